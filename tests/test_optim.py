"""dwt_jax.optim: the learning-rate schedule and the weight-decay mask."""

from __future__ import annotations

import numpy as np
import pytest
from testutil import load_config

from dwt_jax import optim


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(decay):
    config = load_config(None).optim
    config.decay = decay
    config.warmup_steps = 10
    config.learning_rate = 1e-3
    config.end_lr_factor = 0.1
    schedule = optim.learning_rate_schedule(config, num_steps=110)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
    final = 1e-3 if decay == "constant" else 1e-4
    np.testing.assert_allclose(schedule(110), final, rtol=1e-5)
    if decay != "constant":
        assert schedule(60) < schedule(30) < 1e-3


def test_weight_decay_skips_biases_layernorm_and_embeddings():
    params = {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": 0}, "LayerNorm": {"scale": 0}},
            "encoder": {"layer_0": {"intermediate": {"dense": {"kernel": 0, "bias": 0}}}},
        }
    }
    mask = optim.weight_decay_mask(params)
    assert mask["bert"]["encoder"]["layer_0"]["intermediate"]["dense"] == {
        "kernel": True,
        "bias": False,
    }
    assert mask["bert"]["embeddings"] == {
        "word_embeddings": {"embedding": False},
        "LayerNorm": {"scale": False},
    }
