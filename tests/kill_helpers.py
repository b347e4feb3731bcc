"""Runs of the CLI in subprocesses, interrupted and restarted; their checkpoints and
metrics compared bitwise (tests/test_reliability.py, tests/finetune)."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from testutil import REPO_ROOT

from dwt_jax.metrics import read_metrics


def env(devices: int = 1) -> dict[str, str]:
    """``devices`` CPU devices (1: as a user has it); fast compilation (the runs
    compared compile alike)."""
    variables = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices > 1:
        variables["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    variables["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    return variables


def argv(args: list[str], workdir: str, cache: str) -> list[str]:
    """The CLI with ``args``, the workdir and the test session's data caches."""
    return [
        sys.executable,
        "-m",
        "dwt_jax.main",
        *args,
        f"--workdir={workdir}",
        f"--config.data.tfds_data_dir={cache}/tfds",
        f"--config.data.tokenizer_cache_dir={cache}/tokenizers",
    ]


def run(args: list[str], workdir: str, cache: str, devices: int = 1) -> subprocess.CompletedProcess:
    """The CLI run to the end (status 0 asserted)."""
    result = subprocess.run(
        argv(args, workdir, cache),
        cwd=REPO_ROOT,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def saved_steps(checkpoints: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def _metrics_step(metrics_file: str) -> int:
    """The last step with a complete line in a metrics file (0 if none)."""
    try:
        with open(metrics_file) as f:
            lines = [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines), default=0)


def interrupted_run(args, workdir, stage_dir, cache, plan, seed, devices: int = 1) -> list[str]:
    """Runs the command; interrupts it as ``plan`` says, restarts, until it finishes.

    ``plan``: a list of (signal, when) with when 'saving' (while a checkpoint is being
    written, if one is seen) or 'step' (after a random logged step). SIGTERM/SIGINT
    must end in status 130 with the stop step saved; after any signal the newest
    checkpoint is at least the one committed before it. Returns how each start ended."""
    rng = random.Random(seed)
    metrics_file = os.path.join(stage_dir, "metrics.jsonl")
    checkpoints = os.path.join(stage_dir, "checkpoints")
    endings = []
    for start, (sig, when) in enumerate([*plan, (None, None)]):
        # Output to files: a pipe nobody reads while the run goes on fills and blocks it.
        log = os.path.join(os.path.dirname(workdir), f"start{start}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                argv(args, workdir, cache), cwd=REPO_ROOT, env=env(devices), stdout=out, stderr=out
            )
        if sig is not None:
            start = _metrics_step(metrics_file)
            target = start + rng.randint(1, 4)
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if when == "saving" and glob.glob(os.path.join(checkpoints, "*tmp*")):
                    break
                if _metrics_step(metrics_file) >= target:
                    time.sleep(rng.uniform(0.0, 0.3))  # Anywhere within a step.
                    break
                time.sleep(0.005)
            committed = saved_steps(checkpoints) if os.path.isdir(checkpoints) else []
            if proc.poll() is None:
                proc.send_signal(sig)
        proc.wait(timeout=300)
        with open(log) as f:
            stderr = f.read()
        endings.append(f"{sig and signal.Signals(sig).name}:{proc.returncode}")
        if proc.returncode == 0:
            return endings
        if sig in (signal.SIGTERM, signal.SIGINT):  # Finish the step, save it, exit 130.
            assert proc.returncode == 130, stderr[-4000:]
            stopped = re.search(rf"Stopped by {signal.Signals(sig).name} at step (\d+)", stderr)
            assert stopped, stderr[-4000:]
            assert max(saved_steps(checkpoints)) == int(stopped.group(1))
        else:
            assert proc.returncode == -signal.SIGKILL, stderr[-4000:]
        if sig is not None and committed:  # The newest committed step is never lost
            # (only ever replaced by newer ones; the run may have gone on a little).
            assert max(saved_steps(checkpoints)) >= max(committed), (committed, endings)
    raise AssertionError(f"the run did not finish: {endings}")


def restore_state(stage_dir: str, step: int) -> dict:
    """The whole train state saved at ``step`` in ``stage_dir``, on the host."""
    path = os.path.join(stage_dir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.device_get(checkpointer.restore(path))


def assert_same_state(a_dir: str, b_dir: str, step: int) -> None:
    """The states saved at ``step`` in two runs: the same tree, bitwise the same arrays."""
    a, b = restore_state(a_dir, step), restore_state(b_dir, step)
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def deterministic_metrics(stage_dir: str) -> list[dict]:
    """The metrics file without its timings; each step once, in order."""
    return [
        {k: v for k, v in line.items() if not k.startswith("perf/")}
        for line in read_metrics(stage_dir)
    ]
