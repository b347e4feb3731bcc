"""The DWT three-factor study: teacher quality, soft-loss weight, remapping.

Every factor is measured against the same student trained alone with the same budget,
on held-out MLM loss and accuracy. Each distinct run is trained once, in its own
subdirectory of the study's workdir, and resumes if the study is rerun; a run already
finished with the same settings is not touched. See ``configs/study/dwt_study.py``.

    python -m dwt_jax.study --workdir=runs/study [--quick] [--config=configs/study/dwt_study.py]

Writes ``study.md`` (the table), ``study.json`` (the same, plus the curves) and
``teacher_quality.png``, ``alpha.png``, ``remap.png``, ``schedules.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections

from dwt_jax import checkpoint, cli, train
from dwt_jax.configuration import ConfigError, copy_config, load_config_file, validate_config
from dwt_jax.metrics import METRICS_FILE, read_metrics

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_CONFIG = os.path.join(_REPO, "configs", "study", "dwt_study.py")
REPORT_MD = "study.md"
REPORT_JSON = "study.json"
BASELINE = "baseline"
# Report sections: (factor key, title, plot file).
FACTORS = (
    ("teacher_quality", "teacher quality", "teacher_quality.png"),
    ("alpha", "soft-loss weight", "alpha.png"),
    ("remap", "remapping", "remap.png"),
)
FACTOR_TITLES = {"teachers": "teachers (MLM alone)", "baseline": "baseline"} | {
    key: title for key, title, _ in FACTORS
}
SCHEDULES_PNG = "schedules.png"
# Fields that may differ between a finished run and the study's config of it.
_IGNORED_FIELDS = ("data.tfds_data_dir", "data.tokenizer_cache_dir", "data.worker_count")
_IGNORED_SECTIONS = ("log.", "checkpoint.", "teacher.workdirs")


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training run of the study (trained once, whatever number of factors use it)."""

    name: str  # Its subdirectory of the study's workdir.
    config: ml_collections.ConfigDict
    teacher: str | None = None  # The teacher run's name (students only).
    alpha: str | None = None  # The α_s variant's name (students only).


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """Every distinct run in training order, and the report's (factor, run) rows."""

    workdir: str
    runs: dict[str, StudyRun]
    rows: tuple[tuple[str, str], ...]

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)


@dataclasses.dataclass
class StudyResult:
    """What ``run_study`` did: the runs it trained now, and the report (None if stopped)."""

    plan: StudyPlan
    trained: list[str]
    interrupted: bool
    report: dict[str, Any] | None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The study config less its study-only sections: the base of every run's config."""
    run = copy_config(config)
    for section in ("study", "baseline"):
        if section in run:
            del run[section]
    for field in ("model", "num_steps"):
        if field in run.teacher:
            del run.teacher[field]
    run.teacher.workdirs = ()
    run.teacher.student_init = "scratch"
    run.distill.strategy = "mlm"
    return run


def _teacher_run(config: ml_collections.ConfigDict, spec: Any, index: int) -> StudyRun:
    """A teacher pre-trained with MLM alone: the student's model with ``spec``'s overrides."""
    if not isinstance(spec, dict):
        raise ConfigError(f"study.teachers[{index}]={spec!r} must be a dict of model overrides.")
    run = _run_config(config)
    for key, value in spec.items():
        if key == "num_steps":
            run.train.num_steps = value
        elif key in run.model:
            run.model[key] = value
        else:
            raise ConfigError(
                f"study.teachers[{index}] sets {key!r}, neither a model field nor 'num_steps'."
            )
    name = f"L{run.model.num_layers}H{run.model.hidden_size}"
    if run.train.num_steps != config.train.num_steps:
        name += f"S{run.train.num_steps}"
    return StudyRun(f"teacher_{name}", run)


def _alpha_section(variant: Any, num_steps: int, index: int) -> tuple[str, dict]:
    """(distill.form, distill.alpha_s) of one ``study.alpha_variants`` entry."""
    keys = set(variant) if isinstance(variant, dict) else set()
    unknown = keys - {"name", "form", "schedule", "value", "end_value", "run_fraction"}
    if unknown or not {"name", "schedule", "value"} <= keys:
        raise ConfigError(
            f"study.alpha_variants[{index}]={variant!r} needs name, schedule and value "
            "(optionally form, end_value, run_fraction) and nothing else."
        )
    value = float(variant["value"])
    steps = round(float(variant.get("run_fraction", 0.0)) * num_steps)
    section = {
        "name": variant["schedule"],
        "value": value,
        "end_value": float(variant.get("end_value", value)),
        "steps": steps,
    }
    return variant.get("form", "dwt"), section


