"""DWT: distillation from a (weaker) teacher in pre-training (SPEC §3).

``form='dwt'`` (the DWT paper, eq. 3)::

    L = α_h · MLM + α_s(t) · τ(t)² · KL(p_teacher^τ ‖ p_student^τ)

``form='ki'`` (Knowledge Inheritance)::

    L = (1 − α_t) · MLM + α_t · τ(t)² · KL(p_teacher^τ ‖ p_student^τ)

Both over the masked positions only; α_s/α_t and τ are schedules of the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import ml_collections

from dwt_jax import losses
from dwt_jax.distill.base import Batch, Metrics, ModelOutputs, Strategy, mlm_metrics
from dwt_jax.distill.schedules import Schedule, make_schedule

FORMS = ("dwt", "ki")


class DWTStrategy(Strategy):
    """Masked-LM loss plus the teacher's soft labels, weighted by schedules."""

    name: ClassVar[str] = "dwt"
    num_teachers: ClassVar[tuple[int, int | None]] = (1, 1)

    def __init__(self, *, form: str, alpha_h: float, alpha_s: Schedule, tau: Schedule) -> None:
        if form not in FORMS:
            raise ValueError(f"distill.form={form!r} is unknown; use one of {', '.join(FORMS)}.")
        self.form = form
        self.alpha_h = alpha_h
        self.alpha_s = alpha_s
        self.tau = tau

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> DWTStrategy:
        return cls(
            form=distill_config.form,
            alpha_h=float(distill_config.alpha_h),
            alpha_s=make_schedule(distill_config.alpha_s, "distill.alpha_s"),
            tau=make_schedule(distill_config.tau, "distill.tau"),
        )

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        step: jax.Array,
        state: Mapping[str, Any],
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        (teacher,) = teachers
        mlm_loss, metrics = mlm_metrics(student, batch)
        alpha = self.alpha_s(step)
        tau = self.tau(step)
        _, kl = losses.kl_divergence(
            student["mlm_logits"],
            teacher["mlm_logits"],
            batch["masked_weights"],
            temperature=tau,
            scale_by_temperature_squared=False,
        )
        soft = tau**2 * kl
        if self.form == "dwt":
            loss = self.alpha_h * mlm_loss + alpha * soft
        else:
            loss = (1.0 - alpha) * mlm_loss + alpha * soft
        metrics.update({"distill/kl": kl, "distill/alpha": alpha, "distill/tau": tau})
        return loss, metrics, dict(state)
