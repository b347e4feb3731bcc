"""The study's plan: its runs (one per seed), their configs, and the report's rows
(docs/methods.md#the-study)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from dwt_jax.configuration import ConfigError, copy_config
from dwt_jax.models.families import objective_of_section
from dwt_jax.objectives import OBJECTIVES

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    ("multi_teacher", "several teachers", "multi_teacher.png"),
)
# The per-token teacher weights against the student's uncertainty (several teachers).
WEIGHTS_PNG = "multi_teacher_weights.png"
FACTOR_TITLES = {"teachers": "teachers (alone)", "baseline": "baseline"} | {
    key: title for key, title, _ in FACTORS
}
SCHEDULES_PNG = "schedules.png"
# Fields that may differ between a finished run and the study's config of it.
IGNORED_FIELDS = ("data.tfds_data_dir", "data.tokenizer_cache_dir", "data.worker_count")
IGNORED_SECTIONS = ("log.", "checkpoint.", "teacher.workdirs")


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
    more_teachers: tuple[str, ...] = ()  # Further teacher runs (several teachers).


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """Every distinct run in training order, and the report's (factor, run) rows."""

    workdir: str
    runs: dict[str, StudyRun]
    rows: tuple[tuple[str, str], ...]  # (factor, group): a group is one run per seed.
    seeds: tuple[int, ...] = (0,)
    # Run → its fine-tuning on the embedded classification task (BERT: the DWT paper's
    # downstream measure), trained right after it.
    downstream: dict[str, StudyRun] = dataclasses.field(default_factory=dict)

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


def alpha_label(run: StudyRun) -> str:
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


def _multi_rows(config: ml_collections.ConfigDict, teachers: list[StudyRun], student) -> list:
    """The several-teachers factor: the student taught by ``study.multi_teachers`` at
    once, their soft labels mixed per token by each of ``study.teacher_weightings``."""
    from dwt_jax.distill.teacher_mix import WEIGHTINGS

    study = config.study
    picked = tuple(study.get("multi_teachers", (0, 1)))
    rules = tuple(study.get("teacher_weightings", ("uniform", "ca_mkd", "dynamic")))
    _require(
        len(picked) >= 2
        and len(set(picked)) == len(picked)
        and all(isinstance(i, int) and 0 <= i < len(teachers) for i in picked),
        f"study.multi_teachers={picked!r} must index two or more distinct study.teachers.",
    )
    _require(
        len(rules) > 0 and set(rules) <= set(WEIGHTINGS) - {"fixed"},
        f"study.teacher_weightings={rules!r} must name some of uniform, ca_mkd, dynamic.",
    )
    chosen = [teachers[i] for i in picked]
    rows = []
    for rule in rules:
        base = student(chosen[0], study.reference_alpha, "scratch")
        run = copy_config(base.config)
        run.distill.teacher_weighting = rule
        name = f"multi_{rule}_" + "+".join(t.name.removeprefix("teacher_") for t in chosen)
        rows.append(dataclasses.replace(
            base, name=name, config=run, more_teachers=tuple(t.name for t in chosen[1:]),
        ))  # fmt: skip
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
            given = () if run.teacher is None else (run.teacher, *run.more_teachers)
            at_seed = tuple(t if first else f"{t}_seed{seed}" for t in given)
            if at_seed:
                config_at_seed.teacher.workdirs = tuple(os.path.join(workdir, t) for t in at_seed)
            baseline = BASELINE if first else f"{BASELINE}_seed{seed}"
            runs[name] = dataclasses.replace(
                run, name=name, config=config_at_seed, teacher=at_seed[0] if at_seed else None,
                more_teachers=at_seed[1:], group=run.name, baseline=baseline,
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
    if "multi_teacher" in factors:
        plan_rows += [("multi_teacher", r) for r in _multi_rows(config, teachers, student)]
    for index, seed in enumerate(seeds):
        for factor, run in plan_rows:
            name = add(run, seed, first=index == 0)
            if index == 0:
                rows.append((factor, name))
    # Train a seed's teachers and baseline before its students; seeds in order.
    order = sorted(
        runs, key=lambda n: (seeds.index(runs[n].config.seed), runs[n].teacher is not None)
    )
    teacher_names = {t for r in runs.values() for t in (r.teacher, *r.more_teachers) if t}
    only = tuple(config.study.get("downstream", {}).get("only", ()) or ())
    downstream = {
        name: _downstream_run(config, runs[name], workdir)
        for name in order
        if name not in teacher_names
        and _downstream_enabled(config)
        and (not only or (runs[name].group or name) in only)
    }
    return StudyPlan(workdir, {n: runs[n] for n in order}, tuple(rows), seeds, downstream)


def _downstream_enabled(config: ml_collections.ConfigDict) -> bool:
    settings = config.study.get("downstream", None)
    return bool(settings is not None and settings.get("enabled", False))


def _downstream_run(config: ml_collections.ConfigDict, run: StudyRun, workdir: str) -> StudyRun:
    """``run``'s encoder fine-tuned alone (strategy 'task') on ``study.downstream.task``
    for ``study.downstream.steps`` steps (configs/finetune/base.py[:variant])."""
    from dwt_jax.configuration import load_config_file

    settings = config.study.downstream
    _require(
        objective_of_section(run.config.model) == "mlm",
        "study.downstream fine-tunes encoders on a classification task; set "
        "study.downstream.enabled=False for a decoder study.",
    )
    path = os.path.join(_REPO, "configs", "finetune", "base.py")
    ft = load_config_file(path, settings.get("variant", "") or None)
    for key, value in run.config.model.items():
        if key in ft.model:
            ft.model[key] = value
    ft.seed = run.config.seed
    ft.init.workdir = os.path.join(workdir, run.name)
    ft.distill.strategy = "task"
    ft.teacher.workdirs = ()
    ft.data.task = str(settings.get("task", "source"))
    for key in ("tfds_data_dir", "tokenizer_cache_dir"):
        ft.data[key] = run.config.data[key]
    steps = int(settings.steps)
    ft.train.num_steps = steps
    ft.train.eval_every = steps
    ft.checkpoint.every_steps = steps
    ft.log.tensorboard = False
    return StudyRun(f"{run.name}_task", ft, group=f"{run.group or run.name}_task")
