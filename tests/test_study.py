"""The DWT three-factor study (dwt_jax/study/): its plan, and the quick study end to end.

The quick study runs once per module through the CLI, in a subprocess with a JAX
persistent compilation cache: its runs compile near-identical steps (the baseline
and the remapped student reuse others' compilations), which keeps it near 100 s on
2 cores instead of near 170 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from testutil import REPO_ROOT

from dwt_jax import study
from dwt_jax.configuration import ConfigError
from dwt_jax.metrics import read_metrics

SHARED = "dwt_L1H32S4_normal_scratch"  # The reference teacher with Normal α_s, from scratch.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quick_config(data_cache_dir):
    config = study.load_study_config("quick")
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    return config


def test_plan_trains_the_shared_run_once(data_cache_dir, tmp_path):
    plan = study.plan_study(quick_config(data_cache_dir), str(tmp_path))
    assert list(plan.runs)[:4] == [
        "teacher_L1H32S3",
        "teacher_L1H32S4",
        "teacher_L1H32",
        "baseline",
    ]
    assert len(plan.runs) == 21 and len(plan.rows) == 24
    assert [factor for factor, name in plan.rows if name == SHARED] == [
        "teacher_quality",
        "alpha",
        "remap",
        "growth",
    ]
    shared = plan.runs[SHARED].config
    assert shared.teacher.workdirs == (str(tmp_path / "teacher_L1H32S4"),)
    assert (shared.distill.strategy, shared.distill.form) == ("dwt", "dwt")
    assert shared.distill.alpha_s.to_dict() == {
        "name": "constant",
        "value": 1.0,
        "end_value": 1.0,
        "steps": 0,
    }
    several = plan.runs["multi_dynamic_L1H32S3+L1H32S4"]
    assert several.config.teacher.workdirs == (
        str(tmp_path / "teacher_L1H32S3"),
        str(tmp_path / "teacher_L1H32S4"),
    )
    assert several.config.distill.teacher_weighting == "dynamic"
    decay = plan.runs["dwt_L1H32S4_strong_to_normal_scratch"].config.distill.alpha_s
    assert (decay.name, decay.value, decay.end_value, decay.steps) == ("strong_to_normal", 4, 1, 6)
    ki = plan.runs["dwt_L1H32S4_ki_scratch"].config.distill
    assert (ki.form, ki.alpha_s.name, ki.alpha_s.value, ki.alpha_s.steps) == ("ki", "ki", 1, 3)
    remap = plan.runs["dwt_L1H32S4_normal_remap"].config.teacher
    assert (remap.student_init, remap.remap.depth, remap.remap.width) == ("remap", "fna", "fpi")
    for name in ("baseline", "teacher_L1H32S3"):
        run = plan.runs[name].config
        assert (run.distill.strategy, run.teacher.workdirs, "study" in run) == ("mlm", (), False)
    assert plan.runs["teacher_L1H32S3"].config.train.num_steps == 3


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("teachers", ({"num_layers": 1}, {"depth": 2}), r"study.teachers\[1\] sets 'depth'"),
        ("teachers", ({"num_layers": 1}, {"num_layers": 1}), "differ in shape"),
        ("reference_teacher", 3, r"study.reference_teacher=3 must index"),
        ("reference_alpha", "gentle", "reference_alpha='gentle'"),
        ("alpha_variants", ({"name": "normal", "value": 1.0},), r"alpha_variants\[0\]"),
    ],
)
def test_bad_study_fields_are_config_errors(data_cache_dir, tmp_path, field, value, match):
    config = quick_config(data_cache_dir)
    config.study[field] = value
    with pytest.raises(ConfigError, match=match):
        study.plan_study(config, str(tmp_path))


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, data_cache_dir):
    """The quick study, once, through the CLI: (workdir, its stdout)."""
    workdir = str(tmp_path_factory.mktemp("study"))
    command = [
        sys.executable,
        "-m",
        "dwt_jax.study",
        f"--workdir={workdir}",
        f"--config={study.STUDY_CONFIG}:quick",
        f"--config.data.tfds_data_dir={os.path.join(data_cache_dir, 'tfds')}",
        f"--config.data.tokenizer_cache_dir={os.path.join(data_cache_dir, 'tokenizers')}",
    ]
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        # Eighteen small runs, each compiled anew: ~a third faster on XLA:CPU, and these
        # tests compare the runs with their own outputs, not with fixed numbers.
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
    )
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return workdir, done.stdout


def _plan(workdir, data_cache_dir):
    return study.plan_study(quick_config(data_cache_dir), workdir)


def test_every_run_trained_once_to_a_final_checkpoint(quick_study, data_cache_dir):
    workdir, stdout = quick_study
    plan = _plan(workdir, data_cache_dir)
    for name, run in plan.runs.items():
        steps = run.config.train.num_steps
        assert os.path.isdir(os.path.join(workdir, name, "checkpoints", str(steps))), name
        assert stdout.count(f"] {name}: training") == 1, name
        logged = [line["step"] for line in read_metrics(plan.path(name)) if "train/loss" in line]
        assert logged == list(range(1, steps + 1)), name  # Each step trained exactly once.


def _table(workdir):
    """study.md's table rows as {(factor title, run): cells}."""
    with open(os.path.join(workdir, study.REPORT_MD)) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[1:]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    table = {}
    for line in rows:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        table[(cells["factor"], cells["run"])] = cells
    return table, len(rows)


