"""The comparison runner (dwt_jax/finetune/compare.py): two students side by side with
the session's shared teachers, the report files, and the plan that reuses teachers."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from dwt_jax import stages as pipeline
from dwt_jax.finetune import compare
from dwt_jax.metrics import read_metrics

ENTRIES = ("task", "dynamic_kd_selection")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("compile_fast")


def comparison_config(finetune_config, teachers_dir):
    config = finetune_config()
    config.teacher.workdirs = (teachers_dir,)
    config.compare.strategies = ENTRIES
    return config


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, finetune_config, shared_teachers, fast_compilation):
    """(workdir, config, report) of `run_comparison` with the shared teachers."""
    config = comparison_config(finetune_config, shared_teachers[0])
    workdir = str(tmp_path_factory.mktemp("comparison"))
    with fast_compilation():
        report = compare.run_comparison(config, workdir)
    return workdir, config, report


def test_plan_reuses_given_teachers(finetune_config, shared_teachers, tmp_path):
    config = comparison_config(finetune_config, shared_teachers[0])
    stages = pipeline.plan_comparison(config, str(tmp_path), ENTRIES)
    assert [name for name, _, _ in stages] == list(ENTRIES)  # No teachers stage.
    by_name = {name: (stage, stage_dir) for name, stage, stage_dir in stages}
    task, task_dir = by_name["task"]
    assert (task.distill.strategy, tuple(task.teacher.workdirs)) == ("task", ())
    selection, selection_dir = by_name["dynamic_kd_selection"]
    assert selection.distill.strategy == "dynamic_kd"
    assert tuple(selection.teacher.workdirs) == (shared_teachers[0],)
    assert selection.distill.dynamic_kd.selection == "entropy"
    assert selection.distill.dynamic_kd.ratio == 0.25
    assert task_dir == os.path.join(str(tmp_path), "students", "task")
    assert selection_dir == os.path.join(str(tmp_path), "students", "dynamic_kd_selection")
    # Without given teachers they are co-finetuned first, and every student uses them.
    config.teacher.workdirs = ()
    stages = pipeline.plan_comparison(config, str(tmp_path), ENTRIES)
    assert [name for name, _, _ in stages] == ["teachers", *ENTRIES]
    assert tuple(stages[2][1].teacher.workdirs) == (os.path.join(str(tmp_path), "teachers"),)


def test_markdown_has_one_row_per_entry(comparison):
    workdir, _, report = comparison
    with open(os.path.join(workdir, compare.REPORT_MD)) as f:
        markdown = f.read()
    assert markdown == report["markdown"]
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    header, *body = rows
    assert header.startswith("| entry | strategy | accuracy | matthews_corrcoef | wall time (s) |")
    assert [row.split(" | ")[0] for row in body] == [f"| {entry}" for entry in ENTRIES]
    assert body[1].startswith("| dynamic_kd_selection | dynamic_kd | ")
    assert (
        "Task source (accuracy on the validation split)" in markdown
        and "teachers' accuracy: teacher0" in markdown
    )


def test_json_rows_metrics_timing_and_flops(comparison):
    workdir, config, _ = comparison
    with open(os.path.join(workdir, compare.REPORT_JSON)) as f:
        saved = json.load(f)
    assert saved["task"] == "source"
    rows = {row["entry"]: row for row in saved["rows"]}
    assert list(rows) == list(ENTRIES)
    num_steps = config.train.num_steps
    for entry, row in rows.items():
        run_dir = os.path.join(workdir, "students", entry)
        assert row["workdir"] == run_dir
        final = [line for line in read_metrics(run_dir) if "eval/task_loss" in line][-1]
        assert final["step"] == num_steps
        assert row["metrics"] == {
            k[len("eval/") :]: v for k, v in final.items() if k.startswith("eval/")
        }
        assert row["steps"] == num_steps and row["wall_s"] > 0
        np.testing.assert_allclose(row["s_per_step"], row["wall_s"] / num_steps)
        with open(os.path.join(run_dir, compare.TIMING_FILE)) as f:
            assert json.load(f) == {k: row[k] for k in ("wall_s", "steps", "s_per_step")}
        assert row["student_flops"] > 0
    task, selection = rows["task"], rows["dynamic_kd_selection"]
    assert task["student_flops"] == selection["student_flops"]
    assert (task["teacher_flops"], task["teacher_rows_fraction"]) == (0.0, 1.0)
    # The teachers run on ⌊8 · 0.25⌋ = 2 rows of each batch of 8: a quarter of the
    # FLOPs of distilling the whole batch.
    assert selection["teacher_rows_fraction"] == 0.25
    stage = ml_collections.ConfigDict(config.to_dict())
    stage.distill.strategy = "dynamic_kd"
    full = compare.step_flops(stage)["teacher_flops"]
    assert 0 < selection["teacher_flops"] < full
    np.testing.assert_allclose(selection["teacher_flops"], 0.25 * full, rtol=1e-12)


def test_weights_vs_uncertainty_plot(comparison):
    workdir, _, _ = comparison
    with open(os.path.join(workdir, compare.WEIGHTS_PNG), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    series = compare._weight_series(os.path.join(workdir, "students", "dynamic_kd_selection"))
    assert {"step", "kd/mean_uncertainty", "kd/weight_teacher0", "kd/weight_teacher1"} <= set(
        series
    )
    assert len(series["step"]) > 1
    assert compare._weight_series(os.path.join(workdir, "students", "task")) == {}
