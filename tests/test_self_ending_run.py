"""A causal DWT run whose 'gap' schedule ends the teacher's role: the trigger at the
evaluation the scripted margin implies, the switch to a step without the teacher's
forward pass (whose compiled inputs hold no teacher parameter), the decision logged and
checkpointed, and a run killed after the trigger (and after the switch) and restarted
ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import pytest
from causal_step_helpers import build_causal_step, causal_batch
from kill_helpers import (
    _metrics_step,
    argv,
    assert_same_state,
    deterministic_metrics,
    env,
    restore_state,
    run,
)
from testutil import REPO_ROOT

from dwt_jax import sharding, steps
from dwt_jax.distill.schedules import schedule_section
from dwt_jax.metrics import read_metrics

STEPS = 12
ARGS = [
    "--config=configs/causal.py:smoke",
    f"--config.train.num_steps={STEPS}",
    "--config.teacher.num_steps=6",
    "--config.train.eval_every=2",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
    "--config.log.tensorboard=False",
    "--config.baseline.enabled=False",
    "--config.distill.alpha_s.name=gap",
    "--config.distill.alpha_s.steps=2",
    # Generous: the smoke student is within 5 nats of its teacher from the start, so
    # with the default patience (2) the trigger is the evaluation at step 4, and α_s is
    # 0 from step 6 on.
    "--config.distill.alpha_s.margin=5.0",
]
TRIGGER, SWITCH = 4, 6


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("self_ending"))
    result = run(ARGS, workdir, data_cache_dir)
    return workdir, result


def test_gap_triggers_and_the_run_trains_on_without_the_teacher(pipeline):
    workdir, result = pipeline
    out = result.stdout + result.stderr
    assert f"step {TRIGGER}: the student's held-out loss is within 5 of the teacher's" in out
    assert f"the teacher's role ends at step {SWITCH}" in out
    assert f"step {SWITCH}: the teachers' weight is 0 from here on" in out
    assert "Compiled and ran the teacher-free step" in out
    lines = read_metrics(os.path.join(workdir, "student"))
    train = {line["step"]: line for line in lines if "train/loss" in line}
    assert sorted(train) == list(range(1, STEPS + 1))
    for step, line in train.items():
        if step <= SWITCH:  # The DWT step (α_s 1, then decaying from the trigger).
            assert "distill/kl" in line and "distill/teacher_free" not in line
        else:  # The teacher-free step.
            assert line["distill/teacher_free"] == 1.0 and "distill/kl" not in line
            assert line["distill/alpha"] == 0.0
    assert [train[s]["distill/alpha"] for s in (TRIGGER, TRIGGER + 1, SWITCH)] == [1.0, 1.0, 0.5]
    gaps = [line for line in lines if "distill/gap" in line]
    assert [line["step"] for line in gaps] == list(range(2, STEPS + 1, 2))
    for line in gaps:
        assert line["distill/gap"] == pytest.approx(line["eval/loss"] - line["teacher/loss"])
    state = restore_state(os.path.join(workdir, "student"), STEPS)
    assert int(state["strategy_state"]["gap_trigger"]) == TRIGGER


def _start(args, workdir, cache, log):
    with open(log, "w") as out:
        return subprocess.Popen(
            argv(args, workdir, cache), cwd=REPO_ROOT, env=env(), stdout=out, stderr=out
        )


def test_killed_after_the_trigger_and_after_the_switch_resumes_bitwise(
    pipeline, data_cache_dir, tmp_path
):
    reference, _ = pipeline
    args = [*ARGS, f"--config.teacher.workdirs=('{os.path.join(reference, 'teacher')}',)"]
    workdir = str(tmp_path / "killed")
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    # SIGKILL once the trigger's evaluation is logged (its checkpoint may or may not
    # have committed), then once the teacher-free step has run, then finish.
    for start, after in enumerate((TRIGGER + 1, SWITCH + 2)):
        proc = _start(args, workdir, data_cache_dir, str(tmp_path / f"start{start}.log"))
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if _metrics_step(metrics_file) >= after:
                break
            time.sleep(0.005)
        assert proc.poll() is None, (tmp_path / f"start{start}.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    final = _start(args, workdir, data_cache_dir, str(tmp_path / "final.log"))
    assert final.wait(timeout=300) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert_same_state(os.path.join(reference, "student"), workdir, STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(
        os.path.join(reference, "student")
    )


def test_the_teacher_free_step_compiles_without_teacher_inputs():
    """The compiled DWT step takes the teacher's parameters; the teacher-free one takes
    only the state and the batch."""
    state, dwt_step, teacher_params, mesh = build_causal_step(
        jax.devices()[:1],
        (1, 1, 1),
        alpha_s=schedule_section("phase", 1.0, steps=2, start=2),
    )
    batch = sharding.shard_batch(causal_batch(0), mesh)
    inputs = len(jax.tree.leaves((state, batch)))
    teacher_inputs = len(jax.tree.leaves(teacher_params))
    assert teacher_inputs > 0
    compiled = dwt_step.jitted.lower(state, batch, teacher_params).compile()
    assert len(jax.tree.leaves(compiled.input_shardings)) == inputs + teacher_inputs
    parts = dict(dwt_step.parts)
    parts["strategy"] = parts["strategy"].without_teachers()
    free = steps.make_train_step(**parts)
    compiled_free = free.jitted.lower(state, batch, ()).compile()
    assert len(jax.tree.leaves(compiled_free.input_shardings)) == inputs
    _, metrics = free(state, batch)
    assert float(metrics["distill/teacher_free"]) == 1.0
