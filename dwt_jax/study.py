"""The DWT three-factor study: teacher quality, soft-loss weight, remapping.

Every factor is measured against the same student trained alone with the same budget,
on held-out MLM loss and accuracy. Each distinct run is trained once, in its own
subdirectory of the study's workdir, and resumes if the study is rerun; a run already
finished with the same settings is not touched. See ``configs/study/dwt_study.py``.

    python -m dwt_jax.study --workdir=runs/study [--family=bert|llama|both] [--seeds=3]
        [--factors=teacher_quality,alpha,remap] [--quick] [--config=configs/study/...py]

Without ``--config`` it runs each selected family's study (``FAMILY_CONFIGS``) into
``<workdir>/<family>``. Every run is repeated for each of ``study.seeds`` (the table
gives the mean and the spread, the plots a band). Writes ``study.md`` (the table, the
per-factor lines and "what this shows"), ``study.json`` (the same, plus the curves) and
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

from dwt_jax import checkpoint, cli, speedup, train
from dwt_jax.configuration import ConfigError, copy_config, load_config_file, validate_config
from dwt_jax.metrics import METRICS_FILE, read_metrics
from dwt_jax.models.families import objective_of_section
from dwt_jax.objectives import OBJECTIVES

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_CONFIG = os.path.join(_REPO, "configs", "study", "dwt_study.py")
# The study config of each family (``--family``): BERT (masked LM) and Llama (causal LM).
FAMILY_CONFIGS = {
    "bert": STUDY_CONFIG,
    "llama": os.path.join(_REPO, "configs", "study", "causal_study.py"),
}
REPORT_MD = "study.md"
REPORT_JSON = "study.json"
BASELINE = "baseline"
# Report sections: (factor key, title, plot file).
FACTORS = (
    ("teacher_quality", "teacher quality", "teacher_quality.png"),
    ("alpha", "soft-loss weight", "alpha.png"),
    ("remap", "remapping", "remap.png"),
    ("growth", "growth, compute-matched", "growth.png"),
)
FACTOR_TITLES = {"teachers": "teachers (alone)", "baseline": "baseline"} | {
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
    group: str = ""  # The run's name at the first seed: its row in the report.
    baseline: str = BASELINE  # The baseline run of the same seed.
    init: str = ""  # How the report names its initialisation ('' : teacher.student_init).
    charged: int = 0  # Student steps charged before step 0 (a grown run's teacher training).


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """Every distinct run in training order, and the report's (factor, run) rows."""

    workdir: str
    runs: dict[str, StudyRun]
    rows: tuple[tuple[str, str], ...]  # (factor, group): a group is one run per seed.
    seeds: tuple[int, ...] = (0,)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def replicas(self, group: str) -> list[str]:
        """The runs of ``group``, one per seed, in seed order."""
        return [name for name, run in self.runs.items() if (run.group or name) == group]

    @property
    def metric(self) -> str:
        """The held-out loss's metric name ('eval/mlm_loss' or 'eval/loss')."""
        return f"eval/{self.objective.eval_loss}"

    @property
    def objective(self) -> Any:
        return OBJECTIVES[objective_of_section(self.runs[BASELINE].config.model)]


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
    run.distill.strategy = objective_of_section(run.model)  # 'mlm' or 'clm': alone.
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


_ALPHA_KEYS = {
    "name", "form", "schedule", "value", "end_value", "run_fraction", "start_fraction",
    "warmup_fraction", "margin", "patience",
}  # fmt: skip


def _alpha_section(variant: Any, num_steps: int, index: int) -> tuple[str, dict]:
    """(distill.form, distill.alpha_s) of one ``study.alpha_variants`` entry; the
    ``*_fraction`` fields are fractions of the run (``run_fraction``: the schedule's
    ``steps``; ``start_fraction``, ``warmup_fraction``: 'wsd'/'phase' ``start`` and
    ``warmup``)."""
    keys = set(variant) if isinstance(variant, dict) else set()
    unknown = keys - _ALPHA_KEYS
    if unknown or not {"name", "schedule", "value"} <= keys:
        raise ConfigError(
            f"study.alpha_variants[{index}]={variant!r} needs name, schedule and value "
            f"(optionally {', '.join(sorted(_ALPHA_KEYS - {'name', 'schedule', 'value'}))}) "
            "and nothing else."
        )
    value = float(variant["value"])
    section = {
        "name": variant["schedule"],
        "value": value,
        "end_value": float(variant.get("end_value", value)),
        "steps": round(float(variant.get("run_fraction", 0.0)) * num_steps),
    }
    for key in ("start", "warmup"):
        if f"{key}_fraction" in variant:
            section[key] = round(float(variant[f"{key}_fraction"]) * num_steps)
    for key in ("margin", "patience"):
        if key in variant:
            section[key] = variant[key]
    return variant.get("form", "dwt"), section


