"""Reinforced teacher selection: the policy, its rewards and REINFORCE
(docs/methods.md#rl-kd).

Pure ``jax.numpy`` functions with static shapes; the batch-mean reward of the
baseline is taken over the *global* batch (docs/methods.md#global-batch-statistics).
States, sampled actions, rewards and baselines carry no gradient. Every name here is
also reachable as ``dwt_jax.distill.weighting.<name>``.

Decision the methods leave open: the policy starts at kernel ~ N(0, 0.01²), bias 0,
i.e. σ ≈ 0.5: every teacher is initially used on about half the instances.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dwt_jax.distill.arrays import check_choice, check_ndim, positive_int, sg

REWARD_VARIANTS = ("batch_ce", "instance_ce", "instance_ce_teacher")

PolicyParams = Mapping[str, jax.Array]


def policy_features(
    instance_BxD: jax.Array, teacher_probs_KxBxC: jax.Array, teacher_ce_KxB: jax.Array
) -> jax.Array:
    """State s_jk = [instance feature_j, teacher k's soft labels p_kj, CE_k(y_j)], [K, B, F].

    F = D + C + 1; everything stop-gradiented (the state is an input of the policy).
    """
    check_ndim(instance_BxD, 2, "instance_BxD")
    check_ndim(teacher_probs_KxBxC, 3, "teacher_probs_KxBxC")
    check_ndim(teacher_ce_KxB, 2, "teacher_ce_KxB")
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
    return sg(s_KxBxF)


def init_policy_params(rng: jax.Array, feature_dim: int) -> dict[str, jax.Array]:
    """{'kernel': [F] ~ N(0, 0.01²), 'bias': [] = 0}: σ ≈ 0.5 for every state at start."""
    feature_dim = positive_int(feature_dim, "feature_dim")
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
    probs_KxB = jax.nn.sigmoid(sg(jnp.asarray(logits_KxB, jnp.float32)))
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
    check_choice(variant, REWARD_VARIANTS, "variant")
    ce_after_B = jnp.asarray(student_ce_after_B, jnp.float32)
    check_ndim(ce_after_B, 1, "student_ce_after_B")
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
    return sg(reward_B)


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
    return sg(jnp.where(count == 0, mean_reward, moved)), count + 1


def reinforce_loss(
    log_prob_KxB: jax.Array, reward_B: jax.Array, baseline: jax.Array | float
) -> jax.Array:
    """−mean_j[(R_j − b)·Σ_k log π(a_jk | s_jk)], advantage stop-gradiented.

    Its gradient w.r.t. the policy parameters is the REINFORCE estimator
    −mean_j (R_j − b)·∇ Σ_k log π(a_jk | s_jk): minimise it to maximise the reward.
    """
    check_ndim(log_prob_KxB, 2, "log_prob_KxB")
    advantage_B = sg(jnp.asarray(reward_B, jnp.float32) - jnp.asarray(baseline, jnp.float32))
    return -jnp.mean(advantage_B * jnp.sum(log_prob_KxB, axis=0))


def rl_student_kd(kd_KxB: jax.Array, actions_KxB: jax.Array) -> jax.Array:
    """mean_jk(a_jk·KD_jk): the student's KD term (total α·this + (1 − α)·CE,
    docs/methods.md#rl-kd)."""
    return jnp.mean(sg(jnp.asarray(actions_KxB, jnp.float32)) * kd_KxB)
