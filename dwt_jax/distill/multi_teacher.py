"""Several teachers, one student, per-instance teacher weights (fine-tuning).

Every strategy here computes ``L = L_task + kd_weight · mean_j Σ_k W_kj · KD_kj``
(+ MT-BERT's hidden term) and differs only in the weights ``W`` [K,B]:

``mt_bert``         1/(1 + CE_k(y_j)), no gradient through them; KD = soft CE at τ;
                    plus the multi-teacher hidden loss (docs/methods.md#mt-bert).
``ca_mkd``          (1 − softmax_k CE_k(y_j)) / (K − 1); KD = τ²·KL, τ = 4
                    (docs/methods.md#ca-mkd).
``avg_teachers``    1/K (the uniform average).
``random_teacher``  one teacher, drawn per batch.
``fixed_weights``   weights given in the config (normalised to sum 1).
``best_teacher``    the teacher with the lowest CE on instance j.

All weights are functions of global-batch arrays (no per-shard statistics,
docs/methods.md#global-batch-statistics), see `dwt_jax.distill.weighting`. Sub-configs
live in ``distill.<strategy name>``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from dwt_jax import losses
from dwt_jax.distill import weighting
from dwt_jax.distill.adapters import HiddenProjections
from dwt_jax.distill.base import (
    Batch,
    Metrics,
    ModelOutputs,
    StepContext,
    Strategy,
    StrategySetup,
)
from dwt_jax.distill.dwt import hidden_layer_pairs
from dwt_jax.distill.task import (
    check_keys,
    example_weights,
    sub_config,
    task_loss_per_instance,
    task_metrics,
    weighted_mean,
)
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig

KD_KINDS = ("kl", "ce", "mse")


def stack_teacher_logits(teachers: Sequence[ModelOutputs]) -> jax.Array:
    """[K,B,C] float32 logits of every teacher."""
    return jnp.stack([t["logits"].astype(jnp.float32) for t in teachers])


def weight_metrics(weights_KxB: jax.Array, mask_B: jax.Array) -> Metrics:
    """Mean weight of each teacher over the (real) instances."""
    return {
        f"kd/weight_teacher{k}": weighted_mean(weights_KxB[k], mask_B)
        for k in range(weights_KxB.shape[0])
    }


class WeightedKDStrategy(Strategy):
    """Task loss + Σ_k W_kj·KD_kj; subclasses define the weights ``W``."""

    mode: ClassVar[str] = "finetune"
    num_teachers: ClassVar[tuple[int, int | None]] = (1, None)
    default_kd: ClassVar[str] = "kl"
    default_tau: ClassVar[float] = 1.0
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, kd: str, tau: float, kd_weight: float, **extra: Any) -> None:
        field = f"distill.{self.name}"
        if kd not in KD_KINDS:
            raise ConfigError(f"{field}.kd={kd!r} is unknown; use one of {', '.join(KD_KINDS)}.")
        if not tau > 0:
            raise ConfigError(f"{field}.tau={tau!r} must be positive.")
        if kd_weight < 0:
            raise ConfigError(f"{field}.kd_weight={kd_weight!r} must be >= 0.")
        self.kd, self.tau, self.kd_weight = kd, float(tau), float(kd_weight)
        self.configure(**extra)

    def configure(self, **extra: Any) -> None:
        """Strategy-specific settings (``extra_keys``)."""
        del extra

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> WeightedKDStrategy:
        section = dict(sub_config(distill_config, cls.name))
        check_keys(section, ("kd", "tau", "kd_weight", *cls.extra_keys), f"distill.{cls.name}")
        return cls(
            kd=section.pop("kd", cls.default_kd),
            tau=float(section.pop("tau", cls.default_tau)),
            kd_weight=float(section.pop("kd_weight", 1.0)),
            **section,
        )

    def check_setup(self, setup: StrategySetup) -> None:
        super().check_setup(setup)
        if setup.is_regression and self.kd != "mse":
            field = f"distill.{self.name}.kd"
            raise ConfigError(
                f"{field}={self.kd!r} needs class probabilities, but data.task={setup.task!r} "
                f"is a regression task; set {field}='mse'."
            )

    @abc.abstractmethod
    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        """W [K,B]: the weight of teacher k's KD term on instance j, from the
        teachers' cross-entropy on the gold labels [K,B] (and the step's ``ctx``)."""

    def extra_loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        adapters: Mapping[str, Any],
    ) -> tuple[jax.Array, Metrics]:
        """An additional term (MT-BERT's hidden loss); none by default."""
        return jnp.zeros((), jnp.float32), {}

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        student_logits_BxC = student["logits"].astype(jnp.float32)
        task_loss, metrics = task_metrics(student_logits_BxC, batch)
        mask_B = example_weights(batch)
        teacher_logits_KxBxC = stack_teacher_logits(teachers)
        teacher_ce_KxB = weighting.teacher_cross_entropy(teacher_logits_KxBxC, batch["labels"])
        weights_KxB = jax.lax.stop_gradient(self.teacher_weights(teacher_ce_KxB, ctx))
        kd_KxB = weighting.kd_per_teacher(
            student_logits_BxC, teacher_logits_KxBxC, self.kd, self.tau
        )
        kd = weighted_mean(jnp.sum(weights_KxB * kd_KxB, axis=0), mask_B)
        extra, extra_metrics = self.extra_loss(student, teachers, batch, ctx.adapters)
        loss = task_loss + self.kd_weight * kd + extra
        metrics.update(weight_metrics(weights_KxB, mask_B))
        metrics.update(extra_metrics)
        teacher_loss_KxB = teacher_ce_KxB
        if student_logits_BxC.shape[-1] > 1:
            uncertainty_B = weighting.normalized_uncertainty(
                jax.lax.stop_gradient(student_logits_BxC)
            )
            metrics["kd/mean_uncertainty"] = weighted_mean(uncertainty_B, mask_B)
        else:  # A regression score: no uncertainty, and the task loss is squared error.
            teacher_loss_KxB = jax.vmap(task_loss_per_instance, in_axes=(0, None))(
                teacher_logits_KxBxC, batch["labels"]
            )
        metrics.update(
            {
                "kd/loss": kd,
                "kd/distilled_fraction": jnp.ones((), jnp.float32),
                **{
                    f"kd/teacher{k}_task_loss": weighted_mean(teacher_loss_KxB[k], mask_B)
                    for k in range(teacher_loss_KxB.shape[0])
                },
            }
        )
        return loss, metrics, dict(ctx.state)


class AverageTeachers(WeightedKDStrategy):
    """The uniform average of the teachers' soft labels."""

    name: ClassVar[str] = "avg_teachers"

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        return weighting.uniform_weights(*teacher_ce_KxB.shape)


class RandomTeacher(WeightedKDStrategy):
    """One teacher for the whole batch, drawn uniformly at every step."""

    name: ClassVar[str] = "random_teacher"

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        if ctx.rng is None:
            raise ValueError("random_teacher needs the step's rng.")
        return weighting.random_teacher_weights(ctx.rng, *teacher_ce_KxB.shape)


class FixedWeights(WeightedKDStrategy):
    """Weights set in the config (``distill.fixed_weights.weights``, one per teacher)."""

    name: ClassVar[str] = "fixed_weights"
    extra_keys: ClassVar[tuple[str, ...]] = ("weights",)

    def configure(self, weights: Sequence[float] = ()) -> None:
        self.weights = tuple(float(w) for w in weights)
        if not self.weights:
            raise ConfigError(
                "distill.fixed_weights.weights is empty; give one weight per teacher, "
                "e.g. (0.3, 0.7)."
            )
        if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
            raise ConfigError(
                f"distill.fixed_weights.weights={self.weights!r} must be non-negative and "
                "not all zero."
            )

    def _check_weight_count(self, num_teachers: int) -> None:
        if len(self.weights) != num_teachers:
            raise ConfigError(
                f"distill.fixed_weights.weights has {len(self.weights)} weights for "
                f"{num_teachers} teachers; give one weight per teacher (teacher.workdirs)."
            )

    def check_setup(self, setup: StrategySetup) -> None:
        super().check_setup(setup)
        if not setup.num_teachers_is_minimum:
            self._check_weight_count(setup.num_teachers)

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        num_teachers, batch = teacher_ce_KxB.shape
        self._check_weight_count(num_teachers)  # Also when check_setup was not called.
        return weighting.fixed_weights(jnp.asarray(self.weights, jnp.float32), batch)


class BestTeacher(WeightedKDStrategy):
    """Per instance, the teacher with the lowest loss on the gold label."""

    name: ClassVar[str] = "best_teacher"
    needs_class_probabilities: ClassVar[bool] = True

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        return weighting.best_teacher_weights(teacher_ce_KxB)


class CAMKD(WeightedKDStrategy):
    """Confidence-aware multi-teacher KD: w_kj = (1 − softmax_k CE_kj)/(K − 1), τ = 4."""

    name: ClassVar[str] = "ca_mkd"
    needs_class_probabilities: ClassVar[bool] = True
    default_tau: ClassVar[float] = 4.0

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        return weighting.ca_mkd_weights(teacher_ce_KxB)


class MTBert(WeightedKDStrategy):
    """MT-BERT: L = L_task + L_hid + L_dis (docs/methods.md#mt-bert).

    ``L_dis = mean_j Σ_k CE(p_k^τ, p_s^τ)/(1 + CE_k(y_j))``; ``L_hid = Σ_k mean over
    matched layers of MSE(P_kl·h_s, h_k)`` with student layer j ↔ teacher layer
    ⌈j·L_k/L_s⌉ (embeddings ↔ embeddings) and P a learned student-side projection
    per teacher and layer (the adapters, dropped at export).
    """

    name: ClassVar[str] = "mt_bert"
    needs_class_probabilities: ClassVar[bool] = True
    default_kd: ClassVar[str] = "ce"
    extra_keys: ClassVar[tuple[str, ...]] = ("hidden_weight",)

    def configure(self, hidden_weight: float = 1.0) -> None:
        if hidden_weight < 0:
            raise ConfigError(f"distill.mt_bert.hidden_weight={hidden_weight!r} must be >= 0.")
        self.hidden_weight = float(hidden_weight)
        if self.hidden_weight > 0:
            self.student_output_kwargs = {"output_hidden_states": True}
            self.teacher_output_kwargs = {"output_hidden_states": True}

    def teacher_weights(self, teacher_ce_KxB: jax.Array, ctx: StepContext) -> jax.Array:
        return weighting.mt_bert_weights(teacher_ce_KxB)

    def init_adapters(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        if self.hidden_weight <= 0:
            return {}
        adapters = {}
        for k, teacher in enumerate(teachers):
            pairs = hidden_layer_pairs("uniform", student.num_layers, teacher.num_layers)
            module = HiddenProjections(len(pairs), teacher.hidden_size, student.initializer_range)
            dummy = [jnp.zeros((1, 1, student.hidden_size), jnp.float32)] * len(pairs)
            adapters[f"teacher{k}"] = module.init(jax.random.fold_in(rng, k), dummy)["params"]
        return {"hidden": adapters}

    def extra_loss(self, student, teachers, batch, adapters):
        if self.hidden_weight <= 0:
            return jnp.zeros((), jnp.float32), {}
        student_hs = student["hidden_states"]
        tokens_BxL = (batch["segment_ids"] != 0).astype(jnp.float32)
        tokens_BxL = tokens_BxL * example_weights(batch)[:, None]
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for k, teacher in enumerate(teachers):
            teacher_hs = teacher["hidden_states"]
            pairs = hidden_layer_pairs("uniform", len(student_hs) - 1, len(teacher_hs) - 1)
            module = HiddenProjections(len(pairs), teacher_hs[0].shape[-1])
            projected = module.apply(
                {"params": adapters["hidden"][f"teacher{k}"]}, [student_hs[i] for i, _ in pairs]
            )
            terms = [
                losses.hidden_mse(p, teacher_hs[t].astype(jnp.float32), tokens_BxL)[1]
                for p, (_, t) in zip(projected, pairs, strict=True)
            ]
            term = sum(terms) / len(terms)
            metrics[f"kd/hidden_teacher{k}"] = term
            total = total + term
        metrics["kd/hidden"] = total
        return self.hidden_weight * total, metrics
