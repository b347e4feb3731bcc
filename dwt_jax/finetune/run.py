"""Fine-tuning on a classification task: the `RunKind` of such runs.

``run(config, workdir)`` is the classification counterpart of `dwt_jax.train.run`:
the config is checked into a plan (`FINETUNE.check`) and run through the one driver
(`dwt_jax.driver.execute`). What is particular to fine-tuning is here:

- the model is a `BertClassifier` (pooler + classifier, C = the task's labels, 1 for
  regression) or, for a strategy that ``trains_ensemble`` (co-finetuning), a
  `TeacherEnsemble` of the architectures in ``teacher.models`` with one shared pooler
  and classifier;
- encoders start from pre-training runs (``init.workdir`` for the student,
  ``teacher.init_workdirs[k]`` for ensemble member k), or from random weights;
- teachers (``teacher.workdirs``) are earlier fine-tuning runs of this stack on the
  same task (a co-finetuned ensemble contributes each of its members as a teacher),
  or Hugging Face ``*ForSequenceClassification`` directories;
- evaluation covers the whole eval split with the task's own metrics.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import tokenizers
from flax import linen as nn

from dwt_jax import hf, inputs, sharding
from dwt_jax import teachers as teachers_lib
from dwt_jax.config_files import FINETUNE_MODE, FINETUNE_REFERENCE, is_finetune
from dwt_jax.configuration import (
    check_model_fits_mesh,
    validate_teacher_sharding,
    validate_training,
    validate_workdirs,
)
from dwt_jax.data import classification, tasks
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import Strategy, make_strategy
from dwt_jax.distill.base import StrategySetup
from dwt_jax.driver import Evaluation, Produced, RunKind, RunPlan, execute, start_text
from dwt_jax.errors import ConfigError
from dwt_jax.finetune import evaluation, sources
from dwt_jax.finetune.evaluation import describe, evaluate
from dwt_jax.finetune.sources import model_config, plan_finetuned_teacher, restore_params
from dwt_jax.loop import TOKENIZER_FILE, RunResult
from dwt_jax.models.bert import BertClassifier
from dwt_jax.models.config import BertConfig
from dwt_jax.models.ensemble import TeacherEnsemble
from dwt_jax.schema import validate_types
from dwt_jax.state import count_params, dummy_model_inputs

MODE = FINETUNE_MODE
__all__ = [
    "FINETUNE",
    "MODE",
    "FinetuneKind",
    "describe",
    "evaluate",
    "is_finetune",
    "model_config",
    "plan_finetuned_teacher",
    "restore_params",
    "run",
    "validate_finetune_settings",
]


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
    strategy = make_strategy(config.distill)
    if strategy.mode != FINETUNE_MODE:
        raise ConfigError(
            f"distill.strategy={config.distill.strategy!r} is not a fine-tuning strategy; use "
            "one of the fine-tuning strategies (see configs/finetune/base.py)."
        )
    return task, strategy


def _trained_models(
    config: ml_collections.ConfigDict, task: tasks.TaskSpec, strategy: Strategy
) -> tuple[list[BertConfig], list[str]]:
    """The trained model's config(s) and the field naming each."""
    if not strategy.trains_ensemble:
        return [sources.model_config(config.model, task.num_labels, "model")], ["model"]
    models = sources.member_configs(config, task.num_labels)
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
    return models, [f"teacher.models[{k}]" for k in range(len(models))]


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
        path = os.path.join(workdir, TOKENIZER_FILE) if workdir else ""
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


