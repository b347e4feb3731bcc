"""Pure loss functions. Imports only jax (and the two modules below): usable from any JAX code.

Shapes: B instances, M masked (predicted) positions per instance, V vocabulary or
classes, L sequence length, D hidden width, H attention heads, R relation heads.

Every loss is masked and returns ``(per_instance_B, scalar)`` in float32: the
per-instance value is the weighted mean over that instance's positions, the scalar
the weighted mean over all positions of the batch (so each real token counts once,
however the batch is padded). Positions with weight 0 contribute nothing, even when
their inputs are garbage; an instance with no weight at all has per-instance value 0.

Distillation losses take ``(student, teacher, ...)`` in that order, always; the
math below writes the teacher first where the divergence is KL(teacher ‖ student).
Notation: ``p^τ = softmax(z / τ)`` (docs/methods.md#notation); the losses are those
of docs/methods.md#feature-losses.

The layer maps (``dwt_jax.layer_maps``) and the fused MLM head
(``dwt_jax.fused_head``) live in their own modules and are re-exported here, so
``losses.uniform_layer_map``, ``losses.fused_mlm_losses`` and ``losses.fused_lm_losses``
work.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The [.., V] primitives (with their hand-written VJPs) live with the fused head; it is
# re-exported here, so it sits below this module and the dependency stays one-way.
from dwt_jax.fused_head import (
    DIVERGENCES,
    as_beta,
    as_temperature,
    fused_lm_losses,
    fused_mlm_losses,
    kl_per_position,
    log_mixture,
    plogp_ratio,
    token_ce,
)
from dwt_jax.fused_loss import fused_lm_loss
from dwt_jax.layer_maps import (
    LayerMap,
    as_int,
    explicit_layer_map,
    last_k_layer_map,
    uniform_layer_map,
)

__all__ = [
    "DIVERGENCES",
    "LayerMap",
    "attention_distribution_kl",
    "attention_score_mse",
    "cosine_distance",
    "explicit_layer_map",
    "fused_lm_loss",
    "fused_lm_losses",
    "fused_mlm_losses",
    "hidden_mse",
    "jensen_shannon",
    "kl_divergence",
    "last_k_layer_map",
    "logits_mse",
    "mlm_accuracy",
    "mlm_cross_entropy",
    "pkd",
    "reverse_kl",
    "soft_cross_entropy",
    "token_cross_entropy",
    "uniform_layer_map",
    "value_relation_kl",
    "weighted_mean",
]


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


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ values·weights / Σ weights over every position (0 where all weights are 0)."""
    return _weighted_means(values, weights)[1]


def token_cross_entropy(logits_BxMxV: jax.Array, labels_BxM: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] at every position, float32, shape [B, M].

    Differentiable in the logits (gradient softmax − one_hot(label))."""
    return token_ce(logits_BxMxV.astype(jnp.float32), jnp.asarray(labels_BxM, jnp.int32))


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


# --- Soft-label losses on logits -----------------------------------------------------


def _tempered_log_probs(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float | jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p_s^τ, log p_t^τ, τ) in float32; τ may be traced, so no branching on it."""
    _check_pair(student_logits, teacher_logits, "logits")
    temperature = as_temperature(temperature)
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
    temperature = as_temperature(temperature)
    per_position = kl_per_position(
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
    per_position = plogp_ratio(jnp.exp(log_ps), log_ps, log_pt)
    return _soft_reduce(per_position, weights, temperature, scale_by_temperature_squared)


def jensen_shannon(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    beta: float = 0.5,
    scale_by_temperature_squared: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Generalised Jensen-Shannon τ²·JSD_β(p_t^τ ‖ p_s^τ) (GKD, docs/methods.md#causal-dwt).

    JSD_β(P ‖ Q) = β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M), M = β·P + (1 − β)·Q, with P the
    teacher and Q the student. In [0, τ²·H(β)], H(β) = −β ln β − (1 − β) ln(1 − β);
    JSD_β(P ‖ Q) = JSD_{1−β}(Q ‖ P). β = ½ (the default) is the symmetric JSD, in
    [0, τ²·ln 2]. ``beta`` is a Python number in (0, 1); other shapes and arguments
    as in :func:`soft_cross_entropy`.
    """
    beta = as_beta(beta)
    log_ps, log_pt, temperature = _tempered_log_probs(student_logits, teacher_logits, temperature)
    log_m = log_mixture(log_pt, log_ps, beta)
    kl_pm = plogp_ratio(jnp.exp(log_pt), log_pt, log_m)
    kl_qm = plogp_ratio(jnp.exp(log_ps), log_ps, log_m)
    per_position = beta * kl_pm + (1.0 - beta) * kl_qm
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
    kl_BxHxL = plogp_ratio(jnp.exp(log_pt), log_pt, log_ps)
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
    if as_int(num_relation_heads, "num_relation_heads") < 1:
        raise ValueError(f"num_relation_heads must be a positive int, got {num_relation_heads}")
    token_mask = jnp.asarray(token_mask).astype(bool)
    if token_mask.shape != student_values.shape[:2]:
        raise ValueError(f"token_mask must be [B, L], got {token_mask.shape}")
    student_BxRxLxL = _relation_scores(student_values, num_relation_heads)
    teacher_BxRxLxL = _relation_scores(teacher_values, num_relation_heads)
    pair_mask_Bx1xLxL = token_mask[:, None, :, None] & token_mask[:, None, None, :]
    return _distribution_kl(student_BxRxLxL, teacher_BxRxLxL, pair_mask_Bx1xLxL)
