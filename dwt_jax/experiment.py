"""The main job: a run, or the DWT pipeline of stages (teacher → student → baseline).

A config whose strategy needs a teacher and lists none (``teacher.workdirs`` empty)
runs as a pipeline: the weak teacher is pre-trained into ``<workdir>/teacher``, the
student learns from it in ``<workdir>/student``, and (``baseline.enabled``) the same
student is trained alone in ``<workdir>/baseline``. Every stage resumes on its own,
so rerunning the command after a stop continues where it stopped. Any other config
is a single run in ``<workdir>`` itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import jax
import ml_collections

from dwt_jax import hf, train
from dwt_jax import teachers as teachers_lib
from dwt_jax.configuration import (
    FINETUNE_REFERENCE,
    ConfigError,
    copy_config,
    fields_as_in,
    validate_config,
    validate_training,
)
from dwt_jax.data import corpus
from dwt_jax.distill import PRETRAIN_STRATEGIES
from dwt_jax.finetune import pipeline as finetune_pipeline
from dwt_jax.finetune import run as finetune_run
from dwt_jax.models.config import BertConfig

SUMMARY_FILE = "summary.json"


def _alone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run with no teacher: MLM only, initialised from scratch."""
    alone = copy_config(config)
    alone.distill.strategy = "mlm"
    alone.teacher.workdirs = ()
    alone.teacher.student_init = "scratch"
    return alone


def _teacher_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The weak teacher's pre-training: ``teacher.model`` alone, from scratch (the
    student's ``init.workdir`` is the student's, not the teacher's)."""
    teacher = _alone(config)
    teacher.model = copy_config(config.teacher.model)
    teacher.train.num_steps = int(config.teacher.get("num_steps", config.train.num_steps))
    if "init" in teacher:
        teacher.init.workdir = ""
    return teacher


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
        teacher_dir = os.path.join(workdir, "teacher")
        stages.append(("teacher", _teacher_stage(config), teacher_dir))
        student.teacher.workdirs = (teacher_dir,)
    stages.append(("student", student, os.path.join(workdir, "student")))
    if config.get("baseline", {}).get("enabled", False):
        stages.append(("baseline", _alone(config), os.path.join(workdir, "baseline")))
    if len(stages) == 1:  # A given teacher and no baseline: one run in the workdir itself.
        return [("run", config, workdir)]
    return stages


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` meanwhile (TFDS warns while probing a dataset)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_data_files(config: ml_collections.ConfigDict) -> None:
    """The corpus (or task) and tokenizer the stage reads exist: read-only look-ups,
    nothing is built (the embedded corpus and tasks are built on first use)."""
    data = config.data
    path = str(data.get("tokenizer_path", "") or "")
    if path and not os.path.exists(os.path.expanduser(path.removeprefix(hf.PREFIX))):
        raise ConfigError(
            f"data.tokenizer_path={path!r} does not exist; fix it or set it to '' to train "
            "a tokenizer on the configured corpus."
        )
    if finetune_run.is_finetune(config):
        if data.source == "tfds":  # A GLUE task: prepared, with the train split.
            from dwt_jax.data import classification

            with _quiet("absl"):
                classification.load_task_source(data, data.get("train_split", "train"))
        return
    if data.source == "text_files":
        for field in ("text_files", "eval_text_files"):
            corpus.expand_files(data.get(field, ()) or (), field)
    if data.source == "tfds":
        with _quiet("absl"):  # TFDS warns while probing a dataset.
            corpus.tfds_builder(data.tfds_name, os.path.expanduser(data.tfds_data_dir))


def _check_vocabulary(field: str, spec: str, vocab_size: int, model: BertConfig) -> None:
    if vocab_size != model.vocab_size:
        raise ConfigError(
            f"{field}: the teacher in {spec} has model.vocab_size={vocab_size} but the "
            f"student has model.vocab_size={model.vocab_size}; soft labels need one "
            f"vocabulary: set model.vocab_size={vocab_size} and the teacher's tokenizer "
            "(data.tokenizer_path)."
        )


def _check_stage(stage_config: ml_collections.ConfigDict, produced: set[str]) -> None:
    """The stage's config checked as its runner checks it, then what it reads from
    runs that no stage produces (teachers, initial weights) by their files only, and
    its data."""
    given = lambda spec: bool(spec) and (hf.is_hf(spec) or os.path.abspath(spec) not in produced)
    teachers = [(f"teacher.workdirs[{i}]", s) for i, s in enumerate(stage_config.teacher.workdirs)]
    if finetune_run.is_finetune(stage_config):
        with fields_as_in(stage_config, FINETUNE_REFERENCE):
            validated = finetune_run.validate_finetune_config(stage_config, jax.device_count())
        task, _, models = validated
        for field, spec in teachers:
            if given(spec):
                configs = finetune_run.plan_finetuned_teacher(spec, field, task)[1]
                for config in configs:
                    _check_vocabulary(field, spec, config.vocab_size, models[0])
        inits = [("init.workdir", stage_config.get("init", {}).get("workdir", ""))]
        inits += [
            (f"teacher.init_workdirs[{k}]", s)
            for k, s in enumerate(stage_config.teacher.get("init_workdirs", ()) or ())
        ]
        for field, spec in inits:
            if given(spec) and hf.is_hf(spec):
                teachers_lib.plan_hf(spec, field)
            elif given(spec):
                teachers_lib.read_run_config(spec, field)
                teachers_lib.latest_teacher_step(spec, field)
    else:
        model = validate_config(stage_config, jax.device_count())
        for field, spec in teachers:
            if given(spec):
                plan = teachers_lib.plan_teacher(spec, field)
                _check_vocabulary(field, spec, plan.config.vocab_size, model)
        if given(str(stage_config.get("init", {}).get("workdir", "") or "")):
            train.plan_init(stage_config, model)  # Exists, and of the student's shape.
    _check_data_files(stage_config)


def _check_stages(stages: list[tuple[str, ml_collections.ConfigDict, str]]) -> None:
    """Checks every stage (config, given runs, data) before the first one starts."""
    produced = {os.path.abspath(stage_dir) for _, _, stage_dir in stages}
    for name, stage_config, _ in stages:
        try:
            _check_stage(stage_config, produced)
        except ConfigError as e:
            where = f" (in the {name} stage)" if len(stages) > 1 else ""
            raise ConfigError(f"{e}{where}") from None


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


def _validate_finetune_settings(config: ml_collections.ConfigDict) -> None:
    """What the stages of a fine-tuning config share, checked on the config as given
    (each stage is checked in full later): its settings, batches against the mesh, the
    optimiser and the loop."""
    with fields_as_in(config, FINETUNE_REFERENCE):
        finetune_run.validate_finetune_settings(config)
        validate_training(config, jax.device_count())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, train.RunResult]:
    """Runs every stage (resuming finished or partial ones); returns their results."""
    train.check_workdir(workdir)
    if finetune_run.is_finetune(config):
        _validate_finetune_settings(config)  # As given, before it is split up.
        stages = finetune_pipeline.plan_finetune_stages(config, workdir)
    else:
        validate_config(config, jax.device_count())  # As given, before it is split up.
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
