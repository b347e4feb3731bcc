"""The main job: a run, or the DWT pipeline of stages (teacher → student → baseline).

A config whose strategy needs a teacher and lists none (``teacher.workdirs`` empty)
runs as a pipeline: the weak teacher is pre-trained into ``<workdir>/teacher``, the
student learns from it in ``<workdir>/student``, and (``baseline.enabled``) the same
student is trained alone in ``<workdir>/baseline``. Every stage resumes on its own,
so rerunning the command after a stop continues where it stopped. Any other config
is a single run in ``<workdir>`` itself.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from dwt_jax import train
from dwt_jax.configuration import ConfigError, copy_config, validate_config
from dwt_jax.distill import PRETRAIN_STRATEGIES
from dwt_jax.finetune import pipeline as finetune_pipeline
from dwt_jax.finetune import run as finetune_run

SUMMARY_FILE = "summary.json"


def _alone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run with no teacher: MLM only, initialised from scratch."""
    alone = copy_config(config)
    alone.distill.strategy = "mlm"
    alone.teacher.workdirs = ()
    alone.teacher.student_init = "scratch"
    return alone


def plan_stages(
    config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """(stage name, config, workdir) of every stage the config asks for, in order.

    A strategy with a teacher runs in stages: the teacher (only if none is given),
    the student, and the student alone (``baseline.enabled``); anything else is one
    run in ``workdir`` itself.
    """
    # Every stage (the baseline too) uses the Hugging Face models' tokenizer, if any.
    config = train.with_tokenizer_source(config)
    strategy_cls = PRETRAIN_STRATEGIES.get(config.distill.strategy)
    needs_teacher = strategy_cls is not None and strategy_cls.num_teachers[0] > 0
    if not needs_teacher:
        return [("run", config, workdir)]
    stages = []
    student = copy_config(config)
    if not config.teacher.workdirs:
        if "model" not in config.teacher:
            raise ConfigError(
                f"distill.strategy={config.distill.strategy!r} needs a teacher: set "
                "teacher.workdirs, or a teacher.model section to train one first."
            )
        teacher = _alone(config)
        teacher.model = copy_config(config.teacher.model)
        teacher.train.num_steps = int(config.teacher.get("num_steps", config.train.num_steps))
        teacher_dir = os.path.join(workdir, "teacher")
        stages.append(("teacher", teacher, teacher_dir))
        student.teacher.workdirs = (teacher_dir,)
    stages.append(("student", student, os.path.join(workdir, "student")))
    if config.get("baseline", {}).get("enabled", False):
        stages.append(("baseline", _alone(config), os.path.join(workdir, "baseline")))
    if len(stages) == 1:  # A given teacher and no baseline: one run in the workdir itself.
        return [("run", config, workdir)]
    return stages


def _check_stages(stages: list[tuple[str, ml_collections.ConfigDict, str]]) -> None:
    """Validates every stage's config before the first one starts."""
    for name, stage_config, _ in stages:
        try:
            if finetune_run.is_finetune(stage_config):
                finetune_run.validate_finetune_config(stage_config, jax.device_count())
            else:
                validate_config(stage_config, jax.device_count())
        except ConfigError as e:
            raise ConfigError(f"{e} (in the {name} stage)") from None
    models = {name: c.model for name, c, _ in stages}
    if "teacher" in models and models["teacher"].vocab_size != models["student"].vocab_size:
        raise ConfigError(
            f"teacher.model.vocab_size={models['teacher'].vocab_size} differs from "
            f"model.vocab_size={models['student'].vocab_size}; distillation needs one vocabulary."
        )


def run_stages(
    stages: list[tuple[str, ml_collections.ConfigDict, str]],
) -> dict[str, train.RunResult]:
    """Validates every stage, then runs them in order (each resumes on its own);
    stops after a stage that was interrupted."""
    _check_stages(stages)
    results: dict[str, train.RunResult] = {}
    for name, stage_config, stage_dir in stages:
        if len(stages) > 1 and jax.process_index() == 0:
            print(f"dwt_jax: stage '{name}' in {stage_dir}", flush=True)
        runner = finetune_run.run if finetune_run.is_finetune(stage_config) else train.run
        results[name] = runner(stage_config, stage_dir)
        if results[name].interrupted:
            break
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, train.RunResult]:
    """Runs every stage (resuming finished or partial ones); returns their results."""
    train.check_workdir(workdir)
    if finetune_run.is_finetune(config):
        stages = finetune_pipeline.plan_finetune_stages(config, workdir)
    else:
        stages = plan_stages(config, workdir)
    results = run_stages(stages)
    if len(stages) > 1 and not any(r.interrupted for r in results.values()):
        if finetune_run.is_finetune(config):
            _write_finetune_summary(workdir, results, stages)
        else:
            _write_summary(workdir, results)
    return results


def _write_finetune_summary(
    workdir: str,
    results: dict[str, train.RunResult],
    stages: list[tuple[str, ml_collections.ConfigDict, str]],
) -> None:
    """Prints and saves the task metrics of the teachers, the student and the baseline."""
    rows: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        if name.startswith("pretrain"):
            continue
        metrics = result.eval_metrics
        if name == "teachers":
            members = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/teacher")})
            for member in members:
                prefix = f"eval/{member}/"
                rows[member] = {
                    f"eval/{k[len(prefix) :]}": v
                    for k, v in metrics.items()
                    if k.startswith(prefix)
                }
            rows["teachers (ensemble)"] = {
                k: v for k, v in metrics.items() if k.count("/") == 1 and k.startswith("eval/")
            }
        else:
            rows[name] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    names = sorted({k for m in rows.values() for k in m})
    widths = [max(14, len(n) - 5 + 2) for n in names]  # Room for every metric's name.
    header = f"{'model':<22}" + "".join(f"{n[5:]:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = [header] + [
        f"{name:<22}"
        + "".join(f"{m.get(n, float('nan')):>{w}.4f}" for n, w in zip(names, widths, strict=True))
        for name, m in rows.items()
    ]
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(rows, f, indent=2, sort_keys=True)


def _write_summary(workdir: str, results: dict[str, train.RunResult]) -> None:
    """Prints and saves the held-out metrics of every stage side by side."""
    rows = {
        name: {k: v for k, v in result.eval_metrics.items() if k.startswith("eval/")}
        for name, result in results.items()
    }
    if "teacher" not in rows and "student" in rows:  # A given teacher: as the student saw it.
        seen = results["student"].eval_metrics
        rows = {
            "teacher": {f"eval/{k[8:]}": v for k, v in seen.items() if k.startswith("teacher/")},
            **rows,
        }
    lines = [f"{'stage':<10} {'eval MLM loss':>14} {'accuracy':>9} {'perplexity':>11}"]
    lines += [
        f"{name:<10} {m['eval/mlm_loss']:>14.4f} {m['eval/mlm_accuracy']:>9.4f} "
        f"{m['eval/perplexity']:>11.1f}"
        for name, m in rows.items()
    ]
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(rows, f, indent=2, sort_keys=True)
