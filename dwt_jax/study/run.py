"""Running the study: the finished runs found and reused, the others trained in order,
the report written; and the command line (``python -m dwt_jax.study``)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections

from dwt_jax import checkpoint, cli, train
from dwt_jax.configuration import ConfigError, load_config_file, validate_config
from dwt_jax.metrics import METRICS_FILE
from dwt_jax.models.families import objective_of_section
from dwt_jax.objectives import OBJECTIVES
from dwt_jax.study.plan import (
    FAMILY_CONFIGS,
    IGNORED_FIELDS,
    IGNORED_SECTIONS,
    StudyPlan,
    StudyResult,
    StudyRun,
    plan_study,
)
from dwt_jax.study.report import build_report, eval_lines, write_report


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
    metric = _final_metric(run)
    if num_steps not in eval_lines(run_dir, metric):
        return False
    with open(os.path.join(run_dir, checkpoint.CONFIG_FILE)) as f:
        saved = _flatten(json.load(f))
    wanted = _flatten(json.loads(run.config.to_json_best_effort()))
    defaults = _reference_defaults()
    differ = [
        key
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
        and key not in IGNORED_FIELDS
        and not key.startswith(IGNORED_SECTIONS)
        # A fine-tuning run saves the task's label count, which the plan leaves open.
        and not (key == "model.num_labels" and run.config.get("mode") == "finetune")
        # A field added to the stack since the run was trained, at its default.
        and not (key not in saved and key in defaults and wanted.get(key) == defaults[key])
    ]
    if differ:
        raise ConfigError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differ[:6])}); "
            "use a new --workdir, or delete that run to retrain it."
        )
    return True


def _final_metric(run: StudyRun) -> str:
    """The metric a finished run has logged at its last step."""
    if run.config.get("mode", "pretrain") == "finetune":
        return "eval/accuracy"
    return f"eval/{OBJECTIVES[objective_of_section(run.config.model)].eval_loss}"


def _reference_defaults() -> dict[str, Any]:
    """Every field of the pre-training reference config at its default, flattened."""
    from dwt_jax.config_files import PRETRAIN_REFERENCE, load_reference

    reference = load_reference(PRETRAIN_REFERENCE)
    return {} if reference is None else _flatten(json.loads(reference.to_json_best_effort()))


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
    total = len(plan.runs) + len(plan.downstream)
    todo = []  # Each run, then its downstream fine-tuning (if any).
    for name, run in plan.runs.items():
        todo.append((name, run))
        if name in plan.downstream:
            todo.append((plan.downstream[name].name, plan.downstream[name]))
    for index, (name, run) in enumerate(todo, start=1):
        if _is_finished(run, plan.path(name)):
            print(f"dwt_jax.study: [{index}/{total}] {name}: finished", flush=True)
            continue
        print(f"dwt_jax.study: [{index}/{total}] {name}: training", flush=True)
        trained.append(name)
        if run.config.get("mode", "pretrain") == "finetune":  # A downstream fine-tuning.
            from dwt_jax import experiment

            results = experiment.run(run.config, plan.path(name))
            if any(result.interrupted for result in results.values()):
                return StudyResult(plan, trained, interrupted=True, report=None)
        elif train.run(run.config, plan.path(name)).interrupted:
            return StudyResult(plan, trained, interrupted=True, report=None)
    report = build_report(plan, float(config.study.early_fraction))
    write_report(report, plan.workdir)
    print(report["markdown"], flush=True)
    return StudyResult(plan, trained, interrupted=False, report=report)


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
