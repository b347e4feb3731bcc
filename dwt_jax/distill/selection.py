"""Dynamic KD's data selection and objective adaptation (docs/methods.md#dynamic-kd).

Pure ``jax.numpy`` functions with static shapes: the selection scores rank the
instances of the *global* batch (docs/methods.md#global-batch-statistics) and
``select_top`` keeps a static number of them, so the teachers run on that subset
only. Every name here is also reachable as ``dwt_jax.distill.weighting.<name>``.

Decisions the methods leave open:
- ``num_selected`` floors B·r after adding 1e-9, so binary rounding (100·0.29 =
  28.999…) does not drop an instance.
- ``select_top`` returns indices in descending score order (ties: lower index first).
- ``rep_per_instance`` follows ``losses.pkd``: the squared error of the L2-normalised
  features is *averaged* over D (PKD's paper sums; the two differ by the constant D).
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
    entropy,
    instance_cross_entropy,
    log_probs,
    positive_int,
    sg,
)

SELECTION_CRITERIA = ("entropy", "margin", "least_confidence", "kl_to_label", "random")


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
    check_choice(criterion, SELECTION_CRITERIA, "criterion")
    check_ndim(student_logits_BxC, 2, "student_logits_BxC")
    batch, num_classes = jnp.shape(student_logits_BxC)
    if criterion == "random":
        if rng is None:
            raise ValueError("criterion='random' needs an rng")
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if criterion == "entropy":
        scores_B = entropy(student_logits_BxC)
    elif criterion == "margin":
        if num_classes < 2:
            raise ValueError(f"criterion='margin' needs C >= 2 classes, got C={num_classes}")
        top2_Bx2, _ = jax.lax.top_k(jnp.exp(log_probs(student_logits_BxC)), 2)
        scores_B = -(top2_Bx2[:, 0] - top2_Bx2[:, 1])
    elif criterion == "least_confidence":
        scores_B = 1.0 - jnp.max(jnp.exp(log_probs(student_logits_BxC)), axis=-1)
    else:
        if labels_B is None:
            raise ValueError("criterion='kl_to_label' needs labels_B")
        scores_B = instance_cross_entropy(student_logits_BxC, labels_B)
    return sg(scores_B)


def num_selected(batch: int, ratio: float) -> int:
    """How many instances keep the KD loss: max(1, ⌊B·r⌋), a static Python int.

    ``B·r`` gets 1e-9 added before the floor so that binary rounding (100·0.29 =
    28.999…) does not lose an instance.

    Raises:
      ValueError: if ``batch`` is not a positive int or ``ratio`` is not in (0, 1].
    """
    batch = positive_int(batch, "batch")
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
    check_ndim(scores_B, 1, "scores_B")
    batch = jnp.shape(scores_B)[0]
    k = positive_int(k, "k")
    if k > batch:
        raise ValueError(f"k must be in [1, {batch}], got {k}")
    _, indices_k = jax.lax.top_k(sg(jnp.asarray(scores_B, jnp.float32)), k)
    indices_k = indices_k.astype(jnp.int32)
    mask_B = jnp.zeros((batch,), jnp.float32).at[indices_k].set(1.0)
    return indices_k, mask_B


# --- Dynamic KD: objective adaptation -------------------------------------------------


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
    u_B = sg(jnp.asarray(u_B, jnp.float32))
    return jnp.mean((1.0 - u_B) * kd_B) + jnp.mean(u_B * rep_B)
