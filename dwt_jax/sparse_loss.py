"""Top-k ("sparse") teacher targets, and the LM loss against one or several teachers per
predicted token, in row blocks (docs/methods.md#teacher-caches,
docs/methods.md#several-teachers-in-pre-training).

A cached teacher keeps, per predicted position, its top-k tempered log-probabilities
``log p_t^τ(i)``, their token ids ``S`` and the mass outside them, ``r = Σ_{i∉S} p_t^τ(i)``.
The divergence is taken over k + 1 buckets — the k kept tokens and one "other" bucket —
with the student normalised over the *full* vocabulary (its "other" bucket is
``q_r = Σ_{i∉S} q(i)``, never a renormalisation over S):

    KL_k(P ‖ Q) = Σ_{i∈S} p(i)·log(p(i)/q(i)) + r·log(r/q_r)

(reverse KL and JSD_β are the same divergences over the same buckets). With k = V the
buckets are the vocabulary and KL_k is the full KL. For k < V merging tokens into one
bucket can only lose information (the log-sum inequality), and the chain rule says by
how much: ``KL − KL_k = r · KL(p_t(·|tail) ‖ q(·|tail)) ≥ 0``.

Both masses outside S are summed from the excluded entries, not taken as 1 − Σ_S
(which cancels to noise when S holds nearly all the mass). Slots a top-p cut drops
carry id −1 and log-probability −inf and count in the tail.

:func:`lm_teacher_terms` is the row-blocked loss a pre-training step minimises when a
teacher is cached or there are several: per row the student's cross-entropy, accuracy,
normalised uncertainty and, per teacher, the divergence and the teacher's
cross-entropy on the true token (what CA-MKD weighs by). Each row block's logits are
recomputed in the backward pass (``jax.checkpoint``), so memory holds one
[block_rows, V] block, not [N, V]. Imports only jax (and :mod:`dwt_jax.fused_head`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dwt_jax.fused_head import as_beta, check_divergence, log_mixture, plogp_ratio


class SparseTargets(NamedTuple):
    """A cached teacher's targets for N positions: ``logp`` float [N, k] (tempered, −inf
    in dropped slots), ``ids`` int32 [N, k] (−1 in dropped slots), ``tail`` float [N]
    (the mass outside the kept ids) and ``label_logp`` float [N] (log p_t(y) at τ = 1,
    for teacher weighting)."""

    logp: jax.Array
    ids: jax.Array
    tail: jax.Array
    label_logp: jax.Array


class DenseTeacher(NamedTuple):
    """An online teacher for N positions: hidden states [N, D], its decoder [V, D] and
    bias [V] or None; its logits are computed block by block."""

    hidden: jax.Array
    embedding: jax.Array
    bias: jax.Array | None


def _masked_membership(ids: jax.Array, vocab: int) -> jax.Array:
    """bool [N, V]: token v is among row n's kept ids (slots with id −1 are not)."""
    valid = ids >= 0
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, jnp.where(valid, ids, 0)].max(valid)


def _log_rest(z: jax.Array, member: jax.Array) -> jax.Array:
    """log Σ_{v ∉ member} exp(z_v) per row; −inf (with a finite gradient) where every v
    is a member."""
    any_rest = jnp.any(~member, axis=-1)
    masked = jnp.where(member | ~any_rest[:, None], -jnp.inf, z)
    masked = jnp.where(any_rest[:, None], masked, 0.0)  # A safe row where nothing is left.
    return jnp.where(any_rest, jax.nn.logsumexp(masked, axis=-1), -jnp.inf)


