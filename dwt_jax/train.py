"""Pre-training (masked LM, with or without teachers): the `RunKind` of such runs.

``run(config, workdir)`` checks the config into a plan (`PRETRAIN.check`) and runs
it through the one driver (`dwt_jax.driver.execute`): it resumes from the latest
checkpoint in ``workdir`` if there is one and trains to ``config.train.num_steps``.
SIGTERM/SIGINT finish the current step, save, and exit. What is particular to
pre-training is here: the MLM model, the packed and masked text, teachers that are
pre-training runs or Hugging Face ``*ForMaskedLM`` directories, the student's
initial weights (``init.workdir``, or grown from the teacher with
``teacher.student_init='remap'``: docs/methods.md#remapping), and the held-out MLM
metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from dwt_jax import hf, inputs, remap, sharding
from dwt_jax import teachers as teachers_lib
from dwt_jax.config_files import PRETRAIN_REFERENCE
from dwt_jax.configuration import check_teacher_model, validate_pretrain
from dwt_jax.data import teacher_cache
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import make_strategy
from dwt_jax.distill.base import StrategySetup
from dwt_jax.driver import Evaluation, Produced, RunKind, RunPlan, execute, start_text
from dwt_jax.errors import ConfigError, NonFiniteError
from dwt_jax.loop import CHECKPOINT_DIR, TOKENIZER_FILE, RunResult, check_workdir
from dwt_jax.models.families import ModelConfig, make_lm
from dwt_jax.objectives import objective_for
from dwt_jax.objectives.base import make_evaluator
from dwt_jax.schema import model_config
from dwt_jax.stages import with_tokenizer_source
from dwt_jax.state import TrainState, count_params

__all__ = [
    "CHECKPOINT_DIR",
    "PRETRAIN",
    "TOKENIZER_FILE",
    "NonFiniteError",
    "PretrainKind",
    "RunResult",
    "check_workdir",
    "plan_init",
    "run",
    "with_tokenizer_source",
]

# The fields that fix a model's parameters (of either family; each config has its own).
_ARCHITECTURE = (
    "family",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_len",
    "type_vocab_size",
    "position_offset",
    "norm",
    "tie_embeddings",
    "qkv_bias",
    "qk_norm",
)


def plan_init(
    config: ml_collections.ConfigDict, model_config: ModelConfig
) -> teachers_lib.TeacherPlan | None:
    """The student's starting weights (``init.workdir``), checked by their files only."""
    spec = str(config.get("init", {}).get("workdir", "") or "")
    if not spec:
        return None
    if config.teacher.student_init != "scratch":
        raise ConfigError(
            f"init.workdir and teacher.student_init={config.teacher.student_init!r} both "
            "set the student's weights; keep one."
        )
    if hf.is_hf(spec):
        checkpoint = teachers_lib.plan_hf(spec, "init.workdir")
        plan = teachers_lib.TeacherPlan(spec, checkpoint.config, 0, checkpoint)
        teachers_lib.check_same_objective(plan.config, model_config, "init.workdir", spec)
        objective_for(model_config).check_hf_init(checkpoint, config)
    else:
        plan = teachers_lib.plan_pretraining_run(
            spec,
            "init.workdir",
            "start from a pre-training run (configs/pretrain.py, configs/causal.py) or a "
            "Hugging Face *ForMaskedLM / *ForCausalLM directory (hf:DIR).",
        )
        teachers_lib.check_same_objective(plan.config, model_config, "init.workdir", spec)
    for name in _ARCHITECTURE:
        if not hasattr(model_config, name):
            continue
        theirs, ours = getattr(plan.config, name), getattr(model_config, name)
        if theirs != ours:
            raise ConfigError(
                f"init.workdir: the model in {spec} has {name}={theirs!r} but "
                f"model.{name}={ours!r}; set model.{name}={theirs!r} to start from it, or "
                "make it the teacher and grow it with teacher.student_init='remap'."
            )
    return plan


