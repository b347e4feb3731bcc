"""One fine-tuning run: a student classifier (or a co-finetuned teacher ensemble) on a task.

``run(config, workdir)`` is the classification counterpart of `dwt_jax.train.run` and
shares its loop, checkpoints, metrics and stop handling. What differs:

- the model is a `BertClassifier` (pooler + classifier, C = the task's labels, 1 for
  regression) or, for ``distill.strategy='cofinetune'``, a `TeacherEnsemble` of the
  architectures in ``teacher.models`` with one shared pooler and classifier;
- encoders start from pre-training runs (``init.workdir`` for the student,
  ``teacher.init_workdirs[k]`` for ensemble member k), or from random weights;
- teachers (``teacher.workdirs``) are earlier fine-tuning runs of this stack on the
  same task: a co-finetuned ensemble contributes each of its members as a teacher;
- evaluation covers the whole eval split with the task's own metrics.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tokenizers
from absl import logging
from flax import linen as nn

from dwt_jax import distributed, hf, sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax import train as train_lib
from dwt_jax.checkpoint import (
    Checkpointer,
    check_resume_compatible,
    check_saved_state,
    write_run_config,
)
from dwt_jax.configuration import (
    ConfigError,
    check_model_fits_mesh,
    validate_teacher_sharding,
    validate_training,
    validate_types,
)
from dwt_jax.data import classification, tasks
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import FINETUNE_STRATEGIES, Strategy, make_strategy
from dwt_jax.metrics import MetricsWriter, Progress
from dwt_jax.models.bert import BertClassifier, BertMLM
from dwt_jax.models.config import BertConfig
from dwt_jax.models.ensemble import TeacherEnsemble, member_name
from dwt_jax.optim import make_optimizer
from dwt_jax.state import count_params, create_train_state, dummy_model_inputs

MODE = "finetune"
# Strategies that learn with the student's uncertainty or class probabilities.
_CLASSIFICATION_ONLY = ("mt_bert", "rl_kd", "dynamic_kd", "ca_mkd", "best_teacher")


def is_finetune(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` describes fine-tuning (``mode='finetune'``) or pre-training."""
    return config.get("mode", "pretrain") == MODE


@dataclasses.dataclass(frozen=True)
class FinetuneTeacher:
    """A fine-tuned teacher run on the mesh (an ensemble counts as its members)."""

    workdir: str
    step: int
    configs: tuple[BertConfig, ...]
    model: nn.Module
    params: Any
    shardings: Any
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES  # Its layout (teacher.sharding).


def model_config(model_section: Any, num_labels: int, field: str) -> BertConfig:
    values = model_section.to_dict() if hasattr(model_section, "to_dict") else dict(model_section)
    try:
        cfg = BertConfig.from_config({**values, "num_labels": num_labels})
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: {e}") from None
    return cfg


def member_configs(config: ml_collections.ConfigDict, num_labels: int) -> list[BertConfig]:
    """The architectures of the co-finetuned teachers (``teacher.models``)."""
    models = config.teacher.get("models", ())
    return [model_config(m, num_labels, f"teacher.models[{k}]") for k, m in enumerate(models or ())]


