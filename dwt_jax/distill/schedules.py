"""Weight and temperature schedules: pure functions ``step -> value`` (SPEC §3).

Each works on Python ints and on traced int32 steps inside ``jit``. A schedule is
configured by a small section (see ``configs/base.py``, ``distill.alpha_s``)::

    name       'constant' | 'linear' | 'ki' | 'cosine' | 'cutoff' | 'strong_to_normal'
    value      the value at step 0
    end_value  the value the schedule reaches ('linear', 'cosine'; 'ki' and 'cutoff' reach 0)
    steps      the step at which it gets there (decay length, KI's T/α_T, the cut-off step)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array | int], jax.Array]

KNOWN_SCHEDULES = ("constant", "linear", "ki", "cosine", "cutoff", "strong_to_normal")


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


def make_schedule(section: Mapping[str, Any], field: str) -> Schedule:
    """The schedule a config section describes; ``field`` names it in errors."""
    name = section["name"]
    value = float(section["value"])
    end_value = float(section.get("end_value", value))
    steps = int(section.get("steps", 0))
    if name not in KNOWN_SCHEDULES:
        raise ValueError(
            f"{field}.name={name!r} is unknown; use one of {', '.join(KNOWN_SCHEDULES)}."
        )
    if name != "constant" and steps <= 0:
        raise ValueError(f"{field}.steps={steps} must be > 0 for schedule {name!r}.")
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