def _alpha_label(run: StudyRun) -> str:
    """α_s as the table shows it, e.g. 'constant 4' or 'ki 1→0 by 200 (ki form)'."""
    if run.alpha is None:
        return "— (alone)"
    distill = run.config.distill
    alpha = distill.alpha_s
    label = f"{alpha.name} {alpha.value:g}"
    if alpha.name == "gap":
        label += (
            f"→0 over {alpha.steps} steps once within {alpha.get('margin') or 0:g} of the "
            f"teacher at {alpha.get('patience') or 2} evaluations"
        )
    elif alpha.name == "phase":
        label += f" to step {alpha.start}, →0 by step {alpha.start + alpha.steps}"
    elif alpha.name == "wsd":
        label += f" (warm-up {alpha.get('warmup') or 0}), →{alpha.end_value:g} from step "
        label += f"{alpha.start} by {alpha.start + alpha.steps}"
    elif alpha.name != "constant":
        end = 0.0 if alpha.name in ("ki", "cutoff") else alpha.end_value
        label += f"→{end:g} by step {alpha.steps}"
    return label + ("" if distill.form == "dwt" else f" ({distill.form} form)")


def _matched_steps(config: ml_collections.ConfigDict, teacher: StudyRun) -> tuple[int, int]:
    """(the grown student's steps, the teacher's training in student steps): the
    teacher's training FLOPs (``flops.pretrain_step_flops`` × its steps) are taken out of
    the student's budget (docs/methods.md#the-study)."""
    from dwt_jax import flops
    from dwt_jax.schema import model_config

    data = config.data
    shapes = (int(data.batch_size), int(data.seq_len), data.get("max_predictions"))
    per_step = [
        flops.pretrain_step_flops(model_config(section), [], *shapes)
        for section in (config.model, teacher.config.model)
    ]
    spent = round(teacher.config.train.num_steps * per_step[1] / per_step[0])
    budget = int(config.train.num_steps)
    _require(
        spent < budget,
        f"study.growth: training the teacher {teacher.name} costs {spent} student steps, "
        f"the whole budget of {budget}; give the student more steps or a cheaper teacher.",
    )
    return budget - spent, spent


