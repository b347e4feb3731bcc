"""Pure weighting, selection and reward functions for multi-teacher and dynamic KD.

SPEC §4 (MT-BERT), §5.1 (reinforced teacher selection), §5.2 (Dynamic KD) and
§5.3 (CA-MKD). Every function is a pure ``jax.numpy`` function of arrays: jit-able,
with static shapes and no Python control flow on array values (string modes, teacher
counts and subset sizes are static Python values).

Shapes: K teachers, B instances, C classes (the vocabulary for MLM: flatten masked
positions into the instance axis), D feature width, F policy-feature width. Teacher
weights are ``[K, B]`` arrays ``W_KxB``; a column holds one instance's weights.

Gradients: every teacher weight (MT-BERT, CA-MKD, fixed/uniform/random/best, Dynamic
KD adoption) is returned under ``jax.lax.stop_gradient`` — the weights are constants
of the loss (SPEC §4.3: "no gradient through them"), and so are the uncertainty used
by objective adaptation, the selection scores, the RL policy's state, the sampled
actions, rewards and baselines.

Batch statistics (the batch-mean uncertainty of 'soft' adoption, the ranks of 'hard'
adoption and of data selection, the batch-mean reward of the baseline) are plain
array ops over the whole B axis. Under ``jit`` with a batch sharded over devices they
are therefore computed over the *global* batch (XLA inserts the collectives), never
per shard (SPEC §5.2, correctness trap). Do not call them inside ``shard_map`` on
local shards.

Decisions where SPEC is silent (to be recorded in BUILD_NOTES.md):
- ``normalized_uncertainty`` is clipped to [0, 1] (float rounding can put the
  entropy of near-uniform logits a hair above log C) and is differentiable; the
  consumers (adoption, objective adaptation) stop its gradient.
- Adoption: teachers of equal size are interchangeable and share the weight of their
  size position equally; all sizes equal therefore gives uniform weights 1/K in every
  mode. 'hard' with B not divisible by K: group g = ⌊r·K/B⌋, so for K=2 the
  ⌈B/2⌉ most uncertain instances go to the small teacher.
- ``num_selected`` floors B·r after adding 1e-9, so binary rounding (100·0.29 =
  28.999…) does not drop an instance.
- ``select_top`` returns indices in descending score order (ties: lower index first).
- ``rep_per_instance`` follows ``losses.pkd``: the squared error of the L2-normalised
  features is *averaged* over D (PKD's paper sums; the two differ by the constant D).
- The RL policy starts at kernel ~ N(0, 0.01²), bias 0, i.e. σ ≈ 0.5: every teacher
  is initially used on about half the instances.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax import losses

KD_KINDS = ("kl", "ce", "mse")
ADOPTION_MODES = ("hard", "soft", "soft_instance")
SELECTION_CRITERIA = ("entropy", "margin", "least_confidence", "kl_to_label", "random")
REWARD_VARIANTS = ("batch_ce", "instance_ce", "instance_ce_teacher")

PolicyParams = Mapping[str, jax.Array]

_sg = jax.lax.stop_gradient


# --- Checks ---------------------------------------------------------------------------


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is unknown; use one of {', '.join(choices)}")


def _check_ndim(x: jax.Array, ndim: int, name: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {jnp.shape(x)}")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a positive int, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive int, got {number}")
    return number


def _concrete(x: object) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known now, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _log_probs(logits_BxC: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits_BxC).astype(jnp.float32), axis=-1)


def _entropy(logits_BxC: jax.Array) -> jax.Array:
    """H(softmax(z)) over the last axis, natural log; 0·log 0 = 0 (finite gradients)."""
    log_p = _log_probs(logits_BxC)
    p = jnp.exp(log_p)
    return -jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)


# --- Uncertainty, cross-entropy, per-instance KD ----------------------------------------


def normalized_uncertainty(logits_BxC: jax.Array) -> jax.Array:
    """u_j = H(softmax(z_j)) / log C ∈ [0, 1] at τ = 1 (SPEC §2), float32 [B].

    0 for a one-hot prediction, 1 for a uniform one. Differentiable (the callers that
    weight by u stop its gradient).

    Raises:
      ValueError: if C < 2 (the uncertainty of a single class is undefined).
    """
    num_classes = jnp.shape(logits_BxC)[-1]
    if num_classes < 2:
        raise ValueError(f"normalized_uncertainty needs C >= 2 classes, got C={num_classes}")
    return jnp.clip(_entropy(logits_BxC) / math.log(num_classes), 0.0, 1.0)


def instance_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """−log softmax(z_j)[y_j] per instance, float32 [B]."""
    _check_ndim(logits_BxC, 2, "logits_BxC")
    return losses.token_cross_entropy(jnp.asarray(logits_BxC), jnp.asarray(labels_B))


def teacher_cross_entropy(teacher_logits_KxBxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Each teacher's CE_k(y_j) = −log softmax(z_kj)[y_j], float32 [K, B]."""
    _check_ndim(teacher_logits_KxBxC, 3, "teacher_logits_KxBxC")
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
    _check_choice(kind, KD_KINDS, "kind")
    _check_ndim(student_logits_BxC, 2, "student_logits_BxC")
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
    _check_ndim(teacher_logits_KxBxC, 3, "teacher_logits_KxBxC")
    return jax.vmap(
        lambda teacher_BxC: kd_per_instance(student_logits_BxC, teacher_BxC, kind, tau)
    )(jnp.asarray(teacher_logits_KxBxC))


