"""Pure loss functions and layer maps. Imports only jax: usable from any JAX code.

Shapes: B instances, M masked (predicted) positions per instance, V vocabulary or
classes, L sequence length, D hidden width, H attention heads, R relation heads.

Every loss is masked and returns ``(per_instance_B, scalar)`` in float32: the
per-instance value is the weighted mean over that instance's positions, the scalar
the weighted mean over all positions of the batch (so each real token counts once,
however the batch is padded). Positions with weight 0 contribute nothing, even when
their inputs are garbage; an instance with no weight at all has per-instance value 0.

Distillation losses take ``(student, teacher, ...)`` in that order, always; the
math below writes the teacher first where the divergence is KL(teacher ‖ student).
Notation: ``p^τ = softmax(z / τ)``.

Layer maps pair student and teacher ``hidden_states`` indices (0 = the embedding
output, i = the output of layer i) and are plain tuples of ``(student, teacher)``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable

import jax
import jax.numpy as jnp

# Stands in for -inf on masked attention keys: exp() of it is exactly 0, yet a row
# with every key masked stays finite (uniform) instead of producing NaN.
_MASKED_SCORE = -1e30


def _weighted_means(values_BxM: jax.Array, weights_BxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted means over all axes but the first (per instance) and over everything.

    ``weights_BxM`` broadcasts against ``values_BxM`` (e.g. [B, 1, L] against
    [B, H, L]). A value whose weight is 0 is dropped, even if it is inf or NaN.
    """
    weights_BxM = jnp.broadcast_to(jnp.asarray(weights_BxM, jnp.float32), values_BxM.shape)
    weighted_BxM = jnp.where(weights_BxM != 0, values_BxM * weights_BxM, 0.0)
    axes = tuple(range(1, values_BxM.ndim))
    per_instance_B = weighted_BxM.sum(axes) / jnp.maximum(weights_BxM.sum(axes), 1e-9)
    scalar = weighted_BxM.sum() / jnp.maximum(weights_BxM.sum(), 1e-9)
    return per_instance_B, scalar


