"""How much compute a teacher saves: the steps (and the time) a student needs to reach a
held-out loss, read from a run's metrics (docs/methods.md#steps-to-baseline-quality).

Pure functions of metrics lines (the dicts of ``metrics.jsonl``), so the pipeline's
summary, the study and a notebook compute the figure the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Line = Mapping[str, Any]


def eval_curve(lines: Sequence[Line], key: str) -> list[tuple[int, float]]:
    """(step, value) of every evaluation that logged ``key``, in step order; a step
    logged twice (a resumed run) keeps its last value."""
    points = {int(line["step"]): float(line[key]) for line in lines if key in line}
    return sorted(points.items())


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve is at or below ``target``, linearly interpolated
    between the evaluation before and the one that gets there (the step of the first
    evaluation if it is already there); None if it never does."""
    previous: tuple[int, float] | None = None
    for step, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            s0, v0 = previous
            return s0 + (v0 - target) / (v0 - value) * (step - s0)
        previous = (step, value)
    return None


def seconds_per_step(lines: Sequence[Line]) -> float | None:
    """The run's median seconds per train step from its logged throughput
    (``perf/steps_per_s``), compilation and evaluation excluded; None if none logged."""
    rates = [float(line["perf/steps_per_s"]) for line in lines if "perf/steps_per_s" in line]
    median = statistics.median(rates) if rates else 0.0
    return 1.0 / median if median > 0 else None


def speedup(student: Sequence[Line], baseline: Sequence[Line], key: str) -> dict[str, float | None]:
    """The student's steps and time to reach the baseline's final held-out ``key`` (e.g.
    'eval/loss'), against the baseline's own. Keys: ``target``, ``student_steps``
    (None: never reached), ``baseline_steps``, ``step_ratio`` (student / baseline),
    ``student_seconds``, ``baseline_seconds`` and ``time_ratio`` (at each run's median
    step time; None where a figure is missing)."""
    base_curve = eval_curve(baseline, key)
    if not base_curve:
        raise ValueError(f"the baseline's metrics have no {key!r} evaluation")
    baseline_steps, target = base_curve[-1]
    student_steps = steps_to_reach(eval_curve(student, key), target)
    s_time, b_time = seconds_per_step(student), seconds_per_step(baseline)
    student_seconds = None if student_steps is None or s_time is None else student_steps * s_time
    baseline_seconds = None if b_time is None else baseline_steps * b_time
    ratio = None if student_steps is None else student_steps / baseline_steps
    time_ratio = (
        student_seconds / baseline_seconds
        if student_seconds is not None and baseline_seconds
        else None
    )
    return {
        "target": target,
        "student_steps": student_steps,
        "baseline_steps": float(baseline_steps),
        "step_ratio": ratio,
        "student_seconds": student_seconds,
        "baseline_seconds": baseline_seconds,
        "time_ratio": time_ratio,
    }


def describe(result: Mapping[str, float | None], key: str) -> str:
    """One line for the terminal and the README."""
    target, base = result["target"], int(result["baseline_steps"] or 0)
    if result["student_steps"] is None:
        return (
            f"The DWT student did not reach the student alone's final {key} ({target:.4f}) "
            f"within its {base} steps."
        )
    text = (
        f"The DWT student reached the student alone's final {key} ({target:.4f}) at step "
        f"{result['student_steps']:.0f} of {base} ({result['step_ratio']:.2f}× the steps"
    )
    if result["time_ratio"] is not None and math.isfinite(result["time_ratio"]):
        text += f", {result['time_ratio']:.2f}× the time at each run's measured step time"
    return text + ")."