def validate_finetune_settings(
    config: ml_collections.ConfigDict,
) -> tuple[tasks.TaskSpec, Strategy]:
    """What a fine-tuning config's stages share, checkable before its teachers exist:
    the kinds of its values, its sections, the task and the strategy's settings."""
    validate_types(config)
    for section in ("model", "teacher", "distill", "data", "optim", "train", "mesh", "checkpoint"):
        if section not in config:
            raise ConfigError(
                f"config has no '{section}' section; start from configs/finetune/base.py."
            )
    task = classification.task_from_config(config.data)
    name = config.distill.strategy
    if name not in FINETUNE_STRATEGIES:
        raise ConfigError(
            f"distill.strategy={name!r} is not a fine-tuning strategy; use one of "
            f"{', '.join(sorted(FINETUNE_STRATEGIES))}."
        )
    if task.is_regression and name in _CLASSIFICATION_ONLY:
        raise ConfigError(
            f"distill.strategy={name!r} needs class probabilities, but data.task="
            f"{task.name!r} is a regression task; use 'task', 'avg_teachers', "
            "'random_teacher' or 'fixed_weights' with kd='mse'."
        )
    try:
        return task, make_strategy(config.distill)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_finetune_config(
    config: ml_collections.ConfigDict, num_devices: int
) -> tuple[tasks.TaskSpec, Strategy, list[BertConfig]]:
    """Checks everything a fine-tuning run reads, before any file or device work.

    Returns the task, the strategy, and the trained model's config(s): the student's
    (one) or, for 'cofinetune', the ensemble members'.
    """
    task, strategy = validate_finetune_settings(config)
    name = config.distill.strategy
    if name == "cofinetune":
        models = member_configs(config, task.num_labels)
        if not models:
            raise ConfigError(
                "teacher.models is empty; list the architectures of the teachers to "
                "co-finetune (model sections, e.g. copies of model with other sizes)."
            )
        inits = tuple(config.teacher.get("init_workdirs", ()) or ())
        if inits and len(inits) != len(models):
            raise ConfigError(
                f"teacher.init_workdirs has {len(inits)} entries for {len(models)} "
                "teacher.models; give one per model ('' = random initialisation)."
            )
    else:
        models = [model_config(config.model, task.num_labels, "model")]
        low = strategy.num_teachers[0]
        if low > 0 and not config.teacher.workdirs:
            raise ConfigError(
                f"distill.strategy={name!r} needs teachers: set teacher.workdirs to a "
                "fine-tuned teacher run (e.g. the 'teachers' stage of the pipeline)."
            )
        if low == 0 and config.teacher.workdirs:
            raise ConfigError(
                f"distill.strategy={name!r} takes no teacher but teacher.workdirs is set; "
                "clear it or pick a distillation strategy."
            )
    seq_len = int(config.data.seq_len)
    for cfg in models:
        if seq_len > cfg.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds the model's {cfg.max_seq_len} positions "
                f"(max_len={cfg.max_len} - position_offset={cfg.position_offset}); lower "
                "data.seq_len or raise max_len."
            )
    mesh = validate_training(config, num_devices)
    for index, cfg in enumerate(models):
        check_model_fits_mesh(
            cfg, mesh, "model" if name != "cofinetune" else f"teacher.models[{index}]"
        )
    validate_teacher_sharding(config)
    if strategy.has_after_update and int(config.optim.grad_accum_steps) != 1:
        raise ConfigError(
            f"distill.strategy={name!r} updates its policy after every optimiser step; set "
            "optim.grad_accum_steps=1."
        )
    return task, strategy, models


def restore_params(workdir: str, step: int, abstract: Any) -> Any:
    checkpointer = Checkpointer(
        os.path.join(workdir, teachers_lib.TEACHER_CHECKPOINT_DIR), async_save=False
    )
    try:
        return checkpointer.restore_student_params(step, abstract)
    finally:
        checkpointer.close()


def plan_finetuned_teacher(
    workdir: str, field: str, task: tasks.TaskSpec
) -> tuple[nn.Module, tuple[BertConfig, ...], int]:
    """(model, member configs, step) of a fine-tuned teacher run, or of a Hugging Face
    ``*ForSequenceClassification`` directory (``hf:DIR``); file checks only."""
    if hf.is_hf(workdir):
        checkpoint = _plan_hf_classifier(workdir, field, task)
        return BertClassifier(checkpoint.config), (checkpoint.config,), 0
    saved = teachers_lib.read_run_config(workdir, field)
    if saved.get("mode") != MODE:
        raise ConfigError(
            f"{field}: {workdir} is a pre-training run; fine-tuning teachers must be "
            "fine-tuned first (e.g. by the pipeline's 'teachers' stage)."
        )
    saved_task = saved.get("data", {}).get("task")
    if saved_task != task.name:
        raise ConfigError(
            f"{field}: the teacher in {workdir} was fine-tuned on data.task={saved_task!r}, "
            f"this run is on {task.name!r}; fine-tune teachers on the same task."
        )
    step = teachers_lib.latest_teacher_step(workdir, field)
    if saved.get("distill", {}).get("strategy") == "cofinetune":
        configs = tuple(
            model_config(m, task.num_labels, f"{field} teacher.models[{k}]")
            for k, m in enumerate(saved["teacher"]["models"])
        )
        return TeacherEnsemble(configs, task.num_labels), configs, step
    cfg = model_config(saved["model"], task.num_labels, f"{field} model")
    return BertClassifier(cfg), (cfg,), step


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