def test_markdown_numbers_are_the_runs_final_evaluations(quick_study, data_cache_dir):
    workdir, stdout = quick_study
    plan = _plan(workdir, data_cache_dir)
    table, count = _table(workdir)
    assert count == len(plan.rows) == len(table)
    baseline = read_metrics(plan.path("baseline"))[-1]
    for factor, name in plan.rows:
        cells = table[(study.FACTOR_TITLES[factor], name)]
        final = read_metrics(plan.path(name))[-1]
        assert final["step"] == plan.runs[name].config.train.num_steps
        assert cells["final loss"] == f"{final['eval/mlm_loss']:.4f}", name
        assert cells["final acc"] == f"{final['eval/mlm_accuracy']:.4f}", name
        delta = final["eval/mlm_loss"] - baseline["eval/mlm_loss"]
        assert cells["Δ final loss vs baseline (± paired 95%)"] == f"{delta:+.4f}", name
        early = next(line for line in read_metrics(plan.path(name)) if "eval/mlm_loss" in line)
        assert (cells["early step"], cells["early loss"]) == (
            str(early["step"]),
            f"{early['eval/mlm_loss']:.4f}",
        )
    teacher = read_metrics(plan.path("teacher_L1H32S4"))[-1]["eval/mlm_loss"]
    assert table[("remapping", SHARED)]["teacher (layers×hidden: own loss)"] == (
        f"1×32 (4 steps): {teacher:.4f}"
    )
    assert "**soft-loss weight**: lowest final held-out MLM loss" in stdout
    # The downstream column: each encoder's fine-tuning, its final task accuracy.
    for factor, name in plan.rows:
        task = plan.downstream.get(name)
        cells = table[(study.FACTOR_TITLES[factor], name)]
        if task is None:
            assert cells["task accuracy"] == "—", name
            continue
        assert stdout.count(f"] {task.name}: training") == 1, name
        final = [m for m in read_metrics(plan.path(task.name)) if "eval/accuracy" in m][-1]
        assert cells["task accuracy"] == f"{final['eval/accuracy']:.4f}", name


def test_json_and_plots(quick_study, data_cache_dir):
    workdir, _ = quick_study
    with open(os.path.join(workdir, study.REPORT_JSON)) as f:
        report = json.load(f)
    assert len(report["rows"]) == 24 and len(report["best"]) == 5
    shared = report["runs"][SHARED]
    assert shared["curve"]["step"] == [2, 4, 6]
    assert shared["final_loss"] == read_metrics(os.path.join(workdir, SHARED))[-1]["eval/mlm_loss"]
    decay = report["runs"]["dwt_L1H32S4_strong_to_normal_scratch"]["schedule"]
    assert decay["alpha"][0] == 4.0 and decay["alpha"][-1] < decay["alpha"][0]
    pngs = ("teacher_quality.png", "alpha.png", "remap.png", "growth.png", "schedules.png",
            "multi_teacher.png", "multi_teacher_weights.png")  # fmt: skip
    for png in pngs:
        with open(os.path.join(workdir, png), "rb") as f:
            data = f.read()
        assert data.startswith(PNG_SIGNATURE) and data.endswith(b"IEND\xaeB`\x82"), png
        assert len(data) > 5000, png


