"""Decoder pre-training end to end, through the CLI as a user starts it:
configs/causal.py:smoke's pipeline (a Llama teacher, the larger student with DWT,
the student alone) and its summary; a causal DWT run killed at random points and
restarted ends bitwise equal to the uninterrupted one; the held-out bits per byte."""

from __future__ import annotations

import json
import math
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from kill_helpers import assert_same_state, deterministic_metrics, interrupted_run, run

from dwt_jax.metrics import read_metrics
from dwt_jax.objectives import CLM

STEPS = 12
ARGS = [
    "--config=configs/causal.py:smoke",
    f"--config.train.num_steps={STEPS}",
    "--config.teacher.num_steps=6",
    "--config.train.eval_every=4",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
    "--config.log.tensorboard=False",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("causal_pipeline"))
    result = run(ARGS, workdir, data_cache_dir)
    return workdir, result


def test_pipeline_trains_teacher_student_and_baseline(pipeline):
    workdir, result = pipeline
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == {"teacher", "student", "baseline"}
    for row in summary.values():
        assert math.isfinite(row["eval/loss"]) and row["eval/loss"] > 0
        assert row["eval/perplexity"] == pytest.approx(math.exp(row["eval/loss"]), rel=1e-6)
        # Bits per byte: nats per token / ln 2 / bytes per token, a few bytes per token.
        bytes_per_token = row["eval/loss"] / (math.log(2) * row["eval/bits_per_byte"])
        assert 1.0 < bytes_per_token < 8.0
    assert "bits/byte" in result.stdout and "eval loss" in result.stdout
    student = read_metrics(os.path.join(workdir, "student"))
    trained = [line for line in student if "distill/kl" in line]
    assert trained and all(line["distill/kl"] >= 0 for line in trained)
    assert all("train/lm_loss" in line for line in trained)
    baseline = [
        line for line in read_metrics(os.path.join(workdir, "baseline")) if "train/loss" in line
    ]
    assert baseline and not any("distill/kl" in line for line in baseline)
    with open(os.path.join(workdir, "student", "config.json")) as f:
        assert json.load(f)["model"]["family"] == "llama"


def test_causal_run_killed_and_restarted_ends_bitwise_equal(pipeline, data_cache_dir, tmp_path):
    """The pipeline's student stage, run alone from the same teacher and stopped by
    SIGKILL (also while a checkpoint is written) and SIGTERM: the same parameters,
    optimiser state and metrics."""
    reference, _ = pipeline
    args = [
        *ARGS,
        f"--config.teacher.workdirs=('{os.path.join(reference, 'teacher')}',)",
        "--config.baseline.enabled=False",
    ]
    workdir = str(tmp_path / "killed")
    plan = [(signal.SIGKILL, "saving"), (signal.SIGTERM, "step"), (signal.SIGKILL, "step")]
    endings = interrupted_run(args, workdir, workdir, data_cache_dir, plan, seed=3)
    assert len(endings) >= 3, endings
    assert_same_state(os.path.join(reference, "student"), workdir, STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(
        os.path.join(reference, "student")
    )


def test_bits_per_byte_against_numpy():
    """The eval sums of the causal objective against a NumPy computation on logits."""
    rng = np.random.default_rng(0)
    B, L, D, V = 2, 5, 4, 9
    hidden = rng.normal(size=(B, L, D)).astype(np.float32)
    decoder = rng.normal(size=(V, D)).astype(np.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    weights = (rng.random((B, L)) < 0.7).astype(np.float32)
    bytes_per_token = rng.integers(0, 5, V).astype(np.float32)
    outputs = {"lm_hidden": jnp.asarray(hidden), "lm_decoder": (jnp.asarray(decoder), None)}
    batch = {"targets": jnp.asarray(targets), "target_weights": jnp.asarray(weights)}
    sums = CLM.eval_sums(outputs, batch, jnp.asarray(bytes_per_token))
    metrics = CLM.eval_metrics({k: float(v) for k, v in sums.items()}, "eval")

    logits = hidden @ decoder.T
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    total_nll = (nll * weights).sum()
    total_bytes = (bytes_per_token[targets] * weights).sum()
    assert metrics["eval/loss"] == pytest.approx(total_nll / weights.sum(), rel=1e-5)
    assert metrics["eval/bits_per_byte"] == pytest.approx(
        total_nll / (math.log(2) * total_bytes), rel=1e-5
    )
    correct = (logits.argmax(-1) == targets) * weights
    assert metrics["eval/accuracy"] == pytest.approx(correct.sum() / weights.sum(), rel=1e-6)