def _plan_teacher(
    spec: str,
    field: str,
    produced: Mapping[str, Produced],
    config: ml_collections.ConfigDict,
    mesh_shape: dict[str, int],
) -> tuple[teachers_lib.TeacherPlan, str]:
    """(the teacher's plan, the field that names it in messages). A teacher an earlier
    stage trains is checked from its model section: positions and mesh fit."""
    made = produced.get(os.path.abspath(spec)) if not hf.is_hf(spec) else None
    if made is None:
        return teachers_lib.plan_teacher(spec, field), field
    if made.kind != PretrainKind.mode:
        raise ConfigError(
            f"{field}: {spec} is made by a fine-tuning stage; a pre-training teacher is a "
            "pre-training run."
        )
    teacher = model_config(made.config.model, made.field)
    check_teacher_model(teacher, made.field, config, mesh_shape)
    return teachers_lib.TeacherPlan(spec, teacher, 0, produced=True), made.field


class PretrainKind(RunKind):
    """Pre-training, alone or with teachers: masked LM for a BERT-style encoder, causal
    LM for a decoder (the student's family decides: `dwt_jax.objectives`)."""

    mode = "pretrain"
    reference = PRETRAIN_REFERENCE

    def make_plan(
        self, config: ml_collections.ConfigDict, workdir: str, produced: Mapping[str, Produced]
    ) -> RunPlan:
        model_config, mesh_shape = validate_pretrain(config, jax.device_count())
        strategy = make_strategy(config.distill)
        if strategy.mode != self.mode:
            raise ConfigError(
                f"distill.strategy={config.distill.strategy!r} is a fine-tuning strategy; "
                "this is a pre-training config: start from configs/finetune/base.py to "
                "use it."
            )
        objective = objective_for(model_config)
        if strategy.objective not in (None, objective.name):
            raise ConfigError(
                f"distill.strategy={config.distill.strategy!r} trains a "
                f"{strategy.objective.upper()} but model.family={model_config.family!r} is "
                f"{objective.model_kind}; use distill.strategy={objective.name!r} (alone) or 'dwt'."
            )
        config = with_tokenizer_source(config)
        strategy.check_setup(
            StrategySetup(
                num_teachers=len(config.teacher.workdirs),
                grad_accum_steps=int(config.optim.grad_accum_steps),
            )
        )
        teachers = []
        for index, spec in enumerate(config.teacher.workdirs):
            field = teachers_lib.teacher_field(config, index)
            plan, vocab_field = _plan_teacher(spec, field, produced, config, mesh_shape)
            teachers_lib.check_vocabulary(plan, model_config, vocab_field)
            if plan.cache is not None:
                _check_cache(plan.cache, config, objective.name, field)
            teachers.append(plan)
        if config.teacher.student_init == "remap" and teachers and teachers[0].cache is not None:
            raise ConfigError(
                "teacher.student_init='remap' grows the student from the first teacher's "
                f"weights, but {teachers[0].workdir} is a cache (no weights); list the "
                "teacher's run first in teacher.workdirs, or set teacher.student_init='scratch'."
            )
        init = plan_init(config, model_config)
        inputs.check_pretrain_data(config.data)
        return RunPlan(
            kind=self,
            config=config,
            workdir=workdir,
            mesh_shape=mesh_shape,
            strategy=strategy,
            models=(model_config,),
            teachers=tuple(teachers),
            details={"init": init},
        )

    def load_tokenizer(self, plan: RunPlan) -> Any:
        kind = objective_for(plan.models[0]).tokenizer_kind
        return tokenizer_lib.get_tokenizer(plan.config.data, kind=kind)

    def check_tokenizer(self, plan: RunPlan, tokenizer: Any) -> None:
        student = plan.models[0]
        if tokenizer.get_vocab_size() > student.vocab_size:
            raise ConfigError(
                f"model.vocab_size={student.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({tokenizer.get_vocab_size()}); raise model.vocab_size."
            )
        objective_for(student).check_tokenizer(tokenizer)

    def make_data(self, plan: RunPlan, tokenizer: Any, mesh: jax.sharding.Mesh):
        host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        train_iter, eval_batches = objective_for(plan.models[0]).make_data(
            plan.config, tokenizer, mesh, host
        )
        caches = _cache_readers(plan)
        if caches:  # The cached teachers' entries, joined by batch position.
            train_iter = teacher_cache.JoinIterator(train_iter, caches)
        return train_iter, eval_batches

    def batch_spec(self, plan: RunPlan) -> dict[str, Any]:
        spec = objective_for(plan.models[0]).batch_spec(plan.config)
        for index, teacher in enumerate(plan.teachers):
            if teacher.cache is not None:
                spec.update(teacher_cache.batch_spec(teacher.cache, index, jax.process_count()))
        return spec

    def make_model(self, plan: RunPlan):
        return make_lm(plan.models[0])

    def model_inputs(self, plan: RunPlan) -> dict[str, Any]:
        return objective_for(plan.models[0]).model_inputs(self.make_model(plan), plan.config)

    def load_teachers(self, plan: RunPlan, mesh: jax.sharding.Mesh):
        rules = sharding.configured_teacher_rules(plan.config)
        loaded = []
        for index, teacher in enumerate(plan.teachers):
            field = f"teacher.workdirs[{index}]"
            if teacher.produced:  # Made by an earlier stage: it exists now.
                teacher = teachers_lib.plan_teacher(teacher.workdir, field)
            loaded.append(teachers_lib.load_teacher(teacher, mesh, field, rules, index))
        return loaded

    def plan_initial_weights(self, plan, abstract_state, mesh):
        return plan.details["init"]  # init.workdir, checked with the config.

    def initialise(self, plan, state, initial, teachers, mesh, state_shardings):
        config = plan.config
        if initial is not None:
            return _init_student(state, initial, config, mesh, state_shardings), []
        if config.teacher.student_init == "remap":
            return _remap_student(state, teachers[0], plan.models[0], config, state_shardings), []
        return state, []

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
        objective = objective_for(plan.models[0])
        # Eval batches carry the objective's fields only (no cached teacher entries).
        eval_keys = objective.batch_spec(plan.config)
        batch_shardings = {k: v for k, v in batch_shardings.items() if k in eval_keys}
        common = {"mesh": mesh, "batch_shardings": batch_shardings}
        constants = objective.eval_constants(tokenizer)
        student_eval = make_evaluator(
            objective, model=model, params_shardings=params_shardings, constants=constants,
            **common,
        )  # fmt: skip
        teacher_metrics: dict[str, float] = {}
        for index, teacher in enumerate(teachers):
            prefix = "teacher" if len(teachers) == 1 else f"teacher{index}"
            cache = plan.teachers[index].cache
            if cache is not None:  # Evaluated by the cache's builder on these batches.
                for name, value in cache.get("teacher_eval", {}).items():
                    teacher_metrics[f"{prefix}/{name}"] = float(value)
                continue
            teacher_eval = make_evaluator(
                objective,
                model=teacher.model,
                params_shardings=teacher.shardings,
                constants=constants,
                rules=teacher.rules,
                **common,
            )
            teacher_metrics.update(teacher_eval(teacher.params, eval_batches, prefix))
        return Evaluation(
            evaluate=lambda params: student_eval(params, eval_batches, "eval"),
            teachers=teacher_metrics,
            describe=objective.describe,
            loss_name=objective.eval_loss,
        )

    def start_line(self, plan, state, teachers, mesh, start_step, sources, teacher_metrics):
        n_student = count_params(state.params["student"])
        objective = objective_for(plan.models[0])
        n_embed = count_params(objective.embedding_params(state.params["student"]))
        teacher_text = "".join(
            f"; teacher {t.workdir} ("
            + (
                f"cached: {int(t.model.num_params):,} parameters, no forward pass"
                if isinstance(t.model, teachers_lib.CachedTeacher)
                else f"{count_params(t.params):,} parameters"
            )
            + f", step {t.step})"
            for t in teachers
        )
        return (
            f"dwt_jax: model {n_student:,} parameters ({n_student - n_embed:,} non-embedding)"
            f"{teacher_text}; {start_text(start_step, mesh)}; training to step "
            f"{plan.config.train.num_steps}."
        )


