"""Where a fine-tuning run's weights come from: teacher runs and pre-trained encoders.

Teachers are fine-tuning runs of this stack on the same task (a co-finetuned
ensemble contributes each member), Hugging Face ``*ForSequenceClassification``
directories (``hf:DIR``), or the runs an earlier stage of the pipeline produces.
Encoders start from pre-training runs or Hugging Face directories. Every run is
checked for its kind and by its files before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from dwt_jax import hf, sharding
from dwt_jax import teachers as teachers_lib
from dwt_jax.checkpoint import Checkpointer
from dwt_jax.config_files import FINETUNE_MODE
from dwt_jax.data import tasks
from dwt_jax.driver import Produced, RunPlan
from dwt_jax.errors import ConfigError
from dwt_jax.models.bert import BertClassifier, BertMLM
from dwt_jax.models.config import BertConfig
from dwt_jax.models.ensemble import TeacherEnsemble, member_name
from dwt_jax.schema import model_config as checked_model_config


def plan_finetuned_teacher(
    workdir: str, field: str, task: tasks.TaskSpec
) -> tuple[nn.Module, tuple[BertConfig, ...], int]:
    """(model, member configs, step) of a fine-tuned teacher run, or of a Hugging Face
    ``*ForSequenceClassification`` directory (``hf:DIR``); file checks only."""
    plan = plan_teacher(workdir, field, task)
    return teacher_model(plan, task), plan.configs, plan.step


def plan_teacher(workdir: str, field: str, task: tasks.TaskSpec) -> teachers_lib.TeacherPlan:
    if hf.is_hf(workdir):
        checkpoint = _plan_hf_classifier(workdir, field, task)
        return teachers_lib.TeacherPlan(
            workdir, checkpoint.config, 0, checkpoint, head="classifier"
        )
    saved = teachers_lib.read_run_config(workdir, field)
    kind = teachers_lib.expect_kind(
        saved,
        workdir,
        field,
        (teachers_lib.FINETUNING, teachers_lib.ENSEMBLE),
        "fine-tuning teachers must be fine-tuned first (e.g. by the pipeline's 'teachers' stage).",
    )
    saved_task = saved.get("data", {}).get("task")
    if saved_task != task.name:
        raise ConfigError(
            f"{field}: the teacher in {workdir} was fine-tuned on data.task={saved_task!r}, "
            f"this run is on {task.name!r}; fine-tune teachers on the same task."
        )
    step = teachers_lib.latest_teacher_step(workdir, field)
    labels = {"num_labels": task.num_labels}
    if kind == teachers_lib.ENSEMBLE:
        members = tuple(
            teachers_lib.saved_model_config(
                saved, workdir, f"{field} teacher.models[{k}]", m, **labels
            )
            for k, m in enumerate(saved["teacher"]["models"])
        )
        return teachers_lib.TeacherPlan(workdir, members[0], step, members=members, head="ensemble")
    cfg = teachers_lib.saved_model_config(saved, workdir, f"{field} model", **labels)
    return teachers_lib.TeacherPlan(workdir, cfg, step, head="classifier")


def teacher_model(plan: teachers_lib.TeacherPlan, task: tasks.TaskSpec) -> nn.Module:
    if plan.head == "ensemble":
        return TeacherEnsemble(plan.configs, task.num_labels)
    return BertClassifier(plan.config)


def produced_teacher(
    spec: str, field: str, made: Produced, task: tasks.TaskSpec
) -> teachers_lib.TeacherPlan:
    """A teacher an earlier stage of the pipeline co-finetunes (its members known)."""
    if made.kind != FINETUNE_MODE:
        raise ConfigError(
            f"{field}: {spec} is made by a pre-training stage; fine-tuning teachers must be "
            "fine-tuned first."
        )
    members = tuple(member_configs(made.config, task.num_labels))
    if members:
        return teachers_lib.TeacherPlan(
            spec, members[0], 0, members=members, head="ensemble", produced=True
        )
    cfg = model_config(made.config.model, task.num_labels, "model")
    return teachers_lib.TeacherPlan(spec, cfg, 0, head="classifier", produced=True)


ENCODER_FIX = "initialise from a pre-training run (configs/pretrain.py) instead."


def check_encoder_run(
    spec: str, field: str, produced: Mapping[str, Produced]
) -> teachers_lib.TeacherPlan | None:
    """An initial encoder, a pre-training run (or ``hf:DIR``) checked by its files; None
    for a run an earlier stage produces (planned once it exists)."""
    if hf.is_hf(spec):
        checkpoint = teachers_lib.plan_hf(spec, field)
        return teachers_lib.TeacherPlan(spec, checkpoint.config, 0, checkpoint)
    if os.path.abspath(spec) in produced:
        return None
    return teachers_lib.plan_pretraining_run(spec, field, ENCODER_FIX)


def restore_params(workdir: str, step: int, abstract: Any) -> Any:
    checkpointer = Checkpointer(
        os.path.join(workdir, teachers_lib.TEACHER_CHECKPOINT_DIR), async_save=False
    )
    try:
        return checkpointer.restore_student_params(step, abstract)
    finally:
        checkpointer.close()


def _plan_hf_classifier(workdir: str, field: str, task: tasks.TaskSpec) -> hf.HFCheckpoint:
    """A Hugging Face sequence classifier fine-tuned on ``task``, checked by its files."""
    checkpoint = teachers_lib.plan_hf(workdir, field)
    head = [theirs for _, theirs, _ in checkpoint.family.classifier]
    if not all(key in checkpoint.keys for key in head):
        raise ConfigError(
            f"{field}: {checkpoint.path} has no sequence-classification head ({head[-2]}); "
            "a fine-tuning teacher is a *ForSequenceClassification checkpoint fine-tuned "
            "on the task."
        )
    if checkpoint.config.num_labels != task.num_labels:
        raise ConfigError(
            f"{field}: {checkpoint.path} has {checkpoint.config.num_labels} labels but "
            f"data.task={task.name!r} has {task.num_labels}; use a teacher fine-tuned on "
            "this task (with its labels in the task's order)."
        )
    return checkpoint


def _check_same_shapes(pretrained: Any, target: Any, field: str, workdir: str) -> None:
    flat_pre = dict(jax.tree_util.tree_flatten_with_path(pretrained)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in flat_pre:
            raise ConfigError(
                f"{field}: the encoder in {workdir} has no parameter {name}; it is not the "
                "architecture configured here (use the same model settings as that run)."
            )
        if tuple(flat_pre[path].shape) != tuple(leaf.shape):
            raise ConfigError(
                f"{field}: parameter {name} is {tuple(flat_pre[path].shape)} in {workdir} but "
                f"{tuple(leaf.shape)} here; use the model settings of that run."
            )


def encoder_subtree(mlm_params: Any, key: str) -> Any:
    """The ``bert`` encoder of MLM params; without its pooler for an ensemble member
    (members use the shared pooler)."""
    encoder = mlm_params["bert"]
    return encoder if key == "bert" else {k: v for k, v in encoder.items() if k != "pooler"}


# (param key, workdir or hf:DIR, step, abstract MLM params or the HFCheckpoint)
EncoderPlan = tuple[str, str, int, Any]


def _encoder_targets(
    config: ml_collections.ConfigDict, plan: RunPlan
) -> list[tuple[str, str, str]]:
    """(param key, workdir, field) of every encoder to start from a pre-trained run."""
    if plan.strategy.trains_ensemble:
        inits = tuple(config.teacher.get("init_workdirs", ()) or ())
        return [
            (member_name(k), d, f"teacher.init_workdirs[{k}]") for k, d in enumerate(inits) if d
        ]
    spec = config.get("init", {}).get("workdir", "")
    return [("bert", spec, "init.workdir")] if spec else []


def plan_encoders(plan: RunPlan, abstract_state: Any, mesh: jax.sharding.Mesh) -> list[EncoderPlan]:
    """Every pre-trained encoder to load, checked by shape only (a pre-training run
    with a checkpoint and the same shapes): nothing is read but config files."""
    encoders = []
    for key, workdir, field in _encoder_targets(plan.config, plan):
        run = plan.details["encoders"].get(field) or check_encoder_run(workdir, field, {})
        abstract = teachers_lib.abstract_params(BertMLM(run.config), mesh)[0]
        encoder = encoder_subtree(abstract, key)
        _check_same_shapes(encoder, abstract_state.params["student"][key], field, workdir)
        encoders.append((key, workdir, run.step, run.hf or abstract))
    return encoders


def load_teacher(
    plan: teachers_lib.TeacherPlan,
    field: str,
    task: tasks.TaskSpec,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> teachers_lib.Teacher:
    """A fine-tuned teacher (or ensemble) restored onto the mesh."""
    model = teacher_model(plan, task)
    abstract, shardings = teachers_lib.abstract_params(model, mesh, rules)
    if plan.hf is not None:
        params = teachers_lib.load_hf_on_mesh(
            plan.hf, abstract, shardings, field, head="classifier"
        )
    else:
        params = restore_params(plan.workdir, plan.step, abstract)
    return teachers_lib.Teacher(
        plan.workdir, plan.step, plan.configs, model, params, shardings, rules
    )


def member_configs(config: ml_collections.ConfigDict, num_labels: int) -> list[BertConfig]:
    """The architectures of the co-finetuned teachers (``teacher.models``)."""
    models = config.teacher.get("models", ()) or ()
    return [model_config(m, num_labels, f"teacher.models[{k}]") for k, m in enumerate(models)]


def model_config(model_section: Any, num_labels: int, field: str) -> BertConfig:
    """The checked config of a classifier with ``num_labels`` outputs."""
    return checked_model_config(model_section, field, num_labels=num_labels)
