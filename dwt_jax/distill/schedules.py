"""Weight and temperature schedules: pure functions ``step -> value``.

Each works on Python ints and on traced int32 steps inside ``jit``. A schedule is
configured by a small section (see ``configs/base.py``, ``distill.alpha_s``, and
docs/methods.md#dwt-schedules)::

    name       'constant' | 'linear' | 'ki' | 'cosine' | 'cutoff' | 'strong_to_normal'
               | 'wsd' | 'phase' | 'gap'
    value      the value at step 0 (the stable value of 'wsd')
    end_value  the value the schedule reaches ('linear', 'cosine', 'wsd'; 'ki', 'cutoff',
               'phase' and 'gap' reach 0)
    steps      the step at which it gets there (decay length, KI's T/α_T, the cut-off
               step); for 'wsd', 'phase' and 'gap' the length of the final decay
    warmup     'wsd': steps of the warm-up from 0 to ``value`` (0 = none)
    start      'wsd' and 'phase': the step at which the final decay begins
    margin     'gap': the student counts as caught up when its held-out loss is at most
               the teacher's + margin
    patience   'gap': ...at that many evaluations in a row

The self-ending schedules ('wsd', 'phase', 'gap': docs/methods.md#self-ending-schedules)
end the teacher's role: :func:`zero_from` says from which step a schedule is 0 for
good, so the run can drop the teacher's forward pass. 'gap' decides that step from the
held-out losses (`GapSchedule`): its trigger lives in the strategy's checkpointed state.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from dwt_jax.errors import ConfigError

Schedule = Callable[[jax.Array | int], jax.Array]

KNOWN_SCHEDULES = (
    "constant", "linear", "ki", "cosine", "cutoff", "strong_to_normal", "wsd", "phase", "gap",
)  # fmt: skip
SCHEDULE_FIELDS = ("name", "value", "end_value", "steps", "warmup", "start", "margin", "patience")
# The fields each schedule reads beyond name and value (others must be left unset).
_READS = {
    "constant": (),
    "linear": ("end_value", "steps"),
    "ki": ("steps",),
    "cosine": ("end_value", "steps"),
    "cutoff": ("steps",),
    "strong_to_normal": ("end_value", "steps"),
    "wsd": ("end_value", "steps", "warmup", "start"),
    "phase": ("steps", "start"),
    "gap": ("steps", "margin", "patience"),
}
# Schedules that reach 0: never a temperature.
_TO_ZERO = ("ki", "cutoff", "phase", "gap")
# 'gap''s defaults (docs/methods.md#self-ending-schedules): caught up = level with the
# teacher (margin 0) at two evaluations in a row.
GAP_DEFAULTS = {"margin": 0.0, "patience": 2}
# The trigger step of a 'gap' schedule that has not triggered (int32's largest).
NEVER = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a schedule may take, checked by ``make_schedule``."""

    low: float
    """The smallest value allowed (ignored for a temperature)."""
    high: float
    """The largest value allowed."""
    meaning: str
    """The range as the error states it, e.g. '[0, 1000] (the KL weight)'."""
    temperature: bool = False
    """A temperature: every value must be > 0, and the schedule may not reach 0."""


def _fraction(step: jax.Array | int, steps: int) -> jax.Array:
    """min(step / steps, 1) as float32."""
    return jnp.clip(jnp.asarray(step, jnp.float32) / max(int(steps), 1), 0.0, 1.0)


def constant(value: float) -> Schedule:
    return lambda step: jnp.full((), value, jnp.float32)


def linear(value: float, end_value: float, steps: int) -> Schedule:
    """``value`` → ``end_value`` linearly over ``steps``, then ``end_value`` (a floor)."""
    return lambda step: value + (end_value - value) * _fraction(step, steps)


def ki_decay(value: float, steps: int) -> Schedule:
    """Knowledge Inheritance: α_t = value · max(1 − t/steps, 0); distillation off after."""
    return lambda step: value * (1.0 - _fraction(step, steps))


