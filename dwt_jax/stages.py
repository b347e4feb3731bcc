"""Stage planning for every pipeline: which runs a config asks for, in order.

Pre-training (a strategy that needs a teacher and lists none): the weak teacher is
pre-trained from ``teacher.model`` into ``<workdir>/teacher``, the student learns
from it in ``<workdir>/student``, and (``baseline.enabled``) the same student is
trained alone in ``<workdir>/baseline``.

Fine-tuning (a config from ``configs/finetune/``), each stage in its own directory:

1. ``pretrain/student``, ``pretrain/teacher{k}``: masked-LM pre-training of every
   encoder that has no pre-trained run given (``init.workdir``,
   ``teacher.init_workdirs``), with ``pretrain`` (a configs/pretrain.py config);
   skipped when ``pretrain.train.num_steps`` is 0;
2. ``teachers``: the K teachers (``teacher.models``) co-finetuned on the task with
   one shared pooler and classifier (skipped when ``teacher.workdirs`` is given);
3. ``student``: the student fine-tuned with ``distill.strategy``;
4. ``baseline``: the same student fine-tuned alone (``baseline.enabled``).

`plan_comparison` plans the same stages 1–2 and then one student per strategy in
``students/<strategy>`` (`dwt_jax.finetune.compare` runs it). Any other config is
one run in ``<workdir>`` itself. `stage_fields` says how a stage's fields are named
in the user's config, so a stage's errors name the field the user wrote.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import ml_collections

from dwt_jax import hf
from dwt_jax.config_files import copy_config, is_finetune
from dwt_jax.distill import FINETUNE_STRATEGIES, PRETRAIN_STRATEGIES
from dwt_jax.errors import ConfigError
from dwt_jax.models.families import objective_of_section

Stage = tuple[str, ml_collections.ConfigDict, str]  # (name, config, workdir)

# The fine-tuning strategy that co-finetunes the teachers, and those that train a student.
ENSEMBLE_STRATEGY = next(n for n, c in FINETUNE_STRATEGIES.items() if c.trains_ensemble)
STUDENT_STRATEGIES = tuple(n for n, c in FINETUNE_STRATEGIES.items() if not c.trains_ensemble)


def _hf_tokenizer_source(config: ml_collections.ConfigDict) -> str:
    """The Hugging Face directory whose tokenizer the run uses when
    ``data.tokenizer_path`` is empty: the student's ``init.workdir``, else the first
    Hugging Face teacher; '' if neither comes from Hugging Face."""
    specs = [str(config.get("init", {}).get("workdir", "") or "")]
    specs += [str(s) for s in config.teacher.workdirs]
    return next((hf.hf_path(s) for s in specs if hf.is_hf(s)), "")


def with_tokenizer_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with ``data.tokenizer_path`` set to the Hugging Face models' directory
    when it is empty and the models come from Hugging Face (so the run's saved config
    says where its tokens came from)."""
    source = "" if config.data.tokenizer_path else _hf_tokenizer_source(config)
    if not source:
        return config
    config = copy_config(config)
    config.data.tokenizer_path = source
    return config


def plan_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
    """(stage name, config, workdir) of every stage the config asks for, in order."""
    if is_finetune(config):
        return plan_finetune_stages(config, workdir)
    return plan_pretrain_stages(config, workdir)


def stage_fields(name: str) -> tuple[tuple[str, str], ...]:
    """(stage field prefix, the user's field prefix) for a stage whose sections come
    from elsewhere in the user's config (the teacher stage's ``model`` is the user's
    ``teacher.model``)."""
    if name == "teacher":
        return (("model.", "teacher.model."), ("train.num_steps", "teacher.num_steps"))
    several = re.fullmatch(r"teacher(\d+)", name)  # One of teacher.models, pre-trained first.
    if several:
        return (
            ("model.", f"teacher.models[{several.group(1)}]."),
            ("train.num_steps", "teacher.num_steps"),
        )
    match = re.fullmatch(r"pretrain_(student|teacher(\d+))", name)
    if not match:
        return ()
    model = "model." if match.group(1) == "student" else f"teacher.models[{match.group(2)}]."
    sections = ("data", "optim", "train", "mesh", "checkpoint", "log", "distill", "teacher")
    return (("model.", model), *((f"{s}.", f"pretrain.{s}.") for s in sections))


def user_fields(message: str, name: str) -> str:
    """``message`` (about stage ``name``'s config) with its fields as the user wrote them."""
    renames = stage_fields(name)
    if not renames:
        return message
    pattern = "|".join(re.escape(stage) for stage, _ in renames)
    table = dict(renames)
    return re.sub(rf"(?<![\w.\[])({pattern})", lambda m: table[m.group(1)], message)