def test_rerun_trains_nothing(quick_study, data_cache_dir):
    workdir, _ = quick_study
    plan = _plan(workdir, data_cache_dir)
    counts = {name: len(read_metrics(plan.path(name))) for name in plan.runs}
    with open(os.path.join(workdir, study.REPORT_MD)) as f:
        markdown = f.read()
    result = study.run_study(quick_config(data_cache_dir), workdir)
    assert (result.trained, result.interrupted) == ([], False)
    assert {name: len(read_metrics(plan.path(name))) for name in plan.runs} == counts
    assert result.report["markdown"] == markdown


def test_a_finished_run_with_other_settings_is_refused(quick_study, data_cache_dir):
    workdir, _ = quick_study
    config = quick_config(data_cache_dir)
    variants = [dict(v) for v in config.study.alpha_variants]
    variants[1]["value"] = 3.0  # 'strong': α_s=3 where its run was trained with 4.
    config.study.alpha_variants = tuple(variants)
    with pytest.raises(ConfigError, match=r"dwt_L1H32S4_strong_scratch.*distill\.alpha_s\.value"):
        study.run_study(config, workdir)


def test_seeds_and_factors_plan_one_run_per_seed(data_cache_dir, tmp_path):
    config = quick_config(data_cache_dir)
    config.study.seeds = (0, 5)
    config.study.factors = ("remap",)
    plan = study.plan_study(config, str(tmp_path))
    assert [factor for factor, _ in plan.rows] == ["teachers"] * 3 + ["baseline", "remap", "remap"]
    assert len(plan.runs) == 2 * 6 and plan.seeds == (0, 5)
    # A seed's teachers and baseline train before its students; the first seed first.
    assert list(plan.runs)[:6] == [
        "teacher_L1H32S3", "teacher_L1H32S4", "teacher_L1H32", "baseline", SHARED,
        "dwt_L1H32S4_normal_remap",
    ]  # fmt: skip
    seeded = plan.runs[f"{SHARED}_seed5"]
    assert (seeded.config.seed, seeded.group, seeded.baseline) == (5, SHARED, "baseline_seed5")
    assert seeded.teacher == "teacher_L1H32S4_seed5"
    assert seeded.config.teacher.workdirs == (str(tmp_path / "teacher_L1H32S4_seed5"),)
    assert plan.replicas(SHARED) == [SHARED, f"{SHARED}_seed5"]
    assert plan.runs["teacher_L1H32_seed5"].config.seed == 5
    config.study.factors = ("speed",)
    with pytest.raises(ConfigError, match=r"study\.factors"):
        study.plan_study(config, str(tmp_path))
    config.study.factors, config.study.seeds = ("alpha",), (1, 1)
    with pytest.raises(ConfigError, match=r"study\.seeds"):
        study.plan_study(config, str(tmp_path))


def test_the_decoder_study_plans_causal_runs(tmp_path):
    config = study.load_study_config("quick", "llama")
    plan = study.plan_study(config, str(tmp_path))
    assert plan.metric == "eval/loss" and len(plan.runs) == 21
    assert plan.runs["baseline"].config.distill.strategy == "clm"
    assert plan.runs["teacher_L1H32"].config.model.family == "llama"
    gap = plan.runs["dwt_L1H32S4_gap_scratch"].config.distill.alpha_s
    assert (gap.name, gap.margin, gap.patience, gap.steps) == ("gap", 0.0, 2, 1)
    wsd = plan.runs["dwt_L1H32S4_wsd_scratch"].config.distill.alpha_s
    assert (wsd.warmup, wsd.start, wsd.steps, wsd.end_value) == (1, 4, 2, 0.0)


def _member(group, seed, final, early, steps=None):
    return {
        "run": f"{group}_{seed}", "group": group, "seed": seed, "teacher": "t", "alpha": "a",
        "early_loss": early, "early_accuracy": 0.1, "final_loss": final, "final_accuracy": 0.2,
        "steps_to_baseline": steps, "time_to_baseline": None if steps is None else 0.5,
        "curve": {}, "schedule": {},
    }  # fmt: skip


