"""Several teachers per token in pre-training (dwt_jax.distill.teacher_mix): each
weighting rule against an independent NumPy computation, the mixed loss against its
definition, and DWT choosing the mixed path for several or cached teachers."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax.distill.teacher_mix import mixed_lm_loss, token_weights
from dwt_jax.sparse_loss import RowTerms, topk_targets

N, K = 40, 3


def _terms(seed: int, k: int = K) -> RowTerms:
    rng = np.random.default_rng(seed)
    return RowTerms(
        ce=jnp.asarray(rng.uniform(0, 5, N), jnp.float32),
        correct=jnp.zeros(N),
        uncertainty=jnp.asarray(rng.uniform(0, 1, N), jnp.float32),
        divergence=jnp.asarray(rng.uniform(0, 2, (k, N)), jnp.float32),
        teacher_ce=jnp.asarray(rng.uniform(0, 6, (k, N)), jnp.float32),
    )


def test_uniform_and_fixed():
    terms = _terms(0)
    np.testing.assert_allclose(token_weights("uniform", terms, [1, 2, 3]), np.full((K, N), 1 / K))
    fixed = np.asarray(token_weights("fixed", terms, [1, 2, 3], (1.0, 3.0, 0.0)))
    np.testing.assert_allclose(fixed, np.broadcast_to([[0.25], [0.75], [0.0]], (K, N)))


def test_ca_mkd_matches_numpy():
    terms = _terms(1)
    ce = np.asarray(terms.teacher_ce, np.float64)
    soft = np.exp(ce - ce.max(0)) / np.exp(ce - ce.max(0)).sum(0)
    expected = (1 - soft) / (K - 1)
    ours = np.asarray(token_weights("ca_mkd", terms, [1, 2, 3]))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # The teacher that is right more confidently weighs more.
    assert np.all(np.argmax(ours, 0) == np.argmin(ce, 0))


def _numpy_adoption(u: np.ndarray, sizes: list[float]) -> np.ndarray:
    """Dynamic KD's soft-instance adoption written from its definition: the target
    1 − u on the size axis scaled to [0, 1], linear between the two teachers around it."""
    s = (np.asarray(sizes, np.float64) - min(sizes)) / (max(sizes) - min(sizes))
    order = np.argsort(s)
    w = np.zeros((len(sizes), u.size))
    for j, target in enumerate(1 - u):
        for a, b in itertools.pairwise(order):
            if s[a] <= target <= s[b]:
                frac = (target - s[a]) / (s[b] - s[a])
                w[:, j] = 0
                w[a, j], w[b, j] = 1 - frac, frac
                break
    return w


@pytest.mark.parametrize("sizes", [[100, 400], [300, 100, 200]])
def test_dynamic_matches_numpy(sizes):
    terms = _terms(2, len(sizes))
    ours = np.asarray(token_weights("dynamic", terms, sizes))
    expected = _numpy_adoption(np.asarray(terms.uncertainty, np.float64), sizes)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # Confident tokens (low u) lean on the largest teacher, uncertain ones on the smallest.
    u = np.asarray(terms.uncertainty)
    largest, smallest = int(np.argmax(sizes)), int(np.argmin(sizes))
    assert np.all(ours[largest, u < 0.05] > 0.9) and np.all(ours[smallest, u > 0.95] > 0.9)


def test_mixed_loss_is_the_weighted_sum_of_divergences():
    rng = np.random.default_rng(3)
    B, L, D, V = 2, 5, 8, 32
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (B, L)), jnp.float32).at[0, 0].set(1.0)
    batch = {"targets": targets, "target_weights": weights}
    student = {"lm_hidden": hidden, "lm_decoder": (emb, None)}
    teacher_logits = [jnp.asarray(rng.normal(size=(B * L, V)) * 2, jnp.float32) for _ in range(2)]
    cached = [
        topk_targets(z, targets.reshape(-1), 8, temperature=1.5)._asdict() for z in teacher_logits
    ]
    teachers = [
        {"sparse_targets": type(topk_targets(teacher_logits[0], targets.reshape(-1), 1))(
            *(x.reshape(B, L, *x.shape[1:]) for x in c.values())
        )}
        for c in cached
    ]  # fmt: skip
    loss, hard, soft, metrics = mixed_lm_loss(
        student, teachers, batch, hard_weight=0.7, soft_weight=2.0, temperature=1.5,
        divergence="kl", beta=0.5, block_rows=4, rule="ca_mkd", sizes=[1, 2],
    )  # fmt: skip
    # By hand, in NumPy: CE, the bucketed KL of each teacher, CA-MKD weights.
    z = np.asarray(hidden.reshape(-1, D) @ emb.T, np.float64)
    y, w = np.asarray(targets).reshape(-1), np.asarray(weights).reshape(-1)
    log_q1 = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    ce = -log_q1[np.arange(y.size), y]
    zt = z / 1.5
    log_q = zt - (
        np.log(np.exp(zt - zt.max(-1, keepdims=True)).sum(-1, keepdims=True))
        + zt.max(-1, keepdims=True)
    )
    kls, tce = [], []
    for c in cached:
        ids, lp, tail = (
            np.asarray(c["ids"]),
            np.asarray(c["logp"], np.float64),
            np.asarray(c["tail"], np.float64),
        )
        q = np.exp(log_q)
        q_kept = np.take_along_axis(q, ids, -1)
        q_rest = 1 - q_kept.sum(-1)
        p = np.exp(lp)
        kls.append((p * (lp - np.log(q_kept))).sum(-1) + tail * np.log(tail / q_rest))
        tce.append(-np.asarray(c["label_logp"], np.float64))
    tce = np.stack(tce)
    soft_ca = np.exp(tce - tce.max(0)) / np.exp(tce - tce.max(0)).sum(0)
    w_kn = 1 - soft_ca  # (1 - softmax) / (K - 1) with K = 2.
    expected_hard = (ce * w).sum() / w.sum()
    expected_soft = ((w_kn * np.stack(kls)).sum(0) * w).sum() / w.sum()
    np.testing.assert_allclose(hard, expected_hard, rtol=1e-5)
    np.testing.assert_allclose(soft, expected_soft, rtol=1e-4)
    np.testing.assert_allclose(loss, 0.7 * expected_hard + 2.0 * expected_soft, rtol=1e-4)
    np.testing.assert_allclose(
        metrics["distill/weight0"] + metrics["distill/weight1"], 1.0, rtol=1e-6
    )
    np.testing.assert_allclose(metrics["distill/weight0"], (w_kn[0] * w).sum() / w.sum(), rtol=1e-5)
    shares = sum(float(metrics[f"distill/u{b}_share"]) for b in range(4))
    assert math.isclose(shares, 1.0, rel_tol=1e-6)
    # Differentiable in the student only, with finite gradients.
    grad = jax.grad(
        lambda h: mixed_lm_loss(
            {"lm_hidden": h, "lm_decoder": (emb, None)}, teachers, batch, hard_weight=1.0,
            soft_weight=1.0, temperature=1.5, divergence="jsd", beta=0.5, block_rows=3,
            rule="dynamic", sizes=[1, 2],
        )[0]
    )(hidden)  # fmt: skip
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0


def test_unknown_rule_is_a_value_error():
    with pytest.raises(ValueError, match="unknown"):
        token_weights("best", _terms(0), [1, 2, 3])
