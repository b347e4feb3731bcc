"""Metrics out of the run: JSON lines, TensorBoard events and a progress display.

Only process 0 writes. Each line of ``<workdir>/metrics.jsonl`` is one step's
values, e.g. ``{"step": 200, "train/loss": 4.1, "perf/tokens_per_s": 5100.0}``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(value: Any) -> float | int:
    value = np.asarray(value).item()
    return value if isinstance(value, int) else float(value)


def truncate_metrics(path: str, step: int) -> None:
    """Drops the lines of a metrics file after ``step`` (and a line cut short by a
    kill). The file is replaced atomically, and only if a line goes."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # A write cut short: only ever the last line.
            continue
        if line.endswith("\n") and int(record.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:
    """Appends step metrics to metrics.jsonl and TensorBoard (process 0 only).

    ``resume_step``: the step the run resumes from; lines written after it by a run
    that was killed before its next checkpoint are dropped (those steps run again),
    so the file has each step once, as an uninterrupted run writes it.
    (TensorBoard's event files keep both; its viewer shows the later points.)
    """

    def __init__(
        self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self._enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._enabled:
            return
        path = os.path.join(workdir, METRICS_FILE)
        if resume_step is not None:  # A fresh start (0) keeps nothing of a killed one.
            truncate_metrics(path, resume_step if resume_step > 0 else -1)
        self._jsonl = open(path, "a")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        values = {name: _to_python(value) for name, value in sorted(metrics.items())}
        if not self._enabled:
            return values
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))
            self._tb.flush()
        return values

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The lines of ``<workdir>/metrics.jsonl`` as dicts (for tests and notebooks)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A progress bar with loss, tokens/s and ETA; plain log lines when not a terminal.

    ``enabled=False`` silences the per-step updates, not the messages.
    """

    def __init__(self, *, start_step: int, total_steps: int, enabled: bool) -> None:
        self._enabled = enabled and jax.process_index() == 0
        self._bar = None
        self._start = time.monotonic()
        self._total = total_steps
        if self._enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, values: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        loss = values.get("train/loss", math.nan)
        tokens_per_s = values.get("perf/tokens_per_s", math.nan)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=True)
            return
        steps_per_s = values.get("perf/steps_per_s", math.nan)
        remaining = (self._total - step) / steps_per_s if steps_per_s > 0 else math.nan
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if math.isfinite(remaining) else "?"
        accuracy = values.get("train/mlm_accuracy", values.get("train/lm_accuracy", math.nan))
        print(
            f"step {step}/{self._total}  loss {loss:.4f}  acc {accuracy:.3f}  "
            f"{tokens_per_s:,.0f} tok/s  eta {eta}",
            file=sys.stderr,
            flush=True,
        )

    def message(self, text: str) -> None:
        """Prints a one-off message (evaluations, stops) even when updates are off."""
        if jax.process_index() != 0:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