def cosine(value: float, end_value: float, steps: int) -> Schedule:
    """Half-cosine from ``value`` to ``end_value`` over ``steps``, then ``end_value``."""

    def schedule(step: jax.Array | int) -> jax.Array:
        weight = 0.5 * (1.0 + jnp.cos(jnp.pi * _fraction(step, steps)))
        return end_value + (value - end_value) * weight

    return schedule


def cutoff(value: float, steps: int) -> Schedule:
    """``value`` before step ``steps``, 0 from it on (a hard switch)."""
    return lambda step: jnp.where(jnp.asarray(step) < steps, value, 0.0).astype(jnp.float32)


def strong_to_normal(value: float, end_value: float, steps: int) -> Schedule:
    """The DWT paper's recommendation: start Strong (α_s=4), decay linearly to Normal (1)."""
    return linear(value, end_value, steps)


def phase(value: float, start: int, steps: int) -> Schedule:
    """``value`` before step ``start``, then linearly to 0 over ``steps`` (SALT's
    early-phase distillation)."""
    return lambda step: value * (1.0 - _fraction(jnp.asarray(step) - start, steps))


def wsd(value: float, end_value: float, warmup: int, start: int, steps: int) -> Schedule:
    """Warm-up from 0 to ``value`` over ``warmup`` steps, stable at ``value`` until
    ``start``, then linearly to ``end_value`` over ``steps`` (a warmup–stable–decay
    weight, as the learning rate's phases are)."""

    def schedule(step: jax.Array | int) -> jax.Array:
        rise = _fraction(step, warmup) if warmup > 0 else 1.0
        fall = _fraction(jnp.asarray(step) - start, steps)
        return value * rise + (end_value - value) * fall

    return schedule


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """A schedule of the step alone, behind the interface a strategy drives every α_s
    schedule through (as `GapSchedule` has it): no state, no decision after an
    evaluation, and 0 for good from ``zero_step`` (None: never)."""

    schedule: Schedule
    zero_step: int | None = None
    decides: ClassVar[bool] = False

    def __call__(self, step: jax.Array | int) -> jax.Array:
        return self.schedule(step)

    def at(self, step: jax.Array | int, state: Mapping[str, Any]) -> jax.Array:
        del state
        return self.schedule(step)

    def init_state(self) -> dict[str, jax.Array]:
        return {}

    def decide(
        self, state: Mapping[str, Any], step: int, student_loss: float, teacher_loss: float
    ) -> tuple[None, None, None]:
        del state, step, student_loss, teacher_loss
        return None, None, None

    def zero_from(self, state: Mapping[str, Any]) -> int | None:
        del state
        return self.zero_step


@dataclasses.dataclass(frozen=True)
class GapSchedule:
    """α = ``value`` until the trigger step T (set by :meth:`decide` from the held-out
    losses), then linearly to 0 over ``steps``: ``value · (1 − min((t − T)/steps, 1))``.

    The trigger and the count of evaluations in a row within the margin are state
    (``init_state``), checkpointed with the run, so a resumed run decides as an
    uninterrupted one."""

    value: float
    margin: float
    patience: int
    steps: int
    decides: ClassVar[bool] = True

    def __call__(self, step: jax.Array | int, trigger: jax.Array | int = NEVER) -> jax.Array:
        since = jnp.asarray(step, jnp.float32) - jnp.asarray(trigger, jnp.float32)
        return self.value * (1.0 - _fraction(since, self.steps))

    def at(self, step: jax.Array | int, state: Mapping[str, Any]) -> jax.Array:
        return self(step, state["gap_trigger"])

    def init_state(self) -> dict[str, jax.Array]:
        return {"gap_trigger": jnp.array(NEVER, jnp.int32), "gap_streak": jnp.array(0, jnp.int32)}

    def decide(
        self, state: Mapping[str, Any], step: int, student_loss: float, teacher_loss: float
    ) -> tuple[dict[str, int], float, str | None]:
        """(the new state, the gap, a line to print or None) after the evaluation at
        ``step``; once triggered, the state no longer changes."""
        trigger, streak = int(state["gap_trigger"]), int(state["gap_streak"])
        gap = float(student_loss) - float(teacher_loss)
        if trigger != NEVER:
            return {"gap_trigger": trigger, "gap_streak": streak}, gap, None
        streak = streak + 1 if gap <= self.margin else 0
        if streak < self.patience:
            return {"gap_trigger": NEVER, "gap_streak": streak}, gap, None
        line = (
            f"step {step}: the student's held-out loss is within {self.margin:g} of the "
            f"teacher's ({gap:+.4f}) at {streak} evaluations in a row; α_s decays to 0 "
            f"over {self.steps} steps, the teacher's role ends at step {step + self.steps}."
        )
        return {"gap_trigger": step, "gap_streak": streak}, gap, line

    def zero_from(self, state: Mapping[str, Any]) -> int | None:
        """The step from which α is 0 for good, once triggered (None before)."""
        trigger = int(state["gap_trigger"])
        return None if trigger == NEVER else trigger + self.steps