def load_finetuned_teacher(
    workdir: str,
    field: str,
    task: tasks.TaskSpec,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
) -> FinetuneTeacher:
    if hf.is_hf(workdir):
        checkpoint = _plan_hf_classifier(workdir, field, task)
        model, configs, step = BertClassifier(checkpoint.config), (checkpoint.config,), 0
    else:
        model, configs, step = plan_finetuned_teacher(workdir, field, task)
    abstract, shardings = teachers_lib.abstract_params(model, mesh, rules)
    if hf.is_hf(workdir):
        params = teachers_lib.load_hf_on_mesh(
            checkpoint, abstract, shardings, field, head="classifier"
        )
    else:
        params = restore_params(workdir, step, abstract)
    return FinetuneTeacher(workdir, step, configs, model, params, shardings, rules)


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


# (param key, workdir or hf:DIR, step, abstract MLM params or the HFCheckpoint)
EncoderPlan = tuple[str, str, int, Any]


def _plan_encoders(
    config: ml_collections.ConfigDict, abstract_state: Any, mesh: jax.sharding.Mesh
) -> list[EncoderPlan]:
    """Every pre-trained encoder to load, checked (a pre-training run with a checkpoint
    and the same shapes) by shape only: nothing is read but config files."""
    if config.distill.strategy == "cofinetune":
        inits = tuple(config.teacher.get("init_workdirs", ()) or ())
        targets = [(member_name(k), d, f"teacher.init_workdirs[{k}]") for k, d in enumerate(inits)]
    else:
        targets = [("bert", config.get("init", {}).get("workdir", ""), "init.workdir")]
    plan = []
    for key, workdir, field in targets:
        if not workdir:
            continue
        if hf.is_hf(workdir):
            checkpoint = teachers_lib.plan_hf(workdir, field)
            cfg, step, source = checkpoint.config, 0, checkpoint
        else:
            saved = teachers_lib.read_run_config(workdir, field)
            if saved.get("mode", "pretrain") == MODE:
                raise ConfigError(
                    f"{field}: {workdir} is a fine-tuning run; initialise from a "
                    "pre-training run (configs/pretrain.py) instead."
                )
            cfg = teachers_lib.teacher_model_config(workdir, field)
            step = teachers_lib.latest_teacher_step(workdir, field)
            source = None
        abstract = teachers_lib.abstract_params(BertMLM(cfg), mesh)[0]
        encoder = _encoder_subtree(abstract, key)
        _check_same_shapes(encoder, abstract_state.params["student"][key], field, workdir)
        plan.append((key, workdir, step, source or abstract))
    return plan


def _encoder_subtree(mlm_params: Any, key: str) -> Any:
    """The ``bert`` encoder of MLM params; without its pooler for an ensemble member
    (members use the shared pooler)."""
    encoder = mlm_params["bert"]
    return encoder if key == "bert" else {k: v for k, v in encoder.items() if k != "pooler"}


def _initialise_encoders(
    state: Any,
    plan: list[EncoderPlan],
    state_shardings: Any,
) -> tuple[Any, list[str]]:
    """The fresh state with the planned encoders loaded; and their workdirs."""
    student = dict(state.params["student"])
    for key, workdir, step, source in plan:
        if hf.is_hf(workdir):
            # The encoder (and its pooler where the checkpoint has one; else it stays
            # fresh, as in transformers) from the Hugging Face checkpoint.
            encoder = teachers_lib.load_hf_params(
                source,
                sharding.to_host(student[key]),
                workdir,
                head="encoder",
                allow_fresh=("bert/pooler",),
            )
        else:
            encoder = _encoder_subtree(restore_params(workdir, step, source), key)
        student[key] = sharding.put_on_mesh(encoder, state_shardings.params["student"][key])
    return state.replace(params={**state.params, "student": student}), [p[1] for p in plan]


