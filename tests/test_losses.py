"""dwt_jax.losses: MLM cross-entropy and accuracy against NumPy, and their masking."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import losses


def _numpy_ce(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(3, 5)).astype(np.int32)
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    return logits, labels, weights


def test_cross_entropy_matches_numpy(batch):
    logits, labels, weights = batch
    per_instance, scalar = losses.mlm_cross_entropy(logits, labels, weights)
    ce = _numpy_ce(logits, labels)
    expected_per_instance = (ce * weights).sum(-1) / weights.sum(-1)
    expected_scalar = (ce * weights).sum() / weights.sum()
    np.testing.assert_allclose(per_instance, expected_per_instance, rtol=1e-5)
    np.testing.assert_allclose(scalar, expected_scalar, rtol=1e-5)


def test_padded_positions_contribute_nothing(batch):
    logits, labels, weights = batch
    _, scalar = losses.mlm_cross_entropy(logits, labels, weights)
    garbage_logits = np.where(weights[..., None] > 0, logits, 1e4 * np.sign(logits))
    garbage_labels = np.where(weights > 0, labels, 7)
    _, scalar_garbage = losses.mlm_cross_entropy(garbage_logits, garbage_labels, weights)
    np.testing.assert_allclose(scalar, scalar_garbage, rtol=1e-6)


def test_perfect_prediction_has_zero_loss_and_full_accuracy():
    labels = np.array([[1, 2, 3]], np.int32)
    logits = 100.0 * np.eye(5, dtype=np.float32)[labels]
    weights = np.ones((1, 3), np.float32)
    _, loss = losses.mlm_cross_entropy(logits, labels, weights)
    _, acc = losses.mlm_accuracy(logits, labels, weights)
    assert float(loss) < 1e-6
    assert float(acc) == 1.0


def test_uniform_logits_give_log_vocab():
    logits = jnp.zeros((2, 4, 37))
    labels = jnp.zeros((2, 4), jnp.int32)
    _, loss = losses.mlm_cross_entropy(logits, labels, jnp.ones((2, 4)))
    np.testing.assert_allclose(loss, np.log(37), rtol=1e-6)


def test_accuracy_counts_only_weighted_positions(batch):
    logits, labels, weights = batch
    per_instance, scalar = losses.mlm_accuracy(logits, labels, weights)
    correct = (logits.argmax(-1) == labels).astype(np.float32)
    np.testing.assert_allclose(scalar, (correct * weights).sum() / weights.sum())
    np.testing.assert_allclose(per_instance, (correct * weights).sum(-1) / weights.sum(-1))