def _alpha_label(run: StudyRun) -> str:
    """α_s as the table shows it, e.g. 'constant 4' or 'ki 1→0 by 200 (ki form)'."""
    if run.alpha is None:
        return "— (MLM only)"
    distill = run.config.distill
    alpha = distill.alpha_s
    label = f"{alpha.name} {alpha.value:g}"
    if alpha.name != "constant":
        end = 0.0 if alpha.name in ("ki", "cutoff") else alpha.end_value
        label += f"→{end:g} by step {alpha.steps}"
    return label + ("" if distill.form == "dwt" else f" ({distill.form} form)")


def plan_study(config: ml_collections.ConfigDict, workdir: str) -> StudyPlan:
    """The study's distinct runs (teachers, baseline, students) and its report rows."""
    if "study" not in config:
        raise ConfigError("The config has no 'study' section; use configs/study/dwt_study.py.")
    study = config.study
    workdir = os.path.abspath(os.path.expanduser(workdir))
    teachers = [_teacher_run(config, spec, i) for i, spec in enumerate(study.teachers)]
    _require(
        len({t.name for t in teachers}) == len(teachers) > 0,
        f"study.teachers must be non-empty and differ in shape; got {[t.name for t in teachers]}.",
    )
    reference = study.reference_teacher
    _require(
        isinstance(reference, int) and 0 <= reference < len(teachers),
        f"study.reference_teacher={reference!r} must index study.teachers "
        f"(0..{len(teachers) - 1}).",
    )
    num_steps = config.train.num_steps
    sections = [_alpha_section(v, num_steps, i) for i, v in enumerate(study.alpha_variants)]
    alphas = dict(zip((v["name"] for v in study.alpha_variants), sections, strict=True))
    _require(
        len(alphas) == len(study.alpha_variants) and study.reference_alpha in alphas,
        "study.alpha_variants need distinct names including study.reference_alpha="
        f"{study.reference_alpha!r}; got {list(alphas)}.",
    )
    _require(
        0.0 < study.early_fraction <= 1.0,
        f"study.early_fraction={study.early_fraction!r} must be in (0, 1].",
    )
    runs = {t.name: t for t in teachers}
    runs[BASELINE] = StudyRun(BASELINE, _run_config(config))

    def student(teacher: StudyRun, alpha: str, init: str) -> str:
        name = f"dwt_{teacher.name.removeprefix('teacher_')}_{alpha}_{init}"
        if name not in runs:
            run = _run_config(config)
            run.distill.strategy = "dwt"
            run.distill.form, run.distill.alpha_s = alphas[alpha]
            run.teacher.workdirs = (os.path.join(workdir, teacher.name),)
            run.teacher.model = copy_config(teacher.config.model)
            run.teacher.student_init = init
            runs[name] = StudyRun(name, run, teacher=teacher.name, alpha=alpha)
        return name

    reference = teachers[reference]
    rows = [("teachers", t.name) for t in teachers] + [("baseline", BASELINE)]
    rows += [("teacher_quality", student(t, study.reference_alpha, "scratch")) for t in teachers]
    rows += [("alpha", student(reference, a, "scratch")) for a in alphas]
    rows += [("remap", student(reference, study.reference_alpha, i)) for i in study.inits]
    return StudyPlan(workdir, runs, tuple(rows))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_finished(run: StudyRun, run_dir: str) -> bool:
    """Whether ``run_dir`` holds this run finished (a final checkpoint and evaluation).

    Raises ConfigError if it holds a finished run with other settings, which the
    report would otherwise show under this run's name.
    """
    num_steps = run.config.train.num_steps
    checkpoints = os.path.join(run_dir, train.CHECKPOINT_DIR)
    if not os.path.isdir(checkpoints) or str(num_steps) not in os.listdir(checkpoints):
        return False
    if not os.path.exists(os.path.join(run_dir, METRICS_FILE)) or num_steps not in _evals(run_dir):
        return False
    with open(os.path.join(run_dir, checkpoint.CONFIG_FILE)) as f:
        saved = _flatten(json.load(f))
    wanted = _flatten(json.loads(run.config.to_json_best_effort()))
    differ = [
        key
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
        and key not in _IGNORED_FIELDS
        and not key.startswith(_IGNORED_SECTIONS)
    ]
    if differ:
        raise ConfigError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differ[:6])}); "
            "use a new --workdir, or delete that run to retrain it."
        )
    return True


