"""Fine-tuning end to end (dwt_jax/finetune/run.py and pipeline.py): every student
strategy against the shared co-finetuned teachers, exact resumes, the whole pipeline
through `experiment.run`, GLUE through `tfds.testing.mock_data`, and config errors."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from dwt_jax import experiment
from dwt_jax.configuration import ConfigError
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import FINETUNE_STRATEGIES
from dwt_jax.finetune import run as finetune_run
from dwt_jax.metrics import read_metrics

STUDENT_ENTRIES = [
    *(name for name in FINETUNE_STRATEGIES if name != "cofinetune"),
    "dynamic_kd_selection",
]
WEIGHT_KEYS = {"kd/weight_teacher0", "kd/weight_teacher1"}
KD_KEYS = WEIGHT_KEYS | {"kd/mean_uncertainty", "kd/distilled_fraction"}
# Strategies whose two teacher weights are fixed (per instance, so their batch means too).
FIXED_WEIGHTS = {"avg_teachers": (0.5, 0.5), "fixed_weights": (0.3, 0.7)}
# Strategies whose teacher weights sum to 1 for every instance. (mt_bert weighs teacher
# k by 1/(1 + CE_k); rl_kd's weights are the rates of independent Bernoulli actions.)
NORMALISED_WEIGHTS = {"random_teacher", "best_teacher", "ca_mkd", "dynamic_kd"}

pytestmark = pytest.mark.usefixtures("compile_fast")


def eval_lines(workdir):
    return [line for line in read_metrics(workdir) if "eval/task_loss" in line]


def train_lines(workdir):
    return [line for line in read_metrics(workdir) if "train/loss" in line]


def deterministic(line):
    """A metrics line without its timings (which differ between equal runs)."""
    return {k: v for k, v in line.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module")
def trained(student_config, tmp_path_factory):
    """``trained(entry)``: (workdir, result) of the smoke student fine-tuned with that
    entry against the shared teachers, trained on first use."""
    runs = {}

    def get(entry):
        if entry not in runs:
            workdir = str(tmp_path_factory.mktemp(f"student_{entry}"))
            runs[entry] = workdir, finetune_run.run(student_config(entry), workdir)
        return runs[entry]

    return get


# --- every strategy trains end to end and improves ------------------------------------


def test_cofinetuned_teachers_improve(shared_teachers, finetune_config):
    workdir, result = shared_teachers
    steps = finetune_config().teacher.num_steps
    assert (result.start_step, result.final_step) == (0, steps)
    first, last = eval_lines(workdir)
    assert (first["step"], last["step"]) == (0, steps)
    for k in (0, 1):
        key = f"eval/teacher{k}/task_loss"
        assert last[key] < first[key], (key, first[key], last[key])
    assert last["eval/task_loss"] < first["eval/task_loss"]  # The ensemble's.
    assert {"eval/teacher0/accuracy", "eval/teacher1/matthews_corrcoef", "eval/accuracy"} <= set(
        last
    )
    assert result.eval_metrics == {k: v for k, v in last.items() if k != "step"}
    assert all(np.isfinite(line["train/loss"]) for line in train_lines(workdir))


@pytest.mark.parametrize("entry", STUDENT_ENTRIES)
def test_student_trains_and_improves(entry, trained, shared_teachers):
    workdir, result = trained(entry)
    num_steps = result.final_step
    assert (result.start_step, num_steps) == (0, 10)
    first, last = eval_lines(workdir)
    assert (first["step"], last["step"]) == (0, num_steps)
    assert last["eval/task_loss"] < first["eval/task_loss"], (first, last)

    lines = train_lines(workdir)
    assert [line["step"] for line in lines] == list(range(2, num_steps + 1, 2))
    assert all(np.isfinite(v) for line in lines for v in line.values())
    keys = set(lines[0])
    if entry == "task":
        assert not any(k.startswith(("kd/", "rl/")) for k in keys)
        assert not any(k.startswith("teacher") for k in last)
        return
    assert keys >= KD_KEYS, sorted(KD_KEYS - keys)
    for line in lines:
        weights = [line["kd/weight_teacher0"], line["kd/weight_teacher1"]]
        assert all(0.0 <= w <= 1.0 for w in weights), line
        if entry in FIXED_WEIGHTS:
            np.testing.assert_allclose(weights, FIXED_WEIGHTS[entry], rtol=1e-6)
        elif entry in NORMALISED_WEIGHTS:
            np.testing.assert_allclose(sum(weights), 1.0, rtol=1e-5)
        assert 0.0 <= line["kd/mean_uncertainty"] <= 1.0
        fraction = line["kd/distilled_fraction"]
        if entry == "dynamic_kd_selection":
            np.testing.assert_allclose(sum(weights), 1.0, rtol=1e-5)
            assert fraction == 0.25
        elif entry != "rl_kd":
            assert fraction == 1.0
    if entry == "rl_kd":
        assert keys >= {"rl/reward", "rl/baseline", "rl/entropy"}
    # The frozen teachers score, on the same held-out examples, what they scored at the
    # end of their own run.
    teachers = shared_teachers[1].eval_metrics
    for k in (0, 1):
        for metric in ("task_loss", "accuracy"):
            np.testing.assert_allclose(
                last[f"teacher{k}/{metric}"], teachers[f"eval/teacher{k}/{metric}"], rtol=1e-6
            )


# --- resume ---------------------------------------------------------------------------


def restore_state(workdir, step):
    """The whole train state saved at ``step`` (params, optimiser and strategy state)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.device_get(checkpointer.restore(path))