def test_a_group_is_the_mean_and_spread_of_its_seeds():
    members = [_member("g", 0, 5.0, 6.0, 300.0), _member("g", 1, 5.2, 6.4)]
    row = study.aggregate([*members, _member("g", 2, 5.3, 6.2, 200.0)])
    assert row["run"] == "g" and row["seeds"] == 3
    assert row["final_loss"] == pytest.approx(15.5 / 3)
    assert row["final_loss_spread"] == pytest.approx(0.3)
    assert row["early_loss"] == pytest.approx(6.2)
    assert (row["steps_to_baseline"], row["reached_baseline"]) == (250.0, 2)
    baseline = {"final_loss": 5.2, "final_loss_spread": 0.05, "seeds": 3}
    assert study.compare(row, baseline, "final_loss")[0] == "level"  # 0.033 < 0.35.
    tight = dict(row, final_loss_spread=0.0)
    assert study.compare(tight, dict(baseline, final_loss_spread=0.0), "final_loss")[0] == "below"
    assert study.verdict(True, ["below"]) == "agrees"
    assert study.verdict(False, ["above"]) == "disagrees"
    assert study.verdict(True, ["level"]).startswith("cannot tell")
    assert row["final_loss_by_seed"] == {0: 5.0, 1: 5.2, 2: 5.3}


def test_comparisons_over_seeds_are_paired_by_seed():
    """Runs of one seed share data order and initialisation: a difference that holds in
    every seed is found even when the seeds' spread is wider than it; one whose sign
    changes is level. The interval is the 95% Student-t one (t at 2 degrees of freedom,
    4.3027, written out here, not taken from scipy)."""
    base = [5.10, 5.40, 5.72]
    members = [_member("g", seed, final, 6.0) for seed, final in enumerate((5.0, 5.3, 5.6))]
    row = study.aggregate(members)
    baseline = study.aggregate([_member("b", i, f, 6.0) for i, f in enumerate(base)])
    assert row["final_loss_spread"] + baseline["final_loss_spread"] > 0.5  # Unpaired: level.
    deltas = np.array([5.0, 5.3, 5.6]) - np.array(base)
    half = 4.302652729911275 * deltas.std(ddof=1) / np.sqrt(3)
    mean, got_half, n = study.paired_interval(row, baseline, "final_loss")
    assert (mean, got_half, n) == (pytest.approx(deltas.mean()), pytest.approx(half), 3)
    side, phrase = study.compare(row, baseline, "final_loss")
    assert side == "below" and f"± {half:.4f} over 3 paired seeds" in phrase
    mixed = study.aggregate(
        [_member("m", seed, final, 6.0) for seed, final in enumerate((5.0, 5.5, 5.6))]
    )
    assert study.compare(mixed, baseline, "final_loss")[0] == "level"  # −0.1, +0.1, −0.12.
    # Without per-seed values in common (one seed each) the unpaired rule applies.
    assert study.paired_interval(row, {"final_loss_by_seed": {7: 5.0}}, "final_loss") is None


@pytest.fixture(scope="module")
def seeded_decoder_study(tmp_path_factory):
    """The decoder study's remapping factor with two seeds, through the CLI's --family,
    --seeds and --factors: (family workdir, stdout)."""
    workdir = str(tmp_path_factory.mktemp("seeded"))
    command = [
        sys.executable, "-m", "dwt_jax.study", f"--workdir={workdir}", "--quick",
        "--family=llama", "--seeds=2", "--factors=remap",
    ]  # fmt: skip
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache_seeded")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_DISABLE_MOST_OPTIMIZATIONS="true",
        # --quick takes the configs' default data caches (under ~): a home of its own.
        HOME=str(tmp_path_factory.mktemp("home")),
    )
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return os.path.join(workdir, "llama"), done.stdout


def test_seeded_decoder_study_reports_means_spreads_and_bands(seeded_decoder_study):
    workdir, stdout = seeded_decoder_study
    with open(os.path.join(workdir, study.REPORT_JSON)) as f:
        report = json.load(f)
    assert len(report["runs"]) == 12
    for row in report["rows"]:
        members = [r for r in report["runs"].values() if r["group"] == row["run"]]
        assert [m["seed"] for m in members] == [0, 1] and row["seeds"] == 2
        finals = [m["final_loss"] for m in members]
        assert row["final_loss"] == pytest.approx(sum(finals) / 2)
        assert row["final_loss_spread"] == pytest.approx(max(finals) - min(finals))
    table, count = _table(workdir)
    assert count == 6 and {cells["seeds"] for cells in table.values()} == {"2"}
    assert "## What this shows" in stdout and "**Remapping.**" in stdout
    with open(os.path.join(workdir, "remap.png"), "rb") as f:
        assert f.read().startswith(PNG_SIGNATURE)
    assert not os.path.exists(os.path.join(workdir, "alpha.png"))  # Not selected.


