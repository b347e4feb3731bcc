"""Reinforced multi-teacher selection (Yuan et al., AAAI 2021; docs/methods.md#rl-kd).

A policy decides, per instance j and teacher k, whether the student learns from that
teacher: ``σ_jk = sigmoid(w·s_jk + b)``, ``a_jk ~ Bernoulli(σ_jk)``, with the state
``s_jk`` = [stop-gradient student [CLS] feature, teacher k's soft labels, teacher k's
CE on the gold label]. The student minimises ``α·mean_jk(a_jk·KD_jk) + (1−α)·CE``.
After the student's update the policy gets the reward R (by default −(the updated
student's CE on the batch)) and takes a REINFORCE step
``∇J = E[(R − b)·∇ Σ_k log π(a_jk|s_jk)]`` with a moving-average baseline b
(**Decision:** log π and a baseline, which the public re-implementation omits).

The policy's parameters, its Adam state and the baseline live in the strategy state,
so they are checkpointed and resumed with the student. ``warmup_steps``: the student
first learns from all teachers (a_jk = 1, i.e. the averaged teachers) and the policy
is not updated; then the two alternate every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dwt_jax.distill import weighting
from dwt_jax.distill.base import Batch, Metrics, ModelOutputs, StepContext, Strategy
from dwt_jax.distill.multi_teacher import stack_teacher_logits
from dwt_jax.distill.task import (
    check_keys,
    example_weights,
    sub_config,
    task_metrics,
    weighted_mean,
)
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig

REWARDS = ("batch_ce", "instance_ce", "instance_ce_teacher")
_KEYS = (
    "alpha",
    "kd",
    "tau",
    "reward",
    "baseline_decay",
    "policy_learning_rate",
    "warmup_steps",
)


class RLKD(Strategy):
    """Per-instance teacher selection by a policy trained with REINFORCE."""

    name: ClassVar[str] = "rl_kd"
    mode: ClassVar[str] = "finetune"
    needs_class_probabilities: ClassVar[bool] = True
    num_teachers: ClassVar[tuple[int, int | None]] = (1, None)
    has_after_update: ClassVar[bool] = True

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        kd: str = "kl",
        tau: float = 1.0,
        reward: str = "batch_ce",
        baseline_decay: float = 0.9,
        policy_learning_rate: float = 1e-3,
        warmup_steps: int = 0,
    ) -> None:
        field = "distill.rl_kd"
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"{field}.alpha={alpha!r} must be in [0, 1].")
        if kd not in ("kl", "ce", "mse"):
            raise ConfigError(f"{field}.kd={kd!r} is unknown; use one of kl, ce, mse.")
        if reward not in REWARDS:
            raise ConfigError(
                f"{field}.reward={reward!r} is unknown; use one of {', '.join(REWARDS)}."
            )
        if not 0.0 <= baseline_decay < 1.0:
            raise ConfigError(f"{field}.baseline_decay={baseline_decay!r} must be in [0, 1).")
        if not policy_learning_rate > 0:
            raise ConfigError(f"{field}.policy_learning_rate={policy_learning_rate!r} must be > 0.")
        if not tau > 0:
            raise ConfigError(f"{field}.tau={tau!r} must be positive.")
        if int(warmup_steps) < 0:
            raise ConfigError(f"{field}.warmup_steps={warmup_steps!r} must be >= 0.")
        self.alpha, self.kd, self.tau = float(alpha), kd, float(tau)
        self.reward, self.baseline_decay = reward, float(baseline_decay)
        self.warmup_steps = int(warmup_steps)
        self.policy_optimizer = optax.adam(float(policy_learning_rate))

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> RLKD:
        section = dict(sub_config(distill_config, cls.name))
        check_keys(section, _KEYS, "distill.rl_kd")
        return cls(**section)

    def init_state(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        del teachers
        # s_jk = [student [CLS] feature (D), teacher k's class probabilities (C), CE_k].
        feature_dim = student.hidden_size + student.num_labels + 1
        policy = weighting.init_policy_params(rng, feature_dim)
        return {
            "policy": policy,
            "policy_opt": self.policy_optimizer.init(policy),
            "baseline": jnp.zeros((), jnp.float32),
            "baseline_count": jnp.zeros((), jnp.int32),
        }

    def _policy(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        labels_B: jax.Array,
        ctx: StepContext,
    ):
        """(features, policy logits, actions, teacher logits, teacher CE) for the batch
        under the policy in ``ctx.state``, sampled with ``ctx.rng``; actions are all
        ones during warm-up."""
        teacher_logits_KxBxC = stack_teacher_logits(teachers)
        teacher_ce_KxB = weighting.teacher_cross_entropy(teacher_logits_KxBxC, labels_B)
        features_KxBxF = weighting.policy_features(
            student["pooled"].astype(jnp.float32),
            jax.nn.softmax(teacher_logits_KxBxC, axis=-1),
            teacher_ce_KxB,
        )
        logits_KxB = weighting.policy_logits(ctx.state["policy"], features_KxBxF)
        sampled_KxB = weighting.sample_actions(ctx.rng, logits_KxB)
        warming_up = ctx.step < self.warmup_steps
        actions_KxB = jnp.where(warming_up, jnp.ones_like(sampled_KxB), sampled_KxB)
        return features_KxBxF, logits_KxB, actions_KxB, teacher_logits_KxBxC, teacher_ce_KxB

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        if ctx.rng is None:
            raise ValueError("rl_kd needs the step's rng to sample its actions.")
        logits_BxC = student["logits"].astype(jnp.float32)
        task_loss, metrics = task_metrics(logits_BxC, batch)
        _, policy_logits_KxB, actions_KxB, teacher_logits_KxBxC, _ = self._policy(
            jax.lax.stop_gradient(student), teachers, batch["labels"], ctx
        )
        real_B = example_weights(batch)
        kd_KxB = weighting.kd_per_teacher(logits_BxC, teacher_logits_KxBxC, self.kd, self.tau)
        # mean_jk(a_jk·KD_jk) over the real instances (padding rows have weight 0).
        chosen_KxB = jax.lax.stop_gradient(actions_KxB) * kd_KxB
        kd = weighted_mean(jnp.mean(chosen_KxB, axis=0), real_B)
        loss = self.alpha * kd + (1.0 - self.alpha) * task_loss
        probs_KxB = jax.nn.sigmoid(policy_logits_KxB)
        uncertainty_B = weighting.normalized_uncertainty(jax.lax.stop_gradient(logits_BxC))
        metrics.update(
            {
                "kd/loss": kd,
                "kd/mean_uncertainty": weighted_mean(uncertainty_B, real_B),
                "kd/distilled_fraction": jnp.mean(jnp.max(actions_KxB, axis=0)),
                "rl/entropy": jnp.mean(weighting.bernoulli_entropy(policy_logits_KxB)),
                **{
                    f"kd/weight_teacher{k}": jnp.mean(actions_KxB[k])
                    for k in range(actions_KxB.shape[0])
                },
                **{
                    f"rl/select_prob_teacher{k}": jnp.mean(probs_KxB[k])
                    for k in range(probs_KxB.shape[0])
                },
            }
        )
        return loss, metrics, dict(ctx.state)

    def after_update(
        self,
        *,
        student: ModelOutputs,
        student_after: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[dict[str, Any], Metrics]:
        state, step = ctx.state, ctx.step
        features_KxBxF, _, actions_KxB, _, teacher_ce_KxB = self._policy(
            student, teachers, batch["labels"], ctx
        )
        student_ce_after_B = weighting.instance_cross_entropy(
            student_after["logits"].astype(jnp.float32), batch["labels"]
        )
        reward_B = weighting.rl_reward(student_ce_after_B, teacher_ce_KxB, actions_KxB, self.reward)
        # Before the first update the baseline is the reward itself (advantage 0).
        baseline = jnp.where(state["baseline_count"] > 0, state["baseline"], jnp.mean(reward_B))

        def policy_loss(policy: Any) -> jax.Array:
            logits_KxB = weighting.policy_logits(policy, features_KxBxF)
            log_prob_KxB = weighting.bernoulli_log_prob(actions_KxB, logits_KxB)
            return weighting.reinforce_loss(log_prob_KxB, reward_B, baseline)

        loss, grads = jax.value_and_grad(policy_loss)(state["policy"])
        updates, policy_opt = self.policy_optimizer.update(grads, state["policy_opt"])
        new_baseline, new_count = weighting.update_baseline(
            state["baseline"], state["baseline_count"], reward_B, self.baseline_decay
        )
        learning = step >= self.warmup_steps
        # The first update only sets the baseline: its advantage is 0 up to rounding,
        # which Adam would blow up into a full step in a random direction.
        learn_policy = learning & (state["baseline_count"] > 0)

        def keep_or(when: jax.Array, new: Any, old: Any) -> Any:
            return jax.tree.map(lambda n, o: jnp.where(when, n, o), new, old)

        new_state = {
            "policy": keep_or(
                learn_policy, optax.apply_updates(state["policy"], updates), state["policy"]
            ),
            "policy_opt": keep_or(learn_policy, policy_opt, state["policy_opt"]),
            "baseline": keep_or(learning, new_baseline, state["baseline"]),
            "baseline_count": keep_or(learning, new_count, state["baseline_count"]),
        }
        metrics = {
            "rl/reward": jnp.mean(reward_B),
            "rl/baseline": baseline,
            "rl/advantage": jnp.mean(reward_B) - baseline,
            "rl/policy_loss": loss,
        }
        return new_state, metrics
