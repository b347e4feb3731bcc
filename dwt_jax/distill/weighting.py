"""Pure weighting functions for multi-teacher and dynamic KD: per-instance terms and
teacher weights.

docs/methods.md#mt-bert (MT-BERT), #ca-mkd (CA-MKD), #dynamic-kd (teacher adoption)
and the baselines. Every function is a pure ``jax.numpy`` function of arrays:
jit-able, with static shapes and no Python control flow on array values (string
modes, teacher counts and subset sizes are static Python values). Dynamic KD's data
selection and objective adaptation live in `dwt_jax.distill.selection`, the RL
policy's formulas in `dwt_jax.distill.reinforce`; both are re-exported here, so
``weighting.<name>`` reaches every formula.

Shapes: K teachers, B instances, C classes (the vocabulary for MLM: flatten masked
positions into the instance axis), D feature width, F policy-feature width. Teacher
weights are ``[K, B]`` arrays ``W_KxB``; a column holds one instance's weights.

Gradients: every teacher weight (MT-BERT, CA-MKD, fixed/uniform/random/best, Dynamic
KD adoption) is returned under ``jax.lax.stop_gradient`` — the weights are constants
of the loss (docs/methods.md#mt-bert: "no gradient through them"), and so are the
uncertainty used by objective adaptation, the selection scores, the RL policy's
state, the sampled actions, rewards and baselines.

Batch statistics (the batch-mean uncertainty of 'soft' adoption, the ranks of 'hard'
adoption and of data selection, the batch-mean reward of the baseline) are plain
array ops over the whole B axis. Under ``jit`` with a batch sharded over devices they
are therefore computed over the *global* batch (XLA inserts the collectives), never
per shard (docs/methods.md#global-batch-statistics). Do not call them inside
``shard_map`` on local shards.

Decisions the methods leave open:
- ``normalized_uncertainty`` is clipped to [0, 1] (float rounding can put the
  entropy of near-uniform logits a hair above log C) and is differentiable; the
  consumers (adoption, objective adaptation) stop its gradient.
- Adoption: teachers of equal size are interchangeable and share the weight of their
  size position equally; all sizes equal therefore gives uniform weights 1/K in every
  mode. 'hard' with B not divisible by K: group g = ⌊r·K/B⌋, so for K=2 the
  ⌈B/2⌉ most uncertain instances go to the small teacher.
- Data selection, the representation loss and the RL policy's start: see
  `dwt_jax.distill.selection` and `dwt_jax.distill.reinforce`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax import losses
from dwt_jax.distill.arrays import (
    check_choice,
    check_ndim,
    concrete,
    entropy,
    instance_cross_entropy,
    positive_int,
    sg,
)
from dwt_jax.distill.reinforce import (
    REWARD_VARIANTS,
    PolicyParams,
    bernoulli_entropy,
    bernoulli_log_prob,
    init_policy_params,
    policy_features,
    policy_logits,
    reinforce_loss,
    rl_reward,
    rl_student_kd,
    sample_actions,
    update_baseline,
)
from dwt_jax.distill.selection import (
    SELECTION_CRITERIA,
    num_selected,
    objective_adaptation,
    rep_per_instance,
    select_top,
    selection_scores,
)

KD_KINDS = ("kl", "ce", "mse")
ADOPTION_MODES = ("hard", "soft", "soft_instance")

__all__ = [
    "ADOPTION_MODES",
    "KD_KINDS",
    "REWARD_VARIANTS",
    "SELECTION_CRITERIA",
    "PolicyParams",
    "adoption_weights",
    "bernoulli_entropy",
    "bernoulli_log_prob",
    "best_teacher_weights",
    "ca_mkd_weights",
    "fixed_weights",
    "init_policy_params",
    "instance_cross_entropy",
    "kd_per_instance",
    "kd_per_teacher",
    "mt_bert_weights",
    "normalized_uncertainty",
    "num_selected",
    "objective_adaptation",
    "policy_features",
    "policy_logits",
    "random_teacher_weights",
    "reinforce_loss",
    "rep_per_instance",
    "rl_reward",
    "rl_student_kd",
    "sample_actions",
    "select_top",
    "selection_scores",
    "teacher_cross_entropy",
    "uniform_weights",
    "update_baseline",
    "weighted_teacher_loss",
]


# --- Uncertainty, cross-entropy, per-instance KD ----------------------------------------


def normalized_uncertainty(logits_BxC: jax.Array) -> jax.Array:
    """u_j = H(softmax(z_j)) / log C ∈ [0, 1] at τ = 1 (docs/methods.md#dynamic-kd), float32 [B].

    0 for a one-hot prediction, 1 for a uniform one. Differentiable (the callers that
    weight by u stop its gradient).

    Raises:
      ValueError: if C < 2 (the uncertainty of a single class is undefined).
    """
    num_classes = jnp.shape(logits_BxC)[-1]
    if num_classes < 2:
        raise ValueError(f"normalized_uncertainty needs C >= 2 classes, got C={num_classes}")
    return jnp.clip(entropy(logits_BxC) / math.log(num_classes), 0.0, 1.0)


def teacher_cross_entropy(teacher_logits_KxBxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Each teacher's CE_k(y_j) = −log softmax(z_kj)[y_j], float32 [K, B]."""
    check_ndim(teacher_logits_KxBxC, 3, "teacher_logits_KxBxC")
    num_teachers, batch, _ = jnp.shape(teacher_logits_KxBxC)
    labels_KxB = jnp.broadcast_to(jnp.asarray(labels_B), (num_teachers, batch))
    return losses.token_cross_entropy(jnp.asarray(teacher_logits_KxBxC), labels_KxB)


def kd_per_instance(
    student_logits_BxC: jax.Array,
    teacher_logits_BxC: jax.Array,
    kind: str,
    tau: float | jax.Array = 1.0,
) -> jax.Array:
    """Per-instance KD loss, float32 [B] (via ``dwt_jax.losses``).

    kind:
      'kl'  τ²·KL(p_t^τ ‖ p_s^τ)                (``losses.kl_divergence``)
      'ce'  τ²·H(p_t^τ, p_s^τ)                  (``losses.soft_cross_entropy``)
      'mse' mean over C of (z_s − z_t)², no τ   (``losses.logits_mse``; Dynamic KD's
            default, and the only kind for regression, C = 1)
    ``tau`` may be a traced scalar (a schedule's value).

    Raises:
      ValueError: unknown kind, 'kl'/'ce' with C = 1, or shapes that are not equal [B, C].
    """
    check_choice(kind, KD_KINDS, "kind")
    check_ndim(student_logits_BxC, 2, "student_logits_BxC")
    if kind != "mse" and jnp.shape(student_logits_BxC)[-1] < 2:
        raise ValueError(f"kind={kind!r} needs C >= 2 classes; use kind='mse' for regression")
    student, teacher = jnp.asarray(student_logits_BxC), jnp.asarray(teacher_logits_BxC)
    if kind == "mse":
        per_instance_B, _ = losses.logits_mse(student, teacher, None)
    elif kind == "kl":
        per_instance_B, _ = losses.kl_divergence(student, teacher, None, temperature=tau)
    else:
        per_instance_B, _ = losses.soft_cross_entropy(student, teacher, None, temperature=tau)
    return per_instance_B


def kd_per_teacher(
    student_logits_BxC: jax.Array,
    teacher_logits_KxBxC: jax.Array,
    kind: str,
    tau: float | jax.Array = 1.0,
) -> jax.Array:
    """:func:`kd_per_instance` against each of K teachers, float32 [K, B]."""
    check_ndim(teacher_logits_KxBxC, 3, "teacher_logits_KxBxC")
    return jax.vmap(
        lambda teacher_BxC: kd_per_instance(student_logits_BxC, teacher_BxC, kind, tau)
    )(jnp.asarray(teacher_logits_KxBxC))


# --- Multi-teacher weights --------------------------------------------------------------


def mt_bert_weights(ce_KxB: jax.Array) -> jax.Array:
    """MT-BERT (docs/methods.md#mt-bert): w_kj = 1 / (1 + CE_k(y_j)), [K, B], no gradient.

    Not normalised."""
    check_ndim(ce_KxB, 2, "ce_KxB")
    return sg(1.0 / (1.0 + jnp.asarray(ce_KxB, jnp.float32)))


def ca_mkd_weights(ce_KxB: jax.Array) -> jax.Array:
    """CA-MKD (docs/methods.md#ca-mkd): w_kj = (1 − softmax_k(CE_kj)) / (K − 1), [K, B],
    no gradient.

    Columns sum to 1; a lower CE gets a higher weight. K = 1 gives ones.
    """
    check_ndim(ce_KxB, 2, "ce_KxB")
    ce_KxB = jnp.asarray(ce_KxB, jnp.float32)
    num_teachers = ce_KxB.shape[0]
    if num_teachers == 1:
        return jnp.ones_like(ce_KxB)
    return sg((1.0 - jax.nn.softmax(ce_KxB, axis=0)) / (num_teachers - 1))


def uniform_weights(num_teachers: int, batch: int) -> jax.Array:
    """Uniform average of the teachers: 1/K everywhere, [K, B]."""
    num_teachers = positive_int(num_teachers, "num_teachers")
    batch = positive_int(batch, "batch")
    return jnp.full((num_teachers, batch), 1.0 / num_teachers, jnp.float32)


def fixed_weights(weights_K: Sequence[float] | jax.Array, batch: int) -> jax.Array:
    """Fixed per-teacher weights, normalised to sum 1, broadcast to [K, B], no gradient.

    Raises:
      ValueError: if a weight is negative or all are zero (checked whenever the
        weights are concrete, i.e. not traced inside ``jit``), or not 1-D.
    """
    batch = positive_int(batch, "batch")
    weights_K = jnp.asarray(weights_K, jnp.float32)
    check_ndim(weights_K, 1, "weights_K")
    values = concrete(weights_K)
    if values is not None and (np.any(values < 0) or not np.any(values > 0)):
        raise ValueError(
            f"fixed teacher weights must be non-negative and not all zero, got {values.tolist()}"
        )
    normalised_K = weights_K / jnp.sum(weights_K)
    return sg(jnp.broadcast_to(normalised_K[:, None], (weights_K.shape[0], batch)))


def random_teacher_weights(rng: jax.Array, num_teachers: int, batch: int) -> jax.Array:
    """One teacher drawn uniformly for the whole batch: a one-hot row of ones, [K, B]."""
    num_teachers = positive_int(num_teachers, "num_teachers")
    batch = positive_int(batch, "batch")
    teacher = jax.random.randint(rng, (), 0, num_teachers)
    one_hot_K = jax.nn.one_hot(teacher, num_teachers, dtype=jnp.float32)
    return jnp.broadcast_to(one_hot_K[:, None], (num_teachers, batch))


def best_teacher_weights(ce_KxB: jax.Array) -> jax.Array:
    """One-hot on each instance's lowest-CE teacher (ties → lowest index), [K, B], no gradient."""
    check_ndim(ce_KxB, 2, "ce_KxB")
    ce_KxB = jnp.asarray(ce_KxB, jnp.float32)
    best_B = jnp.argmin(ce_KxB, axis=0)
    return sg(jax.nn.one_hot(best_B, ce_KxB.shape[0], axis=0, dtype=jnp.float32))


def weighted_teacher_loss(weights_KxB: jax.Array, kd_KxB: jax.Array) -> jax.Array:
    """mean_j Σ_k w_kj · KD_kj: the multi-teacher KD term for any of the weights above."""
    return jnp.mean(jnp.sum(jnp.asarray(weights_KxB) * jnp.asarray(kd_KxB), axis=0))


# --- Dynamic KD: teacher adoption (docs/methods.md#dynamic-kd) ------------------------


def _smallness(sizes_K: jax.Array) -> jax.Array:
    """y_k = (max − s_k) / (max − min) = 1 − s̃_k: 1 for the smallest, 0 for the largest.

    All sizes equal → all 0 (every teacher at one position, hence uniform weights).
    """
    low, high = jnp.min(sizes_K), jnp.max(sizes_K)
    span = high - low
    return jnp.where(span > 0, (high - sizes_K) / jnp.where(span > 0, span, 1.0), 0.0)


def _hat_weights(target_N: jax.Array, positions_K: jax.Array) -> jax.Array:
    """Piecewise-linear interpolation weights [K, N] of targets in [0, 1] over positions.

    Teacher k's weight is the hat function that is 1 at its position and falls linearly
    to 0 at the nearest distinct positions on either side, so the weights of a target
    interpolate linearly between the two bracketing teachers and sum to 1. Teachers at
    the same position split that position's weight equally. Works in any teacher order.
    """
    x_K1, x_1K = positions_K[:, None], positions_K[None, :]
    below_KxK, above_KxK = x_1K < x_K1, x_1K > x_K1
    has_left_K, has_right_K = below_KxK.any(axis=1), above_KxK.any(axis=1)
    left_K = jnp.max(jnp.where(below_KxK, x_1K, -1.0), axis=1)  # nearest position below
    right_K = jnp.min(jnp.where(above_KxK, x_1K, 2.0), axis=1)  # nearest position above
    t_1xN = target_N[None, :]
    rise_KxN = jnp.where(
        has_left_K[:, None],
        (t_1xN - left_K[:, None]) / jnp.where(has_left_K, positions_K - left_K, 1.0)[:, None],
        1.0,
    )
    fall_KxN = jnp.where(
        has_right_K[:, None],
        (right_K[:, None] - t_1xN) / jnp.where(has_right_K, right_K - positions_K, 1.0)[:, None],
        1.0,
    )
    hat_KxN = jnp.clip(jnp.where(t_1xN <= x_K1, rise_KxN, fall_KxN), 0.0, 1.0)
    ties_K = jnp.sum(x_1K == x_K1, axis=1)
    return hat_KxN / ties_K[:, None]


def adoption_weights(u_B: jax.Array, sizes_K: Sequence[float] | jax.Array, mode: str) -> jax.Array:
    """Dynamic KD teacher adoption: [K, B] weights, columns summing to 1, no gradient.

    Confident instances learn from larger teachers, uncertain ones from smaller.
    Teachers may come in any order; ``sizes_K`` ranks them (e.g. parameter counts).

    mode:
      'soft_instance'  target t_j = 1 − u_j on the normalised size axis
                       s̃_k = (s_k − min s)/(max s − min s); the weights interpolate
                       linearly between the two teachers whose s̃ bracket t_j (hat
                       functions). K = 2: W_small = u_j, W_large = 1 − u_j.
      'soft'           the same with the batch mean ū for every instance.
      'hard'           instances ranked by u descending (ties → lower index first);
                       rank r goes to group g = ⌊r·K/B⌋; group 0 (most uncertain) →
                       smallest teacher, group K−1 → largest. K = 2: the more uncertain
                       half (⌈B/2⌉) learns from the small teacher, the rest from the large.
    Teachers of equal size share their weight equally; all sizes equal → 1/K.

    Args:
      u_B: the student's normalised uncertainty (its gradient is stopped).
      sizes_K: teacher sizes, [K].
      mode: 'hard' | 'soft' | 'soft_instance'.
    """
    check_choice(mode, ADOPTION_MODES, "mode")
    check_ndim(u_B, 1, "u_B")
    u_B = jnp.clip(sg(jnp.asarray(u_B, jnp.float32)), 0.0, 1.0)
    sizes_K = jnp.asarray(sizes_K, jnp.float32)
    check_ndim(sizes_K, 1, "sizes_K")
    (batch,), (num_teachers,) = u_B.shape, sizes_K.shape
    if mode == "hard":
        order_B = jnp.argsort(u_B, descending=True, stable=True)
        rank_B = jnp.zeros(batch, jnp.int32).at[order_B].set(jnp.arange(batch, dtype=jnp.int32))
        group_B = (rank_B * num_teachers) // batch
        group_size_B = jnp.sort(sizes_K)[group_B]
        match_KxB = (sizes_K[:, None] == group_size_B[None, :]).astype(jnp.float32)
        weights_KxB = match_KxB / jnp.sum(match_KxB, axis=0, keepdims=True)
    else:
        # On the smallness axis y = 1 − s̃ the target is u itself (K = 2: W_small = u exactly).
        target_B = u_B if mode == "soft_instance" else jnp.full((batch,), jnp.mean(u_B))
        weights_KxB = _hat_weights(target_B, _smallness(sizes_K))
    return sg(weights_KxB)