def _growth_rows(
    config: ml_collections.ConfigDict, teacher: StudyRun, scratch_dwt: StudyRun
) -> list[tuple[str, StudyRun]]:
    """The growth factor, compute-matched: the student grown from ``teacher`` by each of
    ``study.growth``'s methods, alone (α_s 0: no teacher forward pass at all) and with
    DWT, with the teacher's training taken out of its budget; beside the baseline
    (scratch, alone) and ``scratch_dwt`` (scratch, DWT), whose budgets are whole."""
    steps, spent = _matched_steps(config, teacher)
    rows: list[tuple[str, StudyRun]] = [("growth", scratch_dwt)]
    for index, method in enumerate(config.study.growth):
        _require(
            isinstance(method, dict) and set(method) == {"name", "depth", "width"},
            f"study.growth[{index}]={method!r} must be a dict of name, depth and width.",
        )
        for alone in (True, False):
            run = copy_config(scratch_dwt.config)
            run.train.num_steps = steps
            run.teacher.student_init = "remap"
            run.teacher.remap.depth, run.teacher.remap.width = method["depth"], method["width"]
            if alone:  # α_s = 0 from step 0: the run trains without the teacher's forward.
                run.distill.form = "dwt"
                run.distill.alpha_s = {"name": "constant", "value": 0.0, "end_value": 0.0,
                                       "steps": 0}  # fmt: skip
            suffix = "" if alone else "_dwt"
            name = f"grown_{method['name']}{suffix}_{teacher.name.removeprefix('teacher_')}"
            label = f"grown {method['name']} ({method['depth']}/{method['width']})"
            rows.append(("growth", dataclasses.replace(
                scratch_dwt, name=name, config=run, alpha=None if alone else scratch_dwt.alpha,
                init=f"{label}, {steps} steps (+{spent} for the teacher)", charged=spent,
            )))  # fmt: skip
    return rows


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
    seeds = tuple(study.get("seeds", (config.seed,)))
    _require(
        len(seeds) > 0 and len(set(seeds)) == len(seeds) and all(isinstance(x, int) for x in seeds),
        f"study.seeds={seeds!r} must be distinct integers (at least one).",
    )
    factors = tuple(study.get("factors", tuple(key for key, _, _ in FACTORS)))
    known = [key for key, _, _ in FACTORS]
    _require(
        len(factors) > 0 and set(factors) <= set(known),
        f"study.factors={factors!r} must name some of {', '.join(known)}.",
    )
    runs: dict[str, StudyRun] = {}
    rows: list[tuple[str, str]] = []

    def add(run: StudyRun, seed: int, first: bool) -> str:
        """The run at ``seed`` (named with a seed suffix after the first seed)."""
        name = run.name if first else f"{run.name}_seed{seed}"
        if name not in runs:
            config_at_seed = copy_config(run.config)
            config_at_seed.seed = seed
            teacher = run.teacher if first or run.teacher is None else f"{run.teacher}_seed{seed}"
            if teacher is not None:
                config_at_seed.teacher.workdirs = (os.path.join(workdir, teacher),)
            baseline = BASELINE if first else f"{BASELINE}_seed{seed}"
            runs[name] = dataclasses.replace(
                run, name=name, config=config_at_seed, teacher=teacher, group=run.name,
                baseline=baseline,
            )  # fmt: skip
        return name

    def student(teacher: StudyRun, alpha: str, init: str) -> StudyRun:
        name = f"dwt_{teacher.name.removeprefix('teacher_')}_{alpha}_{init}"
        run = _run_config(config)
        run.distill.strategy = "dwt"
        run.distill.form, run.distill.alpha_s = alphas[alpha]
        run.teacher.model = copy_config(teacher.config.model)
        run.teacher.student_init = init
        # A student grown from the teacher inherits its training: charged in the
        # compute-saved figures (not taken out of its steps: the remapping factor is the
        # DWT paper's, with whole budgets; the growth factor takes it out).
        charged = _matched_steps(config, teacher)[1] if init == "remap" else 0
        return StudyRun(name, run, teacher=teacher.name, alpha=alpha, charged=charged)

    reference = teachers[reference]
    plan_rows = [("teachers", t) for t in teachers]
    plan_rows += [("baseline", StudyRun(BASELINE, _run_config(config)))]
    if "teacher_quality" in factors:
        plan_rows += [("teacher_quality", student(t, study.reference_alpha, "scratch"))
                      for t in teachers]  # fmt: skip
    if "alpha" in factors:
        plan_rows += [("alpha", student(reference, a, "scratch")) for a in alphas]
    if "remap" in factors:
        plan_rows += [("remap", student(reference, study.reference_alpha, i)) for i in study.inits]
    if "growth" in factors:
        plan_rows += _growth_rows(config, reference, student(reference, study.reference_alpha,
                                                               "scratch"))  # fmt: skip
    for index, seed in enumerate(seeds):
        for factor, run in plan_rows:
            name = add(run, seed, first=index == 0)
            if index == 0:
                rows.append((factor, name))
    # Train a seed's teachers and baseline before its students; seeds in order.
    order = sorted(
        runs, key=lambda n: (seeds.index(runs[n].config.seed), runs[n].teacher is not None)
    )
    return StudyPlan(workdir, {n: runs[n] for n in order}, tuple(rows), seeds)


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
    if not os.path.exists(os.path.join(run_dir, METRICS_FILE)):
        return False
    metric = f"eval/{OBJECTIVES[objective_of_section(run.config.model)].eval_loss}"
    if num_steps not in _evals(run_dir, metric):
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