def _tokenizer(config: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
    """``data.tokenizer_path``; else the tokenizer of the pre-trained encoders (or of a
    Hugging Face teacher); else the embedded corpus's WordPiece tokenizer (trained once
    and cached)."""
    if config.data.get("tokenizer_path", ""):
        return tokenizer_lib.get_tokenizer(config.data)
    inits = [config.get("init", {}).get("workdir", "")]
    inits += list(config.teacher.get("init_workdirs", ()) or ())
    inits += [d for d in config.teacher.get("workdirs", ()) or () if hf.is_hf(d)]
    for workdir in inits:
        if hf.is_hf(workdir):
            return tokenizer_lib.get_tokenizer({"tokenizer_path": hf.hf_path(workdir)})
        path = os.path.join(workdir, train_lib.TOKENIZER_FILE) if workdir else ""
        if path and os.path.isfile(path):
            return tokenizer_lib.get_tokenizer({"tokenizer_path": path})
    corpus = ml_collections.ConfigDict(
        {
            "source": "embedded",
            "tfds_data_dir": config.data.get("tfds_data_dir", ""),
            "tokenizer_path": "",
            "tokenizer_cache_dir": config.data.get("tokenizer_cache_dir", ""),
            "vocab_size": int(config.data.vocab_size),
        }
    )
    return tokenizer_lib.get_tokenizer(corpus)


def _eval_fn(
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    params_shardings: Any,
    batch_shardings: Any,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
):
    """Logits, labels and example weights of a global batch, replicated (for metrics)."""

    def predict(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = steps.forward(model, params, batch, deterministic=True)["logits"]
        return {"logits": logits, "labels": batch["labels"], "weights": batch["example_weights"]}

    jitted = jax.jit(
        predict,
        in_shardings=(params_shardings, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )

    def run(params: Any, batch: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        with sharding.activate(mesh), nn.logical_axis_rules(rules):
            return jax.device_get(jitted(params, batch))

    return run


def evaluate(
    predict, params: Any, eval_batches: Sequence[Any], task: tasks.TaskSpec, prefix: str
) -> dict[str, float]:
    """The task's metrics and mean task loss of one model (or ensemble) on the eval set.

    An ensemble ([K,N,C] logits) reports each member as ``<prefix>/teacher{k}/...`` and
    the average of their probabilities (scores, for regression) as ``<prefix>/...``.
    """
    outs = [predict(params, batch) for batch in eval_batches]
    logits = np.concatenate([o["logits"] for o in outs], axis=-2)
    labels = np.concatenate([o["labels"] for o in outs])
    weights = np.concatenate([o["weights"] for o in outs])

    def scored(logits_NxC: np.ndarray, name: str) -> dict[str, float]:
        values = tasks.compute_metrics(task, logits_NxC, labels, weights)
        if task.is_regression:
            loss = np.square(logits_NxC[:, 0] - labels)
        else:
            shifted = logits_NxC - logits_NxC.max(-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            loss = -np.take_along_axis(log_probs, labels.astype(int)[:, None], -1)[:, 0]
        values["task_loss"] = float((loss * weights).sum() / max(weights.sum(), 1e-9))
        return {f"{name}/{k}": float(v) for k, v in values.items()}

    if logits.ndim == 2:
        return scored(logits, prefix)
    metrics: dict[str, float] = {}
    for k in range(logits.shape[0]):
        metrics.update(scored(logits[k], f"{prefix}/teacher{k}"))
    if task.is_regression:
        mean = logits.mean(0)
    else:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        mean = np.log(probs.mean(0) + 1e-12)
    metrics.update(scored(mean, prefix))
    return metrics


def describe(task: tasks.TaskSpec):
    """The progress line of an evaluation: every task metric and the loss."""

    def text(metrics: dict[str, float]) -> str:
        shown = [f"{m} {metrics[f'eval/{m}']:.4f}" for m in task.metrics if f"eval/{m}" in metrics]
        return "  ".join([*shown, f"task_loss {metrics.get('eval/task_loss', float('nan')):.4f}"])

    return text


def run(config: ml_collections.ConfigDict, workdir: str) -> train_lib.RunResult:
    """Fine-tunes (or resumes) the configured model in ``workdir``."""
    task, strategy, model_configs = validate_finetune_config(config, jax.device_count())
    saved_config = ml_collections.ConfigDict(config.to_dict())
    saved_config.mode = MODE
    saved_config.model.num_labels = task.num_labels  # What the model really has.
    check_resume_compatible(workdir, saved_config)
    train_lib.check_workdir(workdir)
    teacher_plans = [
        plan_finetuned_teacher(d, f"teacher.workdirs[{i}]", task)
        for i, d in enumerate(config.teacher.workdirs)
    ]
    num_teachers = sum(len(configs) for _, configs, _ in teacher_plans)
    low, high = strategy.num_teachers
    if teacher_plans and not (low <= num_teachers and (high is None or num_teachers <= high)):
        raise ConfigError(
            f"teacher.workdirs give {num_teachers} teacher(s) but distill.strategy="
            f"{config.distill.strategy!r} takes {low} to {high or 'any number'}."
        )
    for cfg in (c for _, configs, _ in teacher_plans for c in configs):
        if cfg.vocab_size != model_configs[0].vocab_size:
            raise ConfigError(
                f"a teacher has model.vocab_size={cfg.vocab_size} but the student has "
                f"{model_configs[0].vocab_size}; distillation needs one vocabulary."
            )
    tokenizer = distributed.shared_tokenizer(lambda: _tokenizer(config))
    if tokenizer.get_vocab_size() > min(c.vocab_size for c in model_configs):
        raise ConfigError(
            f"model.vocab_size={model_configs[0].vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.get_vocab_size()}); raise model.vocab_size."
        )
    for i, d in enumerate(config.teacher.workdirs):
        teachers_lib.check_teacher_tokenizer(d, tokenizer, f"teacher.workdirs[{i}]")

    mesh = sharding.make_mesh(config.mesh)
    train_lib.check_mesh_layout(mesh, config)
    if config.distill.strategy == "cofinetune":
        model: nn.Module = TeacherEnsemble(tuple(model_configs), task.num_labels)
    else:
        model = BertClassifier(model_configs[0])
    num_steps = int(config.train.num_steps)
    optimizer, schedule = make_optimizer(config.optim, num_steps)
    materialise, abstract_state, state_shardings = create_train_state(
        seed=config.seed,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_model_inputs(int(config.data.seq_len), 1),
        mesh=mesh,
        teacher_configs=[c for _, configs, _ in teacher_plans for c in configs],
    )
    # Everything that can be wrong with the inputs is found before the workdir exists.
    check_saved_state(os.path.join(workdir, train_lib.CHECKPOINT_DIR), abstract_state)
    encoder_plan = _plan_encoders(config, abstract_state, mesh)
    train_split = str(config.data.get("train_split", "train") or "train")
    with distributed.main_process_first("task data"):
        for split in (train_split, classification.eval_split_name(config.data, task)):
            classification.load_task_source(config.data, split)

    os.makedirs(workdir, exist_ok=True)
    write_run_config(workdir, saved_config)
    train_lib._save_tokenizer(workdir, tokenizer)
    rules = sharding.configured_teacher_rules(config)
    teachers = [
        load_finetuned_teacher(d, f"teacher.workdirs[{i}]", task, mesh, rules)
        for i, d in enumerate(config.teacher.workdirs)
    ]
    host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_iter = classification.make_classification_iterator(
        config.data,
        tokenizer,
        split=train_split,
        global_batch_size=int(config.data.batch_size),
        seed=int(config.seed),
        **host,
    )
    eval_batches = classification.classification_eval_batches(
        config.data,
        tokenizer,
        global_batch_size=int(config.data.eval_batch_size),
        max_examples=int(config.train.get("eval_examples", 0)) or None,
        **host,
    )
    eval_batches = [sharding.shard_batch(b, mesh) for b in eval_batches]

    checkpointer = train_lib.make_checkpointer(workdir, config)
    start_step, state = checkpointer.restore_latest(abstract_state, train_iter)
    sources: list[str] = []
    if start_step is None:
        state, start_step = materialise(), 0
        state, sources = _initialise_encoders(state, encoder_plan, state_shardings)
    else:
        logging.info("Resumed from step %d in %s", start_step, checkpointer.directory)

    batch_shardings = sharding.batch_shardings(
        classification.classification_batch_spec(config.data, int(config.data.batch_size), task),
        mesh,
    )
    compiled_step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        grad_accum_steps=int(config.optim.grad_accum_steps),
        teacher_models=[t.model for t in teachers],
        teacher_shardings=[t.shardings for t in teachers],
        teacher_rules=[t.rules for t in teachers],
    )
    teacher_params = tuple(t.params for t in teachers)
    predict = _eval_fn(model, mesh, state_shardings.params["student"], batch_shardings)
    teacher_eval: dict[str, float] = {}
    member = 0
    for teacher in teachers:
        t_predict = _eval_fn(teacher.model, mesh, teacher.shardings, batch_shardings, teacher.rules)
        t_metrics = evaluate(t_predict, teacher.params, eval_batches, task, "t")
        for k in range(len(teacher.configs)):
            inner = f"t/teacher{k}/" if len(teacher.configs) > 1 else "t/"
            teacher_eval.update(
                {
                    f"teacher{member + k}/{name[len(inner) :]}": v
                    for name, v in t_metrics.items()
                    if name.startswith(inner) and "/" not in name[len(inner) :]
                }
            )
        member += len(teacher.configs)
    _print_start(state, teachers, mesh, start_step, num_steps, sources, task, teacher_eval)

    writer = MetricsWriter(workdir, tensorboard=config.log.tensorboard, resume_step=start_step)
    progress = Progress(start_step=start_step, total_steps=num_steps, enabled=config.log.progress)
    try:
        with train_lib._StopRequest() as stop:
            return train_lib._loop(
                config,
                state=state,
                start_step=start_step,
                train_iter=train_iter,
                train_step=lambda s, b: compiled_step(s, b, teacher_params),
                evaluate=lambda params: {
                    **evaluate(predict, params["student"], eval_batches, task, "eval"),
                    **teacher_eval,
                },
                checkpointer=checkpointer,
                writer=writer,
                progress=progress,
                mesh=mesh,
                stop=stop,
                describe_eval=describe(task),
            )
    finally:
        checkpointer.close()
        writer.close()
        progress.close()


def _print_start(state, teachers, mesh, start_step, num_steps, sources, task, teacher_eval):
    n_params = count_params(state.params["student"])
    teacher_text = "".join(
        f"; teacher {t.workdir} ({len(t.configs)} model(s), {count_params(t.params):,} "
        f"parameters, step {t.step})"
        for t in teachers
    )
    main = task.main_metric
    scores = ", ".join(
        f"{name.split('/')[0]} {v:.4f}"
        for name, v in sorted(teacher_eval.items())
        if name.endswith(f"/{main}")
    )
    init = f"; encoders from {', '.join(sources)}" if sources else ""
    if jax.process_index() != 0:
        return
    print(
        f"dwt_jax: fine-tuning on {task.name}: model {n_params:,} parameters{teacher_text}"
        f"{init}; {jax.device_count()} device(s), mesh {dict(mesh.shape)}; "
        f"{'resuming at step ' + str(start_step) if start_step else 'starting'}; training to "
        f"step {num_steps}." + (f" Teachers' eval {main}: {scores}." if scores else ""),
        flush=True,
    )
