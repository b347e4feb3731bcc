"""How the study's report compares two rows over seeds: paired by seed, with a 95%
Student-t interval (docs/methods.md#the-study), and what a comparison means for a
paper's claim."""

from __future__ import annotations

import math
import statistics
from typing import Any

from scipy import stats


def paired_interval(row: dict[str, Any], other: dict[str, Any], key: str):
    """(mean, half-width, n) of the per-seed differences ``row[key] − other[key]`` over
    the seeds both rows ran, with the half-width of its 95% Student-t interval; None
    with fewer than two common seeds.

    Runs of one seed share the data order and the initialisation, so most of the
    seed-to-seed variation moves both rows alike: the paired difference is what one
    seed to the next actually changes (docs/methods.md#the-study)."""
    mine, theirs = row.get(f"{key}_by_seed") or {}, other.get(f"{key}_by_seed") or {}
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    deltas = [mine[s] - theirs[s] for s in seeds]
    n = len(deltas)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(deltas) / math.sqrt(n)
    return sum(deltas) / n, float(half), n


def compare(row: dict[str, Any], other: dict[str, Any], key: str) -> tuple[str, str]:
    """('below' | 'above' | 'level', a phrase) for ``row[key]`` against ``other[key]``.

    With two or more common seeds: 'level' when the 95% interval of the paired
    per-seed difference contains zero (`paired_interval`). Otherwise (rows without
    per-seed values) 'level' when the difference is no larger than the two seed
    spreads together, or, with one seed, below 1e-4 (rounding)."""
    paired = paired_interval(row, other, key)
    if paired is not None:
        delta, half, n = paired
        interval = f"{delta:+.4f} ± {half:.4f} over {n} paired seeds"
        if abs(delta) <= max(half, 1e-4):
            return "level", f"level ({interval})"
        side = "below" if delta < 0 else "above"
        return side, f"{side} ({interval})"
    delta = row[key] - other[key]
    noise = row.get(f"{key}_spread", 0.0) + other.get(f"{key}_spread", 0.0)
    if abs(delta) <= max(noise, 1e-4):
        where = f"within the seed spread {noise:.4f}" if row["seeds"] > 1 else "rounding"
        return "level", f"level ({delta:+.4f}, {where})"
    side = "below" if delta < 0 else "above"
    return side, f"{side} ({delta:+.4f})"


def verdict(holds: bool, sides: list[str]) -> str:
    """How a finding compares with a paper's claim: 'agrees', 'disagrees', or — when a
    comparison it rests on is level — 'cannot tell (level within the seeds' variation)'."""
    if "level" in sides:
        return "cannot tell (level within the seeds' variation)"
    return "agrees" if holds else "disagrees"
