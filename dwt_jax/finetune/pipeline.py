"""The fine-tuning job: pre-trained encoders → co-finetuned teachers → distilled student.

With nothing given, a config from ``configs/finetune/`` runs these stages, each
resumable in its own directory under ``--workdir``:

1. ``pretrain/student``, ``pretrain/teacher{k}``: masked-LM pre-training of every
   encoder that has no pre-trained run given (``init.workdir``,
   ``teacher.init_workdirs``), with ``pretrain`` (a configs/pretrain.py config);
   skipped when ``pretrain.train.num_steps`` is 0;
2. ``teachers``: the K teachers (``teacher.models``) co-finetuned on the task with
   one shared pooler and classifier (skipped when ``teacher.workdirs`` is given);
3. ``student``: the student fine-tuned with ``distill.strategy``;
4. ``baseline``: the same student fine-tuned alone (``baseline.enabled``).

`plan_comparison` plans the same stages 1–2 and then one student per strategy in
``students/<strategy>``: the runner in `dwt_jax.finetune.compare` uses it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

from dwt_jax.configuration import ConfigError, copy_config
from dwt_jax.distill import FINETUNE_STRATEGIES

Stage = tuple[str, ml_collections.ConfigDict, str]  # (name, config, workdir)


def _pretrain_stage(
    config: ml_collections.ConfigDict, model: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
    """Pre-training of one encoder: ``config.pretrain`` with this model."""
    stage = copy_config(config.pretrain)
    stage.model = copy_config(model)
    stage.distill.strategy = "mlm"
    stage.teacher.workdirs = ()
    return stage


def _pretrain_steps(config: ml_collections.ConfigDict) -> int:
    if "pretrain" not in config:
        return 0
    return int(config.pretrain.train.num_steps)


def _common_stages(
    config: ml_collections.ConfigDict, workdir: str, needs_teachers: bool
) -> tuple[list[Stage], ml_collections.ConfigDict]:
    """Pre-training and teacher stages, and the student's config pointing at them."""
    stages: list[Stage] = []
    student = copy_config(config)
    pretrain = _pretrain_steps(config) > 0
    if needs_teachers and not config.teacher.workdirs:
        models = tuple(config.teacher.get("models", ()) or ())
        if not models:
            raise ConfigError(
                f"distill.strategy={config.distill.strategy!r} needs teachers: set "
                "teacher.workdirs, or list teacher.models to co-finetune them first."
            )
        inits = list(config.teacher.get("init_workdirs", ()) or ()) or [""] * len(models)
        if len(inits) != len(models):
            raise ConfigError(
                f"teacher.init_workdirs has {len(inits)} entries for {len(models)} "
                "teacher.models; give one per model ('' = pre-train it here)."
            )
        for k, model in enumerate(models):
            if not inits[k] and pretrain:
                stage_dir = os.path.join(workdir, "pretrain", f"teacher{k}")
                stages.append(
                    (f"pretrain_teacher{k}", _pretrain_stage(config, model, stage_dir), stage_dir)
                )
                inits[k] = stage_dir
        teachers = copy_config(config)
        teachers.distill.strategy = "cofinetune"
        teachers.teacher.workdirs = ()
        teachers.teacher.init_workdirs = tuple(inits)
        teachers.train.num_steps = int(config.teacher.get("num_steps", config.train.num_steps))
        teachers_dir = os.path.join(workdir, "teachers")
        stages.append(("teachers", teachers, teachers_dir))
        student.teacher.workdirs = (teachers_dir,)
    if not config.init.workdir and pretrain:
        stage_dir = os.path.join(workdir, "pretrain", "student")
        stages.append(
            ("pretrain_student", _pretrain_stage(config, config.model, stage_dir), stage_dir)
        )
        student.init.workdir = stage_dir
    return stages, student


def _alone(student: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    alone = copy_config(student)
    alone.distill.strategy = "task"
    alone.teacher.workdirs = ()
    return alone


def plan_finetune_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
    """Every stage the fine-tuning config asks for, in order (see the module doc)."""
    name = config.distill.strategy
    if name not in FINETUNE_STRATEGIES:
        raise ConfigError(
            f"distill.strategy={name!r} is not a fine-tuning strategy; use one of "
            f"{', '.join(sorted(FINETUNE_STRATEGIES))}."
        )
    if name == "cofinetune":  # The teachers alone (and their encoders' pre-training).
        stages, _ = _common_stages(config, workdir, needs_teachers=True)
        stages = [stage for stage in stages if stage[0] != "pretrain_student"]
        return [("run", stages[0][1], workdir)] if len(stages) == 1 else stages
    needs_teachers = FINETUNE_STRATEGIES[name].num_teachers[0] > 0
    stages, student = _common_stages(config, workdir, needs_teachers)
    if not stages and not (needs_teachers and config.get("baseline", {}).get("enabled")):
        return [("run", config, workdir)]
    stages.append(("student", student, os.path.join(workdir, "student")))
    if needs_teachers and config.get("baseline", {}).get("enabled", False):
        stages.append(("baseline", _alone(student), os.path.join(workdir, "baseline")))
    return stages


def resolve_entry(
    config: ml_collections.ConfigDict, name: str
) -> tuple[str, dict[str, dict[str, object]]]:
    """(strategy, sub-config overrides) of a comparison entry: a strategy name, or a
    variant in ``compare.variants`` (``{'strategy': ..., '<strategy>': {...}}``)."""
    variants = config.get("compare", {}).get("variants", {}) or {}
    if name in variants:
        variant = (
            variants[name].to_dict() if hasattr(variants[name], "to_dict") else dict(variants[name])
        )
        strategy = variant.pop("strategy", None)
        if strategy is None:
            raise ConfigError(f"compare.variants.{name} has no 'strategy'; name the strategy.")
        return str(strategy), variant
    return name, {}


def plan_comparison(
    config: ml_collections.ConfigDict, workdir: str, entries: Sequence[str]
) -> list[Stage]:
    """Pre-training, teachers, then one student per entry in ``students/<entry>``.

    An entry is a strategy name or a named variant (see `resolve_entry`).
    """
    if not entries:
        raise ConfigError("compare.strategies is empty; list the strategies to compare.")
    resolved = [(name, *resolve_entry(config, name)) for name in entries]
    for name, strategy, _ in resolved:
        if strategy not in FINETUNE_STRATEGIES or strategy == "cofinetune":
            raise ConfigError(
                f"compare.strategies: {name!r} is not a student strategy or a variant in "
                "compare.variants; use names from "
                f"{', '.join(sorted(set(FINETUNE_STRATEGIES) - {'cofinetune'}))}."
            )
    stages, student = _common_stages(config, workdir, needs_teachers=True)
    for name, strategy, overrides in resolved:
        stage = _alone(student) if strategy == "task" else copy_config(student)
        stage.distill.strategy = strategy
        for section, values in overrides.items():
            if section not in stage.distill:
                stage.distill[section] = ml_collections.ConfigDict()
            stage.distill[section].update(values)
        stages.append((name, stage, os.path.join(workdir, "students", name)))
    return stages
