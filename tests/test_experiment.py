"""The DWT pipeline (configs/base.py:smoke): teacher → student → baseline, end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from testutil import load_config

from dwt_jax import experiment, train
from dwt_jax.configuration import ConfigError
from dwt_jax.metrics import read_metrics


def base_smoke(data_cache_dir):
    config = load_config("smoke", name="base")
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    return config


def _counting(calls, name, function):
    def counted(*args, **kwargs):
        calls.append((name, args, kwargs))
        return function(*args, **kwargs)

    return counted


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, data_cache_dir):
    """The smoke pipeline, with every call of the stage checks counted."""
    workdir = str(tmp_path_factory.mktemp("dwt_pipeline"))
    calls: list = []
    with pytest.MonkeyPatch.context() as patch:
        kind = type(train.PRETRAIN)
        patch.setattr(kind, "check", _counting(calls, "check", kind.check))
        patch.setattr(
            train, "validate_pretrain", _counting(calls, "validate", train.validate_pretrain)
        )
        patch.setattr(train, "make_strategy", _counting(calls, "strategy", train.make_strategy))
        results = experiment.run(base_smoke(data_cache_dir), workdir)
    return workdir, results, calls


def test_each_stage_config_is_validated_once(pipeline_run):
    """One check per stage, each validating its config and building its strategy
    once; the runner trusts the plan and validates nothing again."""
    workdir, _, calls = pipeline_run
    checked = [args[2] for name, args, _ in calls if name == "check"]  # (self, config, dir)
    stage_dirs = [os.path.join(workdir, s) for s in ("teacher", "student", "baseline")]
    assert checked == stage_dirs
    validated = [args[0] for name, args, _ in calls if name == "validate"]
    assert len(validated) == 3 and len({id(c) for c in validated}) == 3
    assert sum(name == "strategy" for name, _, _ in calls) == 3


def test_three_stages_and_a_summary(pipeline_run):
    workdir, results, _ = pipeline_run
    assert list(results) == ["teacher", "student", "baseline"]
    for name, result in results.items():
        assert result.final_step == 6, name
        assert os.path.isdir(os.path.join(workdir, name, "checkpoints", "6"))
    with open(os.path.join(workdir, experiment.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert set(summary) == {"teacher", "student", "baseline"}
    assert summary["student"]["eval/mlm_loss"] == results["student"].eval_metrics["eval/mlm_loss"]


def test_student_logs_distillation_and_teacher_metrics(pipeline_run):
    workdir, results, _ = pipeline_run
    lines = read_metrics(os.path.join(workdir, "student"))
    train_line = next(line for line in lines if "train/loss" in line)
    assert {"distill/kl", "distill/alpha", "distill/tau"} <= set(train_line)
    assert train_line["distill/kl"] > 0
    eval_line = next(line for line in lines if "eval/mlm_loss" in line)
    assert {"teacher/mlm_loss", "teacher/mlm_accuracy"} <= set(eval_line)
    # The frozen teacher, restored into the student's run, scores exactly what it
    # scored at the end of its own run on the same held-out batches.
    teacher_final = results["teacher"].eval_metrics
    assert eval_line["teacher/mlm_loss"] == teacher_final["eval/mlm_loss"]
    assert eval_line["teacher/mlm_accuracy"] == teacher_final["eval/mlm_accuracy"]


def test_teacher_differs_from_student_and_changes_its_training(pipeline_run):
    workdir, _, _ = pipeline_run
    student = read_metrics(os.path.join(workdir, "student"))
    baseline = read_metrics(os.path.join(workdir, "baseline"))
    loss = lambda lines: [line["train/mlm_loss"] for line in lines if "train/mlm_loss" in line]
    # Same data, init and dropout: step 1's MLM loss is equal; later ones differ.
    np.testing.assert_allclose(loss(student)[0], loss(baseline)[0], rtol=1e-6)
    assert loss(student)[-1] != loss(baseline)[-1]


def test_teacher_is_not_in_the_student_checkpoint(pipeline_run):
    workdir, _, _ = pipeline_run
    path = os.path.join(workdir, "student", "checkpoints", "6", "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata
    assert list(tree["params"]) == ["student"]


def test_rerun_resumes_every_stage_without_training(pipeline_run, data_cache_dir):
    workdir, _, _ = pipeline_run
    counts = {n: len(read_metrics(os.path.join(workdir, n))) for n in ("teacher", "student")}
    results = experiment.run(base_smoke(data_cache_dir), workdir)
    for name, result in results.items():
        assert (result.start_step, result.final_step) == (6, 6), name
    for name, count in counts.items():
        assert len(read_metrics(os.path.join(workdir, name))) == count


def _student_of(teacher_dir, data_cache_dir, **data_overrides):
    config = base_smoke(data_cache_dir)
    config.teacher.workdirs = (teacher_dir,)
    config.data.update(data_overrides)
    return config


def test_teacher_with_another_tokenizer_is_refused(pipeline_run, data_cache_dir, tmp_path):
    workdir, _, _ = pipeline_run
    config = _student_of(os.path.join(workdir, "teacher"), data_cache_dir, vocab_size=600)
    with pytest.raises(ConfigError, match=r"teacher.workdirs\[0\].*tokenizer"):
        train.run(config, str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()


def test_teacher_with_another_vocabulary_size_is_refused(pipeline_run, data_cache_dir, tmp_path):
    workdir, _, _ = pipeline_run
    config = _student_of(os.path.join(workdir, "teacher"), data_cache_dir)
    config.model.vocab_size = 2048
    with pytest.raises(ConfigError, match="vocab_size"):
        train.run(config, str(tmp_path / "student"))


def test_missing_teacher_directory_is_refused(data_cache_dir, tmp_path):
    config = _student_of(str(tmp_path / "no_teacher"), data_cache_dir)
    with pytest.raises(ConfigError, match=r"teacher.workdirs\[0\]"):
        experiment.run(config, str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()


def _fake_run(directory, model, step=6):
    """A run's files as the up-front checks read them: config.json and a checkpoint name."""
    os.makedirs(os.path.join(directory, "checkpoints", str(step)))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": model}, f)
    return str(directory)