def topk_targets(
    logits: jax.Array,
    labels: jax.Array,
    k: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> SparseTargets:
    """A teacher's top-k targets from its logits [N, V] (τ applied before the top-k).

    ``top_p`` < 1 keeps, of the k, the fewest most likely tokens whose mass reaches
    ``top_p`` (at least one); the others join the tail."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be in [1, {logits.shape[-1]}] (the vocabulary)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    z = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(z / temperature, axis=-1)
    top, ids = jax.lax.top_k(logp, k)
    keep = jnp.ones(top.shape, bool)
    if top_p < 1.0:
        p = jnp.exp(top)
        keep = (jnp.cumsum(p, axis=-1) - p) < top_p
    member = _masked_membership(jnp.where(keep, ids, -1), z.shape[-1])
    tail = jnp.exp(_log_rest(logp, member))
    label_logp = jnp.take_along_axis(
        jax.nn.log_softmax(z, axis=-1), labels[:, None].astype(jnp.int32), axis=-1
    )[:, 0]
    return SparseTargets(
        jnp.where(keep, top, -jnp.inf), jnp.where(keep, ids, -1).astype(jnp.int32), tail, label_logp
    )


def _bucket_divergence(
    log_p: jax.Array, log_q: jax.Array, divergence: str, beta: float
) -> jax.Array:
    """D(P ‖ Q) per row over the last axis, from log-probabilities (0·log 0 = 0)."""
    if divergence == "kl":
        return plogp_ratio(jnp.exp(log_p), log_p, log_q)
    if divergence == "reverse_kl":
        return plogp_ratio(jnp.exp(log_q), log_q, log_p)
    # A bucket empty in both (the "other" one at k = V) gets a finite stand-in, so the
    # mixture's gradient there is 0, not NaN; both masses are 0, so its terms are 0.
    empty = jnp.isneginf(log_p) & jnp.isneginf(log_q)
    log_m = log_mixture(jnp.where(empty, 0.0, log_p), jnp.where(empty, 0.0, log_q), beta)
    return beta * plogp_ratio(jnp.exp(log_p), log_p, log_m) + (1.0 - beta) * plogp_ratio(
        jnp.exp(log_q), log_q, log_m
    )


def sparse_divergence(
    student_logits: jax.Array,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
) -> jax.Array:
    """D(P_k ‖ Q_k) per position [N] over the k kept tokens and the "other" bucket, the
    student [N, V] tempered by τ and normalised over the full vocabulary (module doc).
    Not scaled by τ²."""
    check_divergence(divergence)
    if divergence == "jsd":
        beta = as_beta(beta)
    z = student_logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    valid = targets.ids >= 0
    safe_ids = jnp.where(valid, targets.ids, 0)
    log_q_kept = jnp.where(
        valid, jnp.take_along_axis(z, safe_ids, axis=-1) - lse[:, None], -jnp.inf
    )
    log_q_rest = _log_rest(z, _masked_membership(targets.ids, z.shape[-1])) - lse
    tail = targets.tail.astype(jnp.float32)
    log_p_rest = jnp.where(tail > 0, jnp.log(jnp.where(tail > 0, tail, 1.0)), -jnp.inf)
    log_p = jnp.concatenate([targets.logp.astype(jnp.float32), log_p_rest[:, None]], axis=-1)
    log_q = jnp.concatenate([log_q_kept, log_q_rest[:, None]], axis=-1)
    return _bucket_divergence(log_p, log_q, divergence, beta)


def _dense_divergence(
    z_s: jax.Array, z_t: jax.Array, temperature: float, divergence: str, beta: float
) -> jax.Array:
    log_q = jax.nn.log_softmax(z_s / temperature, axis=-1)
    log_p = jax.nn.log_softmax(z_t / temperature, axis=-1)
    return _bucket_divergence(log_p, log_q, divergence, beta)


def _logits(h: jax.Array, embedding: jax.Array, bias: jax.Array | None) -> jax.Array:
    z = jnp.dot(h, embedding.T.astype(h.dtype), preferred_element_type=jnp.float32)
    return z if bias is None else z + bias.astype(jnp.float32)


class RowTerms(NamedTuple):
    """Per position [N]: the student's ``ce``, ``correct`` (its largest logit is the
    label's), ``uncertainty`` (entropy / log V, τ = 1, no gradient); per teacher [K, N]:
    ``divergence`` D(p_t^τ ‖ p_s^τ) and ``teacher_ce`` −log p_t(y) at τ = 1."""

    ce: jax.Array
    correct: jax.Array
    uncertainty: jax.Array
    divergence: jax.Array
    teacher_ce: jax.Array


def lm_teacher_terms(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    teachers: Sequence[SparseTargets | DenseTeacher],
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    block_rows: int = 256,
) -> RowTerms:
    """The student's and every teacher's per-position terms (:class:`RowTerms`) for N
    positions: ``hidden`` [N, D] and its decoder ``embedding`` [V, D] (+ ``bias``),
    ``labels`` [N]. Differentiable in the student's inputs; teachers are constants.

    Rows go ``block_rows`` at a time (strided: row r·blocks + i is in block i, so a
    sharded row axis stays sharded), each block under ``jax.checkpoint``."""
    check_divergence(divergence)
    rows = hidden.shape[0]
    blocks = -(-rows // block_rows) if 0 < block_rows < rows else 1
    pad = blocks * -(-rows // blocks) - rows

    def strided(x: jax.Array, fill: float = 0) -> jax.Array:
        if pad:
            x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
        return jnp.swapaxes(x.reshape(-1, blocks, *x.shape[1:]), 0, 1)

    def unstrided(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])[:rows]

    # Padding rows have no kept token (id −1, log-probability −inf) and no tail, so
    # every term of theirs is 0 with finite gradients.
    per_row = [
        DenseTeacher(strided(t.hidden), None, None)
        if isinstance(t, DenseTeacher)
        else SparseTargets(
            strided(t.logp, -jnp.inf), strided(t.ids, -1), strided(t.tail), strided(t.label_logp)
        )
        for t in teachers
    ]
    vocab = embedding.shape[0]

    @jax.checkpoint
    def block(x):
        h_b, labels_b, teachers_b = x
        z = _logits(h_b, embedding, bias)
        log_q1 = jax.nn.log_softmax(z, axis=-1)
        label_logq = jnp.take_along_axis(log_q1, labels_b[:, None], axis=-1)[:, 0]
        correct = (label_logq >= jnp.max(log_q1, axis=-1)).astype(jnp.float32)
        entropy = -jnp.sum(jnp.exp(log_q1) * log_q1, axis=-1)
        uncertainty = jax.lax.stop_gradient(jnp.clip(entropy / math.log(vocab), 0.0, 1.0))
        divs, teacher_ces = [], []
        for spec, t in zip(teachers, teachers_b, strict=True):
            if isinstance(spec, DenseTeacher):
                z_t = jax.lax.stop_gradient(_logits(t.hidden, spec.embedding, spec.bias))
                divs.append(_dense_divergence(z, z_t, temperature, divergence, beta))
                log_t = jax.nn.log_softmax(z_t, axis=-1)
                teacher_ces.append(-jnp.take_along_axis(log_t, labels_b[:, None], axis=-1)[:, 0])
            else:
                t = jax.lax.stop_gradient(t)
                divs.append(
                    sparse_divergence(
                        z, t, temperature=temperature, divergence=divergence, beta=beta
                    )
                )
                teacher_ces.append(-t.label_logp.astype(jnp.float32))
        zeros = jnp.zeros((0, h_b.shape[0]), jnp.float32)
        return (
            -label_logq,
            correct,
            uncertainty,
            jnp.stack(divs) if divs else zeros,
            jnp.stack(teacher_ces) if teacher_ces else zeros,
        )

    outs = jax.lax.map(block, (strided(hidden), strided(labels), per_row))
    ce, correct, uncertainty = (unstrided(x) for x in outs[:3])
    # outs[3:] are [blocks, K, R]: K to the back, unstride the rows, then K to the front.
    divergences, teacher_ces = (
        jnp.swapaxes(unstrided(jnp.swapaxes(x, 1, 2)), 0, 1) for x in outs[3:]
    )
    return RowTerms(ce, correct, uncertainty, divergences, jax.lax.stop_gradient(teacher_ces))
