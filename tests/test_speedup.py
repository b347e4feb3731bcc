"""Steps (and time) to the baseline's quality, from metrics lines (dwt_jax.speedup)."""

from __future__ import annotations

import pytest

from dwt_jax import speedup


def _evals(points, key="eval/loss"):
    return [{"step": s, key: v} for s, v in points]


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(100, 6.0), (200, 5.5), (300, 5.0)]
    assert speedup.steps_to_reach(curve, 5.25) == pytest.approx(250.0)
    assert speedup.steps_to_reach(curve, 5.5) == pytest.approx(200.0)  # Exactly on one.
    assert speedup.steps_to_reach(curve, 6.5) == 100.0  # Already there at the first.
    assert speedup.steps_to_reach(curve, 4.9) is None  # Never.
    # Not monotone: the first crossing counts.
    assert speedup.steps_to_reach([(1, 5.0), (2, 4.0), (3, 6.0), (4, 3.0)], 4.5) == 1.5


def test_eval_curve_keeps_the_last_value_of_a_step_logged_twice():
    lines = [*_evals([(2, 5.0), (4, 4.0)]), {"step": 3, "train/loss": 1.0}, *_evals([(4, 3.5)])]
    assert speedup.eval_curve(lines, "eval/loss") == [(2, 5.0), (4, 3.5)]


def test_speedup_against_the_baseline_and_the_time_at_each_runs_step_time():
    rates = [{"step": s, "perf/steps_per_s": r} for s, r in ((10, 2.0), (20, 1.0), (30, 2.0))]
    student = [*_evals([(100, 5.8), (200, 5.4), (300, 5.1)]), *rates]
    baseline = [
        *_evals([(100, 6.0), (200, 5.6), (300, 5.3)]),
        {"step": 10, "perf/steps_per_s": 4.0},
    ]
    result = speedup.speedup(student, baseline, "eval/loss")
    # 5.3 lies a third of the way from 5.4 (step 200) to 5.1 (step 300).
    assert result["student_steps"] == pytest.approx(200 + 100 / 3)
    assert result["baseline_steps"] == 300 and result["target"] == 5.3
    assert result["step_ratio"] == pytest.approx((200 + 100 / 3) / 300)
    assert result["student_seconds"] == pytest.approx((200 + 100 / 3) * 0.5)  # Median 2/s.
    assert result["baseline_seconds"] == pytest.approx(75.0)
    assert result["time_ratio"] == pytest.approx(result["student_seconds"] / 75.0)
    text = speedup.describe(result, "eval/loss")
    assert "step 233 of 300" in text and "0.78× the steps" in text


def test_a_student_that_never_gets_there_is_said_so():
    result = speedup.speedup(_evals([(100, 6.0)]), _evals([(100, 5.0)]), "eval/loss")
    assert result["student_steps"] is None and result["step_ratio"] is None
    assert "did not reach" in speedup.describe(result, "eval/loss")
    with pytest.raises(ValueError, match="eval/mlm_loss"):
        speedup.speedup([], [], "eval/mlm_loss")