def test_growth_is_compute_matched(data_cache_dir, tmp_path):
    """The grown students' steps are the budget less the reference teacher's training
    in student-step FLOPs; alone means α_s 0 (no teacher forward), else DWT."""
    config = quick_config(data_cache_dir)
    config.train.num_steps = 60
    plan = study.plan_study(config, str(tmp_path))
    growth = [name for factor, name in plan.rows if factor == "growth"]
    assert growth == [SHARED, "grown_fna_L1H32S4", "grown_fna_dwt_L1H32S4",
                      "grown_stack_L1H32S4", "grown_stack_dwt_L1H32S4"]  # fmt: skip
    from dwt_jax import flops
    from dwt_jax.schema import model_config

    shapes = (config.data.batch_size, config.data.seq_len, config.data.max_predictions)
    student = flops.pretrain_step_flops(model_config(config.model), [], *shapes)
    teacher_cfg = plan.runs["teacher_L1H32S4"].config
    teacher = flops.pretrain_step_flops(model_config(teacher_cfg.model), [], *shapes)
    spent = round(teacher_cfg.train.num_steps * teacher / student)
    alone = plan.runs["grown_fna_L1H32S4"].config
    assert alone.train.num_steps == 60 - spent and 0 < spent < 60
    assert (alone.teacher.student_init, alone.teacher.remap.depth) == ("remap", "fna")
    assert alone.distill.alpha_s.value == 0.0 and alone.distill.strategy == "dwt"
    dwt = plan.runs["grown_stack_dwt_L1H32S4"].config
    assert dwt.distill.alpha_s.value == 1.0 and dwt.teacher.remap.depth == "stack"
    assert plan.runs[SHARED].config.train.num_steps == 60  # Scratch + DWT: the whole budget.


def test_report_only_reports_the_finished_rows(quick_study, data_cache_dir, tmp_path):
    workdir, _ = quick_study
    with open(os.path.join(workdir, study.REPORT_MD)) as f:
        full = f.read()
    config = quick_config(data_cache_dir)
    assert study.report_study(config, workdir)["markdown"] == full  # All finished.
    config.study.seeds = (0, 1)  # Seed 1 has not run: not even its baseline.
    with pytest.raises(ConfigError, match="baseline has not finished"):
        study.report_study(config, workdir)
    config.study.seeds = (0,)
    config.study.alpha_variants = (
        *config.study.alpha_variants,
        {"name": "later", "schedule": "constant", "value": 2.0},
    )
    report = study.report_study(config, workdir)
    assert report["left_out"] == ["alpha: dwt_L1H32S4_later_scratch"]
    assert "## Not finished yet" in report["markdown"]
    with open(os.path.join(workdir, study.REPORT_MD), "w") as f:  # Leave it as it was.
        f.write(full)


def test_every_encoder_of_the_study_is_also_fine_tuned_on_the_task(data_cache_dir, tmp_path):
    """The DWT paper's downstream measure: the baseline and every BERT student (not the
    teachers) get a fine-tuning run ('task' alone, from the run's encoder); a decoder
    study has none."""
    config = quick_config(data_cache_dir)
    assert set(study.plan_study(config, str(tmp_path)).downstream) == {"baseline", SHARED}
    config.study.downstream.only = ()  # Every run (the full study's setting).
    plan = study.plan_study(config, str(tmp_path))
    teachers = {n for n in plan.runs if n.startswith("teacher_")}
    assert set(plan.downstream) == set(plan.runs) - teachers
    task = plan.downstream["baseline"]
    assert task.name == "baseline_task" and task.config.mode == "finetune"
    assert task.config.init.workdir == str(tmp_path / "baseline")
    assert task.config.distill.strategy == "task" and task.config.teacher.workdirs == ()
    student = plan.runs[SHARED].config.model
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "vocab_size"):
        assert task.config.model[key] == student[key]
    decoder = study.plan_study(study.load_study_config("quick", "llama"), str(tmp_path))
    assert decoder.downstream == {}