def _get(section: Any, key: str, default: Any = None) -> Any:
    """``section[key]``, or ``default`` where the field is absent or unset (None)."""
    value = section.get(key, None) if hasattr(section, "get") else None
    return default if value is None else value


def schedule_section(
    name: str = "constant",
    value: float = 1.0,
    end_value: float | None = None,
    steps: int = 0,
    **fields: Any,
) -> ml_collections.ConfigDict:
    """A schedule's config section with every field (:data:`SCHEDULE_FIELDS`) present,
    so that any may be set from the command line; those not given are typed
    placeholders (None: unset), e.g. ``schedule_section('gap', 1.0, steps=40)``."""
    unknown = sorted(set(fields) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ValueError(f"schedule_section: unknown field(s) {unknown}")
    types = {"warmup": int, "start": int, "margin": float, "patience": int}
    section = ml_collections.ConfigDict()
    section.name, section.value, section.steps = name, float(value), int(steps)
    section.end_value = float(value if end_value is None else end_value)
    for key, field_type in types.items():
        section[key] = fields.get(key, config_dict.placeholder(field_type))
    return section


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_schedule(section: Any, field: str, bounds: Bounds | None = None) -> None:
    """Refuses a schedule section that ``make_schedule`` cannot build, or whose values
    leave ``bounds``, with a `ConfigError` naming ``field`` (e.g. 'distill.alpha_s')."""
    if not isinstance(section, (Mapping, ml_collections.ConfigDict)):
        raise ConfigError(
            f"{field}={section!r} must be a schedule section: {{'name': 'constant', 'value': "
            "1.0, 'end_value': 1.0, 'steps': 0}."
        )
    unknown = sorted(set(section) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]} is not a schedule setting; use {', '.join(SCHEDULE_FIELDS)}."
        )
    for key in ("name", "value"):
        if key not in section:
            raise ConfigError(f"{field}.{key} is missing; set it (see configs/base.py).")
    name = section["name"]
    if name not in KNOWN_SCHEDULES:
        raise ConfigError(
            f"{field}.name={name!r} is unknown; use one of {', '.join(KNOWN_SCHEDULES)}."
        )
    for key in ("value", "end_value"):
        if key not in section:
            continue
        value = section[key]
        if not _is_number(value):
            raise ConfigError(f"{field}.{key}={value!r} must be a number.")
        if bounds is None:
            continue
        ok = value > 0 if bounds.temperature else bounds.low <= value
        if not (ok and value <= bounds.high):
            raise ConfigError(f"{field}.{key}={value!r} must be in {bounds.meaning}.")
    steps = section.get("steps", 0)
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool):
        raise ConfigError(f"{field}.steps={steps!r} must be an integer.")
    if steps <= 0 and name != "constant":
        raise ConfigError(
            f"{field}.steps={steps!r}: schedule {name!r} needs the step at which it "
            f"reaches its end; set {field}.steps > 0 (or {field}.name='constant')."
        )
    _check_phase_fields(section, field, name)
    if (
        bounds is not None
        and bounds.temperature
        and (name in _TO_ZERO or (name == "wsd" and _get(section, "warmup", 0)))
    ):
        raise ConfigError(
            f"{field}.name={name!r} takes the temperature to 0; use constant, "
            "linear, cosine or strong_to_normal."
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _check_phase_fields(section: Any, field: str, name: str) -> None:
    """The fields of the self-ending schedules, where read: present and well formed.
    (Fields a schedule does not read are ignored: a config carries every field, so that
    switching ``name`` on the command line needs no other change.)"""
    if name in ("wsd", "phase") and _get(section, "start") is None:
        raise ConfigError(
            f"{field}.start is missing: schedule {name!r} needs the step at which its final "
            f"decay begins (e.g. half the run: train.num_steps // 2)."
        )
    for key in ("warmup", "start", "patience"):
        if key in _READS[name] and _get(section, key) is not None and not _is_count(section[key]):
            raise ConfigError(f"{field}.{key}={section[key]!r} must be an integer >= 0.")
    if name == "wsd" and _get(section, "warmup", 0) > section["start"]:
        raise ConfigError(
            f"{field}.warmup={section['warmup']!r} is after {field}.start="
            f"{section['start']!r}: the warm-up must end before the decay begins."
        )
    if name == "gap":
        margin = _get(section, "margin", GAP_DEFAULTS["margin"])
        if not _is_number(margin) or not math.isfinite(margin):
            raise ConfigError(f"{field}.margin={margin!r} must be a finite number.")
        if _get(section, "patience", GAP_DEFAULTS["patience"]) < 1:
            raise ConfigError(
                f"{field}.patience={section['patience']!r} must be at least 1 (evaluations "
                "in a row within the margin before the teacher's weight decays)."
            )


def zero_from(section: Any) -> int | None:
    """The first step from which the (checked) schedule is 0 for good, None if it never
    is or (for 'gap') if only the run decides it (``GapSchedule.zero_from``)."""
    name, value = section["name"], float(section["value"])
    end_value = float(section.get("end_value", value))
    steps = int(section.get("steps", 0))
    if name == "constant":
        return 0 if value == 0 else None
    if name in ("ki", "cutoff"):
        return 0 if value == 0 else steps
    if name == "phase":
        return 0 if value == 0 else int(section["start"]) + steps
    if name == "wsd":
        return int(section["start"]) + steps if end_value == 0 else None
    if name in ("linear", "cosine", "strong_to_normal"):
        return (0 if value == 0 else steps) if end_value == 0 else None
    return None


def make_weight_schedule(
    section: Any, field: str, bounds: Bounds | None = None
) -> StepSchedule | GapSchedule:
    """A teacher-weight schedule behind one interface (``at``, ``init_state``,
    ``decide``, ``zero_from``, ``decides``): 'gap' as it is, any other as a
    `StepSchedule` with its :func:`zero_from`."""
    schedule = make_schedule(section, field, bounds)
    if isinstance(schedule, GapSchedule):
        return schedule
    return StepSchedule(schedule, zero_from(section))


def make_schedule(section: Any, field: str, bounds: Bounds | None = None) -> Schedule:
    """The schedule a config section describes, checked (``check_schedule``);
    ``field`` names it in errors."""
    check_schedule(section, field, bounds)
    name = section["name"]
    value = float(section["value"])
    end_value = float(section.get("end_value", value))
    steps = int(section.get("steps", 0))
    if name == "constant":
        return constant(value)
    if name == "linear":
        return linear(value, end_value, steps)
    if name == "ki":
        return ki_decay(value, steps)
    if name == "cosine":
        return cosine(value, end_value, steps)
    if name == "cutoff":
        return cutoff(value, steps)
    if name == "phase":
        return phase(value, int(section["start"]), steps)
    if name == "wsd":
        return wsd(value, end_value, int(_get(section, "warmup", 0)), int(section["start"]), steps)
    if name == "gap":
        return GapSchedule(
            value,
            float(_get(section, "margin", GAP_DEFAULTS["margin"])),
            int(_get(section, "patience", GAP_DEFAULTS["patience"])),
            steps,
        )
    return strong_to_normal(value, end_value, steps)