def _logsumexp(z: jax.Array) -> jax.Array:
    """log Σ_last exp(z), stable; a row of -inf gives -inf (not NaN)."""
    m = jnp.max(z, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(jnp.sum(jnp.exp(z - m[..., None]), axis=-1))


# The vocabulary-sized losses below have hand-written backward passes: one fused
# elementwise pass per input (softmax minus target) instead of the chain autodiff
# derives through log_softmax, where() and take_along_axis (whose transpose is a
# scatter into [B, M, V]). Same values and gradients, fewer passes over [B, M, V].


@jax.custom_vjp
def _token_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return _token_ce_fwd(logits, labels)[0]


def _token_ce_fwd(logits, labels):
    lse = _logsumexp(logits)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse - label_logit, (logits, labels, lse)


def _token_ce_bwd(residuals, g):
    logits, labels, lse = residuals
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    one_hot = (vocab == labels[..., None]).astype(logits.dtype)
    return g[..., None] * (jnp.exp(logits - lse[..., None]) - one_hot), None


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ values·weights / Σ weights over every position (0 where all weights are 0)."""
    return _weighted_means(values, weights)[1]


def token_cross_entropy(logits_BxMxV: jax.Array, labels_BxM: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] at every position, float32, shape [B, M].

    Differentiable in the logits (gradient softmax − one_hot(label))."""
    return _token_ce(logits_BxMxV.astype(jnp.float32), jnp.asarray(labels_BxM, jnp.int32))


def mlm_cross_entropy(
    logits_BxMxV: jax.Array, labels_BxM: jax.Array, weights_BxM: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masked-LM cross-entropy H(q, p_θ) over the masked positions.

    Args:
      logits_BxMxV: the model's logits at the masked positions.
      labels_BxM: the original token ids at those positions.
      weights_BxM: 1.0 where a position is a real prediction, 0.0 for padding.
    Returns:
      (per-instance mean cross-entropy [B], weighted mean over the batch []).
    """
    return _weighted_means(token_cross_entropy(logits_BxMxV, labels_BxM), weights_BxM)


def mlm_accuracy(
    logits_BxMxV: jax.Array, labels_BxM: jax.Array, weights_BxM: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fraction of masked positions whose arg-max prediction is the label."""
    correct_BxM = (jnp.argmax(logits_BxMxV, axis=-1) == labels_BxM).astype(jnp.float32)
    return _weighted_means(correct_BxM, weights_BxM)


# --- Shared checks -----------------------------------------------------------------


def _check_pair(student: jax.Array, teacher: jax.Array, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got {student.shape} "
            f"and {teacher.shape}"
        )


def _position_weights(weights: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """The weights as float32 of ``shape`` (the inputs' shape minus the last axis)."""
    if weights is None:
        return jnp.ones(shape, jnp.float32)
    weights = jnp.asarray(weights)
    if weights.shape != shape:
        raise ValueError(f"weights must have shape {shape}, got {weights.shape}")
    return weights.astype(jnp.float32)


def _plogp_ratio(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Σ_last p·(log p − log q), with 0·log 0 = 0 and finite gradients where p = 0."""
    support = p > 0
    return jnp.sum(p * (jnp.where(support, log_p, 0.0) - jnp.where(support, log_q, 0.0)), axis=-1)


# --- Soft-label losses on logits -----------------------------------------------------


@jax.custom_vjp
def _kl_per_position(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Σ_last p_t (log p_t − log p_s), p = softmax of the (already tempered) inputs."""
    return _kl_fwd(student, teacher)[0]


def _kl_fwd(student, teacher):
    lse_s, lse_t = _logsumexp(student), _logsumexp(teacher)
    log_ps = student - lse_s[..., None]
    log_pt = teacher - lse_t[..., None]
    kl = _plogp_ratio(jnp.exp(log_pt), log_pt, log_ps)
    return kl, (student, teacher, lse_s, lse_t, kl)


def _kl_bwd(residuals, g):
    student, teacher, lse_s, lse_t, kl = residuals
    log_ps = student - lse_s[..., None]
    log_pt = teacher - lse_t[..., None]
    pt = jnp.exp(log_pt)
    # d/dz_s = p_s − p_t; d/dz_t = p_t (log p_t − log p_s − KL), 0 where p_t = 0.
    d_teacher = jnp.where(pt > 0, pt * (log_pt - log_ps - kl[..., None]), 0.0)
    g = g[..., None]
    return g * (jnp.exp(log_ps) - pt), g * d_teacher


_kl_per_position.defvjp(_kl_fwd, _kl_bwd)


def _temperature(temperature: float | jax.Array) -> jax.Array:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return jnp.asarray(temperature, jnp.float32)


def _tempered_log_probs(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float | jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p_s^τ, log p_t^τ, τ) in float32; τ may be traced, so no branching on it."""
    _check_pair(student_logits, teacher_logits, "logits")
    temperature = _temperature(temperature)
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return log_ps, log_pt, temperature


def _soft_reduce(
    per_position: jax.Array,
    weights: jax.Array | None,
    temperature: jax.Array,
    scale_by_temperature_squared: bool,
) -> tuple[jax.Array, jax.Array]:
    if scale_by_temperature_squared:
        per_position = per_position * jnp.square(temperature)
    return _weighted_means(per_position, _position_weights(weights, per_position.shape))


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    scale_by_temperature_squared: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Soft-label cross-entropy τ²·H(p_t^τ, p_s^τ) = −τ²·Σ_v p_t^τ log p_s^τ.

    It equals τ²·KL(p_t^τ ‖ p_s^τ) plus the teacher's entropy, a constant for the
    student, so its gradient is the KL's.

    Args:
      student_logits: [B, M, V] (masked LM) or [B, V] (sequence classification);
        any leading axes work, the last is the one softmax runs over.
      teacher_logits: the same shape as ``student_logits``.
      weights: the logits' shape minus the last axis ([B, M] or [B]); 0 drops a
        position. None weighs every position 1.
      temperature: τ > 0, a Python number or a (traced) scalar array.
      scale_by_temperature_squared: multiply by τ² (Hinton et al.), which keeps the
        gradient's magnitude roughly independent of τ.
    Returns:
      (per-instance [B], scalar []), float32.
    """
    log_ps, log_pt, temperature = _tempered_log_probs(student_logits, teacher_logits, temperature)
    pt = jnp.exp(log_pt)
    per_position = -jnp.sum(pt * jnp.where(pt > 0, log_ps, 0.0), axis=-1)
    return _soft_reduce(per_position, weights, temperature, scale_by_temperature_squared)


def kl_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    scale_by_temperature_squared: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Forward KL τ²·KL(p_t^τ ‖ p_s^τ) = τ²·Σ_v p_t^τ (log p_t^τ − log p_s^τ).

    The DWT / KI soft term (teacher first in the math; arguments student first).
    Exactly 0 for identical logits; terms with p_t = 0 are 0. The gradient of the
    scaled scalar wrt the student logits is τ·(p_s^τ − p_t^τ)·weight / Σ weights.
    Shapes and arguments as in :func:`soft_cross_entropy`.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    temperature = _temperature(temperature)
    per_position = _kl_per_position(
        student_logits.astype(jnp.float32) / temperature,
        teacher_logits.astype(jnp.float32) / temperature,
    )
    return _soft_reduce(per_position, weights, temperature, scale_by_temperature_squared)


def reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    scale_by_temperature_squared: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Reverse KL τ²·KL(p_s^τ ‖ p_t^τ) = τ²·Σ_v p_s^τ (log p_s^τ − log p_t^τ) (mode-seeking).

    Shapes and arguments as in :func:`soft_cross_entropy`.
    """
    log_ps, log_pt, temperature = _tempered_log_probs(student_logits, teacher_logits, temperature)
    per_position = _plogp_ratio(jnp.exp(log_ps), log_ps, log_pt)
    return _soft_reduce(per_position, weights, temperature, scale_by_temperature_squared)


def jensen_shannon(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    scale_by_temperature_squared: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Jensen-Shannon divergence τ²·[½KL(p_s^τ ‖ m) + ½KL(p_t^τ ‖ m)], m = ½(p_s^τ + p_t^τ).

    Symmetric, in [0, τ²·ln 2] (natural log; [0, ln 2] unscaled). Shapes and
    arguments as in :func:`soft_cross_entropy`.
    """
    log_ps, log_pt, temperature = _tempered_log_probs(student_logits, teacher_logits, temperature)
    log_m = jnp.logaddexp(log_ps, log_pt) - math.log(2.0)
    per_position = 0.5 * (
        _plogp_ratio(jnp.exp(log_ps), log_ps, log_m) + _plogp_ratio(jnp.exp(log_pt), log_pt, log_m)
    )
    return _soft_reduce(per_position, weights, temperature, scale_by_temperature_squared)


def logits_mse(
    student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Mean over V of (z_s − z_t)²: Dynamic KD's default KD loss (no temperature).

    Shapes as in :func:`soft_cross_entropy`.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
    per_position = jnp.mean(jnp.square(diff), axis=-1)
    return _weighted_means(per_position, _position_weights(weights, per_position.shape))


# --- Representation losses on hidden states ------------------------------------------


def _hidden_pair(
    student_hidden: jax.Array, teacher_hidden: jax.Array
) -> tuple[jax.Array, jax.Array]:
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student and teacher hidden states must have the same shape (project the "
            f"student first when widths differ), got {student_hidden.shape} and "
            f"{teacher_hidden.shape}"
        )
    return student_hidden.astype(jnp.float32), teacher_hidden.astype(jnp.float32)


def _l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # sqrt(max(Σx², eps²)) keeps the value and the gradient finite for a zero vector.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


def hidden_mse(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    weights: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Per token mean over D of (h_s − h_t)², then masked means.

    Args:
      student_hidden: student hidden states [B, L, D], already projected to the
        teacher's width when they differ (any leading axes work, e.g. [B, D]).
      teacher_hidden: teacher hidden states, the same shape.
      weights: [B, L], 1.0 for real tokens, 0.0 for padding; None weighs all 1.
    Returns:
      (per-instance [B], scalar []), float32.
    Raises:
      ValueError: if the shapes (e.g. the widths D) differ.
    """
    student, teacher = _hidden_pair(student_hidden, teacher_hidden)
    per_token_BxL = jnp.mean(jnp.square(student - teacher), axis=-1)
    return _weighted_means(per_token_BxL, _position_weights(weights, per_token_BxL.shape))


def cosine_distance(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    weights: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Per token 1 − cos(h_s, h_t) ∈ [0, 2], then masked means. Shapes as in :func:`hidden_mse`."""
    student, teacher = _hidden_pair(student_hidden, teacher_hidden)
    cos_BxL = jnp.sum(_l2_normalise(student) * _l2_normalise(teacher), axis=-1)
    per_token_BxL = 1.0 - cos_BxL
    return _weighted_means(per_token_BxL, _position_weights(weights, per_token_BxL.shape))


def pkd(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    weights: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Patient KD: per token mean over D of (h_s/‖h_s‖ − h_t/‖h_t‖)², then masked means.

    Invariant to scaling either input by a positive constant; equals
    2·cosine_distance / D. Shapes as in :func:`hidden_mse`.
    """
    student, teacher = _hidden_pair(student_hidden, teacher_hidden)
    diff = _l2_normalise(student) - _l2_normalise(teacher)
    per_token_BxL = jnp.mean(jnp.square(diff), axis=-1)
    return _weighted_means(per_token_BxL, _position_weights(weights, per_token_BxL.shape))


# --- Attention losses ----------------------------------------------------------------


def _check_scores(student_scores: jax.Array, teacher_scores: jax.Array) -> None:
    if student_scores.ndim != 4:
        raise ValueError(f"attention scores must be [B, H, L, L], got {student_scores.shape}")
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student and teacher attention scores must have the same shape (equal head "
            f"counts), got {student_scores.shape} and {teacher_scores.shape}"
        )


def _pair_mask(mask: jax.Array, scores_shape: tuple[int, ...]) -> jax.Array:
    """The (query, key) mask as bool [B, 1, L, L] (or [B, H, L, L] if given so)."""
    mask = jnp.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    batch, _, queries, keys = scores_shape
    if mask.shape not in ((batch, 1, queries, keys), tuple(scores_shape)):
        raise ValueError(f"mask must be [B, L, L] or [B, 1, L, L] for scores {scores_shape}")
    return mask.astype(bool)


def _distribution_kl(
    student_scores: jax.Array, teacher_scores: jax.Array, pair_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """KL(softmax_keys(t) ‖ softmax_keys(s)) per (head, query), averaged over valid queries."""
    log_ps = jax.nn.log_softmax(
        jnp.where(pair_mask, student_scores.astype(jnp.float32), _MASKED_SCORE), axis=-1
    )
    log_pt = jax.nn.log_softmax(
        jnp.where(pair_mask, teacher_scores.astype(jnp.float32), _MASKED_SCORE), axis=-1
    )
    kl_BxHxL = _plogp_ratio(jnp.exp(log_pt), log_pt, log_ps)
    return _weighted_means(kl_BxHxL, pair_mask.any(axis=-1))


def attention_score_mse(
    student_scores: jax.Array, teacher_scores: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """TinyBERT attention loss: (a_s − a_t)² on raw pre-softmax scores, mean over valid pairs.

    Masked pairs are zeroed before the difference, so any value there (even -inf)
    contributes nothing to the loss or its gradient. The per-instance value is the
    mean over heads and valid (query, key) pairs; the scalar over the whole batch.

    Args:
      student_scores: student scores q·kᵀ/√K, [B, H, L, L].
      teacher_scores: teacher scores, the same shape.
      mask: bool [B, L, L] or [B, 1, L, L], True for a valid (query, key) pair.
    Returns:
      (per-instance [B], scalar []), float32.
    Raises:
      ValueError: if the shapes (e.g. head counts H) differ, or the mask does not fit.
    """
    _check_scores(student_scores, teacher_scores)
    pair_mask = _pair_mask(mask, student_scores.shape)
    student = jnp.where(pair_mask, student_scores.astype(jnp.float32), 0.0)
    teacher = jnp.where(pair_mask, teacher_scores.astype(jnp.float32), 0.0)
    return _weighted_means(jnp.square(student - teacher), pair_mask)


def attention_distribution_kl(
    student_scores: jax.Array, teacher_scores: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """MiniLM attention transfer: Σ_k A_t log(A_t / A_s) with A = softmax over valid keys.

    Invalid keys get a large negative score (probability exactly 0). A query counts
    when it has at least one valid key, so pass ``mask = valid_query ∧ valid_key``
    to leave padding queries out. Averaged over heads and valid queries.

    Args:
      student_scores: student pre-softmax scores, [B, H, L, L].
      teacher_scores: teacher pre-softmax scores, the same shape.
      mask: bool [B, L, L] or [B, 1, L, L], True for a valid (query, key) pair.
    Returns:
      (per-instance [B], scalar []), float32.
    Raises:
      ValueError: if the shapes (e.g. head counts H) differ, or the mask does not fit.
    """
    _check_scores(student_scores, teacher_scores)
    pair_mask = _pair_mask(mask, student_scores.shape)
    return _distribution_kl(student_scores, teacher_scores, pair_mask)


def _relation_scores(x_BxLxD: jax.Array, num_relation_heads: int) -> jax.Array:
    """softmax-ready x xᵀ / √(D/R) per relation head: [B, L, D] → [B, R, L, L]."""
    batch, length, width = x_BxLxD.shape
    if width % num_relation_heads:
        raise ValueError(f"width {width} is not divisible by {num_relation_heads} relation heads")
    head_dim = width // num_relation_heads
    x_BxRxLxK = x_BxLxD.astype(jnp.float32).reshape(batch, length, num_relation_heads, head_dim)
    x_BxRxLxK = x_BxRxLxK.transpose(0, 2, 1, 3)
    return jnp.einsum("brqk,brsk->brqs", x_BxRxLxK, x_BxRxLxK) / math.sqrt(head_dim)


def value_relation_kl(
    student_values: jax.Array,
    teacher_values: jax.Array,
    token_mask: jax.Array,
    *,
    num_relation_heads: int,
) -> tuple[jax.Array, jax.Array]:
    """MiniLM(v2) self-attention relation transfer; D_s and D_t may differ.

    Each input (heads concatenated) is split into R relation heads
    x_r ∈ [B, L, D/R]; the relation is softmax_keys(x_r x_rᵀ / √(D/R)) with padding
    keys masked; the loss is KL(teacher relation ‖ student relation) averaged over
    relation heads and real queries. MiniLMv1 uses values (V-V); passing queries or
    keys gives MiniLMv2's Q-Q and K-K relations.

    Args:
      student_values: student values (or queries / keys), [B, L, D_s].
      teacher_values: the teacher's, [B, L, D_t].
      token_mask: [B, L], 1/True for real tokens.
      num_relation_heads: R, dividing both D_s and D_t.
    Returns:
      (per-instance [B], scalar []), float32.
    Raises:
      ValueError: if R does not divide D_s or D_t, R < 1, or B, L or the mask differ.
    """
    if student_values.ndim != 3 or teacher_values.ndim != 3:
        raise ValueError("values must be [B, L, D]")
    if student_values.shape[:2] != teacher_values.shape[:2]:
        raise ValueError(
            f"student and teacher values must share [B, L], got {student_values.shape} "
            f"and {teacher_values.shape}"
        )
    if _as_int(num_relation_heads, "num_relation_heads") < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads}")
    token_mask = jnp.asarray(token_mask).astype(bool)
    if token_mask.shape != student_values.shape[:2]:
        raise ValueError(f"token_mask must be [B, L], got {token_mask.shape}")
    student_BxRxLxL = _relation_scores(student_values, num_relation_heads)
    teacher_BxRxLxL = _relation_scores(teacher_values, num_relation_heads)
    pair_mask_Bx1xLxL = token_mask[:, None, :, None] & token_mask[:, None, None, :]
    return _distribution_kl(student_BxRxLxL, teacher_BxRxLxL, pair_mask_Bx1xLxL)


# --- Layer maps ------------------------------------------------------------------------

LayerMap = tuple[tuple[int, int], ...]


def _as_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def _num_layers(value: object, what: str) -> int:
    count = _as_int(value, what)
    if count < 1:
        raise ValueError(f"{what} must be at least 1, got {count}")
    return count


def uniform_layer_map(
    num_student_layers: int, num_teacher_layers: int, *, include_embeddings: bool = True
) -> LayerMap:
    """Student layer i ↔ teacher layer ⌈i·L_t / L_s⌉, for i = 1..L_s (plus 0 ↔ 0).

    Rounding: the ceiling. It equals i·L_t/L_s whenever that is whole (PKD's
    12 → 6 gives 2i), always pairs the last layers, and never pairs a student
    transformer layer with the teacher's embeddings: with a shallower teacher
    (L_t < L_s, the weak-teacher case) the floor would send student layer 1 to
    teacher index 0; the ceiling lets consecutive student layers share a teacher
    layer instead. Examples (without the 0 ↔ 0 pair): (L_s, L_t) = (6, 4) →
    1↔1, 2↔2, 3↔2, 4↔3, 5↔4, 6↔4; (4, 2) → 1↔1, 2↔1, 3↔2, 4↔2; (4, 4) → i↔i.

    Returns:
      ((student, teacher), ...) hidden_states indices, sorted by student index.
    Raises:
      ValueError: if a layer count is not a positive int.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    pairs = [(i, -(-i * teacher_layers // student_layers)) for i in range(1, student_layers + 1)]
    return ((0, 0), *pairs) if include_embeddings else tuple(pairs)


def last_k_layer_map(num_student_layers: int, num_teacher_layers: int, k: int) -> LayerMap:
    """The last k student layers ↔ the last k teacher layers, in order.

    (L_s − k + j) ↔ (L_t − k + j) for j = 1..k, e.g. (6, 4, k=2) → 5↔3, 6↔4.

    Raises:
      ValueError: unless 1 ≤ k ≤ min(L_s, L_t) and the counts are positive ints.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    k = _as_int(k, "k")
    if not 1 <= k <= min(student_layers, teacher_layers):
        raise ValueError(f"k must be in [1, {min(student_layers, teacher_layers)}], got {k}")
    return tuple((student_layers - k + j, teacher_layers - k + j) for j in range(1, k + 1))


def explicit_layer_map(
    pairs: Iterable[tuple[int, int]], num_student_layers: int, num_teacher_layers: int
) -> LayerMap:
    """Validates user (student, teacher) pairs and returns them as int tuples sorted by student.

    Indices are hidden_states indices: 0 ≤ student ≤ L_s, 0 ≤ teacher ≤ L_t. Several
    student layers may share a teacher layer; a student layer may appear only once.

    Raises:
      ValueError: if the list is empty, an entry is not a pair of ints, an index is
        out of range, or a student index repeats.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    normalised: dict[int, int] = {}
    for pair in pairs:
        try:
            student, teacher = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"a layer-map entry must be a (student, teacher) pair: {pair!r}"
            ) from None
        student = _as_int(student, "a student layer index")
        teacher = _as_int(teacher, "a teacher layer index")
        if not 0 <= student <= student_layers:
            raise ValueError(f"student layer {student} is outside [0, {student_layers}]")
        if not 0 <= teacher <= teacher_layers:
            raise ValueError(f"teacher layer {teacher} is outside [0, {teacher_layers}]")
        if student in normalised:
            raise ValueError(f"student layer {student} appears more than once")
        normalised[student] = teacher
    if not normalised:
        raise ValueError("a layer map needs at least one (student, teacher) pair")
    return tuple(sorted(normalised.items()))


# --- The MLM head fused with its losses --------------------------------------------


def _over_vocab(step, carry, vocab: int, chunk_size: int):
    """Runs ``step(carry, start, size) -> (carry, out)`` over the vocabulary in slices of
    ``chunk_size`` (0 or ≥ V: one slice): a scan over the full slices, then the
    remainder. Returns the last carry and the slices' outputs joined along axis 0."""
    chunk = vocab if chunk_size <= 0 or chunk_size >= vocab else chunk_size
    full, rest = divmod(vocab, chunk)
    if full == 1 and not rest:
        return step(carry, 0, chunk)
    carry, outs = jax.lax.scan(lambda c, i: step(c, i * chunk, chunk), carry, jnp.arange(full))
    outs = jax.tree.map(lambda x: x.reshape(full * chunk, *x.shape[2:]), outs)
    if rest:
        carry, tail = step(carry, full * chunk, rest)
        outs = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), outs, tail)
    return carry, outs


def _decode(h_NxD: jax.Array, embedding: jax.Array, bias: jax.Array, start, size: int):
    """Logits [N, size] of vocabulary entries [start, start + size), in float32, from
    hidden states in their compute dtype."""
    e_CxD = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h_NxD.dtype)
    logits = jnp.dot(h_NxD, e_CxD.T, preferred_element_type=jnp.float32)
    return logits + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(jnp.float32)


def _finite_or(x: jax.Array, value: float) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, value)


def _online(m: jax.Array, s: jax.Array, x_NxC: jax.Array):
    """Running (max, Σ exp(x − max)) after one more chunk, with exp(x − new max) and
    the factor exp(old max − new max) that rescales other sums kept against the max."""
    new_m = jnp.maximum(m, jnp.max(x_NxC, axis=-1))
    safe_m = _finite_or(new_m, 0.0)
    e_NxC = jnp.exp(x_NxC - safe_m[:, None])
    rescale = jnp.exp(_finite_or(m, -jnp.inf) - safe_m)
    return new_m, s * rescale + e_NxC.sum(-1), e_NxC, rescale


def _lse(m: jax.Array, s: jax.Array) -> jax.Array:
    return _finite_or(m, 0.0) + jnp.log(s)


def _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size):
    """Per-position statistics of the student (and teacher) logits, chunk by chunk."""
    neg_inf = jnp.full((h.shape[0],), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((h.shape[0],), jnp.float32)
    # (max z, Σe^(z−max), label logit, max z/τ, Σ..., teacher max a_t, Σ..., Σe^(a_t−max)(a_t−a_s))
    init = (neg_inf, zeros, zeros, neg_inf, zeros, neg_inf, zeros, zeros)

    def update(carry, start, size):
        m1, s1, label, ms, ss, mt, st, at = carry
        z_s = _decode(h, embedding, bias, start, size)
        m1, s1, _, _ = _online(m1, s1, z_s)
        local = labels - start
        inside = (local >= 0) & (local < size)
        picked = jnp.take_along_axis(z_s, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        label = jnp.where(inside, picked, label)
        if teacher is not None:
            a_s = z_s / tau
            a_t = _decode(*teacher, start, size) / tau
            ms, ss, _, _ = _online(ms, ss, a_s)
            mt, st, e_t_NxC, rescale = _online(mt, st, a_t)
            terms = jnp.where(e_t_NxC > 0, e_t_NxC * (a_t - a_s), 0.0)
            at = at * rescale + terms.sum(-1)
        return (m1, s1, label, ms, ss, mt, st, at), None

    return _over_vocab(update, init, embedding.shape[0], chunk_size)[0]


def _head_outputs(stats, has_teacher):
    m1, s1, label, ms, ss, mt, st, at = stats
    lse1 = _lse(m1, s1)
    out = {"ce": lse1 - label, "correct": (label >= m1).astype(jnp.float32)}
    if has_teacher:
        out["kl"] = jnp.maximum(at / st - _lse(mt, st) + _lse(ms, ss), 0.0)
    return out, (lse1, _lse(ms, ss), _lse(mt, st))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_head(h, embedding, bias, labels, teacher, tau, chunk_size):
    stats = _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size)
    return _head_outputs(stats, teacher is not None)[0]


def _fused_head_fwd(h, embedding, bias, labels, teacher, tau, chunk_size):
    stats = _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size)
    out, lses = _head_outputs(stats, teacher is not None)
    return out, (h, embedding, bias, labels, teacher, tau, lses)


def _fused_head_bwd(chunk_size, residuals, g):
    h, embedding, bias, labels, teacher, tau, (lse1, lse_s, lse_t) = residuals
    g_ce = g["ce"].astype(jnp.float32)[:, None]

    def grads(dh, start, size):
        """dh plus this chunk's contribution; the chunk's embedding-row and bias grads."""
        z_s = _decode(h, embedding, bias, start, size)
        one_hot = jax.lax.broadcasted_iota(labels.dtype, z_s.shape, 1) == (labels - start)[:, None]
        dz = g_ce * (jnp.exp(z_s - lse1[:, None]) - one_hot)
        if teacher is not None:
            a_t = _decode(*teacher, start, size) / tau
            p_s, p_t = jnp.exp(z_s / tau - lse_s[:, None]), jnp.exp(a_t - lse_t[:, None])
            dz = dz + g["kl"].astype(jnp.float32)[:, None] / tau * (p_s - p_t)
        dz = dz.astype(h.dtype)
        e_c = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h.dtype)
        dh = dh + jnp.dot(dz, e_c, preferred_element_type=jnp.float32)
        d_e = jnp.dot(dz.T, h, preferred_element_type=jnp.float32)
        return dh, (d_e, dz.astype(jnp.float32).sum(0))

    dh, (d_embedding, d_bias) = _over_vocab(
        grads, jnp.zeros(h.shape, jnp.float32), embedding.shape[0], chunk_size
    )
    no_teacher = None if teacher is None else jax.tree.map(jnp.zeros_like, teacher)
    return (
        dh.astype(h.dtype),
        d_embedding.astype(embedding.dtype),
        d_bias.astype(bias.dtype),
        None,
        no_teacher,
        jnp.zeros_like(tau),
    )


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def fused_mlm_losses(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array,
    labels: jax.Array,
    *,
    teacher: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """The tied MLM decoder and its losses in one pass, without the [.., V] logits.

    ``logits = hidden @ embedding.T + bias`` for the student (and the teacher) are
    computed ``chunk_size`` vocabulary entries at a time (0: all at once) with running
    log-sum-exps, so memory is O(N·chunk) instead of O(N·V), and the backward pass
    recomputes each chunk instead of storing the logits. Per position it returns:

    - ``ce``: −log softmax(z_s)[label], the masked-LM cross-entropy;
    - ``correct``: 1.0 where the label's logit is the largest (ties count as correct);
    - ``kl`` (with a teacher): KL(p_t^τ ‖ p_s^τ), not scaled by τ².

    Equal to ``token_cross_entropy`` and ``kl_divergence`` on the materialised logits
    (to float32 rounding) and differentiable in ``hidden``, ``embedding`` and ``bias``.
    The teacher's arrays and τ are constants: they get no gradient.

    Args:
      hidden: [..., D] the transformed hidden states at the masked positions.
      embedding: [V, D] the (tied) decoder, the word-embedding table.
      bias: [V] the decoder bias.
      labels: [...] int token ids, in [0, V).
      teacher: the teacher's ``(hidden [..., D_t], embedding [V, D_t], bias [V])``.
      temperature: τ > 0 of the KL term.
      chunk_size: vocabulary entries per chunk; 0 or ≥ V for one chunk.
    """
    lead = hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {lead}, got {labels.shape}")
    if embedding.shape[1] != hidden.shape[-1] or bias.shape != embedding.shape[:1]:
        raise ValueError(
            f"embedding [V, {hidden.shape[-1]}] and bias [V] expected, got "
            f"{embedding.shape} and {bias.shape}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_teacher = None
    if teacher is not None:
        h_t, e_t, b_t = (jax.lax.stop_gradient(x) for x in teacher)
        if h_t.shape[:-1] != lead or e_t.shape[0] != embedding.shape[0]:
            raise ValueError(
                f"the teacher's hidden states [{', '.join(map(str, lead))}, D_t] and "
                f"embedding [{embedding.shape[0]}, D_t] must match the student's, got "
                f"{h_t.shape} and {e_t.shape}"
            )
        flat_teacher = (h_t.reshape(-1, h_t.shape[-1]), e_t, b_t)
    tau = jax.lax.stop_gradient(_temperature(temperature))
    out = _fused_head(
        h, embedding, bias, jnp.asarray(labels, jnp.int32).reshape(-1), flat_teacher, tau,
        int(chunk_size),
    )  # fmt: skip
    return {name: value.reshape(lead) for name, value in out.items()}
