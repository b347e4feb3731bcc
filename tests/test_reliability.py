"""Reliability (issue 8): a pre-training run killed with SIGKILL or stopped with SIGTERM
at arbitrary points (also while a checkpoint is written) and restarted until it
finishes ends bitwise equal to the run never stopped; a newest checkpoint cut short
and one missing a piece are survived with no step lost beyond them; a checkpoint of
another model is refused by name and shapes. (The multi-teacher kill test is in
tests/finetune/test_finetune_run.py, the non-finite guard's in test_nonfinite.py.)

Every run here is the real CLI in a subprocess on one CPU device, as a user starts it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal

import pytest
from kill_helpers import (
    assert_same_state,
    deterministic_metrics,
    interrupted_run,
    run,
    saved_steps,
)

from dwt_jax import train
from dwt_jax.configuration import ConfigError

PRETRAIN_STEPS = 12
PRETRAIN_ARGS = [
    "--config=configs/pretrain.py:smoke",
    f"--config.train.num_steps={PRETRAIN_STEPS}",
    "--config.train.eval_every=4",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
    "--config.log.tensorboard=False",
]


@pytest.fixture(scope="module")
def straight_pretrain(tmp_path_factory, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("straight_pretrain"))
    run(PRETRAIN_ARGS, workdir, data_cache_dir)
    return workdir


def test_pretraining_killed_and_restarted_ends_bitwise_equal(
    straight_pretrain, data_cache_dir, tmp_path
):
    """SIGKILL while a checkpoint is written, Ctrl-C (SIGINT), SIGKILL and SIGTERM at
    random points: the same parameters, optimiser state and metrics as the run that
    was never stopped. (A stop by signal saves the step it stopped at.)"""
    workdir = str(tmp_path / "killed")
    plan = [
        (signal.SIGKILL, "saving"),
        (signal.SIGINT, "step"),
        (signal.SIGKILL, "step"),
        (signal.SIGTERM, "step"),
    ]
    endings = interrupted_run(PRETRAIN_ARGS, workdir, workdir, data_cache_dir, plan, seed=0)
    assert len(endings) >= 3, endings
    assert_same_state(straight_pretrain, workdir, PRETRAIN_STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight_pretrain), endings
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))

    # The newest checkpoint cut short and the one before it missing a piece: a warning
    # for each, the run resumes from the one before those and ends the same.
    checkpoints = os.path.join(workdir, "checkpoints")
    assert saved_steps(checkpoints) == [8, 10, 12]
    biggest = max(
        glob.glob(os.path.join(checkpoints, "12", "state", "**", "d", "*"), recursive=True),
        key=os.path.getsize,
    )
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    os.remove(glob.glob(os.path.join(checkpoints, "10", "data", "*.json"))[0])
    result = run(PRETRAIN_ARGS, workdir, data_cache_dir)
    warnings = [line for line in result.stderr.splitlines() if "dwt_jax: warning" in line]
    assert any("step 12" in w and "bytes" in w for w in warnings), result.stderr[-3000:]
    assert any("step 10" in w and "missing" in w for w in warnings), warnings
    assert "resuming at step 8" in result.stdout
    assert saved_steps(checkpoints) == [8, 10, 12]
    assert sorted(os.listdir(checkpoints + "_corrupt")) == ["10", "12"]
    assert_same_state(straight_pretrain, workdir, PRETRAIN_STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight_pretrain)


def test_checkpoint_of_another_model_names_the_array_and_both_shapes(
    straight_pretrain, smoke_config, tmp_path
):
    """Without its config.json (which names the changed field), the checkpoint itself
    is compared with the model the config builds, before anything is compiled."""
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
    assert saved_steps(os.path.join(workdir, "checkpoints")) == [8, 10, 12]


def test_a_damaged_teacher_checkpoint_is_refused_not_replaced(straight_pretrain, tmp_path):
    """A run used as a teacher (or as initial weights, or exported) whose newest
    checkpoint is cut short: a ConfigError naming the field and the step, never a
    silent fall-back to an older, weaker teacher."""
    from dwt_jax import teachers

    workdir = str(tmp_path / "teacher")
    shutil.copytree(straight_pretrain, workdir)
    newest = os.path.join(workdir, "checkpoints", str(PRETRAIN_STEPS))
    biggest = max(
        glob.glob(os.path.join(newest, "state", "**", "d", "*"), recursive=True),
        key=os.path.getsize,
    )
    with open(biggest, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError) as error:
        teachers.plan_teacher(workdir, "teacher.workdirs[0]")
    message = str(error.value)
    assert message.startswith("teacher.workdirs[0]:") and f"step {PRETRAIN_STEPS}" in message
    assert "bytes" in message and "\n" not in message
