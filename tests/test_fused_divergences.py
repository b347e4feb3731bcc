"""The vocabulary-chunked LM head fused with KL, reverse KL and JSD_β
(``fused_head.fused_lm_losses``): values against the materialised losses and an
independent NumPy computation, hand-written gradients against autodiff of the
materialised reference, the divergences' defining properties, and that no [N, V]
array exists in the fused forward and backward pass."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import losses
from dwt_jax.fused_head import fused_lm_losses, fused_mlm_losses

V, D, D_T = 12, 8, 5  # chunk 3 divides V, chunk 5 does not, 0 is one chunk.
TAU = 1.7
CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


@pytest.fixture(scope="module")
def arrays():
    """Student (hidden [2, 3, D], decoder, bias), teacher (width D_T) and labels."""
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    student = (normal(2, 3, D), normal(V, D, scale=0.8), normal(V, scale=0.5))
    teacher = (normal(2, 3, D_T), normal(V, D_T, scale=1.2), normal(V, scale=0.5))
    labels = jnp.asarray(rng.integers(0, V, size=(2, 3)), jnp.int32)
    cotangents = (normal(2, 3), normal(2, 3))
    return student, teacher, labels, cotangents


def _logits(hidden, decoder, bias):
    logits = hidden @ decoder.T
    return logits if bias is None else logits + bias


_MATERIALISED = {
    "kl": losses.kl_divergence,
    "reverse_kl": losses.reverse_kl,
    "jsd": losses.jensen_shannon,
}


def _materialised(name, student_logits, teacher_logits, tau, beta):
    """Per-position D(p_t^τ ‖ p_s^τ) from the materialised losses (each position its own
    instance, so the per-instance mean is the per-position value)."""
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    extra = {"beta": beta} if name == "jsd" else {}
    per_instance, _ = _MATERIALISED[name](
        student_logits.reshape(-1, 1, vocab),
        teacher_logits.reshape(-1, 1, vocab),
        None,
        temperature=tau,
        scale_by_temperature_squared=False,
        **extra,
    )
    return per_instance.reshape(lead)


def _numpy_divergence(name, student_logits, teacher_logits, tau, beta):
    """The three divergences in float64 NumPy, written out from their definitions."""
    a_s = np.asarray(student_logits, np.float64) / tau
    a_t = np.asarray(teacher_logits, np.float64) / tau
    q = np.exp(a_s - a_s.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.exp(a_t - a_t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)

    def kl(x, y):
        return np.sum(np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0) / y), 0.0), -1)

    if name == "kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@functools.partial(jax.jit, static_argnames=("divergence", "beta", "chunk_size"))
def _fused_and_grads(student, teacher, labels, cotangents, *, divergence, beta, chunk_size):
    """The fused outputs and the gradients of Σ w_ce·ce + Σ w_div·D wrt the student's and
    the teacher's arrays; jitted, and shared by the tests below, so that each setting
    compiles once."""

    def loss(student, teacher):
        out = fused_lm_losses(
            *student, labels, teacher=teacher, temperature=TAU, divergence=divergence,
            beta=beta, chunk_size=chunk_size,
        )  # fmt: skip
        w_ce, w_div = cotangents
        return jnp.sum(w_ce * out["ce"]) + jnp.sum(w_div * out["divergence"]), out

    grads, out = jax.grad(loss, argnums=(0, 1), has_aux=True)(student, teacher)
    return out, grads


def _run(arrays, student=None, teacher=None, **settings):
    fixture_student, fixture_teacher, labels, cotangents = arrays
    return _fused_and_grads(
        fixture_student if student is None else student,
        fixture_teacher if teacher is None else teacher,
        labels,
        cotangents,
        **settings,
    )


# Each divergence with a chunk that divides V (3) and one that does not (5); one chunk (0)
# for JSD_β, whose two passes are the most involved.
SETTINGS = [(*case, chunk) for case in CASES for chunk in (3, 5)] + [("jsd", 0.2, 0)]


@pytest.mark.parametrize(("divergence", "beta", "chunk_size"), SETTINGS)
def test_values_and_gradients_match_the_materialised_reference(
    arrays, divergence, beta, chunk_size
):
    student, teacher, labels, (w_ce, w_div) = arrays
    out, (grads, teacher_grads) = _run(
        arrays, divergence=divergence, beta=beta, chunk_size=chunk_size
    )
    z_s, z_t = _logits(*student), _logits(*teacher)
    want = _materialised(divergence, z_s, z_t, TAU, beta)
    np.testing.assert_allclose(out["divergence"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["divergence"], _numpy_divergence(divergence, z_s, z_t, TAU, beta), rtol=1e-5, atol=1e-6
    )
    assert float(jnp.min(want)) > 1e-3  # Distinct distributions: the check is not 0 == 0.
    np.testing.assert_allclose(out["ce"], losses.token_cross_entropy(z_s, labels), rtol=1e-5)
    # 'kl' stays for the KL only (the name fused_mlm_losses' callers read).
    assert ("kl" in out) == (divergence == "kl")
    if divergence == "kl":
        np.testing.assert_array_equal(out["kl"], out["divergence"])

    def materialised(params):
        z_s = _logits(*params)
        divergence_values = _materialised(divergence, z_s, z_t, TAU, beta)
        ce = losses.token_cross_entropy(z_s, labels)
        return jnp.sum(w_ce * ce) + jnp.sum(w_div * divergence_values)

    for name, got, want in zip(
        ("hidden", "decoder", "bias"), grads, jax.grad(materialised)(student), strict=True
    ):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    # The teacher is a constant.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in teacher_grads)


def _as_student(teacher):
    """A student of width D whose logits equal the (width D_T) teacher's: its hidden
    states are the teacher's padded with zeros, so the extra decoder columns add 0."""
    h_t, e_t, b_t = teacher
    h = jnp.concatenate([h_t, jnp.zeros((*h_t.shape[:-1], D - D_T))], -1)
    e = jnp.concatenate([e_t, jnp.ones((V, D - D_T))], -1)
    return h, e, b_t