def run_study(config: ml_collections.ConfigDict, workdir: str) -> StudyResult:
    """Trains every run not yet finished (resuming partial ones), then writes the report.

    A workdir that cannot be used is refused (``ConfigError``) before anything is
    printed or written."""
    cli.check_workdir(workdir)
    plan = plan_study(config, workdir)
    for name, run in plan.runs.items():
        try:
            validate_config(run.config, jax.device_count())
        except ConfigError as e:
            raise ConfigError(f"{e} (in the study's run {name!r})") from None
    trained: list[str] = []
    for index, (name, run) in enumerate(plan.runs.items(), start=1):
        if _is_finished(run, plan.path(name)):
            print(f"dwt_jax.study: [{index}/{len(plan.runs)}] {name}: finished", flush=True)
            continue
        print(f"dwt_jax.study: [{index}/{len(plan.runs)}] {name}: training", flush=True)
        trained.append(name)
        if train.run(run.config, plan.path(name)).interrupted:
            return StudyResult(plan, trained, interrupted=True, report=None)
    report = build_report(plan, float(config.study.early_fraction))
    write_report(report, plan.workdir)
    print(report["markdown"], flush=True)
    return StudyResult(plan, trained, interrupted=False, report=report)


def _evals(run_dir: str) -> dict[int, dict[str, Any]]:
    """Held-out evaluations by step (the last line wins if a resume repeated a step)."""
    return {line["step"]: line for line in read_metrics(run_dir) if "eval/mlm_loss" in line}


def _summary(plan: StudyPlan, name: str, early_fraction: float) -> dict[str, Any]:
    """One run's early and final held-out numbers and its curves."""
    run = plan.runs[name]
    lines = read_metrics(plan.path(name))
    evals = _evals(plan.path(name))
    num_steps = run.config.train.num_steps
    early_step = min(s for s in evals if s >= early_fraction * num_steps)
    schedule = {int(line["step"]): line for line in lines if "distill/alpha" in line}

    def series(lines_by_step: dict[int, dict], **keys: str) -> dict[str, list]:
        steps = sorted(lines_by_step)
        return {"step": steps} | {k: [lines_by_step[s][m] for s in steps] for k, m in keys.items()}

    return {
        "run": name,
        "teacher": run.teacher,
        "alpha": run.alpha,
        "alpha_label": _alpha_label(run),
        "init": run.config.teacher.student_init,
        "layers": run.config.model.num_layers,
        "hidden": run.config.model.hidden_size,
        "early_step": early_step,
        "early_loss": evals[early_step]["eval/mlm_loss"],
        "early_accuracy": evals[early_step]["eval/mlm_accuracy"],
        "final_step": num_steps,
        "final_loss": evals[num_steps]["eval/mlm_loss"],
        "final_accuracy": evals[num_steps]["eval/mlm_accuracy"],
        "curve": series(evals, mlm_loss="eval/mlm_loss", mlm_accuracy="eval/mlm_accuracy"),
        "schedule": series(schedule, alpha="distill/alpha", tau="distill/tau"),
    }