def finished_part(plan: StudyPlan) -> tuple[StudyPlan, list[str]]:
    """The part of ``plan`` whose runs have all finished: the rows whose every seed's run
    (and its teacher and baseline) is done; and the rows left out."""
    done = {name for name, run in plan.runs.items() if _is_finished(run, plan.path(name))}

    def complete(group: str) -> bool:
        names = plan.replicas(group)
        needed = {n for name in names for n in (name, plan.runs[name].baseline,
                                                 plan.runs[name].teacher) if n}  # fmt: skip
        return needed <= done

    rows = tuple(row for row in plan.rows if complete(row[1]))
    if not any(factor == "baseline" for factor, _ in rows):
        raise ConfigError(
            f"{plan.workdir}: the baseline has not finished at every seed; nothing to report."
        )
    groups = {group for _, group in rows}
    runs = {n: r for n, r in plan.runs.items() if (r.group or n) in groups}
    left = [f"{factor}: {group}" for factor, group in plan.rows if (factor, group) not in rows]
    return dataclasses.replace(plan, runs=runs, rows=rows), left


def report_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes the report of the runs finished so far (every seed of a row), trains
    nothing; the rows not finished are listed at the end of the markdown."""
    plan, left = finished_part(plan_study(config, workdir))
    report = build_report(plan, float(config.study.early_fraction))
    if left:
        report["left_out"] = left
        report["markdown"] += (
            "\n## Not finished yet (left out of this report)\n\n"
            + "\n".join(f"- {row}" for row in left)
            + "\n"
        )
    write_report(report, plan.workdir)
    print(report["markdown"], flush=True)
    return report


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


def _evals(run_dir: str, metric: str) -> dict[int, dict[str, Any]]:
    """Held-out evaluations by step (the last line wins if a resume repeated a step)."""
    return {line["step"]: line for line in read_metrics(run_dir) if metric in line}


def _summary(plan: StudyPlan, name: str, early_fraction: float) -> dict[str, Any]:
    """One run's early and final held-out numbers, its curves and (a student's) steps to
    its seed's baseline's final loss."""
    run = plan.runs[name]
    loss_key = plan.metric
    acc_key = f"eval/{plan.objective.eval_accuracy}"
    lines = read_metrics(plan.path(name))
    evals = _evals(plan.path(name), loss_key)
    num_steps = run.config.train.num_steps
    early_step = min(s for s in evals if s >= early_fraction * num_steps)
    schedule = {int(line["step"]): line for line in lines if "distill/alpha" in line}

    def series(lines_by_step: dict[int, dict], **keys: str) -> dict[str, list]:
        steps = sorted(lines_by_step)
        return {"step": steps} | {k: [lines_by_step[s][m] for s in steps] for k, m in keys.items()}

    reach = None
    if run.teacher is not None:  # A student: the compute its teacher saved.
        reach = speedup.speedup(lines, read_metrics(plan.path(run.baseline)), loss_key)
    return {
        "run": name,
        "group": run.group or name,
        "seed": int(run.config.seed),
        "teacher": run.teacher,
        "alpha": run.alpha,
        "alpha_label": _alpha_label(run),
        "init": run.init or run.config.teacher.student_init,
        "layers": run.config.model.num_layers,
        "hidden": run.config.model.hidden_size,
        "early_step": early_step,
        "early_loss": evals[early_step][loss_key],
        "early_accuracy": evals[early_step][acc_key],
        "final_step": num_steps,
        "final_loss": evals[num_steps][loss_key],
        "final_accuracy": evals[num_steps][acc_key],
        "steps_to_baseline": None if reach is None else reach["student_steps"],
        "charged_steps": run.charged,
        "time_to_baseline": None if reach is None else reach["time_ratio"],
        "curve": series(evals, loss=loss_key, accuracy=acc_key),
        "schedule": series(schedule, alpha="distill/alpha", tau="distill/tau"),
    }


_STATS = ("early_loss", "early_accuracy", "final_loss", "final_accuracy")


def _aggregate(members: list[dict[str, Any]]) -> dict[str, Any]:
    """A group's row over its seeds: the first seed's descriptive fields, the mean of
    every number, its spread (max − min), and the steps to the baseline's quality (the
    mean over the seeds that got there, and how many did)."""
    row = {k: v for k, v in members[0].items() if k not in ("curve", "schedule", "seed")}
    row["run"], row["seeds"] = members[0]["group"], len(members)
    for key in _STATS:
        values = [m[key] for m in members]
        row[key] = sum(values) / len(values)
        row[f"{key}_spread"] = max(values) - min(values)
    reached = [m["steps_to_baseline"] for m in members if m["steps_to_baseline"] is not None]
    row["steps_to_baseline"] = sum(reached) / len(reached) if reached else None
    row["charged_steps"] = members[0].get("charged_steps", 0)
    row["reached_baseline"] = len(reached)
    times = [m["time_to_baseline"] for m in members if m["time_to_baseline"] is not None]
    row["time_to_baseline"] = sum(times) / len(times) if times else None
    return row


def _best_line(title: str, rows: list[dict[str, Any]], baseline: dict[str, Any], what: str) -> str:
    """Which run of a factor had the lowest held-out loss, early and at the end."""
    final = min(rows, key=lambda r: r["final_loss"])
    early = min(rows, key=lambda r: r["early_loss"])
    better = sum(r["final_loss"] < baseline["final_loss"] for r in rows)
    return (
        f"- **{title}**: lowest final held-out {what}: `{final['run']}` "
        f"({final['final_loss']:.4f}, {final['final_loss'] - baseline['final_loss']:+.4f} vs "
        f"baseline); lowest at step {early['early_step']}: `{early['run']}` "
        f"({early['early_loss']:.4f}; baseline {baseline['early_loss']:.4f}); "
        f"{better} of {len(rows)} below the baseline's final loss."
    )


def _teacher_label(teacher: dict[str, Any], student_steps: int) -> str:
    """A teacher's shape (and length when it differs from the student's) and its own loss."""
    steps = "" if teacher["final_step"] == student_steps else f" ({teacher['final_step']} steps)"
    return f"{teacher['layers']}×{teacher['hidden']}{steps}: {teacher['final_loss']:.4f}"


def _compare(row: dict[str, Any], other: dict[str, Any], key: str) -> tuple[str, str]:
    """('below' | 'above' | 'level', a phrase) for ``row[key]`` against ``other[key]``:
    'level' when the difference is no larger than the two seed spreads together (or,
    with one seed, below 1e-4: rounding)."""
    delta = row[key] - other[key]
    noise = row.get(f"{key}_spread", 0.0) + other.get(f"{key}_spread", 0.0)
    if abs(delta) <= max(noise, 1e-4):
        where = f"within the seed spread {noise:.4f}" if row["seeds"] > 1 else "rounding"
        return "level", f"level ({delta:+.4f}, {where})"
    side = "below" if delta < 0 else "above"
    return side, f"{side} ({delta:+.4f})"


def _verdict(holds: bool, sides: list[str]) -> str:
    """How a finding compares with a paper's claim: 'agrees', 'disagrees', or — when a
    comparison it rests on is level — 'cannot tell (within the seed spread)'."""
    if "level" in sides:
        return "cannot tell (level within the seed spread)"
    return "agrees" if holds else "disagrees"


def _findings(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """'What this shows': each factor's result set against the papers' findings
    (docs/methods.md#papers-numbers), in plain words; numbers are the report's."""
    lines = []
    by_factor = {key: [r for r in rows if r["factor"] == key] for key, _, _ in FACTORS}
    quality = by_factor["teacher_quality"]
    if quality:
        weaker = [r for r in quality if r["teacher_final_loss"] > baseline["final_loss"]]
        early = [_compare(r, baseline, "early_loss") for r in quality]
        below = sum(side == "below" for side, _ in early)
        final = [_compare(r, baseline, "final_loss") for r in quality]
        lines.append(
            f"- **Teacher quality.** {len(weaker)} of {len(quality)} teachers end weaker than "
            f"the student alone ({baseline['final_loss']:.4f}). Early (step "
            f"{baseline['early_step']}), {below} of {len(quality)} DWT students are below the "
            "baseline ("
            + "; ".join(f"`{r['run']}` {text}" for r, (_, text) in zip(quality, early, strict=True))
            + "). The DWT paper and SALT say a weaker teacher speeds a larger student up "
            f"early: {_verdict(below == len(quality), [s for s, _ in early])}. At the end: "
            + "; ".join(f"`{r['run']}` {t}" for r, (_, t) in zip(quality, final, strict=True))
            + ". Gemma 3 found small teachers best over short horizons only: a student above "
            "the baseline at the end with a weak teacher is that finding."
        )
    alpha = by_factor["alpha"]
    if alpha:
        best = min(alpha, key=lambda r: r["final_loss"])
        text = (
            f"- **Soft-loss weight.** Lowest final loss: `{best['run']}` "
            f"({_compare(best, baseline, 'final_loss')[1]} against the baseline)."
        )
        ending = [r for r in alpha if r["alpha"] in ("gap", "phase", "wsd", "ki")]
        constant = [r for r in alpha if r["alpha"] in ("normal", "strong")]
        if ending and constant:
            e = min(ending, key=lambda r: r["final_loss"])
            c = min(constant, key=lambda r: r["final_loss"])
            side, phrase = _compare(e, c, "final_loss")
            text += (
                f" The best schedule that ends the teacher's role (`{e['run']}`, "
                f"{e['final_loss']:.4f}) against the best constant weight (`{c['run']}`, "
                f"{c['final_loss']:.4f}) is {phrase}. SALT, KI and the Pre-training "
                "Distillation study (a warmup–stable–decay weight best) say ending wins: "
                f"{_verdict(side == 'below', [side])}."
            )
        lines.append(text)
    remap = by_factor["remap"]
    grown = [r for r in remap if r["init"] != "scratch"]
    scratch = [r for r in remap if r["init"] == "scratch"]
    if grown and scratch:
        g, sc = grown[0], scratch[0]
        side, phrase = _compare(g, sc, "final_loss")
        lines.append(
            f"- **Remapping.** Grown from the teacher then taught by it (`{g['run']}`) ends "
            f"{phrase} against the same student from scratch (`{sc['run']}`). The DWT paper "
            f"found remapping hurts DWT: {_verdict(side == 'above', [side])}. (Whole budgets "
            "here: the grown student also inherits the teacher's training; the growth factor "
            "charges it.)"
        )
    growth = by_factor["growth"]
    alone = [r for r in growth if r["run"].startswith("grown_") and r["alpha"] is None]
    if alone:
        parts = []
        for g in alone:
            side, phrase = _compare(g, baseline, "final_loss")
            with_dwt = next((r for r in growth if r["run"] == g["run"].replace(
                "grown_" + g["run"].split("_")[1], "grown_" + g["run"].split("_")[1] + "_dwt"
            )), None)  # fmt: skip
            text = f"`{g['run']}` ends {phrase} against the student alone"
            if with_dwt is not None:
                text += f"; with DWT on top it ends {_compare(with_dwt, g, 'final_loss')[1]}"
                text += " against grown alone"
            parts.append(text)
        sides = [_compare(g, baseline, "final_loss")[0] for g in alone]
        lines.append(
            "- **Growth, compute-matched** (the teacher's training taken out of the grown "
            "students' steps): " + "; ".join(parts) + ". HyperCloning (2.2–4×), G_stack "
            "(~1.5×) and MSG report that growth speeds training up: "
            f"{_verdict(all(x == 'below' for x in sides), sides)}. The DWT paper found "
            "remapping hurts DWT; the with-DWT figures above test that at equal compute."
        )
    students = [r for r in rows if r["teacher"]]
    reached = [r for r in students if r["steps_to_baseline"] is not None]
    if reached:

        def cost(r: dict[str, Any]) -> float:  # Steps to the baseline's loss, teacher included.
            return (r["steps_to_baseline"] + r["charged_steps"]) / baseline["final_step"]

        fastest = min(reached, key=cost)
        charged = (
            f" + {fastest['charged_steps']} for the teacher" if fastest["charged_steps"] else ""
        )
        lines.append(
            f"- **Compute saved.** The cheapest way to the baseline's final loss: "
            f"`{fastest['run']}` at step {fastest['steps_to_baseline']:.0f}{charged}, "
            f"{cost(fastest):.2f}× the baseline's {baseline['final_step']} steps (SALT reports "
            f"~0.7× for 1.5B → 2.8B); {len(reached)} of {len(students)} student rows got there "
            "in at least one seed."
        )
    elif students:
        lines.append("- **Compute saved.** No DWT student reached the baseline's final loss.")
    return lines


def build_report(plan: StudyPlan, early_fraction: float) -> dict[str, Any]:
    """Every run's numbers and curves, each (factor, group) row over its seeds, the
    per-factor lines, 'what this shows' and the markdown."""
    runs = {name: _summary(plan, name, early_fraction) for name in plan.runs}
    groups = {
        group: _aggregate([runs[n] for n in plan.replicas(group)])
        for group in dict.fromkeys(g for _, g in plan.rows)
    }
    baseline = groups[BASELINE]
    rows = []
    for factor, name in plan.rows:
        row = {"factor": factor, **groups[name]}
        row["delta_vs_baseline"] = row["final_loss"] - baseline["final_loss"]
        teacher = groups[row["teacher"]] if row["teacher"] else None
        row["teacher_final_loss"] = teacher["final_loss"] if teacher else None
        row["teacher_label"] = _teacher_label(teacher, baseline["final_step"]) if teacher else "—"
        rows.append(row)
    what = plan.metric.removeprefix("eval/").replace("_", " ").replace("mlm", "MLM")
    lines = [
        _best_line(title, [r for r in rows if r["factor"] == key], baseline, what)
        for key, title, _ in FACTORS
        if any(r["factor"] == key for r in rows)
    ]
    header = (
        "| factor | run | teacher (layers×hidden: own loss) | α_s / form | init | early step "
        "| early loss | early acc | final loss | final acc | Δ final loss vs baseline "
        "| seeds | final loss spread | steps to baseline |"
    )
    table = [header, "|" + "---|" * 14]
    for r in rows:
        if r["steps_to_baseline"] is None:
            reach = "—" if not r["teacher"] else f"not reached (0 of {r['seeds']})"
        else:
            reach = f"{r['steps_to_baseline']:.0f}"
            if r["charged_steps"]:  # Growth: the teacher's training counted too.
                reach += f" + {r['charged_steps']}"
            if r["reached_baseline"] < r["seeds"]:
                reach += f" ({r['reached_baseline']} of {r['seeds']})"
        table.append(
            f"| {FACTOR_TITLES[r['factor']]} | {r['run']} | {r['teacher_label']} "
            f"| {r['alpha_label']} | {r['init']} "
            f"| {r['early_step']} | {r['early_loss']:.4f} | {r['early_accuracy']:.4f} "
            f"| {r['final_loss']:.4f} | {r['final_accuracy']:.4f} "
            f"| {r['delta_vs_baseline']:+.4f} | {r['seeds']} | {r['final_loss_spread']:.4f} "
            f"| {reach} |"
        )
    student = plan.runs[BASELINE].config.model
    intro = (
        f"{student.get('family', 'bert')} student {student.num_layers}×{student.hidden_size}, "
        f"{baseline['final_step']} steps, seeds {', '.join(map(str, plan.seeds))} (every "
        "number is the mean over the seeds; the spread is max − min). The baseline is the "
        f"student trained alone with the same budget. Held-out {what}: lower is better. "
        "Steps to baseline: the step at which a student first reaches its seed's baseline's "
        "final loss (interpolated between evaluations; '+ n': a grown student's teacher "
        "training, in student steps, counted on top). A run shared by several factors has "
        "a row in each."
    )
    findings = _findings(rows, baseline)
    markdown = "\n".join(
        [
            f"# DWT study: held-out {what} and accuracy", "", intro, "", *table, "", *lines,
            "", "## What this shows", "", *findings, "",
        ]
    )  # fmt: skip
    return {
        "runs": runs, "groups": groups, "rows": rows, "best": lines, "findings": findings,
        "markdown": markdown,
    }  # fmt: skip


def _band(curves: list[dict[str, list]], key: str) -> dict[str, list]:
    """The mean, min and max of ``key`` over the seeds' curves, at the steps they share."""
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    values = [[c[key][c["step"].index(s)] for c in curves] for s in steps]
    return {
        "step": steps,
        key: [sum(v) / len(v) for v in values],
        "low": [min(v) for v in values],
        "high": [max(v) for v in values],
    }


def _plot(path: str, panels: list[tuple[str, str, list[tuple[str, dict, str, str]]]]) -> None:
    """Side-by-side panels (title, y label, [(label, {'step', key[, 'low', 'high']}, key,
    style)]) against the step; a series with 'low' and 'high' gets a band (the seeds')."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes[0], panels, strict=True):
        for label, series, key, style in lines:
            (line,) = ax.plot(series["step"], series[key], style, ms=3, label=label)
            if "low" in series and series["low"] != series["high"]:
                ax.fill_between(
                    series["step"], series["low"], series["high"], color=line.get_color(),
                    alpha=0.15, linewidth=0,
                )  # fmt: skip
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], workdir: str) -> None:
    """Writes study.md, study.json and the PNG plots (seed bands) into ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    with open(os.path.join(workdir, REPORT_MD), "w") as f:
        f.write(report["markdown"])
    with open(os.path.join(workdir, REPORT_JSON), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "markdown"}, f, indent=1)
    runs = report["runs"]

    def band(group: str) -> dict[str, list]:
        return _band([r["curve"] for r in runs.values() if r["group"] == group], "loss")

    baseline = ("baseline (alone)", band(BASELINE), "loss", "k--")
    for key, title, filename in FACTORS:
        names = [r["run"] for r in report["rows"] if r["factor"] == key]
        if not names:
            continue
        lines = [(n, band(n), "loss", "o-") for n in names] + [baseline]
        _plot(os.path.join(workdir, filename), [(f"DWT study: {title}", "held-out loss", lines)])
    names = [r["run"] for r in report["rows"] if r["factor"] == "alpha"]
    if names:
        _plot(
            os.path.join(workdir, SCHEDULES_PNG),
            [
                (title, title, [(n, runs[n]["schedule"], key, "-") for n in names])
                for title, key in (("α_s (α_t in the KI form)", "alpha"), ("τ", "tau"))
            ],
        )