def test_given_teacher_of_another_vocabulary_fails_before_any_stage(data_cache_dir, tmp_path):
    config = base_smoke(data_cache_dir)
    teacher = _fake_run(tmp_path / "teacher", {**config.model.to_dict(), "vocab_size": 2048})
    config.teacher.workdirs = (teacher,)
    with pytest.raises(ConfigError, match=r"^teacher\.workdirs\[0\]: .* model\.vocab_size=2048"):
        experiment.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_init_workdir_fails_before_the_teacher_trains(data_cache_dir, tmp_path):
    config = base_smoke(data_cache_dir)
    config.init.workdir = str(tmp_path / "no_such_run")
    with pytest.raises(ConfigError, match=r"^init\.workdir=.* does not exist.*student stage"):
        experiment.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_teacher_stage_starts_from_scratch(tmp_path):
    """init.workdir holds the student's weights: the teacher stage must not take them."""
    config = load_config("smoke", name="base")
    config.init.workdir = "runs/pretrained_student"
    stages = {name: c for name, c, _ in experiment.plan_stages(config, str(tmp_path))}
    assert stages["teacher"].init.workdir == ""
    assert stages["student"].init.workdir == stages["baseline"].init.workdir == config.init.workdir


def test_bad_student_config_fails_before_the_teacher_trains(data_cache_dir, tmp_path):
    config = base_smoke(data_cache_dir)
    config.distill.alpha_s.name = "sometimes"
    with pytest.raises(ConfigError, match=r"distill\.alpha_s\.name"):
        experiment.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_remapped_student_starts_as_the_teacher(tmp_path, data_cache_dir):
    """Identity-depth remap of a pre-LN teacher is exact: after one step at lr 0 (the
    first warm-up step) the student scores exactly what the teacher scores."""
    config = base_smoke(data_cache_dir)
    config.model.norm = "pre"
    config.teacher.model.update(norm="pre", num_layers=1, hidden_size=32, num_heads=2)
    config.teacher.student_init = "remap"
    config.teacher.remap.update(depth="identity", width="fpi")
    config.baseline.enabled = False
    config.train.num_steps = 1
    config.teacher.num_steps = 4
    results = experiment.run(config, str(tmp_path))
    student = results["student"].eval_metrics
    np.testing.assert_allclose(student["eval/mlm_loss"], student["teacher/mlm_loss"], rtol=1e-5)
    assert student["eval/mlm_accuracy"] == student["teacher/mlm_accuracy"]


