"""Reliability (issue 8): runs killed with SIGKILL or stopped with SIGTERM at arbitrary
points and restarted until they finish end bitwise equal to uninterrupted runs (for
pre-training and for a multi-teacher strategy); a corrupt or incomplete newest
checkpoint is survived; a checkpoint of another model is refused by name and shapes;
the non-finite guard skips, counts and stops.

Every run here is the real CLI in a subprocess on one CPU device, as a user starts it.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from testutil import REPO_ROOT

from dwt_jax import sharding, train
from dwt_jax.configuration import ConfigError
from dwt_jax.metrics import read_metrics

PRETRAIN_STEPS = 12
PRETRAIN_ARGS = [
    "--config=configs/pretrain.py:smoke",
    f"--config.train.num_steps={PRETRAIN_STEPS}",
    "--config.train.eval_every=4",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
    "--config.log.tensorboard=False",
]
FINETUNE_STEPS = 10
FINETUNE_ARGS = [
    "--config=configs/finetune/base.py:smoke",
    "--config.pretrain.train.num_steps=0",
    "--config.distill.strategy=rl_kd",
    "--config.baseline.enabled=False",
    f"--config.train.num_steps={FINETUNE_STEPS}",
    "--config.checkpoint.every_steps=2",
    "--config.log.tensorboard=False",
    "--config.log.every_steps=1",
]


def _env() -> dict[str, str]:
    """One device as a user has it; fast compilation (both runs compile alike)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    return env


def _argv(args: list[str], workdir: str, cache: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dwt_jax.main",
        *args,
        f"--workdir={workdir}",
        f"--config.data.tfds_data_dir={cache}/tfds",
        f"--config.data.tokenizer_cache_dir={cache}/tokenizers",
    ]


def _run(args: list[str], workdir: str, cache: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _argv(args, workdir, cache),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _saved_steps(checkpoints: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())


def _metrics_step(metrics_file: str) -> int:
    """The last step with a complete line in a metrics file (0 if none)."""
    try:
        with open(metrics_file) as f:
            lines = [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines), default=0)


def _interrupted_run(args, workdir, stage_dir, cache, plan, seed) -> list[str]:
    """Runs the command; interrupts it as ``plan`` says, restarts, until it finishes.

    ``plan``: a list of (signal, when) with when 'saving' (while a checkpoint is being
    written, if one is seen) or 'step' (after a random logged step). Returns how each
    start ended."""
    rng = random.Random(seed)
    metrics_file = os.path.join(stage_dir, "metrics.jsonl")
    checkpoints = os.path.join(stage_dir, "checkpoints")
    endings = []
    for start, (sig, when) in enumerate([*plan, (None, None)]):
        # Output to files: a pipe nobody reads while the run goes on fills and blocks it.
        log = os.path.join(os.path.dirname(workdir), f"start{start}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                _argv(args, workdir, cache), cwd=REPO_ROOT, env=_env(), stdout=out, stderr=out
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
            if proc.poll() is None:
                proc.send_signal(sig)
        proc.wait(timeout=300)
        with open(log) as f:
            stderr = f.read()
        endings.append(f"{sig and signal.Signals(sig).name}:{proc.returncode}")
        if proc.returncode == 0:
            return endings
        if sig == signal.SIGTERM:
            assert proc.returncode == 130, stderr[-4000:]
            assert "Stopped by SIGTERM" in stderr
        else:
            assert proc.returncode == -signal.SIGKILL, stderr[-4000:]
    raise AssertionError(f"the run did not finish: {endings}")


def _state(stage_dir: str, step: int) -> dict:
    path = os.path.join(stage_dir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.device_get(checkpointer.restore(path))


def assert_same_state(a_dir: str, b_dir: str, step: int) -> None:
    a, b = _state(a_dir, step), _state(b_dir, step)
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


@pytest.fixture(scope="module")
def straight_pretrain(tmp_path_factory, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("straight_pretrain"))
    _run(PRETRAIN_ARGS, workdir, data_cache_dir)
    return workdir


def test_pretraining_killed_and_restarted_ends_bitwise_equal(
    straight_pretrain, data_cache_dir, tmp_path
):
    """SIGKILL while a checkpoint is written, SIGTERM and SIGKILL at random points: the
    same parameters, optimiser state and metrics as the run that was never stopped."""
    workdir = str(tmp_path / "killed")
    plan = [(signal.SIGKILL, "saving"), (signal.SIGTERM, "step"), (signal.SIGKILL, "step")]
    endings = _interrupted_run(PRETRAIN_ARGS, workdir, workdir, data_cache_dir, plan, seed=0)
    assert len(endings) >= 2, endings
    assert_same_state(straight_pretrain, workdir, PRETRAIN_STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight_pretrain), endings
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))

    # The newest checkpoint cut short and the one before it missing a piece: a warning
    # for each, the run resumes from the one before those and ends the same.
    checkpoints = os.path.join(workdir, "checkpoints")
    assert _saved_steps(checkpoints) == [8, 10, 12]
    biggest = max(
        glob.glob(os.path.join(checkpoints, "12", "state", "**", "d", "*"), recursive=True),
        key=os.path.getsize,
    )
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    os.remove(glob.glob(os.path.join(checkpoints, "10", "data", "*.json"))[0])
    result = _run(PRETRAIN_ARGS, workdir, data_cache_dir)
    warnings = [line for line in result.stderr.splitlines() if "dwt_jax: warning" in line]
    assert any("step 12" in w and "bytes" in w for w in warnings), result.stderr[-3000:]
    assert any("step 10" in w and "missing" in w for w in warnings), warnings
    assert "resuming at step 8" in result.stdout
    assert _saved_steps(checkpoints) == [8, 10, 12]
    assert sorted(os.listdir(checkpoints + "_corrupt")) == ["10", "12"]
    assert_same_state(straight_pretrain, workdir, PRETRAIN_STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight_pretrain)