@pytest.mark.parametrize(("divergence", "beta"), CASES)
def test_divergence_of_a_distribution_from_itself_is_zero_and_flat(arrays, divergence, beta):
    student = _as_student(arrays[1])
    out, (grads, _) = _run(arrays, student, divergence=divergence, beta=beta, chunk_size=5)
    assert float(jnp.abs(out["divergence"]).max()) < 1e-6
    # A minimum: with the CE's cotangent removed, D's gradient at p_s = p_t vanishes.
    (w_ce, _), labels = arrays[3], arrays[2]
    ce_only = jax.grad(lambda p: jnp.sum(w_ce * losses.token_cross_entropy(_logits(*p), labels)))
    for got, ce_part in zip(grads, ce_only(student), strict=True):
        assert float(jnp.abs(got - ce_part).max()) < 1e-5


def _binary_entropy(beta):
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.8])
def test_jsd_beta_bounds_and_symmetry(arrays, beta):
    student, teacher, _, _ = arrays
    bound = _binary_entropy(beta)
    # Peaked distributions (logits ×30) push JSD_β towards its bound H(β).
    peaked_s = (student[0], student[1] * 30, student[2])
    peaked_t = (teacher[0], teacher[1] * 30, teacher[2])
    for s, t in [(student, teacher), (peaked_s, peaked_t)]:
        out, _ = _run(arrays, s, t, divergence="jsd", beta=beta, chunk_size=5)
        z_s, z_t = _logits(*s) / TAU, _logits(*t) / TAU
        # JSD_β(P ‖ Q) = JSD_{1−β}(Q ‖ P): the teacher in the student's place.
        swapped = _materialised("jsd", z_t, z_s, 1.0, 1 - beta)
        np.testing.assert_allclose(out["divergence"], swapped, rtol=1e-5, atol=1e-6)
        materialised = _materialised("jsd", z_s, z_t, 1.0, beta)
        assert float(jnp.min(materialised)) >= 0.0  # Not clamped, unlike the fused value.
        assert float(jnp.max(out["divergence"])) <= bound * (1 + 1e-6)
    # Disjoint one-hot distributions reach the bound: the student puts all its mass on
    # tokens 0-3, the teacher on token 4 (logits 1e4 there, 0 elsewhere).
    student_hidden = jax.nn.one_hot(jnp.arange(6).reshape(2, 3) % 4, D)
    teacher_hidden = jax.nn.one_hot(jnp.full((2, 3), 4), D_T)
    zero_bias = jnp.zeros((V,))
    disjoint_s = (student_hidden, 1e4 * jnp.eye(V, D), zero_bias)
    disjoint_t = (teacher_hidden, 1e4 * jnp.eye(V, D_T), zero_bias)
    out, _ = _run(arrays, disjoint_s, disjoint_t, divergence="jsd", beta=beta, chunk_size=5)
    np.testing.assert_allclose(out["divergence"], np.full((2, 3), bound), rtol=1e-5)