class FinetuneKind(RunKind):
    """Fine-tuning a classifier (or co-finetuning a teacher ensemble) on a task."""

    mode = FINETUNE_MODE
    reference = FINETUNE_REFERENCE

    def make_plan(
        self, config: ml_collections.ConfigDict, workdir: str, produced: Mapping[str, Produced]
    ) -> RunPlan:
        task, strategy = validate_finetune_settings(config)
        models, fields = _trained_models(config, task, strategy)
        seq_len = int(config.data.seq_len)
        for cfg in models:
            if seq_len > cfg.max_seq_len:
                raise ConfigError(
                    f"data.seq_len={seq_len} exceeds the model's {cfg.max_seq_len} positions "
                    f"(max_len={cfg.max_len} - position_offset={cfg.position_offset}); lower "
                    "data.seq_len or raise max_len."
                )
        mesh_shape = validate_training(config, jax.device_count())
        for cfg, field in zip(models, fields, strict=True):
            check_model_fits_mesh(cfg, mesh_shape, field)
        validate_teacher_sharding(config)
        workdirs = validate_workdirs(config.teacher.workdirs, "teacher.workdirs")
        setup = StrategySetup(
            num_teachers=len(workdirs),
            num_teachers_is_minimum=True,  # Ensembles' members are counted below.
            is_regression=task.is_regression,
            task=task.name,
            grad_accum_steps=int(config.optim.grad_accum_steps),
        )
        strategy.check_setup(setup)  # What needs no teacher's files, first.
        teachers = []
        for index, spec in enumerate(workdirs):
            field = f"teacher.workdirs[{index}]"
            made = None if hf.is_hf(spec) else produced.get(os.path.abspath(spec))
            plan = (
                sources.plan_teacher(spec, field, task)
                if made is None
                else sources.produced_teacher(spec, field, made, task)
            )
            teachers_lib.check_vocabulary(plan, models[0], field)
            teachers.append(plan)
        num_teachers = sum(len(plan.configs) for plan in teachers)
        strategy.check_setup(
            dataclasses.replace(setup, num_teachers=num_teachers, num_teachers_is_minimum=False)
        )
        inits = [("init.workdir", config.get("init", {}).get("workdir", ""))]
        inits += [
            (f"teacher.init_workdirs[{k}]", s)
            for k, s in enumerate(config.teacher.get("init_workdirs", ()) or ())
        ]
        encoders = {
            field: sources.check_encoder_run(spec, field, produced) for field, spec in inits if spec
        }
        train_split = str(config.data.get("train_split", "train") or "train")
        inputs.check_task_data(config.data, (train_split,))
        saved = ml_collections.ConfigDict(config.to_dict())
        saved.mode = FINETUNE_MODE
        saved.model.num_labels = task.num_labels  # What the model really has.
        return RunPlan(
            kind=self,
            config=config,
            workdir=workdir,
            mesh_shape=mesh_shape,
            strategy=strategy,
            models=tuple(models),
            teachers=tuple(teachers),
            task=task,
            details={"saved_config": saved, "train_split": train_split, "encoders": encoders},
        )

    def saved_config(self, plan: RunPlan) -> ml_collections.ConfigDict:
        return plan.details["saved_config"]

    def load_tokenizer(self, plan: RunPlan) -> Any:
        return _tokenizer(plan.config)

    def check_tokenizer(self, plan: RunPlan, tokenizer: Any) -> None:
        smallest = min(c.vocab_size for c in plan.models)
        if tokenizer.get_vocab_size() > smallest:
            raise ConfigError(
                f"model.vocab_size={plan.models[0].vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer.get_vocab_size()}); raise model.vocab_size."
            )

    def make_data(self, plan: RunPlan, tokenizer: Any, mesh: jax.sharding.Mesh):
        config, task = plan.config, plan.task
        host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        for split in (
            plan.details["train_split"],
            classification.eval_split_name(config.data, task),
        ):
            classification.load_task_source(config.data, split)
        train_iter = classification.make_classification_iterator(
            config.data,
            tokenizer,
            split=plan.details["train_split"],
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
        return train_iter, [sharding.shard_batch(b, mesh) for b in eval_batches]

    def batch_spec(self, plan: RunPlan) -> dict[str, Any]:
        data = plan.config.data
        return classification.classification_batch_spec(data, int(data.batch_size), plan.task)

    def make_model(self, plan: RunPlan) -> nn.Module:
        if plan.strategy.trains_ensemble:
            return TeacherEnsemble(plan.models, plan.task.num_labels)
        return BertClassifier(plan.models[0])

    def model_inputs(self, plan: RunPlan) -> dict[str, Any]:
        return dummy_model_inputs(int(plan.config.data.seq_len), 1)

    def plan_initial_weights(self, plan, abstract_state, mesh):
        return sources.plan_encoders(plan, abstract_state, mesh)

    def load_teachers(self, plan: RunPlan, mesh: jax.sharding.Mesh):
        rules = sharding.configured_teacher_rules(plan.config)
        loaded = []
        for i, teacher in enumerate(plan.teachers):
            field = f"teacher.workdirs[{i}]"
            if teacher.produced:  # Made by an earlier stage: it exists now.
                teacher = sources.plan_teacher(teacher.workdir, field, plan.task)
            loaded.append(sources.load_teacher(teacher, field, plan.task, mesh, rules))
        return loaded

    def initialise(self, plan, state, initial, teachers, mesh, state_shardings):
        student = dict(state.params["student"])
        for key, workdir, step, source in initial:
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
                encoder = sources.encoder_subtree(
                    sources.restore_params(workdir, step, source), key
                )
            student[key] = sharding.put_on_mesh(encoder, state_shardings.params["student"][key])
        state = state.replace(params={**state.params, "student": student})
        return state, [p[1] for p in initial]

    def evaluation(
        self,
        plan,
        model,
        mesh,
        params_shardings,
        batch_shardings,
        teachers,
        eval_batches,
        tokenizer,
    ):
        del tokenizer  # Class labels: nothing of the tokenizer enters the metrics.
        task = plan.task
        predict = evaluation.eval_fn(model, mesh, params_shardings, batch_shardings)
        teacher_metrics: dict[str, float] = {}
        member = 0
        for teacher in teachers:
            t_predict = evaluation.eval_fn(
                teacher.model, mesh, teacher.shardings, batch_shardings, teacher.rules
            )
            t_metrics = evaluation.evaluate(t_predict, teacher.params, eval_batches, task, "t")
            for k in range(len(teacher.configs)):
                inner = f"t/teacher{k}/" if len(teacher.configs) > 1 else "t/"
                teacher_metrics.update(
                    {
                        f"teacher{member + k}/{name[len(inner) :]}": v
                        for name, v in t_metrics.items()
                        if name.startswith(inner) and "/" not in name[len(inner) :]
                    }
                )
            member += len(teacher.configs)
        return Evaluation(
            evaluate=lambda params: evaluation.evaluate(
                predict, params, eval_batches, task, "eval"
            ),
            teachers=teacher_metrics,
            describe=evaluation.describe(task),
        )

    def start_line(self, plan, state, teachers, mesh, start_step, sources, teacher_metrics):
        task = plan.task
        n_params = count_params(state.params["student"])
        teacher_text = "".join(
            f"; teacher {t.workdir} ({len(t.configs)} model(s), {count_params(t.params):,} "
            f"parameters, step {t.step})"
            for t in teachers
        )
        main = task.main_metric
        scores = ", ".join(
            f"{name.split('/')[0]} {v:.4f}"
            for name, v in sorted(teacher_metrics.items())
            if name.endswith(f"/{main}")
        )
        init = f"; encoders from {', '.join(sources)}" if sources else ""
        return (
            f"dwt_jax: fine-tuning on {task.name}: model {n_params:,} parameters{teacher_text}"
            f"{init}; {start_text(start_step, mesh)}; training to step "
            f"{plan.config.train.num_steps}."
            + (f" Teachers' eval {main}: {scores}." if scores else "")
        )


FINETUNE = FinetuneKind()


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Fine-tunes (or resumes) the configured model in ``workdir``."""
    return execute(FINETUNE.check(config, workdir))
