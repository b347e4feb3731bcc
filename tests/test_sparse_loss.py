"""The top-k teacher targets and the bucketed divergences (dwt_jax.sparse_loss): the full
divergences at k = V, an independent NumPy formula at k < V, the chain-rule bound, and
the row-blocked terms against a direct computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import losses
from dwt_jax.sparse_loss import (
    DenseTeacher,
    SparseTargets,
    lm_teacher_terms,
    sparse_divergence,
    topk_targets,
)

N, V = 12, 64
FULL = {"kl": losses.kl_divergence, "reverse_kl": losses.reverse_kl, "jsd": losses.jensen_shannon}


def _logits(seed: int, scale: float = 3.0, shape=(N, V)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_vocabulary_equals_the_full_divergence(divergence, tau):
    student, teacher = _logits(0), _logits(1)
    labels = jnp.arange(N) % V
    targets = topk_targets(teacher, labels, V, temperature=tau)
    assert float(jnp.max(targets.tail)) == 0.0
    extra = {"beta": 0.3} if divergence == "jsd" else {}

    def sparse(s):
        return sparse_divergence(s, targets, temperature=tau, divergence=divergence, **extra).mean()

    def full(s):
        return FULL[divergence](
            s, teacher, None, temperature=tau, scale_by_temperature_squared=False, **extra
        )[1]

    np.testing.assert_allclose(sparse(student), full(student), rtol=1e-5, atol=1e-6)
    g_sparse, g_full = jax.grad(sparse)(student), jax.grad(full)(student)
    assert np.all(np.isfinite(g_sparse))
    np.testing.assert_allclose(g_sparse, g_full, rtol=1e-4, atol=1e-6)


def _numpy_bucket_kl(student: np.ndarray, teacher: np.ndarray, k: int) -> np.ndarray:
    """KL over the top-k of the teacher and one 'other' bucket, written independently."""
    log_p, log_q = (
        _log_softmax(teacher.astype(np.float64)),
        _log_softmax(student.astype(np.float64)),
    )
    out = []
    for lp, lq in zip(log_p, log_q, strict=True):
        top = np.argsort(-lp)[:k]
        rest = np.setdiff1d(np.arange(lp.size), top)
        p, q = np.exp(lp), np.exp(lq)
        r, qr = p[rest].sum(), q[rest].sum()
        out.append(np.sum(p[top] * (lp[top] - lq[top])) + (r * np.log(r / qr) if r > 0 else 0.0))
    return np.asarray(out)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_top_k_kl_matches_numpy(k):
    student, teacher = _logits(2), _logits(3)
    targets = topk_targets(teacher, jnp.zeros(N, jnp.int32), k)
    ours = sparse_divergence(student, targets)
    np.testing.assert_allclose(
        ours, _numpy_bucket_kl(np.asarray(student), np.asarray(teacher), k), rtol=1e-5, atol=1e-6
    )


def test_top_k_kl_is_below_the_full_kl_by_the_tail_term():
    """KL − KL_k = r·KL(p_t(·|tail) ‖ q(·|tail)) ≥ 0 (the chain rule), checked at k = 32."""
    k = 32
    student, teacher = _logits(4, 2.0, (N, 128)), _logits(5, 2.0, (N, 128))
    targets = topk_targets(teacher, jnp.zeros(N, jnp.int32), k)
    sparse = np.asarray(sparse_divergence(student, targets), np.float64)
    full = np.asarray(
        losses.kl_divergence(student, teacher, None, scale_by_temperature_squared=False)[0]
    )
    log_p = _log_softmax(np.asarray(teacher, np.float64))
    log_q = _log_softmax(np.asarray(student, np.float64))
    gap = []
    for lp, lq in zip(log_p, log_q, strict=True):
        rest = np.argsort(-lp)[k:]
        p, q = np.exp(lp[rest]), np.exp(lq[rest])
        r = p.sum()
        gap.append(r * np.sum(p / r * np.log((p / r) / (q / q.sum()))))
    assert np.all(full - sparse >= -1e-5)
    np.testing.assert_allclose(full - sparse, gap, rtol=1e-3, atol=2e-5)


def test_tail_mass_and_top_p():
    teacher = _logits(6)
    targets = topk_targets(teacher, jnp.zeros(N, jnp.int32), 16, top_p=0.5)
    p = np.exp(np.asarray(targets.logp))
    kept = np.asarray(targets.ids) >= 0
    np.testing.assert_allclose(p.sum(-1) + np.asarray(targets.tail), 1.0, atol=1e-5)
    mass = np.where(kept, p, 0).sum(-1)
    assert np.all(kept[:, 0]) and np.all((mass >= 0.5) | kept.all(-1))
    # The fewest: without the last kept token the mass is below top_p.
    last = kept.sum(-1) - 1
    without_last = mass - p[np.arange(N), last]
    assert np.all((without_last < 0.5) | (last == 0))
    assert np.all(np.isneginf(np.asarray(targets.logp)[~kept]))


def test_label_log_prob_is_at_temperature_one():
    teacher = _logits(7)
    labels = jnp.arange(N) % V
    targets = topk_targets(teacher, labels, 4, temperature=3.0)
    expected = _log_softmax(np.asarray(teacher, np.float64))[np.arange(N), np.asarray(labels)]
    np.testing.assert_allclose(targets.label_logp, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_rows", [5, 256])
def test_row_blocked_terms_match_a_direct_computation(block_rows):
    rng = np.random.default_rng(8)
    D = 16
    h = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)) * 0.1, jnp.float32)
    h_t = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    emb_t = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, size=N), jnp.int32)
    z_t = h_t @ emb_t.T
    cached = topk_targets(z_t, labels, 8, temperature=2.0)
    teachers = [DenseTeacher(h_t, emb_t, None), cached]

    def blocked(h):
        terms = lm_teacher_terms(
            h, emb, bias, labels, teachers, temperature=2.0, block_rows=block_rows
        )
        return terms.ce.sum() + terms.divergence.sum(), terms

    def direct(h):
        z = h @ emb.T + bias
        ce = -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], -1)[:, 0]
        dense = losses.kl_divergence(
            z, z_t, None, temperature=2.0, scale_by_temperature_squared=False
        )[0]
        sparse = sparse_divergence(z, cached, temperature=2.0)
        return ce.sum() + dense.sum() + sparse.sum(), (ce, dense, sparse, z)

    (value, terms), grad = jax.value_and_grad(blocked, has_aux=True)(h)
    (value_ref, (ce, dense, sparse, z)), grad_ref = jax.value_and_grad(direct, has_aux=True)(h)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms.ce, ce, rtol=1e-5)
    np.testing.assert_allclose(terms.divergence[0], dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.divergence[1], sparse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.correct, (jnp.argmax(z, -1) == labels).astype(jnp.float32))
    entropy = -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), -1)
    np.testing.assert_allclose(terms.uncertainty, entropy / np.log(V), rtol=1e-5)
    teacher_ce = -jnp.take_along_axis(jax.nn.log_softmax(z_t), labels[:, None], -1)[:, 0]
    np.testing.assert_allclose(terms.teacher_ce[0], teacher_ce, rtol=1e-5)
    np.testing.assert_allclose(terms.teacher_ce[1], teacher_ce, rtol=1e-5)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="k=0"):
        topk_targets(_logits(0), jnp.zeros(N, jnp.int32), 0)
    with pytest.raises(ValueError, match="top_p"):
        topk_targets(_logits(0), jnp.zeros(N, jnp.int32), 4, top_p=0.0)
    targets = SparseTargets(
        jnp.zeros((N, 1)), jnp.zeros((N, 1), jnp.int32), jnp.zeros(N), jnp.zeros(N)
    )
    with pytest.raises(ValueError, match="divergence"):
        sparse_divergence(_logits(0), targets, divergence="mse")


@pytest.mark.parametrize(("k", "top_p", "tau"), [(V, 1.0, 1.0), (8, 0.9, 2.0), (1, 1.0, 1.0)])
def test_the_fused_head_with_cached_rows_matches_autodiff(k, top_p, tau):
    """``losses.fused_lm_loss`` with a cached teacher (its hand-written gradient q − P̃)
    against autodiff through :func:`lm_teacher_terms`: values and gradients."""
    from dwt_jax.fused_loss import SparseRows

    rng = np.random.default_rng(9)
    D = 16
    h = jnp.asarray(rng.normal(size=(N + 1, D)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(V, D)) * 0.5, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(V,)) * 0.1, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, N + 1), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, N + 1), jnp.float32).at[0].set(1.0)
    cached = topk_targets(_logits(10, 2.0, (N + 1, V)), labels, k, temperature=tau, top_p=top_p)

    def fused(h, emb):
        rows = SparseRows(cached.logp, cached.ids, cached.tail)
        return losses.fused_lm_loss(
            h, emb, bias, labels, weights, hard_weight=0.7, soft_weight=1.3, teacher=rows,
            temperature=tau, block_rows=5,
        )[0]  # fmt: skip

    def reference(h, emb):
        terms = lm_teacher_terms(h, emb, bias, labels, [cached], temperature=tau, block_rows=5)
        return 0.7 * losses.weighted_mean(terms.ce, weights) + 1.3 * losses.weighted_mean(
            terms.divergence[0], weights
        )

    value, grads = jax.value_and_grad(fused, argnums=(0, 1))(h, emb)
    value_ref, grads_ref = jax.value_and_grad(reference, argnums=(0, 1))(h, emb)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
