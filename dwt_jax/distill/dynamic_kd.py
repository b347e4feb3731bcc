"""Dynamic KD (Li et al., EMNLP 2021; docs/methods.md#dynamic-kd): distillation driven
by the student's uncertainty u_j = H(p_s,j)/log C.

Three mechanisms, each optional (``distill.dynamic_kd``):

``adoption``   'none' (uniform), 'hard', 'soft' or 'soft_instance': confident
               instances learn from larger teachers, uncertain ones from smaller
               (K > 2 teachers: linear interpolation over their sizes).
``selection``  'none', 'entropy', 'margin', 'least_confidence', 'kl_to_label' or
               'random' with ``ratio`` r: only the top ⌊B·r⌋ instances are
               distilled, and the teachers run **on those rows only** (a static
               subset inside ``jit``), so teacher compute falls to r of full KD.
               The task loss still uses the whole batch.
``objective``  'prediction' (KD only) or 'adaptive':
               ``mean((1−u)·KD) + mean(u·REP)`` with REP a PKD loss on the [CLS]
               states of matched layers (student layer i ↔ teacher layer
               ⌈i·L_t/L_s⌉, embeddings included) through student-side projections.

KD defaults to MSE on logits as in the paper's code; ``kd='kl'`` uses τ²·KL with τ = 5.
Loss: ``L = CE + kd_weight · (KD term)``. Every rank and mean is over the global batch
(docs/methods.md#global-batch-statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from dwt_jax.distill import weighting
from dwt_jax.distill.adapters import HiddenProjections
from dwt_jax.distill.base import Batch, Metrics, ModelOutputs, StepContext, Strategy
from dwt_jax.distill.dwt import hidden_layer_pairs
from dwt_jax.distill.multi_teacher import stack_teacher_logits
from dwt_jax.distill.task import check_keys, example_weights, sub_config, task_metrics
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig

ADOPTIONS = ("none", "hard", "soft", "soft_instance")
SELECTIONS = ("none", "entropy", "margin", "least_confidence", "kl_to_label", "random")
OBJECTIVES = ("prediction", "adaptive")
KINDS = ("mse", "kl")
_KEYS = ("adoption", "selection", "ratio", "objective", "kd", "tau", "kd_weight")


def _choice(value: str, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        raise ConfigError(
            f"distill.dynamic_kd.{field}={value!r} is unknown; use one of {', '.join(allowed)}."
        )
    return value


class DynamicKD(Strategy):
    """Uncertainty-driven teacher adoption, data selection and objective adaptation."""

    name: ClassVar[str] = "dynamic_kd"
    mode: ClassVar[str] = "finetune"
    needs_class_probabilities: ClassVar[bool] = True
    num_teachers: ClassVar[tuple[int, int | None]] = (1, None)

    def __init__(
        self,
        *,
        adoption: str = "soft_instance",
        selection: str = "none",
        ratio: float = 1.0,
        objective: str = "prediction",
        kd: str = "mse",
        tau: float = 5.0,
        kd_weight: float = 1.0,
    ) -> None:
        self.adoption = _choice(adoption, ADOPTIONS, "adoption")
        self.selection = _choice(selection, SELECTIONS, "selection")
        self.objective = _choice(objective, OBJECTIVES, "objective")
        self.kd = _choice(kd, KINDS, "kd")
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"distill.dynamic_kd.ratio={ratio!r} must be in (0, 1].")
        if not tau > 0:
            raise ConfigError(f"distill.dynamic_kd.tau={tau!r} must be positive.")
        if kd_weight < 0:
            raise ConfigError(f"distill.dynamic_kd.kd_weight={kd_weight!r} must be >= 0.")
        self.ratio, self.tau, self.kd_weight = float(ratio), float(tau), float(kd_weight)
        if self.selection != "none":
            self.teacher_forward = "lazy"
        if self.objective == "adaptive":
            self.student_output_kwargs = {"output_hidden_states": True}
            self.teacher_output_kwargs = {"output_hidden_states": True}

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> DynamicKD:
        section = dict(sub_config(distill_config, cls.name))
        check_keys(section, _KEYS, "distill.dynamic_kd")
        for key in ("ratio", "tau", "kd_weight"):
            if key in section:
                section[key] = float(section[key])
        return cls(**section)

    def init_adapters(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        if self.objective != "adaptive":
            return {}
        adapters = {}
        for k, teacher in enumerate(teachers):
            pairs = hidden_layer_pairs("uniform", student.num_layers, teacher.num_layers)
            module = HiddenProjections(len(pairs), teacher.hidden_size, student.initializer_range)
            dummy = [jnp.zeros((1, student.hidden_size), jnp.float32)] * len(pairs)
            adapters[f"teacher{k}"] = module.init(jax.random.fold_in(rng, k), dummy)["params"]
        return {"rep": adapters}

    def _rep_matrix(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        rows_N: jax.Array | None,
        adapters: Mapping[str, Any],
    ) -> jax.Array:
        """REP_kj [K,N]: PKD on the [CLS] states of matched layers, per teacher."""
        student_cls = [h[:, 0].astype(jnp.float32) for h in student["hidden_states"]]
        if rows_N is not None:
            student_cls = [h[rows_N] for h in student_cls]
        rows = []
        for k, teacher in enumerate(teachers):
            teacher_cls = [h[:, 0].astype(jnp.float32) for h in teacher["hidden_states"]]
            pairs = hidden_layer_pairs("uniform", len(student_cls) - 1, len(teacher_cls) - 1)
            module = HiddenProjections(len(pairs), teacher_cls[0].shape[-1])
            projected = module.apply(
                {"params": adapters["rep"][f"teacher{k}"]}, [student_cls[i] for i, _ in pairs]
            )
            rows.append(weighting.rep_per_instance(projected, [teacher_cls[t] for _, t in pairs]))
        return jnp.stack(rows)

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        logits_BxC = student["logits"].astype(jnp.float32)
        task_loss, metrics = task_metrics(logits_BxC, batch)
        batch_size = logits_BxC.shape[0]
        uncertainty_B = weighting.normalized_uncertainty(jax.lax.stop_gradient(logits_BxC))
        real_B = example_weights(batch)

        if self.selection == "none":
            rows_N = None
            teacher_outputs = list(teachers)
            student_N = logits_BxC
            uncertainty_N, real_N = uncertainty_B, real_B
        else:
            scores_B = weighting.selection_scores(
                jax.lax.stop_gradient(logits_BxC), batch["labels"], self.selection, ctx.rng
            )
            # Padding rows are never worth a teacher forward.
            scores_B = jnp.where(real_B > 0, scores_B, -jnp.inf)
            count = weighting.num_selected(batch_size, self.ratio)
            rows_N, _ = weighting.select_top(scores_B, count)
            teacher_outputs = teachers.on_rows(rows_N)  # type: ignore[attr-defined]
            student_N = logits_BxC[rows_N]
            uncertainty_N, real_N = uncertainty_B[rows_N], real_B[rows_N]

        teacher_logits_KxNxC = stack_teacher_logits(teacher_outputs)
        num_teachers = teacher_logits_KxNxC.shape[0]
        if self.adoption == "none":
            weights_KxN = weighting.uniform_weights(num_teachers, student_N.shape[0])
        else:
            sizes = jnp.asarray(teachers.sizes, jnp.float32)  # type: ignore[attr-defined]
            weights_KxN = weighting.adoption_weights(uncertainty_N, sizes, self.adoption)
        weights_KxN = jax.lax.stop_gradient(weights_KxN)
        kd_N = jnp.sum(
            weights_KxN
            * weighting.kd_per_teacher(student_N, teacher_logits_KxNxC, self.kd, self.tau),
            axis=0,
        )
        # Means over the real instances: padding rows (weight 0) dilute nothing.
        scale = real_N.shape[0] / jnp.maximum(jnp.sum(real_N), 1e-9)
        kd_N = kd_N * real_N * scale
        if self.objective == "adaptive":
            rep_N = jnp.sum(
                weights_KxN * self._rep_matrix(student, teacher_outputs, rows_N, ctx.adapters),
                axis=0,
            )
            rep_N = rep_N * real_N * scale
            kd_term = weighting.objective_adaptation(uncertainty_N, kd_N, rep_N)
            metrics["kd/rep"] = jnp.mean(rep_N)
        else:
            kd_term = jnp.mean(kd_N)
        loss = task_loss + self.kd_weight * kd_term
        metrics.update(
            {
                "kd/loss": kd_term,
                "kd/mean_uncertainty": jnp.sum(uncertainty_B * real_B)
                / jnp.maximum(jnp.sum(real_B), 1e-9),
                "kd/distilled_fraction": jnp.asarray(student_N.shape[0] / batch_size, jnp.float32),
                "kd/distilled_uncertainty": jnp.sum(uncertainty_N * real_N)
                / jnp.maximum(jnp.sum(real_N), 1e-9),
                **{f"kd/weight_teacher{k}": jnp.mean(weights_KxN[k]) for k in range(num_teachers)},
            }
        )
        return loss, metrics, dict(ctx.state)
