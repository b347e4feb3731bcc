"""Weight and temperature schedules: pure functions ``step -> value``.

Each works on Python ints and on traced int32 steps inside ``jit``. A schedule is
configured by a small section (see ``configs/base.py``, ``distill.alpha_s``, and
docs/methods.md#dwt-schedules)::

    name       'constant' | 'linear' | 'ki' | 'cosine' | 'cutoff' | 'strong_to_normal'
    value      the value at step 0
    end_value  the value the schedule reaches ('linear', 'cosine'; 'ki' and 'cutoff' reach 0)
    steps      the step at which it gets there (decay length, KI's T/α_T, the cut-off step)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dwt_jax.errors import ConfigError

Schedule = Callable[[jax.Array | int], jax.Array]

KNOWN_SCHEDULES = ("constant", "linear", "ki", "cosine", "cutoff", "strong_to_normal")
SCHEDULE_FIELDS = ("name", "value", "end_value", "steps")
# Schedules that reach 0: never a temperature.
_TO_ZERO = ("ki", "cutoff")


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
    if bounds is not None and bounds.temperature and name in _TO_ZERO:
        raise ConfigError(
            f"{field}.name={name!r} takes the temperature to 0; use constant, "
            "linear, cosine or strong_to_normal."
        )


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
    return strong_to_normal(value, end_value, steps)
