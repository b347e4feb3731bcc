"""The LM head's training loss in row blocks, its gradients taken in the forward pass.

:func:`fused_lm_loss` is the scalar a pre-training step minimises,

    loss = c_hard · mean_w CE(z_s, labels) + c_soft · mean_w D(p_t^τ ‖ p_s^τ),

with ``z = hidden @ embedding.T (+ bias)`` for the student and the teacher and mean_w
the weighted mean over positions. The rows (positions) are taken ``block_rows`` at a
time against the whole vocabulary: each block's logits are computed once, their
softmaxes exactly (no running log-sum-exp), and the gradients with respect to the
student's hidden states, decoder and bias are formed right there, because a scalar
loss with known coefficients fixes every position's cotangent up to one factor. The
backward pass only scales them. Against the vocabulary-sliced head
(:func:`dwt_jax.fused_head.fused_lm_losses`, whose backward pass recomputes every
logit), the student's logits are computed once instead of twice and the teacher's once
instead of twice: a quarter fewer head matmuls for the student, half for the teacher,
and no online-softmax rescaling (docs/methods.md#fused-head). The cost is one
[block_rows, V] block per model instead of a [N, slice] one.

The row blocks take rows strided by the number of blocks (row r·n + i is in block i),
so that a leading axis sharded over devices stays sharded inside every block: each
device works on its own rows and only the decoder's gradient is summed across devices.
Imports only jax (and its sibling :mod:`dwt_jax.fused_head`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax.fused_head import (
    as_beta,
    as_temperature,
    check_divergence,
    log_mixture,
    plogp_ratio,
)


def _softmax_parts(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x − max, exp(x − max), Σ exp(x − max)) over the last axis: one exp pass."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    shifted = x - m
    e = jnp.exp(shifted)
    return shifted, e, jnp.sum(e, axis=-1, keepdims=True)


class SparseRows(NamedTuple):
    """A cached teacher's rows for the fused loss: top-k tempered log-probabilities
    [N, k] (−inf in dropped slots), ids [N, k] (−1 there) and the tail mass [N]."""

    logp: jax.Array
    ids: jax.Array
    tail: jax.Array


def _sparse_kl(shifted_s, e_s, s_s, teacher: SparseRows, c):
    """KL over the k kept tokens and the "other" bucket (docs/methods.md#teacher-caches)
    per row, and ``c ·`` its gradient with respect to the tempered student logits,
    q − P̃, with P̃ the teacher's kept probabilities and its tail r spread over the other
    tokens in proportion to the student's own (r · q_v / q_r). Written as one dense term,
    q · (1 − r/q_r), plus a correction at the k kept ids, so no [rows, V] mask is built:
    the gradient is (dense [rows, V], rows [rows, 1], ids [rows, k], updates [rows, k])
    for the caller to scatter-add."""
    logp_t, ids, tail = teacher
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)
    inv_s = 1.0 / s_s
    q_kept = jnp.where(valid, jnp.take_along_axis(e_s, safe, axis=-1) * inv_s, 0.0)
    log_q_kept = jnp.take_along_axis(shifted_s, safe, axis=-1) - jnp.log(s_s)
    logp_t = logp_t.astype(jnp.float32)
    p_kept = jnp.where(valid, jnp.exp(logp_t), 0.0)
    tail = tail.astype(jnp.float32)
    has_tail = tail > 0
    # q_r = 1 − Σ_S q: where it cancels to noise the tail r is as small, and so is all
    # it weighs (the tail term and the tail's share of the gradient are both ~r).
    q_rest = jnp.maximum(1.0 - q_kept.sum(-1), 1e-30)
    kept = jnp.where(p_kept > 0, p_kept * (logp_t - log_q_kept), 0.0).sum(-1)
    log_tail = jnp.log(jnp.where(has_tail, tail, 1.0))
    rest = jnp.where(has_tail, tail * (log_tail - jnp.log(q_rest)), 0.0)
    ratio = jnp.where(has_tail, tail / q_rest, 0.0)
    dense = (c * (1.0 - ratio))[:, None] * (e_s * inv_s)
    updates = c[:, None] * jnp.where(valid, ratio[:, None] * q_kept - p_kept, 0.0)
    return jnp.maximum(kept + rest, 0.0), dense, safe, updates


def _block(h, embedding, bias, labels, c_hard, c_soft, teacher, tau, divergence, beta):
    """One row block: (the loss's gradient with respect to z_s [R, V], and per row the
    CE, whether the label's logit is the largest, and the divergence).

    Each model's logits get one exp pass; the divergences are written with the shifted
    logits and the sums of their exps (lse = m + log s), so no log-probability array is
    built for the KL and the reverse KL (docs/methods.md#fused-head)."""
    z = jnp.dot(h, embedding.T.astype(h.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    shifted1, e1, s1 = _softmax_parts(z)
    label_shifted = jnp.take_along_axis(shifted1, labels[:, None], axis=-1)[:, 0]
    ce = jnp.log(s1[:, 0]) - label_shifted
    correct = (label_shifted >= 0.0).astype(jnp.float32)
    one_hot = jax.lax.broadcasted_iota(labels.dtype, z.shape, 1) == labels[:, None]
    p1 = e1 * (1.0 / s1)
    dz = c_hard[:, None] * (p1 - one_hot)
    if teacher is None:
        return dz, ce, correct, jnp.zeros_like(ce)
    if isinstance(teacher, SparseRows):
        if isinstance(tau, float) and tau == 1.0:
            shifted_s, e_s, s_s = shifted1, e1, s1
        else:
            shifted_s, e_s, s_s = _softmax_parts(z * (1.0 / tau))
        value, dense, ids, updates = _sparse_kl(shifted_s, e_s, s_s, teacher, c_soft / tau)
        rows = jnp.arange(ids.shape[0])[:, None]
        return (dz + dense).at[rows, ids].add(updates), ce, correct, value
    h_t, e_t, b_t = teacher
    a_t = jnp.dot(h_t, e_t.T.astype(h_t.dtype), preferred_element_type=jnp.float32)
    if b_t is not None:
        a_t = a_t + b_t.astype(jnp.float32)
    if isinstance(tau, float) and tau == 1.0:  # A static τ = 1: p_s^τ is p_s.
        shifted_s, e_s, s_s = shifted1, e1, s1
    else:
        shifted_s, e_s, s_s = _softmax_parts(z * (1.0 / tau))
        a_t = a_t * (1.0 / tau)
    shifted_t, e_tt, s_t = _softmax_parts(a_t)
    q, p = e_s * (1.0 / s_s), e_tt * (1.0 / s_t)
    # log q − log p = (shifted_s − shifted_t) − (log s_s − log s_t).
    log_ratio_sums = (jnp.log(s_s) - jnp.log(s_t))[:, 0]
    if divergence == "kl":  # KL(p ‖ q) = Σ p (shifted_t − shifted_s) + log s_s − log s_t.
        terms = jnp.where(p > 0, p * (shifted_t - shifted_s), 0.0)
        value = terms.sum(-1) + log_ratio_sums
        d_a = q - p
    elif divergence == "reverse_kl":  # KL(q ‖ p), and its gradient q (log q − log p − KL).
        diff = shifted_s - shifted_t
        value = jnp.where(q > 0, q * diff, 0.0).sum(-1) - log_ratio_sums
        d_a = jnp.where(q > 0, q * (diff - (log_ratio_sums + value)[:, None]), 0.0)
    else:  # JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q.
        log_q = shifted_s - jnp.log(s_s)
        log_p = shifted_t - jnp.log(s_t)
        log_m = log_mixture(log_p, log_q, beta)
        aux = plogp_ratio(q, log_q, log_m)
        value = beta * plogp_ratio(p, log_p, log_m) + (1.0 - beta) * aux
        d_a = (1.0 - beta) * jnp.where(q > 0, q * (log_q - log_m - aux[:, None]), 0.0)
    dz = dz + (c_soft / tau)[:, None] * d_a
    return dz, ce, correct, jnp.maximum(value, 0.0)


def _run(
    h,
    embedding,
    bias,
    labels,
    weights,
    coefs,
    teacher,
    tau,
    block_rows,
    divergence,
    beta,
    with_grads,
):
    """The loss and the per-quantity means, and with ``with_grads`` the gradients of
    (h, embedding, bias), all in one scan over the row blocks."""
    rows = h.shape[0]
    blocks = -(-rows // block_rows) if 0 < block_rows < rows else 1
    pad = blocks * -(-rows // blocks) - rows

    def strided_fill(x, fill):  # [rows, ...] -> [blocks, rows / blocks, ...]: row
        # r·blocks + i in block i; ``pad`` rows of ``fill`` at the end.
        if pad:
            x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
        return jnp.swapaxes(x.reshape(-1, blocks, *x.shape[1:]), 0, 1)

    def strided(x):
        return strided_fill(x, 0)

    def unstrided(x):  # The inverse of strided, the padding dropped.
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])[:rows]

    w = weights.astype(jnp.float32)
    total = jnp.maximum(w.sum(), 1e-9)
    xs = [strided(h), strided(labels), strided(coefs[0] * w / total), strided(coefs[1] * w / total)]
    sparse = isinstance(teacher, SparseRows)
    if sparse:  # Padding rows keep no token and no tail: their terms are 0.
        pads = {"logp": -jnp.inf, "ids": -1, "tail": 0.0}
        xs.extend(strided_fill(getattr(teacher, n), pads[n]) for n in SparseRows._fields)
    elif teacher is not None:
        xs.append(strided(teacher[0]))
    carry = ()
    if with_grads:
        carry = (jnp.zeros(embedding.shape, jnp.float32),)
        if bias is not None:
            carry += (jnp.zeros(bias.shape, jnp.float32),)

    def body(carry, x):
        h_b, labels_b, ch_b, cs_b = x[:4]
        if sparse:
            block_teacher = SparseRows(*x[4:7])
        else:
            block_teacher = None if teacher is None else (x[4], teacher[1], teacher[2])
        dz, ce, correct, div = _block(
            h_b, embedding, bias, labels_b, ch_b, cs_b, block_teacher, tau, divergence, beta
        )
        if not with_grads:
            return carry, (ce, correct, div)
        dz_c = dz.astype(h.dtype)
        dh = jnp.dot(dz_c, embedding.astype(h.dtype), preferred_element_type=jnp.float32)
        d_embedding = carry[0] + jnp.dot(dz_c.T, h_b, preferred_element_type=jnp.float32)
        carry = (d_embedding,) if bias is None else (d_embedding, carry[1] + dz.sum(0))
        return carry, (ce, correct, div, dh)

    carry, outs = jax.lax.scan(body, carry, tuple(xs))
    outs = [unstrided(x) for x in outs]
    ce, correct, div = outs[:3]
    means = {"ce": jnp.sum(ce * w) / total, "accuracy": jnp.sum(correct * w) / total}
    loss = coefs[0] * means["ce"]
    if teacher is not None:
        means["divergence"] = jnp.sum(div * w) / total
        loss = loss + coefs[1] * means["divergence"]
    if not with_grads:
        return loss, means, None
    d_bias = None if bias is None else carry[1].astype(bias.dtype)
    return loss, means, (outs[3].astype(h.dtype), carry[0].astype(embedding.dtype), d_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _fused_loss(h, embedding, bias, labels, weights, coefs, teacher, tau, block_rows, div, beta):
    loss, means, _ = _run(
        h, embedding, bias, labels, weights, coefs, teacher, tau, block_rows, div, beta, False
    )
    return loss, means


def _fused_loss_fwd(*args):
    loss, means, grads = _run(*args, True)
    _, _, _, _, weights, coefs, teacher, tau = args[:8]
    return (loss, means), (grads, weights, coefs, teacher, tau)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


def _fused_loss_bwd(block_rows, div, beta, residuals, g):
    (dh, d_embedding, d_bias), weights, coefs, teacher, tau = residuals
    g_loss = g[0].astype(jnp.float32)  # The means are metrics: their cotangents are ignored.
    return (
        (g_loss * dh).astype(dh.dtype),
        (g_loss * d_embedding).astype(d_embedding.dtype),
        None if d_bias is None else (g_loss * d_bias).astype(d_bias.dtype),
        None,
        jnp.zeros_like(weights),
        jnp.zeros_like(coefs),
        None if teacher is None else jax.tree.map(_zero_cotangent, teacher),
        jnp.zeros_like(tau),
    )


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def fused_lm_loss(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    weights: jax.Array,
    *,
    hard_weight: float | jax.Array = 1.0,
    soft_weight: float | jax.Array = 0.0,
    teacher: tuple[jax.Array, jax.Array, jax.Array | None] | SparseRows | None = None,
    temperature: float | jax.Array = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    block_rows: int = 256,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, means)``: the weighted LM loss of the student's (and teacher's) head.

    ``loss = hard_weight · ce + soft_weight · divergence`` where, as weighted means over
    the positions (``weights``, e.g. the masked or target weights):

    - ``ce``: −log softmax(z_s)[label];
    - ``accuracy``: the fraction of positions whose label has the largest logit (ties
      count as correct);
    - ``divergence`` (with a teacher): D(p_t^τ ‖ p_s^τ), not scaled by τ², with D
      ``'kl'``, ``'reverse_kl'`` or ``'jsd'`` (JSD_β, β the teacher's weight in the
      mixture), as :func:`dwt_jax.fused_head.fused_lm_losses` defines them.

    ``means`` holds those three; they are metrics: only ``loss`` is differentiable (in
    ``hidden``, ``embedding`` and ``bias``; the teacher, weights, coefficients and τ are
    constants). Its gradients equal autodiff through the per-position losses (to
    float32 rounding) and are computed in the forward pass, ``block_rows`` rows at a
    time against the whole vocabulary (0: all rows at once); see the module docstring.
    Under ``jax.jit`` a forward-only use (evaluation) does not compute them.

    Args:
      hidden: [..., D] the hidden states at the predicted positions.
      embedding: [V, D] the decoder.
      bias: [V] the decoder bias, or None.
      labels: [...] int token ids in [0, V).
      weights: [...] the positions' weights (0: not predicted).
      hard_weight, soft_weight: the coefficients of ``ce`` and ``divergence``.
      teacher: the teacher's ``(hidden [..., D_t], embedding [V, D_t], bias | None)``,
        or a cached teacher's :class:`SparseRows` ([..., k] and [...]; KL only: the
        divergence over its k kept tokens and one "other" bucket).
      temperature: τ > 0 of the divergence.
      divergence: ``'kl'``, ``'reverse_kl'`` or ``'jsd'`` (static).
      beta: β ∈ (0, 1) of JSD_β (static).
      block_rows: rows per block (static); memory is O(block_rows · V) per model.
    Raises:
      ValueError: for mismatched shapes, an unknown divergence, β outside (0, 1) or a
        negative ``block_rows``.
    """
    divergence, beta = check_divergence(divergence), as_beta(beta)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be an integer >= 0, got {block_rows!r}")
    lead = hidden.shape[:-1]
    if labels.shape != lead or weights.shape != lead:
        raise ValueError(
            f"labels and weights must have shape {lead}, got {labels.shape} and {weights.shape}"
        )
    if embedding.shape[1] != hidden.shape[-1] or (
        bias is not None and bias.shape != embedding.shape[:1]
    ):
        raise ValueError(
            f"embedding [V, {hidden.shape[-1]}] and bias [V] (or None) expected, got "
            f"{embedding.shape} and {None if bias is None else bias.shape}"
        )
    flat_teacher = None
    if isinstance(teacher, SparseRows):
        if divergence != "kl":
            raise ValueError(f"a cached (sparse) teacher takes divergence 'kl', got {divergence!r}")
        flat_teacher = SparseRows(
            *(jax.lax.stop_gradient(x).reshape(-1, *x.shape[len(lead) :]) for x in teacher)
        )
    elif teacher is not None:
        h_t, e_t, b_t = (None if x is None else jax.lax.stop_gradient(x) for x in teacher)
        if h_t.shape[:-1] != lead or e_t.shape[0] != embedding.shape[0]:
            raise ValueError(
                f"the teacher's hidden states [{', '.join(map(str, lead))}, D_t] and "
                f"embedding [{embedding.shape[0]}, D_t] must match the student's, got "
                f"{h_t.shape} and {e_t.shape}"
            )
        flat_teacher = (h_t.reshape(-1, h_t.shape[-1]), e_t, b_t)
    coefs = jax.lax.stop_gradient(jnp.stack([jnp.asarray(hard_weight, jnp.float32),
                                             jnp.asarray(soft_weight, jnp.float32)]))  # fmt: skip
    return _fused_loss(
        hidden.reshape(-1, hidden.shape[-1]),
        embedding,
        bias,
        jnp.asarray(labels, jnp.int32).reshape(-1),
        jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32).reshape(-1)),
        coefs,
        flat_teacher,
        jax.lax.stop_gradient(as_temperature(temperature)),
        block_rows,
        divergence,
        beta,
    )