PRETRAIN = PretrainKind()


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains (or resumes) the configured pre-training run in ``workdir``.

    Everything that can be checked cheaply (the config, the workdir, the teachers'
    files and tokenizers) is checked before anything is compiled or written.
    """
    return execute(PRETRAIN.check(config, workdir))


def _check_cache(
    manifest: dict[str, Any],
    config: ml_collections.ConfigDict,
    objective: str,
    field: str,
) -> None:
    """Refuses a top-k cache that cannot serve this run: other data, packing, masking or
    length, another temperature, too few batches, a hidden-state term that needs the
    teacher's activations, a missing or truncated shard (the tokenizer is checked when
    it is loaded)."""
    teacher_cache.check_identity(
        manifest, teacher_cache.run_identity(config, objective, jax.process_count()), field
    )
    directory = manifest["directory"]
    steps = int(config.train.num_steps)
    tau = config.distill.tau
    if tau.name != "constant" or float(tau.value) != float(manifest["temperature"]):
        raise ConfigError(
            f"{field}: the cache {directory} holds the teacher at temperature "
            f"{manifest['temperature']} (τ is applied before the top-k), but distill.tau is "
            f"{tau.name} {tau.value}; set distill.tau to constant "
            f"{manifest['temperature']}, or rebuild the cache at this τ."
        )
    if int(manifest["num_batches"]) < steps:
        raise ConfigError(
            f"{field}: the cache {directory} holds {manifest['num_batches']} batches but "
            f"train.num_steps={steps}; rebuild it with cache.num_batches >= {steps} (or "
            "train fewer steps)."
        )
    if float(config.distill.get("hidden_weight", 0.0) or 0.0) > 0:
        raise ConfigError(
            f"{field}: a cached teacher has no hidden states; set distill.hidden_weight=0."
        )
    teacher_cache.check_shards(directory, manifest, jax.process_index(), field)


def _cache_readers(plan: RunPlan) -> dict[int, teacher_cache.CacheReader]:
    """The readers of the run's cached teachers, by the teacher's index."""
    return {
        index: teacher_cache.CacheReader(t.cache["directory"], t.cache, jax.process_index())
        for index, t in enumerate(plan.teachers)
        if t.cache is not None
    }


def _init_student(
    state: TrainState,
    plan: teachers_lib.TeacherPlan,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
) -> TrainState:
    """The fresh state with the student's weights from ``init.workdir``."""
    if plan.hf is not None:
        fresh = objective_for(plan.config).hf_fresh(config)
        template = sharding.to_host(state.params["student"])
        params = teachers_lib.load_hf_params(plan.hf, template, "init.workdir", allow_fresh=fresh)
        student = sharding.put_on_mesh(params, state_shardings.params["student"])
    else:
        params = teachers_lib.load_teacher(plan, mesh, "init.workdir").params
        student = jax.device_put(params, state_shardings.params["student"])
    return state.replace(params={**state.params, "student": student})


def _remap_student(
    state: TrainState,
    teacher: teachers_lib.Teacher,
    student_config: ModelConfig,
    config: ml_collections.ConfigDict,
    state_shardings: Any,
) -> TrainState:
    """The fresh state with the student grown from the teacher's weights
    (docs/methods.md#remapping). Adam's moments are zero whatever the parameters
    are, so only params change."""
    try:
        grown = remap.remap_params(
            sharding.to_host(teacher.params),
            teacher.config,
            student_config,
            depth=config.teacher.remap.depth,
            width=config.teacher.remap.width,
            seed=config.seed,
            noise_std=float(config.teacher.remap.noise_std),
            student_template=sharding.to_host(state.params["student"]),
        )
    except ValueError as e:
        raise ConfigError(f"teacher.remap: {e}") from None
    student = sharding.put_on_mesh(grown, state_shardings.params["student"])
    return state.replace(params={**state.params, "student": student})
