"""The LM head's training loss in row blocks with in-forward gradients
(``losses.fused_lm_loss``): its value against an independent float64 NumPy computation,
its gradients against autodiff through the vocabulary-sliced per-position head, uneven
blocks, padding rows, the coefficients, that a forward-only use computes no gradient,
and that no [N, V] array exists when the blocks are smaller than N."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import losses

V, D, D_T = 13, 8, 5
TAU = 1.6
N_SHAPE = (3, 4)  # 12 rows: blocks of 5 (3 blocks, 3 padding rows), 4, 12 and 0.


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(7)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    student = (normal(*N_SHAPE, D), normal(V, D, scale=0.8), normal(V, scale=0.5))
    teacher = (normal(*N_SHAPE, D_T), normal(V, D_T, scale=1.2), normal(V, scale=0.5))
    labels = jnp.asarray(rng.integers(0, V, size=N_SHAPE), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 3, size=N_SHAPE), jnp.float32)  # Zeros too.
    return student, teacher, labels, weights


def _numpy_reference(student, teacher, labels, weights, divergence, beta, c_hard, c_soft):
    """(loss, ce, accuracy, divergence) as weighted means, in float64 from definitions."""
    h, e, b = (np.asarray(x, np.float64) for x in student)
    z = h @ e.T + b
    log_p1 = z - z.max(-1, keepdims=True)
    log_p1 -= np.log(np.exp(log_p1).sum(-1, keepdims=True))
    labels, w = np.asarray(labels), np.asarray(weights, np.float64)
    ce = -np.take_along_axis(log_p1, labels[..., None], -1)[..., 0]
    correct = (np.take_along_axis(z, labels[..., None], -1)[..., 0] >= z.max(-1)).astype(float)

    def mean(x):
        return float((x * w).sum() / w.sum())

    result = {"ce": mean(ce), "accuracy": mean(correct)}
    loss = c_hard * result["ce"]
    if teacher is not None:
        h_t, e_t, b_t = (np.asarray(x, np.float64) for x in teacher)

        def softmax(x):
            x = np.exp(x - x.max(-1, keepdims=True))
            return x / x.sum(-1, keepdims=True)

        q, p = softmax(z / TAU), softmax((h_t @ e_t.T + b_t) / TAU)

        def kl(x, y):
            return (x * np.log(x / y)).sum(-1)

        m = beta * p + (1 - beta) * q
        per_position = {
            "kl": kl(p, q),
            "reverse_kl": kl(q, p),
            "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
        }[divergence]
        result["divergence"] = mean(per_position)
        loss += c_soft * result["divergence"]
    return loss, result


@functools.partial(jax.jit, static_argnames=("divergence", "beta", "block_rows", "teach"))
def _blocked(student, teacher, labels, weights, c_hard, c_soft, *, divergence, beta,
             block_rows, teach):  # fmt: skip
    def loss(student):
        return losses.fused_lm_loss(
            *student, labels, weights, hard_weight=c_hard, soft_weight=c_soft,
            teacher=teacher if teach else None, temperature=TAU, divergence=divergence,
            beta=beta, block_rows=block_rows,
        )  # fmt: skip

    return jax.value_and_grad(loss, has_aux=True)(student)


@functools.partial(jax.jit, static_argnames=("divergence", "beta", "teach"))
def _sliced_grads(student, teacher, labels, weights, c_hard, c_soft, *, divergence, beta, teach):
    """Autodiff of the same loss through the vocabulary-sliced per-position head."""

    def loss(student):
        out = losses.fused_lm_losses(
            *student, labels, teacher=teacher if teach else None, temperature=TAU,
            divergence=divergence, beta=beta, chunk_size=4,
        )  # fmt: skip
        total = c_hard * losses.weighted_mean(out["ce"], weights)
        if teach:
            total = total + c_soft * losses.weighted_mean(out["divergence"], weights)
        return total

    return jax.grad(loss)(student)


SETTINGS = [
    ("kl", 0.5, 5, True),
    ("kl", 0.5, 0, True),
    ("reverse_kl", 0.5, 4, True),
    ("jsd", 0.5, 5, True),
    ("jsd", 0.2, 12, True),
    ("kl", 0.5, 5, False),
]


@pytest.mark.parametrize(("divergence", "beta", "block_rows", "teach"), SETTINGS)
def test_value_matches_numpy_and_gradients_match_autodiff(
    arrays, divergence, beta, block_rows, teach
):
    student, teacher, labels, weights = arrays
    c_hard, c_soft = 0.7, 1.9
    settings = {"divergence": divergence, "beta": beta, "teach": teach}
    (loss, means), grads = _blocked(
        student, teacher, labels, weights, c_hard, c_soft, block_rows=block_rows, **settings
    )
    expected_loss, expected = _numpy_reference(
        student, teacher if teach else None, labels, weights, divergence, beta, c_hard, c_soft
    )
    np.testing.assert_allclose(float(loss), expected_loss, rtol=2e-5, atol=1e-6)
    assert set(means) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(means[name]), value, rtol=2e-5, atol=1e-6)
    reference = _sliced_grads(student, teacher, labels, weights, c_hard, c_soft, **settings)
    for got, want in zip(grads, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-6)


def test_zero_weight_rows_get_no_gradient_and_do_not_count(arrays):
    student, teacher, labels, weights = arrays
    weights = weights.at[0].set(0.0)
    (loss, _), grads = _blocked(
        student, teacher, labels, weights, 1.0, 1.0, divergence="kl", beta=0.5, block_rows=5,
        teach=True,
    )  # fmt: skip
    assert not np.any(np.asarray(grads[0][0]))
    garbage = (student[0].at[0].set(1e4), *student[1:])  # Rows that do not count.
    (loss2, _), _ = _blocked(
        garbage, teacher, labels, weights, 1.0, 1.0, divergence="kl", beta=0.5, block_rows=5,
        teach=True,
    )  # fmt: skip
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_gradients_scale_with_the_cotangent_and_the_means_are_metrics(arrays):
    student, teacher, labels, weights = arrays

    def scaled(s, factor):
        loss, means = losses.fused_lm_loss(
            *s, labels, weights, soft_weight=1.0, teacher=teacher, block_rows=5
        )
        # The means carry no gradient: adding them changes nothing.
        return factor * loss + jax.lax.stop_gradient(0.0) + 0.0 * means["ce"]

    g1 = jax.grad(scaled)(student, 1.0)
    g3 = jax.grad(scaled)(student, 3.0)
    for a, b in zip(g1, g3, strict=True):
        np.testing.assert_allclose(3.0 * np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _dot_count(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _dot_count(inner)
    return count


def test_a_forward_only_use_computes_no_gradient(arrays):
    student, teacher, labels, weights = arrays

    def forward(h, e, b):
        return losses.fused_lm_loss(h, e, b, labels, weights, teacher=teacher, block_rows=5)[0]

    forward_dots = _dot_count(jax.make_jaxpr(forward)(*student).jaxpr)
    training_dots = _dot_count(jax.make_jaxpr(jax.value_and_grad(forward))(*student).jaxpr)
    assert forward_dots == 2  # The student's and the teacher's logits.
    assert training_dots == 4  # ...and, in the forward pass, dL/dh and dL/dE.


def _shapes(jaxpr):
    for var in (*jaxpr.invars, *jaxpr.constvars):
        yield tuple(var.aval.shape)
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(var.aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_no_n_by_v_array_with_blocks_smaller_than_n(arrays):
    student, teacher, labels, weights = arrays
    n = math.prod(N_SHAPE)

    def train(h, e, b, block_rows):
        return losses.fused_lm_loss(
            h, e, b, labels, weights, soft_weight=1.0, teacher=teacher, block_rows=block_rows
        )[0]

    blocked = set(_shapes(jax.make_jaxpr(jax.grad(functools.partial(train, block_rows=4)))(
        *student).jaxpr))  # fmt: skip
    assert (4, V) in blocked  # The walk sees the blocks' [rows, V] logits...
    assert (n, V) not in blocked and (3, 4, V) not in blocked
    whole = set(_shapes(jax.make_jaxpr(jax.grad(functools.partial(train, block_rows=0)))(
        *student).jaxpr))  # fmt: skip
    assert (n, V) in whole  # ...and one block of all rows does have them.


def test_bad_arguments_are_refused(arrays):
    student, teacher, labels, weights = arrays
    with pytest.raises(ValueError, match="block_rows"):
        losses.fused_lm_loss(*student, labels, weights, block_rows=-1)
    with pytest.raises(ValueError, match="weights"):
        losses.fused_lm_loss(*student, labels, weights[:1], block_rows=4)
    with pytest.raises(ValueError, match="divergence"):
        losses.fused_lm_loss(*student, labels, weights, teacher=teacher, divergence="mse")
    with pytest.raises(ValueError, match="teacher"):
        losses.fused_lm_loss(*student, labels, weights, teacher=(teacher[0][:1], *teacher[1:]))