@pytest.mark.parametrize("entry", ["dynamic_kd_selection"])
def test_resumed_run_equals_straight_run(entry, trained, student_config, tmp_path):
    """Dynamic KD's selection ranks each batch: a resume continues it exactly. (RL-KD's
    policy, Adam state and baseline: the kill test below.)"""
    straight_dir, straight = trained(entry)
    num_steps, half = straight.final_step, straight.final_step // 2
    workdir = str(tmp_path / "resumed")
    first = finetune_run.run(student_config(entry, num_steps=half), workdir)
    resumed = finetune_run.run(student_config(entry), workdir)
    assert (first.start_step, first.final_step) == (0, half)
    assert (resumed.start_step, resumed.final_step) == (half, num_steps)
    assert resumed.eval_metrics == straight.eval_metrics

    straight_lines = {line["step"]: deterministic(line) for line in train_lines(straight_dir)}
    after = [line for line in train_lines(workdir) if line["step"] > half]
    assert [line["step"] for line in after] == [6, 8, 10]  # Logged every 2 steps.
    for line in after:
        assert deterministic(line) == straight_lines[line["step"]]

    a, b = restore_state(straight_dir, num_steps), restore_state(workdir, num_steps)
    assert set(a) == {
        "step",
        "params",
        "opt_state",
        "rng",
        "strategy_state",
        "nonfinite_streak",
        "nonfinite_skipped",
    }
    if entry == "rl_kd":
        assert set(a["strategy_state"]) == {"policy", "policy_opt", "baseline", "baseline_count"}
        assert b["strategy_state"]["baseline_count"] == num_steps
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_killed_and_restarted_rl_kd_run_ends_bitwise_equal(
    trained, shared_teachers, finetune_config, data_cache_dir, tmp_path
):
    """The same RL-KD student through the CLI, killed with SIGKILL at a random point and
    restarted: bitwise the run above that was never stopped, including the policy, its
    Adam state and the reward baseline in the strategy state (the resume point falls
    between checkpoints, so steps after it run twice)."""
    import signal

    from kill_helpers import assert_same_state, deterministic_metrics, interrupted_run

    straight_dir, straight = trained("rl_kd")
    cache = [
        f"--config.{section}data.{field}={data_cache_dir}/{name}"
        for section in ("", "pretrain.")
        for field, name in (("tfds_data_dir", "tfds"), ("tokenizer_cache_dir", "tokenizers"))
    ]
    args = [
        "--config=configs/finetune/base.py:smoke",
        *cache,
        "--config.pretrain.train.num_steps=0",
        f"--config.optim.learning_rate={finetune_config().optim.learning_rate}",
        "--config.optim.decay=constant",
        "--config.distill.strategy=rl_kd",
        f"--config.teacher.workdirs=('{shared_teachers[0]}',)",
        "--config.baseline.enabled=False",
        "--config.log.progress=False",
        "--config.log.tensorboard=False",
        "--config.checkpoint.every_steps=2",
    ]
    workdir = str(tmp_path / "killed")  # With its teachers given, the only stage.
    plan = [(signal.SIGKILL, "step")]
    endings = interrupted_run(args, workdir, workdir, data_cache_dir, plan, seed=1, devices=8)
    assert endings == ["SIGKILL:-9", "None:0"], endings
    state = restore_state(workdir, straight.final_step)
    assert set(state["strategy_state"]) == {"policy", "policy_opt", "baseline", "baseline_count"}
    assert state["strategy_state"]["baseline_count"] == straight.final_step
    assert_same_state(straight_dir, workdir, straight.final_step)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight_dir), endings


# --- the pipeline ---------------------------------------------------------------------