# --- Multi-teacher weights --------------------------------------------------------------


def mt_bert_weights(ce_KxB: jax.Array) -> jax.Array:
    """MT-BERT (SPEC §4.3): w_kj = 1 / (1 + CE_k(y_j)), [K, B], no gradient. Not normalised."""
    _check_ndim(ce_KxB, 2, "ce_KxB")
    return _sg(1.0 / (1.0 + jnp.asarray(ce_KxB, jnp.float32)))


def ca_mkd_weights(ce_KxB: jax.Array) -> jax.Array:
    """CA-MKD (SPEC §5.3): w_kj = (1 − softmax_k(CE_kj)) / (K − 1), [K, B], no gradient.

    Columns sum to 1; a lower CE gets a higher weight. K = 1 gives ones.
    """
    _check_ndim(ce_KxB, 2, "ce_KxB")
    ce_KxB = jnp.asarray(ce_KxB, jnp.float32)
    num_teachers = ce_KxB.shape[0]
    if num_teachers == 1:
        return jnp.ones_like(ce_KxB)
    return _sg((1.0 - jax.nn.softmax(ce_KxB, axis=0)) / (num_teachers - 1))


def uniform_weights(num_teachers: int, batch: int) -> jax.Array:
    """Uniform average of the teachers: 1/K everywhere, [K, B]."""
    num_teachers = _positive_int(num_teachers, "num_teachers")
    batch = _positive_int(batch, "batch")
    return jnp.full((num_teachers, batch), 1.0 / num_teachers, jnp.float32)


def fixed_weights(weights_K: Sequence[float] | jax.Array, batch: int) -> jax.Array:
    """Fixed per-teacher weights, normalised to sum 1, broadcast to [K, B], no gradient.

    Raises:
      ValueError: if a weight is negative or all are zero (checked whenever the
        weights are concrete, i.e. not traced inside ``jit``), or not 1-D.
    """
    batch = _positive_int(batch, "batch")
    weights_K = jnp.asarray(weights_K, jnp.float32)
    _check_ndim(weights_K, 1, "weights_K")
    values = _concrete(weights_K)
    if values is not None and (np.any(values < 0) or not np.any(values > 0)):
        raise ValueError(
            f"fixed teacher weights must be non-negative and not all zero, got {values.tolist()}"
        )
    normalised_K = weights_K / jnp.sum(weights_K)
    return _sg(jnp.broadcast_to(normalised_K[:, None], (weights_K.shape[0], batch)))


def random_teacher_weights(rng: jax.Array, num_teachers: int, batch: int) -> jax.Array:
    """One teacher drawn uniformly for the whole batch: a one-hot row of ones, [K, B]."""
    num_teachers = _positive_int(num_teachers, "num_teachers")
    batch = _positive_int(batch, "batch")
    teacher = jax.random.randint(rng, (), 0, num_teachers)
    one_hot_K = jax.nn.one_hot(teacher, num_teachers, dtype=jnp.float32)
    return jnp.broadcast_to(one_hot_K[:, None], (num_teachers, batch))


def best_teacher_weights(ce_KxB: jax.Array) -> jax.Array:
    """One-hot on each instance's lowest-CE teacher (ties → lowest index), [K, B], no gradient."""
    _check_ndim(ce_KxB, 2, "ce_KxB")
    ce_KxB = jnp.asarray(ce_KxB, jnp.float32)
    best_B = jnp.argmin(ce_KxB, axis=0)
    return _sg(jax.nn.one_hot(best_B, ce_KxB.shape[0], axis=0, dtype=jnp.float32))