def load_study_config(
    variant: str | None = None, family: str = "bert"
) -> ml_collections.ConfigDict:
    """The study config of ``family`` (``FAMILY_CONFIGS``)[:variant] from the repository
    this package sits in."""
    return load_config_file(FAMILY_CONFIGS[family], variant)


_EXAMPLES = {"workdir": "runs/study", "config": "configs/study/dwt_study.py:quick"}


def _selected(config: ml_collections.ConfigDict, seeds: int | None, factors: str | None) -> None:
    """Applies ``--seeds`` (that many, from ``config.seed``) and ``--factors``."""
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds={seeds}: must be at least 1.")
        config.study.seeds = tuple(int(config.seed) + k for k in range(seeds))
    if factors:
        config.study.factors = tuple(f.strip() for f in factors.split(",") if f.strip())


def main(argv: list[str]) -> None:
    """CLI: flags → run_study (per family); ``cli.run`` turns a ``ConfigError`` into one
    line and exit 2; 130 if stopped."""
    from absl import flags

    del argv  # The flag parser refused positional arguments.
    f = flags.FLAGS
    config = f.config
    if f.quick and config is not None:
        raise ConfigError(
            "--quick loads the families' ':quick' study configs; pass either --quick or "
            "--config, not both."
        )
    cli.check_workdir(f.workdir)  # Before the config is loaded or anything runs.
    if config is not None:  # One study, of the config's family, in --workdir.
        studies = [(config, f.workdir)]
    else:
        families = list(FAMILY_CONFIGS) if f.family == "both" else [f.family]
        variant = "quick" if f.quick else None
        studies = [
            (load_study_config(variant, family), os.path.join(f.workdir, family))
            for family in families
        ]
    for study_config, _ in studies:
        _selected(study_config, f.seeds, f.factors)
    for study_config, workdir in studies:
        plan_study(study_config, workdir)  # Every study's settings checked before any runs.
    for study_config, workdir in studies:
        if f.report_only:
            report_study(study_config, workdir)
        elif run_study(study_config, workdir).interrupted:
            sys.exit(130)


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A study config file, e.g. ':quick'.")
    flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")
    flags.DEFINE_bool("quick", False, "The families' ':quick' study configs (tiny, minutes).")
    flags.DEFINE_enum(
        "family", "both", ["bert", "llama", "both"],
        "Without --config: which family's study (into <workdir>/<family>).",
    )  # fmt: skip
    flags.DEFINE_integer("seeds", None, "Seeds per run (default: the config's study.seeds).")
    flags.DEFINE_bool(
        "report_only", False, "Train nothing: report the rows whose runs have all finished."
    )
    flags.DEFINE_string(
        "factors", None, "Comma-separated: teacher_quality, alpha, remap (default: all)."
    )
    flags.mark_flags_as_required(["workdir"])


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.study``."""
    _define_flags()
    cli.run(main, _EXAMPLES, config_flag="config")


if __name__ == "__main__":
    run_cli()
