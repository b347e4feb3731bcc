"""α/τ schedules: values at known steps, the same under jit, clear errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dwt_jax.distill import schedules


def section(name, value=1.0, end_value=1.0, steps=0):
    return {"name": name, "value": value, "end_value": end_value, "steps": steps}


CASES = [
    # (config, {step: expected value})
    (section("constant", 4.0), {0: 4.0, 10**6: 4.0}),
    (section("linear", 1.0, 0.2, 100), {0: 1.0, 50: 0.6, 100: 0.2, 500: 0.2}),
    (section("ki", 1.0, steps=200), {0: 1.0, 100: 0.5, 200: 0.0, 10**5: 0.0}),
    (section("cosine", 2.0, 0.0, 100), {0: 2.0, 50: 1.0, 100: 0.0, 300: 0.0}),
    (section("cutoff", 1.0, steps=10), {0: 1.0, 9: 1.0, 10: 0.0, 11: 0.0}),
    (section("strong_to_normal", 4.0, 1.0, 100), {0: 4.0, 25: 3.25, 100: 1.0, 10**4: 1.0}),
]


@pytest.mark.parametrize(("config", "expected"), CASES, ids=[c["name"] for c, _ in CASES])
def test_schedule_values(config, expected):
    schedule = schedules.make_schedule(config, "distill.alpha_s")
    jitted = jax.jit(schedule)
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(jitted(np.int32(step))), value, rtol=1e-6, atol=1e-7)


def test_decaying_schedules_never_increase():
    for config, _ in CASES:
        schedule = schedules.make_schedule(config, "distill.alpha_s")
        values = np.array([float(schedule(s)) for s in range(0, 400, 7)])
        assert np.all(np.diff(values) <= 1e-7), config["name"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (section("exponential"), "distill.tau.name='exponential' is unknown"),
        (section("linear", 1.0, 0.0, 0), "distill.tau.steps=0: schedule 'linear' needs the step"),
    ],
)
def test_bad_schedules_name_the_field(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schedules.make_schedule(config, "distill.tau")