def weighted_teacher_loss(weights_KxB: jax.Array, kd_KxB: jax.Array) -> jax.Array:
    """mean_j Σ_k w_kj · KD_kj: the multi-teacher KD term for any of the weights above."""
    return jnp.mean(jnp.sum(jnp.asarray(weights_KxB) * jnp.asarray(kd_KxB), axis=0))


# --- Dynamic KD: teacher adoption (SPEC §5.2) -----------------------------------------


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
    _check_choice(mode, ADOPTION_MODES, "mode")
    _check_ndim(u_B, 1, "u_B")
    u_B = jnp.clip(_sg(jnp.asarray(u_B, jnp.float32)), 0.0, 1.0)
    sizes_K = jnp.asarray(sizes_K, jnp.float32)
    _check_ndim(sizes_K, 1, "sizes_K")
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
    return _sg(weights_KxB)


# --- Dynamic KD: data selection (SPEC §5.2) -------------------------------------------


def selection_scores(
    student_logits_BxC: jax.Array,
    labels_B: jax.Array | None,
    criterion: str,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Per-instance selection scores, float32 [B], higher = selected first, no gradient.

    criterion:
      'entropy'           H(p_s) (high entropy first)
      'margin'            −(p_top1 − p_top2) (low margin first)
      'least_confidence'  1 − max_c p_s (low max-probability first)
      'kl_to_label'       KL(onehot(y) ‖ p_s) = −log p_s[y] (``labels_B`` required)
      'random'            uniform [0, 1) from ``rng`` (required)

    Raises:
      ValueError: unknown criterion (the message lists the names), a missing rng or
        labels, or C < 2 for 'margin'.
    """
    _check_choice(criterion, SELECTION_CRITERIA, "criterion")
    _check_ndim(student_logits_BxC, 2, "student_logits_BxC")
    batch, num_classes = jnp.shape(student_logits_BxC)
    if criterion == "random":
        if rng is None:
            raise ValueError("criterion='random' needs an rng")
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if criterion == "entropy":
        scores_B = _entropy(student_logits_BxC)
    elif criterion == "margin":
        if num_classes < 2:
            raise ValueError(f"criterion='margin' needs C >= 2 classes, got C={num_classes}")
        top2_Bx2, _ = jax.lax.top_k(jnp.exp(_log_probs(student_logits_BxC)), 2)
        scores_B = -(top2_Bx2[:, 0] - top2_Bx2[:, 1])
    elif criterion == "least_confidence":
        scores_B = 1.0 - jnp.max(jnp.exp(_log_probs(student_logits_BxC)), axis=-1)
    else:
        if labels_B is None:
            raise ValueError("criterion='kl_to_label' needs labels_B")
        scores_B = instance_cross_entropy(student_logits_BxC, labels_B)
    return _sg(scores_B)


def num_selected(batch: int, ratio: float) -> int:
    """How many instances keep the KD loss: max(1, ⌊B·r⌋), a static Python int.

    ``B·r`` gets 1e-9 added before the floor so that binary rounding (100·0.29 =
    28.999…) does not lose an instance.

    Raises:
      ValueError: if ``batch`` is not a positive int or ``ratio`` is not in (0, 1].
    """
    batch = _positive_int(batch, "batch")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.number)):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return max(1, math.floor(batch * float(ratio) + 1e-9))


def select_top(scores_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k highest-scoring instances, deterministically.

    Args:
      scores_B: [B] scores (e.g. :func:`selection_scores`).
      k: a static Python int, 1 ≤ k ≤ B (e.g. :func:`num_selected`).
    Returns:
      (indices int32 [k] in descending score order, ties → lower index first;
       mask float32 [B], 1.0 on the selected instances).
    Raises:
      ValueError: if k is not an int in [1, B].
    """
    _check_ndim(scores_B, 1, "scores_B")
    batch = jnp.shape(scores_B)[0]
    k = _positive_int(k, "k")
    if k > batch:
        raise ValueError(f"k must be in [1, {batch}], got {k}")
    _, indices_k = jax.lax.top_k(_sg(jnp.asarray(scores_B, jnp.float32)), k)
    indices_k = indices_k.astype(jnp.int32)
    mask_B = jnp.zeros((batch,), jnp.float32).at[indices_k].set(1.0)
    return indices_k, mask_B


# --- Dynamic KD: objective adaptation (SPEC §5.2) -------------------------------------


def rep_per_instance(
    student_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    weights: jax.Array | None = None,
) -> jax.Array:
    """PKD representation loss per instance, float32 [B], averaged over layer pairs.

    Each list holds one entry per matched layer pair (student layer i ↔ teacher layer
    i·L_t/L_s, embeddings included), already projected to the same width: [B, D]
    (e.g. the [CLS] vector). Each pair uses ``losses.pkd``'s convention: both sides
    L2-normalised over D, squared error *averaged* over D (PKD's paper sums over D;
    the two differ by the constant factor D). [B, L, D] features also work: the value
    is then averaged over tokens with ``weights`` [B, L] (None: all tokens).

    Raises:
      ValueError: if the lists are empty or of different lengths, or a pair's shapes differ.
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if not student_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"need one student and one teacher feature per layer pair, got "
            f"{len(student_feats)} and {len(teacher_feats)}"
        )
    per_pair = [
        losses.pkd(jnp.asarray(s), jnp.asarray(t), weights)[0]
        for s, t in zip(student_feats, teacher_feats, strict=True)
    ]
    return jnp.mean(jnp.stack(per_pair), axis=0)


def objective_adaptation(u_B: jax.Array, kd_B: jax.Array, rep_B: jax.Array) -> jax.Array:
    """mean_j((1 − u_j)·KD_j) + mean_j(u_j·REP_j), u stop-gradiented (the task CE is separate).

    Confident instances lean on predictions (KD), uncertain ones on representations.
    """
    u_B = _sg(jnp.asarray(u_B, jnp.float32))
    return jnp.mean((1.0 - u_B) * kd_B) + jnp.mean(u_B * rep_B)


# --- Reinforced teacher selection (SPEC §5.1) -----------------------------------------


def policy_features(
    instance_BxD: jax.Array, teacher_probs_KxBxC: jax.Array, teacher_ce_KxB: jax.Array
) -> jax.Array:
    """State s_jk = [instance feature_j, teacher k's soft labels p_kj, CE_k(y_j)], [K, B, F].

    F = D + C + 1; everything stop-gradiented (the state is an input of the policy).
    """
    _check_ndim(instance_BxD, 2, "instance_BxD")
    _check_ndim(teacher_probs_KxBxC, 3, "teacher_probs_KxBxC")
    _check_ndim(teacher_ce_KxB, 2, "teacher_ce_KxB")
    num_teachers, batch, _ = jnp.shape(teacher_probs_KxBxC)
    if jnp.shape(instance_BxD)[0] != batch or jnp.shape(teacher_ce_KxB) != (num_teachers, batch):
        raise ValueError(
            f"inconsistent shapes: instance {jnp.shape(instance_BxD)}, teacher probs "
            f"{jnp.shape(teacher_probs_KxBxC)}, teacher CE {jnp.shape(teacher_ce_KxB)}"
        )
    instance_KxBxD = jnp.broadcast_to(
        jnp.asarray(instance_BxD, jnp.float32)[None],
        (num_teachers, *jnp.shape(instance_BxD)),
    )
    s_KxBxF = jnp.concatenate(
        [
            instance_KxBxD,
            jnp.asarray(teacher_probs_KxBxC, jnp.float32),
            jnp.asarray(teacher_ce_KxB, jnp.float32)[..., None],
        ],
        axis=-1,
    )
    return _sg(s_KxBxF)


def init_policy_params(rng: jax.Array, feature_dim: int) -> dict[str, jax.Array]:
    """{'kernel': [F] ~ N(0, 0.01²), 'bias': [] = 0}: σ ≈ 0.5 for every state at start."""
    feature_dim = _positive_int(feature_dim, "feature_dim")
    return {
        "kernel": 0.01 * jax.random.normal(rng, (feature_dim,), jnp.float32),
        "bias": jnp.zeros((), jnp.float32),
    }


def policy_logits(params: PolicyParams, s_KxBxF: jax.Array) -> jax.Array:
    """w·s_jk + b, [K, B]; the policy's probability of using teacher k is σ = sigmoid of it."""
    kernel_F = params["kernel"]
    if jnp.shape(kernel_F) != jnp.shape(s_KxBxF)[-1:]:
        raise ValueError(
            f"policy kernel shape {jnp.shape(kernel_F)} does not fit features of width "
            f"{jnp.shape(s_KxBxF)[-1]}"
        )
    return jnp.einsum("kbf,f->kb", jnp.asarray(s_KxBxF, jnp.float32), kernel_F) + params["bias"]


def bernoulli_log_prob(actions_KxB: jax.Array, logits_KxB: jax.Array) -> jax.Array:
    """log π(a | s) = a·log σ(l) + (1 − a)·log σ(−l), stable for any logit, [K, B]."""
    actions_KxB = jnp.asarray(actions_KxB, jnp.float32)
    return actions_KxB * jax.nn.log_sigmoid(logits_KxB) + (1.0 - actions_KxB) * jax.nn.log_sigmoid(
        -logits_KxB
    )


def bernoulli_entropy(logits_KxB: jax.Array) -> jax.Array:
    """−σ log σ − (1 − σ) log(1 − σ) per (teacher, instance), nats, [K, B]."""
    sigma_KxB = jax.nn.sigmoid(logits_KxB)
    return -(
        sigma_KxB * jax.nn.log_sigmoid(logits_KxB)
        + (1.0 - sigma_KxB) * jax.nn.log_sigmoid(-logits_KxB)
    )


def sample_actions(rng: jax.Array, logits_KxB: jax.Array) -> jax.Array:
    """a_jk ~ Bernoulli(sigmoid(l_jk)), float32 in {0, 1}, [K, B], no gradient."""
    probs_KxB = jax.nn.sigmoid(_sg(jnp.asarray(logits_KxB, jnp.float32)))
    return jax.random.bernoulli(rng, probs_KxB).astype(jnp.float32)


def rl_reward(
    student_ce_after_B: jax.Array,
    teacher_ce_KxB: jax.Array | None,
    actions_KxB: jax.Array | None,
    variant: str,
) -> jax.Array:
    """Reward per instance, float32 [B], no gradient.

    variant:
      'batch_ce'             −mean_j CE_after_j, the same for every instance (the paper's)
      'instance_ce'          −CE_after_j
      'instance_ce_teacher'  −CE_after_j − Σ_k a_jk·CE_kj / max(1, Σ_k a_jk)
    ``student_ce_after_B`` is the student's CE after the update; the teacher CE and
    actions are needed (and read) only by 'instance_ce_teacher'.
    """
    _check_choice(variant, REWARD_VARIANTS, "variant")
    ce_after_B = jnp.asarray(student_ce_after_B, jnp.float32)
    _check_ndim(ce_after_B, 1, "student_ce_after_B")
    if variant == "batch_ce":
        reward_B = jnp.full(ce_after_B.shape, -jnp.mean(ce_after_B))
    elif variant == "instance_ce":
        reward_B = -ce_after_B
    else:
        if teacher_ce_KxB is None or actions_KxB is None:
            raise ValueError("variant='instance_ce_teacher' needs teacher_ce_KxB and actions_KxB")
        actions_KxB = jnp.asarray(actions_KxB, jnp.float32)
        chosen_ce_B = jnp.sum(actions_KxB * jnp.asarray(teacher_ce_KxB, jnp.float32), axis=0)
        reward_B = -ce_after_B - chosen_ce_B / jnp.maximum(1.0, jnp.sum(actions_KxB, axis=0))
    return _sg(reward_B)


def update_baseline(
    baseline: jax.Array | float,
    count: jax.Array | int,
    reward_B: jax.Array,
    decay: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Moving-average reward baseline b ← decay·b + (1 − decay)·mean_j R_j.

    The first update (count == 0) sets b to the batch-mean reward, so the baseline has
    no bias toward its initial value. Returns (baseline float32 [], count + 1 int32 []),
    both without gradient.

    Raises:
      ValueError: if a concrete decay is outside [0, 1].
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    mean_reward = jnp.mean(jnp.asarray(reward_B, jnp.float32))
    baseline = jnp.asarray(baseline, jnp.float32)
    count = jnp.asarray(count, jnp.int32)
    decay = jnp.asarray(decay, jnp.float32)
    moved = decay * baseline + (1.0 - decay) * mean_reward
    return _sg(jnp.where(count == 0, mean_reward, moved)), count + 1


def reinforce_loss(
    log_prob_KxB: jax.Array, reward_B: jax.Array, baseline: jax.Array | float
) -> jax.Array:
    """−mean_j[(R_j − b)·Σ_k log π(a_jk | s_jk)], advantage stop-gradiented.

    Its gradient w.r.t. the policy parameters is the REINFORCE estimator
    −mean_j (R_j − b)·∇ Σ_k log π(a_jk | s_jk): minimise it to maximise the reward.
    """
    _check_ndim(log_prob_KxB, 2, "log_prob_KxB")
    advantage_B = _sg(jnp.asarray(reward_B, jnp.float32) - jnp.asarray(baseline, jnp.float32))
    return -jnp.mean(advantage_B * jnp.sum(log_prob_KxB, axis=0))


def rl_student_kd(kd_KxB: jax.Array, actions_KxB: jax.Array) -> jax.Array:
    """mean_jk(a_jk·KD_jk): the student's KD term (total α·this + (1 − α)·CE, SPEC §5.1)."""
    return jnp.mean(_sg(jnp.asarray(actions_KxB, jnp.float32)) * kd_KxB)
