"""Sharding of the causal DWT step: on data / FSDP / tensor meshes (grouped-query
attention's K/V heads split over 'tensor') it computes what one device does."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from causal_step_helpers import build_causal_step, run_causal_steps
from dwt_step_helpers import fewer_xla_passes
from flax import traverse_util


@pytest.fixture(scope="module", autouse=True)
def _fast_compilation():
    with fewer_xla_passes():
        yield


@pytest.fixture(scope="module")
def single_device():
    return run_causal_steps(build_causal_step(jax.devices()[:1], (1, 1, 1)))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_causal_dwt_step_matches_single_device(single_device, mesh_shape):
    """Two causal DWT updates (dropout on, a GPT-2 teacher for a Llama student, the
    fused head in three vocabulary slices) give the single-device loss, metrics and
    parameters."""
    built = build_causal_step(jax.devices(), mesh_shape)
    params, history = run_causal_steps(built)
    ref_params, ref_history = single_device
    for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
        for name in ("train/loss", "train/lm_loss", "distill/kl", "grads/global_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=f"{name}@{step}")
    flat, ref_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(ref_params)
    assert flat.keys() == ref_flat.keys()
    # AdamW's first updates are ±lr·g/(|g| + eps): an element whose gradient is within a
    # few eps of 0 moves by a rounding-dependent fraction of lr (3e-3). Measured: the
    # worst element sat at 0.93× of atol 2e-6 with the vocabulary-sliced head and 1.11×
    # with the row-blocked one, ~2e-6 apart between two runs of either. atol 1e-5 is
    # 0.3% of one step's update; the metrics above are held to rtol 2e-5.
    for path, value in flat.items():
        np.testing.assert_allclose(value, ref_flat[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
    assert built[1].jitted._cache_size() == 1  # No recompile on the second step.


def test_causal_step_learns_and_reports(single_device):
    _, history = single_device
    first = history[0]
    assert first["train/loss"] == pytest.approx(
        first["train/lm_loss"] + first["distill/kl"], rel=1e-5
    )
    assert 0.0 < first["train/lm_accuracy"] < 1.0 or first["train/lm_accuracy"] == 0.0
    assert np.log(64) * 0.5 < first["train/lm_loss"] < np.log(64) * 1.5  # Near uniform at init.