def test_bad_divergence_names_and_betas_are_refused(arrays):
    student, teacher, labels, _ = arrays
    with pytest.raises(ValueError, match=r"divergence must be one of 'kl', 'reverse_kl', 'jsd'"):
        fused_lm_losses(*student, labels, teacher=teacher, divergence="forward_kl")
    for beta in (0.0, 1.0, -0.5, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"beta .* strictly between 0 and 1"):
            fused_lm_losses(*student, labels, teacher=teacher, divergence="jsd", beta=beta)
        with pytest.raises(ValueError, match=r"beta .* strictly between 0 and 1"):
            losses.jensen_shannon(_logits(*student), _logits(*teacher), None, beta=beta)


def test_no_bias_is_zero_bias_without_a_bias_gradient(arrays):
    (h, e, b), (h_t, e_t, b_t), _, _ = arrays
    zeros = jnp.zeros_like(b)
    settings = {"divergence": "jsd", "beta": 0.2, "chunk_size": 5}
    none_out, (none_grads, _) = _run(arrays, (h, e, None), (h_t, e_t, None), **settings)
    zero_out, (zero_grads, _) = _run(arrays, (h, e, zeros), (h_t, e_t, zeros), **settings)
    for name in ("ce", "correct", "divergence"):
        np.testing.assert_allclose(none_out[name], zero_out[name], rtol=1e-6, atol=1e-7)
    assert none_grads[2] is None
    for got, want in zip(none_grads[:2], zero_grads[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # A non-zero bias does change the values (so the comparison above can fail).
    biased_out, _ = _run(arrays, (h, e, b), (h_t, e_t, b_t), **settings)
    assert float(jnp.abs(biased_out["divergence"] - zero_out["divergence"]).max()) > 1e-3


def test_the_mlm_entry_point_is_the_same_computation(arrays):
    student, teacher, labels, _ = arrays
    settings = {"teacher": teacher, "temperature": TAU, "divergence": "reverse_kl", "beta": 0.3}

    def traced(fn):
        return jax.make_jaxpr(functools.partial(fn, labels=labels, chunk_size=5, **settings))(
            *student
        )

    lm, mlm = traced(fused_lm_losses), traced(fused_mlm_losses)
    assert str(lm) == str(mlm)
    keys = jax.eval_shape(functools.partial(fused_lm_losses, labels=labels, **settings), *student)
    assert set(keys) == {"ce", "correct", "divergence"}


# --- No [N, V] array in the fused forward and backward --------------------------------


def _avals(jaxpr):
    """Every variable's abstract value in a jaxpr and the jaxprs nested in its equations
    (scan bodies, custom-VJP calls, pjit)."""
    for var in (*jaxpr.invars, *jaxpr.constvars):
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def _shapes(fn, *args):
    return {tuple(aval.shape) for aval in _avals(jax.make_jaxpr(fn)(*args).jaxpr)}


def _is_n_by_v(shape, n, vocab):
    size = math.prod(shape)
    return (n in shape and vocab in shape) or (size >= n * vocab and size % (n * vocab) == 0)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_no_n_by_v_array_in_the_fused_forward_and_backward(divergence):
    n, vocab, chunk = 6, 37, 7  # 5 chunks of 7 and one of 2; N, V, D, D_t all distinct.
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(vocab, D)), jnp.float32)
    b = jnp.zeros((vocab,), jnp.float32)
    teacher = (
        jnp.asarray(rng.normal(size=(2, 3, D_T)), jnp.float32),
        jnp.asarray(rng.normal(size=(vocab, D_T)), jnp.float32),
        None,
    )
    labels = jnp.zeros((2, 3), jnp.int32)

    def fused(h, e, b):
        out = fused_lm_losses(
            h, e, b, labels, teacher=teacher, temperature=TAU, divergence=divergence,
            chunk_size=chunk,
        )  # fmt: skip
        return jnp.sum(out["ce"]) + jnp.sum(out["divergence"])

    def materialised(h, e, b):
        z_t = _logits(*teacher)
        per_position = _materialised(divergence, _logits(h, e, b), z_t, TAU, 0.5)
        return jnp.sum(per_position)

    shapes = _shapes(jax.value_and_grad(fused, (0, 1, 2)), h, e, b)
    assert (n, chunk) in shapes  # The walk does see the chunks' [N, C] logits...
    assert not [s for s in shapes if _is_n_by_v(s, n, vocab)], sorted(shapes)
    # ...and would see [N, V] logits: the materialised path has them.
    reference = _shapes(jax.value_and_grad(materialised, (0, 1, 2)), h, e, b)
    assert [s for s in reference if _is_n_by_v(s, n, vocab)]