PRETRAIN_STEPS = 2


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, finetune_config, fast_compilation):
    """`experiment.run` on the smoke config: encoders pre-trained for 2 steps, then
    teachers, student (mt_bert) and baseline, 10 steps each."""
    config = finetune_config()
    config.pretrain.train.update(num_steps=PRETRAIN_STEPS, eval_every=PRETRAIN_STEPS)
    config.pretrain.checkpoint.every_steps = PRETRAIN_STEPS
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    with fast_compilation():
        results = experiment.run(config, workdir)
    return workdir, config, results


def saved_config(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)


def test_pipeline_stages_and_summary(pipeline_run):
    workdir, config, results = pipeline_run
    assert list(results) == [
        "pretrain_teacher0",
        "pretrain_teacher1",
        "teachers",
        "pretrain_student",
        "student",
        "baseline",
    ]
    dirs = {
        "pretrain_teacher0": "pretrain/teacher0",
        "pretrain_teacher1": "pretrain/teacher1",
        "pretrain_student": "pretrain/student",
        "teachers": "teachers",
        "student": "student",
        "baseline": "baseline",
    }
    for name, result in results.items():
        steps = PRETRAIN_STEPS if name.startswith("pretrain") else config.train.num_steps
        assert (result.start_step, result.final_step) == (0, steps), name
        assert os.path.isdir(os.path.join(workdir, dirs[name], "checkpoints", str(steps))), name

    def path(name):
        return os.path.join(workdir, name)

    # Each stage starts from the one before it.
    teachers = saved_config(path("teachers"))
    assert teachers["distill"]["strategy"] == "cofinetune"
    assert teachers["teacher"]["init_workdirs"] == [
        path("pretrain/teacher0"),
        path("pretrain/teacher1"),
    ]
    student = saved_config(path("student"))
    assert student["distill"]["strategy"] == "mt_bert"
    assert student["init"]["workdir"] == path("pretrain/student")
    assert student["teacher"]["workdirs"] == [path("teachers")]
    baseline = saved_config(path("baseline"))
    assert baseline["distill"]["strategy"] == "task"
    assert baseline["init"]["workdir"] == path("pretrain/student")
    assert baseline["teacher"]["workdirs"] == []
    assert saved_config(path("pretrain/teacher1"))["model"]["hidden_size"] == 48

    with open(path(experiment.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert set(summary) == {"teacher0", "teacher1", "teachers (ensemble)", "student", "baseline"}
    for row in summary.values():
        assert set(row) == {"eval/accuracy", "eval/matthews_corrcoef", "eval/task_loss"}
    final = results["teachers"].eval_metrics
    assert summary["teacher1"]["eval/task_loss"] == final["eval/teacher1/task_loss"]
    assert summary["teachers (ensemble)"]["eval/accuracy"] == final["eval/accuracy"]
    for name in ("student", "baseline"):
        assert summary[name]["eval/accuracy"] == results[name].eval_metrics["eval/accuracy"]


def test_pipeline_rerun_resumes_without_training(pipeline_run):
    workdir, config, results = pipeline_run
    names = ["pretrain/teacher0", "pretrain/teacher1", "pretrain/student"]
    stage_dirs = [os.path.join(workdir, d) for d in [*names, "teachers", "student", "baseline"]]
    counts = {d: len(read_metrics(d)) for d in stage_dirs}
    again = experiment.run(config, workdir)
    assert list(again) == list(results)
    for name, result in again.items():
        assert result.start_step == result.final_step == results[name].final_step, name
        assert result.eval_metrics == results[name].eval_metrics, name
    assert {d: len(read_metrics(d)) for d in stage_dirs} == counts


# --- GLUE through tfds.testing.mock_data ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_file(finetune_config, tmp_path_factory):
    """The embedded corpus's tokenizer as a file, loaded before any TFDS mock is on."""
    data = finetune_config().pretrain.data
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")
    tokenizer_lib.get_tokenizer(data).save(path)
    return path


@pytest.mark.parametrize(
    ("task", "metrics", "num_labels"),
    [("glue/mrpc", ("accuracy", "f1"), 2), ("glue/stsb", ("pearson", "spearman"), 1)],
)
def test_glue_task_end_to_end(task, metrics, num_labels, finetune_config, tokenizer_file, tmp_path):
    config = finetune_config(num_steps=4, eval_every=4)
    config.data.update(
        source="tfds",
        task=task,
        tfds_data_dir=str(tmp_path / "tfds"),
        tokenizer_path=tokenizer_file,
    )
    config.distill.strategy = "task"
    config.checkpoint.every_steps = 4
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        result = finetune_run.run(config, workdir)
    assert (result.start_step, result.final_step) == (0, 4)
    expected = {f"eval/{m}" for m in (*metrics, "task_loss")}
    assert set(result.eval_metrics) == expected
    assert all(np.isfinite(v) for v in result.eval_metrics.values())
    first, last = eval_lines(workdir)
    assert (first["step"], last["step"]) == (0, 4)
    saved = saved_config(workdir)
    assert (saved["data"]["task"], saved["model"]["num_labels"]) == (task, num_labels)


# --- config errors --------------------------------------------------------------------


TEACHERS = ("{teachers}",)
# case: ({dotted field: value ('{name}' is replaced by the directory of that name)},
#        the error message's pattern)
ERRORS = {
    "unknown_strategy": ({"distill.strategy": "nope"}, r"distill\.strategy='nope'"),
    "unknown_dynamic_kd_key": (
        {
            "teacher.workdirs": TEACHERS,
            "distill.strategy": "dynamic_kd",
            "distill.dynamic_kd.ratios": 0.5,
        },
        r"distill\.dynamic_kd\.ratios is not a setting",
    ),
    "ratio_zero": (
        {
            "teacher.workdirs": TEACHERS,
            "distill.strategy": "dynamic_kd",
            "distill.dynamic_kd.ratio": 0.0,
        },
        r"distill\.dynamic_kd\.ratio=0\.0",
    ),
    "ratio_above_one": (
        {
            "teacher.workdirs": TEACHERS,
            "distill.strategy": "dynamic_kd",
            "distill.dynamic_kd.ratio": 1.5,
        },
        r"distill\.dynamic_kd\.ratio=1\.5",
    ),
    "regression_with_dynamic_kd": (
        {
            "teacher.workdirs": TEACHERS,
            "distill.strategy": "dynamic_kd",
            "data.source": "tfds",
            "data.task": "glue/stsb",
        },
        r"distill\.strategy='dynamic_kd'.*data\.task='glue/stsb' is a regression task",
    ),
    "teacher_is_a_pretraining_run": (
        {"teacher.workdirs": ("{pretrained}",)},
        r"teacher\.workdirs\[0\]: .* is a pre-training run",
    ),
    "teacher_of_another_task": (
        {"teacher.workdirs": TEACHERS, "data.source": "tfds", "data.task": "glue/mrpc"},
        r"teacher\.workdirs\[0\]: .*data\.task='source', this run is on 'glue/mrpc'",
    ),
    "no_teacher_for_a_single_run": (
        {"distill.strategy": "mt_bert", "teacher.workdirs": ()},
        r"distill\.strategy='mt_bert' needs teachers: set teacher\.workdirs",
    ),
    "rl_kd_with_accumulation": (
        {
            "teacher.workdirs": TEACHERS,
            "distill.strategy": "rl_kd",
            "optim.grad_accum_steps": 2,
            "data.batch_size": 16,  # 2 micro-batches of 8 fit the 8 devices.
        },
        r"distill\.strategy='rl_kd' updates its policy .* set optim\.grad_accum_steps=1",
    ),
    "init_from_another_architecture": (
        # teacher0's encoder is 1 layer of width 16; the student's 2 of width 32.
        {"distill.strategy": "task", "init.workdir": "{narrow_pretrained}"},
        r"init\.workdir: parameter \S+ is \([\d, ]+\) in \S+ but \([\d, ]+\) here",
    ),
    "unprepared_glue_task": (
        {
            "distill.strategy": "task",
            "data.source": "tfds",
            "data.task": "glue/rte",
            "data.tfds_data_dir": "{empty}",
        },
        r"data\.task='glue/rte' is not prepared in data\.tfds_data_dir=",
    ),
    "cofinetune_without_models": (
        {"distill.strategy": "cofinetune", "teacher.models": ()},
        r"teacher\.models is empty",
    ),
}


def _resolve(value, dirs):
    if isinstance(value, str):
        return value.format(**dirs)
    if isinstance(value, tuple):
        return tuple(_resolve(v, dirs) for v in value)
    return value


@pytest.mark.parametrize("case", list(ERRORS))
def test_config_error_names_the_field_and_writes_nothing(
    case, finetune_config, shared_teachers, pipeline_run, tmp_path
):
    fields, pattern = ERRORS[case]
    pipeline_dir = pipeline_run[0]
    dirs = {
        "teachers": shared_teachers[0],
        "pretrained": os.path.join(pipeline_dir, "pretrain", "student"),
        "narrow_pretrained": os.path.join(pipeline_dir, "pretrain", "teacher0"),
        "empty": str(tmp_path / "tfds"),
    }
    config = finetune_config()
    for name, value in fields.items():
        *sections, key = name.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[key] = _resolve(value, dirs)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        finetune_run.run(config, str(workdir))
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert not workdir.exists(), sorted(os.listdir(workdir))