def _best_line(title: str, rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """Which run of a factor had the lowest held-out loss, early and at the end."""
    final = min(rows, key=lambda r: r["final_loss"])
    early = min(rows, key=lambda r: r["early_loss"])
    better = sum(r["final_loss"] < baseline["final_loss"] for r in rows)
    return (
        f"- **{title}**: lowest final held-out MLM loss: `{final['run']}` "
        f"({final['final_loss']:.4f}, {final['final_loss'] - baseline['final_loss']:+.4f} vs "
        f"baseline); lowest at step {early['early_step']}: `{early['run']}` "
        f"({early['early_loss']:.4f}; baseline {baseline['early_loss']:.4f}); "
        f"{better} of {len(rows)} below the baseline's final loss."
    )


def _teacher_label(teacher: dict[str, Any], student_steps: int) -> str:
    """A teacher's shape (and length when it differs from the student's) and its own loss."""
    steps = "" if teacher["final_step"] == student_steps else f" ({teacher['final_step']} steps)"
    return f"{teacher['layers']}×{teacher['hidden']}{steps}: {teacher['final_loss']:.4f}"


def build_report(plan: StudyPlan, early_fraction: float) -> dict[str, Any]:
    """Every run's numbers and curves, the (factor, run) rows, per-factor lines, markdown."""
    runs = {name: _summary(plan, name, early_fraction) for name in plan.runs}
    baseline = runs[BASELINE]
    rows = []
    for factor, name in plan.rows:
        row = {"factor": factor}
        row.update({k: v for k, v in runs[name].items() if k not in ("curve", "schedule")})
        row["delta_vs_baseline"] = row["final_loss"] - baseline["final_loss"]
        teacher = runs[row["teacher"]] if row["teacher"] else None
        row["teacher_final_loss"] = teacher["final_loss"] if teacher else None
        row["teacher_label"] = _teacher_label(teacher, baseline["final_step"]) if teacher else "—"
        rows.append(row)
    lines = [
        _best_line(title, [r for r in rows if r["factor"] == key], baseline)
        for key, title, _ in FACTORS
    ]
    header = (
        "| factor | run | teacher (layers×hidden: own loss) | α_s / form | init | early step "
        "| early loss | early acc | final loss | final acc | Δ final loss vs baseline |"
    )
    table = [header, "|" + "---|" * 11]
    for r in rows:
        table.append(
            f"| {FACTOR_TITLES[r['factor']]} | {r['run']} | {r['teacher_label']} "
            f"| {r['alpha_label']} | {r['init']} "
            f"| {r['early_step']} | {r['early_loss']:.4f} | {r['early_accuracy']:.4f} "
            f"| {r['final_loss']:.4f} | {r['final_accuracy']:.4f} "
            f"| {r['delta_vs_baseline']:+.4f} |"
        )
    student = plan.runs[BASELINE].config.model
    intro = (
        f"Student {student.num_layers}×{student.hidden_size}, {baseline['final_step']} steps; "
        "the baseline is the student trained alone with the same budget. Held-out MLM loss: "
        "lower is better. A run shared by several factors has a row in each."
    )
    markdown = "\n".join(
        ["# DWT study: held-out MLM loss and accuracy", "", intro, "", *table, "", *lines, ""]
    )
    return {"runs": runs, "rows": rows, "best": lines, "markdown": markdown}


def _plot(path: str, panels: list[tuple[str, str, list[tuple[str, dict, str, str]]]]) -> None:
    """Side-by-side panels (title, y label, [(label, {'step', key}, key, style)]) vs step."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, series, key, style in lines:
            ax.plot(series["step"], series[key], style, ms=3, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], workdir: str) -> None:
    """Writes study.md, study.json and the PNG plots into ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(report["markdown"])
    with open(os.path.join(workdir, REPORT_JSON), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
    runs = report["runs"]
    baseline = ("baseline (alone)", runs[BASELINE]["curve"], "mlm_loss", "k--")
    for key, title, filename in FACTORS:
        names = [r["run"] for r in report["rows"] if r["factor"] == key]
        lines = [(n, runs[n]["curve"], "mlm_loss", "o-") for n in names] + [baseline]
        _plot(
            os.path.join(workdir, filename), [(f"DWT study: {title}", "held-out MLM loss", lines)]
        )
    names = [r["run"] for r in report["rows"] if r["factor"] == "alpha"]
    _plot(
        os.path.join(workdir, SCHEDULES_PNG),
        [
            (title, title, [(n, runs[n]["schedule"], key, "-") for n in names])
            for title, key in (("α_s (α_t in the KI form)", "alpha"), ("τ", "tau"))
        ],
    )


def load_study_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """configs/study/dwt_study.py[:variant] from the repository this package sits in."""
    return load_config_file(STUDY_CONFIG, variant)


_EXAMPLES = {"workdir": "runs/study", "config": "configs/study/dwt_study.py:quick"}


def main(argv: list[str]) -> None:
    """CLI: flags → run_study; ``cli.run`` turns a ``ConfigError`` into one line and
    exit 2; 130 if stopped."""
    from absl import flags

    del argv  # The flag parser refused positional arguments.
    config = flags.FLAGS.config
    if flags.FLAGS.quick and config is not None:
        raise ConfigError(
            "--quick loads configs/study/dwt_study.py:quick; pass either --quick or "
            "--config, not both."
        )
    cli.check_workdir(flags.FLAGS.workdir)  # Before the config is loaded or anything runs.
    if config is None:
        config = load_study_config("quick" if flags.FLAGS.quick else None)
    result = run_study(config, flags.FLAGS.workdir)
    if result.interrupted:
        sys.exit(130)


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A study config file, e.g. ':quick'.")
    flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")
    flags.DEFINE_bool("quick", False, "Run configs/study/dwt_study.py:quick (tiny, ~2 min).")
    flags.mark_flags_as_required(["workdir"])


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.study``."""
    _define_flags()
    cli.run(main, _EXAMPLES, config_flag="config")


if __name__ == "__main__":
    run_cli()
