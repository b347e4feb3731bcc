"""The schedules that end the teacher's role ('wsd', 'phase', 'gap'): their shapes
(Python and traced steps alike), where they are 0 for good, the 'gap' decision on a
scripted sequence of held-out losses, their config checks, and the DWT strategy's
switch to a teacher-free loss that equals its own at α_s = 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dwt_jax.distill import StepContext, make_strategy, schedules
from dwt_jax.distill.dwt import TeacherFreeDWT
from dwt_jax.errors import ConfigError

NEVER = schedules.NEVER


def _values(section, steps, **call):
    schedule = schedules.make_schedule(section, "distill.alpha_s")
    jitted = jax.jit(schedule)
    python = [float(schedule(s, **call)) for s in steps]
    traced = [float(jitted(np.int32(s), **call)) for s in steps]
    np.testing.assert_allclose(traced, python, rtol=1e-6, atol=1e-7)
    return python


def test_phase_holds_then_ramps_to_zero():
    section = schedules.schedule_section("phase", 2.0, steps=10, start=30)
    values = _values(section, [0, 29, 30, 35, 40, 41, 10**6])
    np.testing.assert_allclose(values, [2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0], atol=1e-7)
    assert schedules.zero_from(section) == 40


def test_wsd_warms_up_holds_and_decays_to_its_end_value():
    section = schedules.schedule_section("wsd", 4.0, 1.0, steps=20, warmup=10, start=50)
    values = _values(section, [0, 5, 10, 49, 50, 60, 70, 500])
    np.testing.assert_allclose(values, [0.0, 2.0, 4.0, 4.0, 4.0, 2.5, 1.0, 1.0], atol=1e-6)
    assert schedules.zero_from(section) is None  # Ends at 1, not 0.
    to_zero = schedules.schedule_section("wsd", 1.0, 0.0, steps=20, warmup=0, start=50)
    assert _values(to_zero, [0, 50, 60, 70]) == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert schedules.zero_from(to_zero) == 70


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"name": "constant", "value": 1.0}, None),
        ({"name": "constant", "value": 0.0}, 0),
        ({"name": "ki", "value": 1.0, "steps": 200}, 200),
        ({"name": "cutoff", "value": 1.0, "steps": 7}, 7),
        ({"name": "linear", "value": 1.0, "end_value": 0.0, "steps": 9}, 9),
        ({"name": "linear", "value": 1.0, "end_value": 0.1, "steps": 9}, None),
        ({"name": "cosine", "value": 2.0, "end_value": 0.0, "steps": 5}, 5),
        ({"name": "gap", "value": 1.0, "steps": 5}, None),  # The run decides.
    ],
)
def test_zero_from_is_where_the_schedule_stays_at_zero(section, expected):
    assert schedules.zero_from(section) == expected
    if expected is not None:
        values = _values(section, range(expected, expected + 50, 7))
        assert values == [0.0] * len(values)
        if expected > 0:
            assert _values(section, [expected - 1])[0] > 0


def test_gap_decays_from_its_trigger():
    gap = schedules.make_schedule(schedules.schedule_section("gap", 2.0, steps=4), "alpha")
    assert [float(gap(s)) for s in (0, 100, 10**6)] == [2.0, 2.0, 2.0]  # Not triggered.
    got = _values(schedules.schedule_section("gap", 2.0, steps=4), [9, 10, 11, 12, 14, 99],
                  trigger=10)  # fmt: skip
    np.testing.assert_allclose(got, [2.0, 2.0, 1.5, 1.0, 0.0, 0.0], atol=1e-7)
    assert gap.zero_from({"gap_trigger": 10, "gap_streak": 2}) == 14
    assert gap.zero_from({"gap_trigger": NEVER, "gap_streak": 1}) is None


def _script(gap, student_losses, teacher_loss, every=100):
    """Feeds evaluations (every ``every`` steps) to ``gap.decide``; (states, lines)."""
    state = {k: int(v) for k, v in gap.init_state().items()}
    states, lines = [], []
    for index, loss in enumerate(student_losses):
        state, _, line = gap.decide(state, every * (index + 1), loss, teacher_loss)
        states.append(dict(state))
        lines.append(line)
    return states, lines


def test_gap_triggers_after_patience_evaluations_in_a_row_within_the_margin():
    section = schedules.schedule_section("gap", 1.0, steps=50, margin=0.0, patience=2)
    gap = schedules.make_schedule(section, "distill.alpha_s")
    # Within the margin at 200, not at 300 (the streak restarts), then at 400 and 500.
    states, lines = _script(gap, [5.5, 4.9, 5.1, 5.0, 4.8, 4.0], teacher_loss=5.0)
    assert [s["gap_streak"] for s in states] == [0, 1, 0, 1, 2, 2]
    assert [s["gap_trigger"] for s in states] == [NEVER] * 4 + [500, 500]
    assert [line is not None for line in lines] == [False] * 4 + [True, False]
    assert "step 500" in lines[4] and "ends at step 550" in lines[4]
    # Once triggered, nothing changes it (a student falling behind again included).
    states, _ = _script(gap, [4.0, 4.0, 9.0, 9.0], teacher_loss=5.0)
    assert [s["gap_trigger"] for s in states] == [NEVER, 200, 200, 200]


def test_gap_margin_and_patience():
    loose = schedules.make_schedule(
        schedules.schedule_section("gap", 1.0, steps=10, margin=0.25, patience=1), "alpha"
    )
    states, _ = _script(loose, [5.5, 5.2], teacher_loss=5.0)  # +0.5, then +0.2 ≤ 0.25.
    assert [s["gap_trigger"] for s in states] == [NEVER, 200]
    strict = schedules.make_schedule(
        schedules.schedule_section("gap", 1.0, steps=10, margin=-0.1, patience=3), "alpha"
    )
    states, _ = _script(strict, [4.95, 4.85, 4.8, 4.7, 4.6], teacher_loss=5.0)
    assert [s["gap_trigger"] for s in states] == [NEVER, NEVER, NEVER, 400, 400]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (schedules.schedule_section("phase", 1.0, steps=10), r"alpha_s\.start is missing"),
        (schedules.schedule_section("gap", 1.0, steps=10, patience=0), r"patience=0"),
        (schedules.schedule_section("gap", 1.0, steps=0), r"alpha_s\.steps=0"),
        (schedules.schedule_section("wsd", 1.0, steps=5, warmup=20, start=10), r"warmup=20"),
        (schedules.schedule_section("phase", 1.0, steps=5, start=-1), r"start=-1"),
        (schedules.schedule_section("gap", 1.0, steps=5, margin=float("nan")), r"margin=nan"),
    ],
)
def test_bad_self_ending_settings_name_the_field(section, message):
    with pytest.raises(ConfigError, match=message):
        schedules.make_schedule(section, "distill.alpha_s")


def test_fields_a_schedule_does_not_read_are_ignored():
    section = schedules.schedule_section("cosine", 2.0, 0.0, 10, start=-5, margin=float("nan"))
    plain = schedules.schedule_section("cosine", 2.0, 0.0, 10)
    for step in (0, 5, 10):
        assert float(schedules.make_schedule(section, "a")(step)) == float(
            schedules.make_schedule(plain, "a")(step)
        )


def test_a_temperature_never_ends():
    for section in (
        schedules.schedule_section("phase", 2.0, steps=5, start=10),
        schedules.schedule_section("gap", 2.0, steps=5),
        schedules.schedule_section("wsd", 2.0, steps=5, warmup=3, start=10),
    ):
        with pytest.raises(ConfigError, match=r"distill\.tau\.name=.*temperature to 0"):
            schedules.make_schedule(section, "distill.tau", schedules.Bounds(0, 10, "", True))


def _dwt(alpha, **extra):
    config = ml_collections.ConfigDict(
        {
            "strategy": "dwt",
            "form": extra.pop("form", "dwt"),
            "alpha_h": 0.7,
            "alpha_s": alpha,
            "tau": schedules.schedule_section("constant", 2.0),
            **extra,
        }
    )
    return make_strategy(config)


def test_dwt_says_when_its_teacher_is_no_longer_read():
    assert _dwt(schedules.schedule_section("constant", 1.0)).teacher_free_from({}) is None
    phase = _dwt(schedules.schedule_section("phase", 1.0, steps=10, start=30))
    assert phase.teacher_free_from({}) == 40
    assert isinstance(phase.without_teachers(), TeacherFreeDWT)
    gap = _dwt(schedules.schedule_section("gap", 1.0, steps=10))
    state = jax.device_get(gap.init_state(jax.random.key(0), None, [None]))
    assert gap.teacher_free_from(state) is None
    state, metrics, line = gap.after_eval(state, 300, 4.9, 5.0)
    assert metrics == {"distill/gap": pytest.approx(-0.1)} and line is None
    state, _, line = gap.after_eval(state, 400, 4.8, 5.0)
    assert state["gap_trigger"] == 400 and gap.teacher_free_from(state) == 410 and line
    assert gap.after_eval(state, 400, 4.8, None) == (None, {}, None)  # No teacher loss.
    # The hidden-state term still reads the teacher: no switch.
    hidden = _dwt(schedules.schedule_section("phase", 1.0, steps=10, start=30), hidden_weight=1.0)
    assert hidden.teacher_free_from({}) is None and hidden.without_teachers() is None
    # ...but a 'gap' schedule still decides (the loop fetches the state after evaluations).
    hidden_gap = _dwt(schedules.schedule_section("gap", 1.0, steps=10), hidden_weight=1.0)
    assert hidden_gap.decides_after_eval and not phase.decides_after_eval


@pytest.mark.parametrize("form", ["dwt", "ki"])
def test_teacher_free_loss_equals_dwt_at_alpha_zero(form):
    """Past the end of a 'phase' schedule, DWT's loss is its hard term alone; the
    teacher-free strategy gives the same loss and gradients with no teacher."""
    rng = np.random.default_rng(0)
    embedding = jnp.asarray(rng.normal(size=(13, 6)), jnp.float32)
    batch = {
        "masked_ids": jnp.asarray(rng.integers(0, 13, size=(2, 3)), jnp.int32),
        "masked_weights": jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32),
    }
    teacher = {
        "masked_hidden": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
        "mlm_decoder": (jnp.asarray(rng.normal(size=(13, 4)), jnp.float32), None),
    }
    hidden = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    value = 0.5 if form == "ki" else 1.0
    dwt = _dwt(schedules.schedule_section("phase", value, steps=4, start=2), form=form)
    free = dwt.without_teachers()
    ctx = StepContext(step=jnp.int32(6))

    def loss(h, strategy, teachers):
        student = {"masked_hidden": h, "mlm_decoder": (embedding, None)}
        return strategy.loss(student, teachers, batch, ctx)[0]

    value_dwt, grad_dwt = jax.value_and_grad(loss)(hidden, dwt, [teacher])
    value_free, grad_free = jax.value_and_grad(loss)(hidden, free, [])
    np.testing.assert_allclose(float(value_free), float(value_dwt), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_free), np.asarray(grad_dwt), rtol=1e-5, atol=1e-7)
    metrics = free.loss(
        {"masked_hidden": hidden, "mlm_decoder": (embedding, None)}, [], batch, ctx
    )[1]
    assert float(metrics["distill/alpha"]) == 0.0 and float(metrics["distill/teacher_free"]) == 1