def _alone(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same run with no teacher: its language-model loss only ('mlm' for an
    encoder, 'clm' for a decoder), initialised from scratch."""
    alone = copy_config(config)
    alone.distill.strategy = objective_of_section(config.model)
    alone.teacher.workdirs = ()
    if "cache" in alone.teacher:
        alone.teacher.cache = ""
    alone.teacher.student_init = "scratch"
    return alone


def _teacher_stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The weak teacher's pre-training: ``teacher.model`` alone, from scratch (the
    student's ``init.workdir`` is the student's, not the teacher's)."""
    teacher = _alone(config)
    teacher.model = copy_config(config.teacher.model)
    teacher.distill.strategy = objective_of_section(teacher.model)
    teacher.train.num_steps = int(config.teacher.get("num_steps", config.train.num_steps))
    if "init" in teacher:
        teacher.init.workdir = ""
    return teacher


def with_cache_teacher(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with ``teacher.cache=DIR`` written as ``cache:DIR`` in
    ``teacher.workdirs`` (the one list every stage reads)."""
    cache = str(config.get("teacher", {}).get("cache", "") or "")
    if not cache or f"cache:{cache}" in config.teacher.workdirs:
        return config
    config = copy_config(config)  # teacher.cache stays: errors name the field it came from.
    config.teacher.workdirs = (*config.teacher.workdirs, f"cache:{cache}")
    return config


def plan_pretrain_stages(
    config: ml_collections.ConfigDict, workdir: str
) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """The pre-training stages (see the module doc).

    A strategy with a teacher runs in stages: the teacher (only if none is given),
    the student, and the student alone (``baseline.enabled``); anything else is one
    run in ``workdir`` itself.
    """
    # Every stage (the baseline too) uses the Hugging Face models' tokenizer, if any.
    config = with_tokenizer_source(with_cache_teacher(config))
    strategy_cls = PRETRAIN_STRATEGIES.get(config.distill.strategy)
    needs_teacher = strategy_cls is not None and strategy_cls.num_teachers[0] > 0
    if not needs_teacher:
        return [("run", config, workdir)]
    stages = []
    student = copy_config(config)
    if not config.teacher.workdirs:
        models = tuple(config.teacher.get("models", ()) or ())
        if "model" not in config.teacher and not models:
            raise ConfigError(
                f"distill.strategy={config.distill.strategy!r} needs a teacher: set "
                "teacher.workdirs, or a teacher.model section to train one first."
            )
        if models:  # Several weak teachers, each pre-trained first (teacher0, teacher1, ...).
            dirs = []
            for index, model in enumerate(models):
                one = copy_config(config)
                one.teacher.model = copy_config(model)
                dirs.append(os.path.join(workdir, f"teacher{index}"))
                stages.append((f"teacher{index}", _teacher_stage(one), dirs[-1]))
            student.teacher.workdirs = tuple(dirs)
        else:
            teacher_dir = os.path.join(workdir, "teacher")
            stages.append(("teacher", _teacher_stage(config), teacher_dir))
            student.teacher.workdirs = (teacher_dir,)
    stages.append(("student", student, os.path.join(workdir, "student")))
    if config.get("baseline", {}).get("enabled", False):
        stages.append(("baseline", _alone(config), os.path.join(workdir, "baseline")))
    if len(stages) == 1:  # A given teacher and no baseline: one run in the workdir itself.
        return [("run", config, workdir)]
    return stages


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
        teachers.distill.strategy = ENSEMBLE_STRATEGY
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


def _alone_finetune(student: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
    if FINETUNE_STRATEGIES[
        name
    ].trains_ensemble:  # The teachers alone (and their encoders' pre-training).
        stages, _ = _common_stages(config, workdir, needs_teachers=True)
        stages = [stage for stage in stages if stage[0] != "pretrain_student"]
        return [("run", stages[0][1], workdir)] if len(stages) == 1 else stages
    needs_teachers = FINETUNE_STRATEGIES[name].num_teachers[0] > 0
    stages, student = _common_stages(config, workdir, needs_teachers)
    if not stages and not (needs_teachers and config.get("baseline", {}).get("enabled")):
        return [("run", config, workdir)]
    stages.append(("student", student, os.path.join(workdir, "student")))
    if needs_teachers and config.get("baseline", {}).get("enabled", False):
        stages.append(("baseline", _alone_finetune(student), os.path.join(workdir, "baseline")))
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
        if strategy not in STUDENT_STRATEGIES:
            raise ConfigError(
                f"compare.strategies: {name!r} is not a student strategy or a variant in "
                "compare.variants; use names from "
                f"{', '.join(sorted(STUDENT_STRATEGIES))}."
            )
    stages, student = _common_stages(config, workdir, needs_teachers=True)
    for name, strategy, overrides in resolved:
        stage = _alone_finetune(student) if strategy == "task" else copy_config(student)
        stage.distill.strategy = strategy
        for section, values in overrides.items():
            if section not in stage.distill:
                stage.distill[section] = ml_collections.ConfigDict()
            stage.distill[section].update(values)
        stages.append((name, stage, os.path.join(workdir, "students", name)))
    return stages