def test_multi_teacher_strategy_killed_and_restarted_ends_bitwise_equal(data_cache_dir, tmp_path):
    """RL-KD (a policy, its Adam state and a reward baseline in the strategy state)
    fine-tuned against co-finetuned teachers, killed while saving, then stopped."""
    straight = str(tmp_path / "straight")
    _run(FINETUNE_ARGS, straight, data_cache_dir)
    teachers = os.path.join(straight, "teachers")
    args = [*FINETUNE_ARGS, f"--config.teacher.workdirs=('{teachers}',)"]
    workdir = str(tmp_path / "killed")
    stage_dir = workdir  # With its teachers given, the student is the only stage.
    plan = [(signal.SIGKILL, "saving"), (signal.SIGTERM, "step")]
    endings = _interrupted_run(args, workdir, stage_dir, data_cache_dir, plan, seed=1)
    assert len(endings) >= 2, endings
    straight_student = os.path.join(straight, "student")
    state = _state(stage_dir, FINETUNE_STEPS)
    assert set(state["strategy_state"]) >= {"policy", "baseline"}
    assert_same_state(straight_student, stage_dir, FINETUNE_STEPS)
    assert deterministic_metrics(stage_dir) == deterministic_metrics(straight_student), endings


def test_checkpoint_of_another_model_names_the_array_and_both_shapes(
    straight_pretrain, smoke_config, tmp_path
):
    """Without its config.json (which names the changed field), the checkpoint itself
    is compared with the model the config builds, before anything is compiled."""
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(straight_pretrain, workdir)
    os.remove(os.path.join(workdir, "config.json"))
    smoke_config.model.mlp_dim = 96
    smoke_config.train.num_steps = PRETRAIN_STEPS + 2
    with pytest.raises(ConfigError) as error:
        train.run(smoke_config, workdir)
    message = str(error.value)
    assert "\n" not in message
    assert "intermediate" in message or "mlp" in message.lower(), message
    assert "(64," in message and "(96," in message, message  # Saved, then wanted.
    assert _saved_steps(os.path.join(workdir, "checkpoints")) == [8, 10, 12]


# --- the non-finite guard ----------------------------------------------------------


def _poison_from(monkeypatch, first_bad_call: int, last_bad_call: int) -> None:
    """Train batches number first..last (1-based, counted after the eval batches) get
    NaN masked-token weights: their loss and gradients are NaN."""
    calls = {"n": 0}
    original = sharding.shard_batch

    def shard_batch(batch, mesh):
        if "masked_weights" in batch and calls.get("train"):
            calls["n"] += 1
            if first_bad_call <= calls["n"] <= last_bad_call:
                batch = {**batch, "masked_weights": np.full_like(batch["masked_weights"], np.nan)}
        return original(batch, mesh)

    monkeypatch.setattr(sharding, "shard_batch", shard_batch)
    original_loop = train._loop

    def loop(*args, **kwargs):
        calls["train"] = True
        return original_loop(*args, **kwargs)

    monkeypatch.setattr(train, "_loop", loop)


def test_nonfinite_steps_are_skipped_and_counted(smoke_config, tmp_path, monkeypatch):
    _poison_from(monkeypatch, 3, 4)
    smoke_config.train.num_steps = 6
    smoke_config.checkpoint.every_steps = 2
    smoke_config.train.max_nonfinite_streak = 3
    workdir = str(tmp_path / "skip")
    result = train.run(smoke_config, workdir)
    assert result.final_step == 6
    lines = {line["step"]: line for line in read_metrics(workdir) if "train/loss" in line}
    assert [lines[s]["train/nonfinite_skipped"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert [lines[s]["train/nonfinite_streak"] for s in range(1, 7)] == [0, 0, 1, 2, 0, 0]
    assert np.isnan(lines[3]["train/loss"]) and np.isfinite(lines[5]["train/loss"])
    # Steps 3 and 4 changed nothing but the step count (and the data position).
    at_2, at_4 = _state(workdir, 2), _state(workdir, 4)
    for part in ("params", "opt_state", "strategy_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, at_2[part], at_4[part])
    assert (int(at_4["step"]), int(at_4["nonfinite_skipped"])) == (4, 2)
    assert np.isfinite(read_metrics(workdir)[-1]["eval/mlm_loss"])


def test_a_nonfinite_streak_stops_the_run_naming_the_steps_and_checkpoint(
    smoke_config, tmp_path, monkeypatch
):
    _poison_from(monkeypatch, 3, 10**9)
    smoke_config.train.num_steps = 20
    smoke_config.checkpoint.every_steps = 2
    smoke_config.train.max_nonfinite_streak = 3
    workdir = str(tmp_path / "stop")
    with pytest.raises(train.NonFiniteError) as error:
        train.run(smoke_config, workdir)
    message = str(error.value)
    assert "3 consecutive steps (3 to 5" in message, message
    assert "step 2 in" in message and "train.max_nonfinite_streak" in message, message
    assert max(_saved_steps(os.path.join(workdir, "checkpoints"))) <= 6
