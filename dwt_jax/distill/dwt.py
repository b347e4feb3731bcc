"""DWT: distillation from a (weaker) teacher in pre-training (docs/methods.md#dwt).

``form='dwt'`` (the DWT paper, eq. 3)::

    L = α_h · MLM + α_s(t) · τ(t)² · KL(p_teacher^τ ‖ p_student^τ)

``form='ki'`` (Knowledge Inheritance)::

    L = (1 − α_t) · MLM + α_t · τ(t)² · KL(p_teacher^τ ‖ p_student^τ)

Over the masked positions (a masked LM) or every predicted position of the packed
documents (a causal LM, where MLM reads "next-token cross-entropy" and the KL may be
``distill.divergence`` = 'reverse_kl' or 'jsd' with ``distill.jsd_beta``:
docs/methods.md#decoders); α_s/α_t and τ are schedules of the step.

Optional (our extension, docs/methods.md#feature-losses):
``+ hidden_weight · mean_pairs hidden_loss(P_j h_s^i, h_t^{m(i)})`` over real
(non-padding) tokens, with ``m`` the uniform layer map
(embeddings included) or only the last layers, and ``P_j`` a learned student-side
projection per pair (``distill/adapters.py``).

``DWTStrategy.from_config`` checks every setting above (the schedules' sections and
ranges included, docs/methods.md#dwt-schedules): a config it accepts trains.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from dwt_jax import losses
from dwt_jax.distill.adapters import HiddenProjections
from dwt_jax.distill.base import (
    Batch,
    Metrics,
    ModelOutputs,
    StepContext,
    Strategy,
    StrategySetup,
)
from dwt_jax.distill.schedules import (
    Bounds,
    Schedule,
    StepSchedule,
    make_schedule,
    make_weight_schedule,
)
from dwt_jax.distill.teacher_mix import WEIGHTINGS, mixed_lm_loss
from dwt_jax.distill.terms import head_settings, lm_loss
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig

FORMS = ("dwt", "ki")
# D(p_teacher^τ ‖ p_student^τ) of the soft term (docs/methods.md#decoders).
DIVERGENCES = ("kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = {"mse": losses.hidden_mse, "pkd": losses.pkd, "cosine": losses.cosine_distance}
HIDDEN_LAYER_MAPS = ("uniform", "last")
# The values of distill.alpha_s by form, and of distill.tau.
ALPHA_BOUNDS = {
    # (1 - α_t)·MLM + α_t·τ²·KL: a convex mix.
    "ki": Bounds(0.0, 1.0, "[0, 1] for distill.form='ki' ((1-α)·MLM + α·KL)"),
    # α_h·MLM + α_s(t)·τ²·KL.
    "dwt": Bounds(0.0, 1e3, "[0, 1000] (the KL weight: 1 = Normal, 4 = Strong)"),
}
TAU_BOUNDS = Bounds(0.0, 1e3, "(0, 1000] (a temperature is positive)", temperature=True)


def _known(value: Any, allowed: Sequence[str], field: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{field}={value!r} is unknown; use one of {', '.join(allowed)}.")
    return value


def _number_in(
    distill_config: ml_collections.ConfigDict, key: str, low: float, high: float
) -> float:
    value = distill_config.get(key)
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number and low <= value <= high):
        raise ConfigError(f"distill.{key}={value!r} must be a number in [{low}, {high}].")
    return float(value)


def hidden_layer_pairs(how: str, num_student: int, num_teacher: int) -> tuple[tuple[int, int], ...]:
    """(student, teacher) ``hidden_states`` indices to match (0 = embeddings)."""
    if how == "uniform":
        return losses.uniform_layer_map(num_student, num_teacher, include_embeddings=True)
    return losses.last_k_layer_map(num_student, num_teacher, 1)


class DWTStrategy(Strategy):
    """Masked-LM loss plus the teacher's soft labels, weighted by schedules."""

    name: ClassVar[str] = "dwt"
    mode: ClassVar[str] = "pretrain"
    num_teachers: ClassVar[tuple[int, int | None]] = (1, None)

    def __init__(
        self,
        *,
        form: str,
        alpha_h: float,
        alpha_s: Schedule,
        tau: Schedule,
        hidden_weight: float = 0.0,
        hidden_loss: str = "mse",
        hidden_layer_map: str = "uniform",
        fused: bool = True,
        chunk_size: int = 0,
        block_rows: int = 0,
        divergence: str = "kl",
        beta: float = 0.5,
        teacher_weighting: str = "uniform",
        teacher_weights: tuple[float, ...] = (),
    ) -> None:
        """``alpha_s``: a plain schedule of the step, or (as ``from_config`` makes it) a
        `StepSchedule` / `GapSchedule` that also says when it is 0 for good.
        ``teacher_weighting`` (and ``teacher_weights`` for 'fixed') mixes several
        teachers per token (docs/methods.md#several-teachers-in-pre-training)."""
        _known(form, FORMS, "distill.form")
        _known(divergence, DIVERGENCES, "distill.divergence")
        _known(hidden_loss, HIDDEN_LOSSES, "distill.hidden_loss")
        _known(hidden_layer_map, HIDDEN_LAYER_MAPS, "distill.hidden_layer_map")
        self.form = form
        self.alpha_h = alpha_h
        self.alpha_s = alpha_s if hasattr(alpha_s, "at") else StepSchedule(alpha_s)
        self.tau = tau
        self.hidden_weight = hidden_weight
        self.hidden_loss = hidden_loss
        self.hidden_layer_map = hidden_layer_map
        self.fused = fused
        self.chunk_size = chunk_size
        self.block_rows = block_rows
        self.divergence = divergence
        self.beta = beta
        self.teacher_weighting = _known(teacher_weighting, WEIGHTINGS, "distill.teacher_weighting")
        self.teacher_weights = tuple(float(w) for w in teacher_weights)
        self.decides_after_eval = self.alpha_s.decides
        if hidden_weight > 0:
            self.student_output_kwargs = {"output_hidden_states": True}
            self.teacher_output_kwargs = {"output_hidden_states": True}

    def _projections(self, student: BertConfig, teacher: BertConfig) -> HiddenProjections:
        pairs = hidden_layer_pairs(self.hidden_layer_map, student.num_layers, teacher.num_layers)
        return HiddenProjections(len(pairs), teacher.hidden_size, student.initializer_range)

    def init_adapters(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        if self.hidden_weight <= 0:
            return {}
        (teacher,) = teachers
        module = self._projections(student, teacher)
        dummy = [jnp.zeros((1, 1, student.hidden_size), jnp.float32)] * module.count
        return {"hidden": module.init(rng, dummy)["params"]}

    def _hidden_term(
        self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch, adapters: Any
    ) -> jax.Array:
        student_hs, teacher_hs = student["hidden_states"], teacher["hidden_states"]
        pairs = hidden_layer_pairs(self.hidden_layer_map, len(student_hs) - 1, len(teacher_hs) - 1)
        module = HiddenProjections(len(pairs), teacher_hs[0].shape[-1])
        projected = module.apply({"params": adapters["hidden"]}, [student_hs[i] for i, _ in pairs])
        tokens_BxL = (batch["segment_ids"] != 0).astype(jnp.float32)
        loss_fn = HIDDEN_LOSSES[self.hidden_loss]
        terms = [
            loss_fn(p, teacher_hs[t].astype(jnp.float32), tokens_BxL)[1]
            for p, (_, t) in zip(projected, pairs, strict=True)
        ]
        return sum(terms) / len(terms)

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> DWTStrategy:
        # Required settings are read as attributes: a missing one is a KeyError that
        # the caller's ``fields_as_in`` names as the reference config has it.
        form = _known(distill_config["form"], FORMS, "distill.form")
        alpha_h = _number_in(distill_config, "alpha_h", 0.0, 1e3)
        alpha_s = make_weight_schedule(
            distill_config["alpha_s"], "distill.alpha_s", ALPHA_BOUNDS[form]
        )
        tau = make_schedule(distill_config["tau"], "distill.tau", TAU_BOUNDS)
        hidden_weight = 0.0
        if distill_config.get("hidden_weight", 0.0):
            hidden_weight = _number_in(distill_config, "hidden_weight", 0.0, 1e3)
        divergence = _known(
            distill_config.get("divergence", "kl"), DIVERGENCES, "distill.divergence"
        )
        beta = 0.5
        if divergence == "jsd":
            beta = _number_in(distill_config, "jsd_beta", 0.0, 1.0)
            if not 0.0 < beta < 1.0:
                raise ConfigError(
                    f"distill.jsd_beta={beta!r} must be strictly between 0 and 1 (at 0 or 1 "
                    "the divergence is zero whatever the models predict)."
                )
        rule = _known(
            distill_config.get("teacher_weighting", "uniform"),
            WEIGHTINGS,
            "distill.teacher_weighting",
        )
        fixed = tuple(distill_config.get("teacher_weights", ()) or ())
        if rule == "fixed" and (
            not fixed
            or any(isinstance(w, bool) or not isinstance(w, numbers.Real) or w < 0 for w in fixed)
            or not any(w > 0 for w in fixed)
        ):
            raise ConfigError(
                f"distill.teacher_weights={fixed!r}: distill.teacher_weighting='fixed' needs one "
                "non-negative weight per teacher, not all zero, e.g. (0.5, 0.5)."
            )
        return cls(
            form=form,
            alpha_h=alpha_h,
            alpha_s=alpha_s,
            tau=tau,
            hidden_weight=hidden_weight,
            hidden_loss=distill_config.get("hidden_loss", "mse"),
            hidden_layer_map=distill_config.get("hidden_layer_map", "uniform"),
            divergence=divergence,
            beta=beta,
            teacher_weighting=rule,
            teacher_weights=fixed,
            **head_settings(distill_config),
        )

    def check_setup(self, setup: StrategySetup) -> None:
        super().check_setup(setup)
        if self.teacher_weighting == "fixed" and len(self.teacher_weights) != setup.num_teachers:
            raise ConfigError(
                f"distill.teacher_weights has {len(self.teacher_weights)} weights for "
                f"{setup.num_teachers} teachers; give one per teacher, in teacher.workdirs order."
            )
        if self.hidden_weight > 0 and setup.num_teachers > 1:
            raise ConfigError(
                "distill.hidden_weight > 0 matches one teacher's hidden states; with "
                f"{setup.num_teachers} teachers set distill.hidden_weight=0."
            )

    def init_state(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        del rng, student, teachers
        return self.alpha_s.init_state()

    def hard_weight(self, alpha: jax.Array | float) -> jax.Array | float:
        """The hard loss's coefficient: α_h ('dwt' form) or 1 − α ('ki' form)."""
        return self.alpha_h if self.form == "dwt" else 1.0 - alpha

    def after_eval(
        self,
        state: Mapping[str, Any],
        step: int,
        student_loss: float,
        teacher_loss: float | None,
    ) -> tuple[dict[str, Any] | None, dict[str, float], str | None]:
        """The 'gap' schedule's decision (docs/methods.md#self-ending-schedules)."""
        if teacher_loss is None:
            return None, {}, None
        new_state, gap, line = self.alpha_s.decide(state, step, student_loss, teacher_loss)
        return new_state, {} if gap is None else {"distill/gap": gap}, line

    def teacher_free_from(self, state: Mapping[str, Any]) -> int | None:
        if self.hidden_weight > 0:  # The hidden-state term still reads the teacher.
            return None
        return self.alpha_s.zero_from(state)

    def without_teachers(self) -> Strategy | None:
        return None if self.hidden_weight > 0 else TeacherFreeDWT(self)

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        alpha = self.alpha_s.at(ctx.step, ctx.state)
        tau = self.tau(ctx.step)
        outputs = list(teachers)
        one_fused_cache = (
            len(outputs) == 1 and self.divergence == "kl" and self.block_rows > 0
        )  # One cached teacher under KL: the fused head below takes its top-k rows.
        if len(outputs) > 1 or ("sparse_targets" in outputs[0] and not one_fused_cache):
            # Several teachers, or a cached one: per-token mix of sparse/dense terms.
            loss, _, divergence, metrics = mixed_lm_loss(
                student, outputs, batch,
                hard_weight=self.hard_weight(alpha), soft_weight=alpha * tau**2,
                temperature=tau, divergence=self.divergence, beta=self.beta,
                block_rows=self.block_rows, rule=self.teacher_weighting,
                sizes=teachers.sizes if hasattr(teachers, "sizes") else [1] * len(outputs),
                fixed=self.teacher_weights,
            )  # fmt: skip
            metrics.update(
                {
                    f"distill/{self.divergence}": divergence,
                    "distill/alpha": alpha,
                    "distill/tau": tau,
                }
            )
            return loss, metrics, dict(ctx.state)
        (teacher,) = outputs
        loss, _, divergence, metrics = lm_loss(
            student,
            batch,
            teacher=teacher,
            hard_weight=self.hard_weight(alpha),
            soft_weight=alpha * tau**2,
            temperature=tau,
            divergence=self.divergence,
            beta=self.beta,
            fused=self.fused,
            chunk_size=self.chunk_size,
            block_rows=self.block_rows,
        )
        metrics.update(
            {f"distill/{self.divergence}": divergence, "distill/alpha": alpha, "distill/tau": tau}
        )
        if self.hidden_weight > 0:
            hidden = self._hidden_term(student, teacher, batch, ctx.adapters)
            loss = loss + self.hidden_weight * hidden
            metrics["distill/hidden"] = hidden
        return loss, metrics, dict(ctx.state)


class TeacherFreeDWT(Strategy):
    """DWT once α_s is 0 for good: the hard loss alone, weighted as DWT weighs it, with
    no teacher (so the step runs no teacher forward pass). The run switches to it at
    ``DWTStrategy.teacher_free_from``; it keeps DWT's state (e.g. the 'gap' trigger)
    unchanged, and logs ``distill/alpha`` = 0 and ``distill/teacher_free`` = 1.
    Not chosen by name: only a run's switch makes it."""

    name: ClassVar[str] = "dwt"
    mode: ClassVar[str] = "pretrain"
    num_teachers: ClassVar[tuple[int, int | None]] = (0, 0)

    def __init__(self, dwt: DWTStrategy) -> None:
        self.dwt = dwt

    def init_state(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        return self.dwt.init_state(rng, student, teachers)

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        del teachers
        dwt = self.dwt
        loss, _, _, metrics = lm_loss(
            student,
            batch,
            hard_weight=dwt.hard_weight(0.0),
            fused=dwt.fused,
            chunk_size=dwt.chunk_size,
            block_rows=dwt.block_rows,
        )
        zero = jnp.zeros((), jnp.float32)
        metrics.update(
            {
                "distill/alpha": zero,
                "distill/tau": dwt.tau(ctx.step),
                "distill/teacher_free": zero + 1,
            }
        )
        return loss, metrics, dict(ctx.state)