def test_remap_of_an_incompatible_teacher_is_a_config_error(pipeline_run, data_cache_dir, tmp_path):
    workdir, _, _ = pipeline_run
    config = _student_of(os.path.join(workdir, "teacher"), data_cache_dir)
    config.teacher.student_init = "remap"
    config.model.hidden_size = 16  # Narrower than the teacher: cannot grow into it.
    config.model.num_heads = 2
    with pytest.raises(ConfigError, match=r"teacher\.remap"):
        train.run(config, str(tmp_path / "student"))


def test_hidden_state_term_trains_adapters_beside_the_student(
    pipeline_run, data_cache_dir, tmp_path
):
    workdir, _, _ = pipeline_run
    config = _student_of(os.path.join(workdir, "teacher"), data_cache_dir)
    config.distill.hidden_weight = 1.0
    config.train.num_steps = 3
    result = train.run(config, str(tmp_path / "student"))
    assert result.final_step == 3
    lines = read_metrics(str(tmp_path / "student"))
    assert all(line["distill/hidden"] > 0 for line in lines if "train/loss" in line)
    path = tmp_path / "student" / "checkpoints" / "3" / "state"
    tree = ocp.StandardCheckpointer().metadata(str(path)).item_metadata
    assert sorted(tree["params"]) == ["adapters", "student"]


@pytest.mark.parametrize(
    ("strategy", "teacher_dirs", "baseline", "expected"),
    [
        ("dwt", (), True, ["teacher", "student", "baseline"]),
        ("dwt", ("given",), True, ["student", "baseline"]),
        ("dwt", ("given",), False, ["run"]),
        ("mlm", (), True, ["run"]),
    ],
)
def test_plan_stages(strategy, teacher_dirs, baseline, expected, tmp_path):
    config = load_config("smoke", name="base")
    config.distill.strategy = strategy
    config.teacher.workdirs = teacher_dirs
    config.baseline.enabled = baseline
    stages = experiment.plan_stages(config, str(tmp_path))
    assert [name for name, _, _ in stages] == expected
    by_name = {name: (c, d) for name, c, d in stages}
    if "student" in by_name:
        student_config, _ = by_name["student"]
        given = teacher_dirs or (os.path.join(str(tmp_path), "teacher"),)
        assert tuple(student_config.teacher.workdirs) == tuple(given)
    if "baseline" in by_name:
        assert by_name["baseline"][0].distill.strategy == "mlm"


def test_teacher_of_another_width_heads_and_mlp(pipeline_run, data_cache_dir, tmp_path):
    """Teacher 1 layer × 32 hidden, 2 heads, MLP 64; student 2 × 48, 4 heads, MLP 96:
    the soft labels need only the vocabulary; the hidden term projects 48 → 32."""
    workdir, _, _ = pipeline_run
    config = _student_of(os.path.join(workdir, "teacher"), data_cache_dir)
    config.model.update(hidden_size=48, num_heads=4, mlp_dim=96)
    config.distill.hidden_weight = 1.0
    config.distill.hidden_loss = "pkd"
    config.train.num_steps = 2
    result = train.run(config, str(tmp_path / "student"))
    assert result.final_step == 2
    assert {"eval/mlm_loss", "teacher/mlm_loss"} <= set(result.eval_metrics)
    line = next(line for line in read_metrics(str(tmp_path / "student")) if "train/loss" in line)
    assert np.isfinite(line["distill/hidden"]) and line["distill/kl"] > 0
