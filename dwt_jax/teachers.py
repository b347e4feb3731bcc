"""Teachers: frozen models from the workdir of a run of this stack, or from a Hugging
Face model directory (``hf:DIR``).

A teacher's workdir holds ``config.json`` (its model section says its shape),
``tokenizer.json`` and ``checkpoints/<step>/state``. Only the parameters are
restored (Orbax partial restore: no optimiser state is read), straight into the
shardings the logical-axis rules give on the student's mesh. A Hugging Face teacher
is converted through the name table (``dwt_jax.hf``) and placed in the same
shardings. Teachers are never part of the train state, so never in the student's
checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import tokenizers
from flax import linen as nn
from jax.sharding import Mesh

from dwt_jax import hf, readers, sharding
from dwt_jax.checkpoint import CONFIG_FILE, Checkpointer, check_manifest, saved_steps
from dwt_jax.data import teacher_cache
from dwt_jax.distill import STRATEGIES
from dwt_jax.errors import ConfigError
from dwt_jax.models.families import ModelConfig, make_lm, model_config_from
from dwt_jax.objectives import objective_for
from dwt_jax.state import dummy_inputs

TEACHER_TOKENIZER_FILE = "tokenizer.json"
TEACHER_CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher on the mesh: its model, config(s), params and their shardings.

    ``configs`` holds one model config, or an ensemble's members' (a co-finetuned
    ensemble is one teacher run that contributes each member as a teacher).
    """

    workdir: str
    step: int
    configs: tuple[ModelConfig, ...]
    model: nn.Module
    params: Any
    shardings: Any
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES  # How params and activations are laid out.

    @property
    def config(self) -> ModelConfig:
        """The (first) model config."""
        return self.configs[0]


# What a run a user points to is, by its files.
PRETRAINING, FINETUNING, ENSEMBLE, HUGGING_FACE = "pre-training", "fine-tuning", "ensemble", "hf"


def run_kind(saved: dict[str, Any]) -> str:
    """The kind of a run of this stack from its saved config: pre-training,
    fine-tuning, or a co-finetuned ensemble (a fine-tuning run of several models)."""
    if saved.get("mode", "pretrain") != "finetune":
        return PRETRAINING
    strategy = STRATEGIES.get(str(saved.get("distill", {}).get("strategy", "")))
    return ENSEMBLE if getattr(strategy, "trains_ensemble", False) else FINETUNING


def expect_kind(
    saved: dict[str, Any], workdir: str, field: str, kinds: tuple[str, ...], fix: str
) -> str:
    """The run's kind, if it is one of ``kinds``; else a ConfigError naming ``field``."""
    kind = run_kind(saved)
    if kind not in kinds:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{field}: {workdir} is {article} {kind} run; {fix}")
    return kind


def read_run_config(workdir: str, field: str) -> dict[str, Any]:
    """The saved ``config.json`` of the run in ``workdir``; errors name ``field``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise ConfigError(
            f"{field}={workdir!r} does not exist"
            + (" or is not a directory" if os.path.exists(workdir) else "")
            + "; point it at the --workdir of a finished run."
        )
    if not os.path.isfile(path):
        raise ConfigError(
            f"{field}: {workdir} is not a dwt_jax run ({CONFIG_FILE} missing); point it at "
            "the --workdir of a finished run."
        )
    saved = readers.read_json(
        path, field, expect=dict, fix="restore it from a copy or re-create the run"
    )
    if "model_type" in saved and "model" not in saved:
        raise ConfigError(
            f"{field}: {workdir} is a Hugging Face model directory; write it as "
            f"'{hf.PREFIX}{workdir}'."
        )
    return saved


def teacher_model_config(workdir: str, field: str) -> ModelConfig:
    """The teacher's model config from its ``config.json``; errors name ``field``."""
    saved = read_run_config(workdir, field)
    return saved_model_config(saved, workdir, field)


def saved_model_config(
    saved: dict[str, Any], workdir: str, field: str, section: Any = None, **extra: Any
) -> ModelConfig:
    """The model config of a run's saved ``model`` section (or ``section``)."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        values = dict(saved["model"] if section is None else section)
        config = model_config_from({**values, **extra})
        config.validate()
        return config
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{field}: the model section of {path} is unusable ({e}).") from None


def latest_teacher_step(workdir: str, field: str) -> int:
    """The newest committed checkpoint step of a teacher run."""
    directory = os.path.join(workdir, TEACHER_CHECKPOINT_DIR)
    steps = saved_steps(directory)
    if not steps:
        raise ConfigError(
            f"{field}: {workdir} has no checkpoint; train the teacher first (or let the "
            "pipeline do it by leaving teacher.workdirs empty)."
        )
    step = max(steps)
    damage = check_manifest(os.path.join(directory, str(step)))
    if damage:  # Never fall back silently to an older, weaker teacher.
        raise ConfigError(
            f"{field}: the newest checkpoint of {workdir} (step {step}) is damaged "
            f"({damage}); rerun that run's command to repair it (it falls back to the "
            "step before and trains again), or point at another run."
        )
    return step


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
    """A teacher checked from its files (config, checkpoint names), not yet loaded.

    Attributes:
      workdir: the setting as given (a run's workdir, or ``hf:DIR``).
      config: its model config (an ensemble's first member).
      step: the checkpoint step of a run (0 for a Hugging Face directory, and for a
        run an earlier stage of the pipeline produces: planned again once it exists).
      hf: the Hugging Face checkpoint, or None for a run of this stack.
      members: an ensemble's member configs (empty: the one ``config``).
      head: which model the teacher is: 'mlm', 'classifier' or 'ensemble'.
      produced: whether an earlier stage of the pipeline produces it.
      cache: a top-k cache's manifest (``cache:DIR``; its teacher's model config is
        ``config``), or None for a model that runs in the step.
    """

    workdir: str
    config: ModelConfig
    step: int
    hf: hf.HFCheckpoint | None = None
    members: tuple[ModelConfig, ...] = ()
    head: str = "mlm"
    produced: bool = False
    cache: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    @property
    def configs(self) -> tuple[ModelConfig, ...]:
        """Every model config the teacher contributes (an ensemble's members)."""
        return self.members or (self.config,)


def check_vocabulary(plan: TeacherPlan, student: ModelConfig, field: str) -> None:
    """Soft labels need one vocabulary: every teacher model's must be the student's.

    ``field`` names the teacher (``teacher.workdirs[0]``, or ``teacher.model`` for a
    teacher the pipeline trains first).
    """
    for config in plan.configs:
        check_same_vocabulary(config, student, field, None if plan.produced else plan.workdir)


_MODEL_KINDS = {"mlm": "an encoder (masked LM)", "clm": "a decoder (causal LM)"}
_GIVE = {
    "mlm": "a BERT-family run (configs/base.py) or hf:DIR of a *ForMaskedLM model",
    "clm": "a gpt2/llama-family run (configs/causal.py) or hf:DIR of a *ForCausalLM model",
}


def check_same_objective(
    teacher: ModelConfig, student: ModelConfig, field: str, workdir: str | None = None
) -> None:
    """A teacher (or initial weights) predicts what the student predicts: an encoder
    cannot teach a decoder, nor the other way round (a teacher of another decoder
    family is fine)."""
    if teacher.objective == student.objective:
        return
    where = f"{field}.family={teacher.family!r}" if workdir is None else f"{field}: {workdir}"
    raise ConfigError(
        f"{where} is {_MODEL_KINDS[teacher.objective]} but the student "
        f"(model.family={student.family!r}) is {_MODEL_KINDS[student.objective]}; give "
        f"{_GIVE[student.objective]}."
    )


def check_same_vocabulary(
    teacher: ModelConfig, student: ModelConfig, field: str, workdir: str | None = None
) -> None:
    """One teacher model against the student: ``workdir`` names a given run; None means
    a teacher the pipeline trains from the section ``field``. Both must predict the
    same kind of token (``check_same_objective``) from one vocabulary."""
    check_same_objective(teacher, student, field, workdir)
    if teacher.vocab_size == student.vocab_size:
        return
    if workdir is None:
        raise ConfigError(
            f"{field}.vocab_size={teacher.vocab_size} differs from model.vocab_size="
            f"{student.vocab_size}; soft labels need one vocabulary: set "
            f"{field}.vocab_size={student.vocab_size}."
        )
    raise ConfigError(
        f"{field}: the teacher in {workdir} has model.vocab_size={teacher.vocab_size} "
        f"but the student has model.vocab_size={student.vocab_size}; soft labels need one "
        f"vocabulary: set model.vocab_size={teacher.vocab_size} and the teacher's tokenizer "
        "(data.tokenizer_path)."
    )


def plan_hf(spec: str, field: str) -> hf.HFCheckpoint:
    """``hf.plan`` with its errors as ``ConfigError``s naming ``field``."""
    try:
        return hf.plan(spec, field)
    except hf.HFConversionError as e:
        raise ConfigError(str(e)) from None


CACHE_PREFIX = "cache:"


def is_cache(spec: str) -> bool:
    """Whether a teacher setting names a top-k cache (``cache:DIR``)."""
    return str(spec).startswith(CACHE_PREFIX)


def teacher_field(config: Any, index: int) -> str:
    """The user's field for teacher ``index`` of ``teacher.workdirs``: ``teacher.cache``
    for the entry that field became (``stages.with_cache_teacher``)."""
    spec = config.teacher.workdirs[index]
    cache = str(config.teacher.get("cache", "") or "")
    return (
        "teacher.cache"
        if cache and spec == f"{CACHE_PREFIX}{cache}"
        else (f"teacher.workdirs[{index}]")
    )


def cache_path(spec: str) -> str:
    return str(spec)[len(CACHE_PREFIX) :]


def plan_cache(spec: str, field: str) -> TeacherPlan:
    """A top-k teacher cache (``cache:DIR``) by its manifest: its teacher's model config
    and step; the run's own checks (``check_cache``) come with the run's config."""
    directory = cache_path(spec)
    manifest = teacher_cache.read_manifest(directory, field)
    teacher = manifest.get("teacher", {})
    saved = {"model": teacher.get("model", {})}
    config = saved_model_config(saved, directory, field)
    return TeacherPlan(spec, config, int(teacher.get("step", 0)), cache=manifest)


class CachedTeacher(nn.Module):
    """A teacher whose outputs were computed once and are read from the batch: the
    fields the cache join adds (``teacher_cache.field_name(index, ...)``) become its
    ``sparse_targets``. It has no parameters; ``num_params`` is its teacher's size."""

    index: int
    num_params: int

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(teacher_cache.field_name(self.index, n) for n in teacher_cache.FIELDS)

    def __call__(self, deterministic: bool = True, **fields: Any) -> tuple[None, dict[str, Any]]:
        del deterministic
        return None, fields

    def step_outputs(self, params: Any, logits: Any, out: dict[str, Any]) -> dict[str, Any]:
        from dwt_jax.sparse_loss import SparseTargets

        del params, logits
        values = [out[teacher_cache.field_name(self.index, n)] for n in teacher_cache.FIELDS]
        return {"sparse_targets": SparseTargets(*values)}


def plan_teacher(spec: str, field: str) -> TeacherPlan:
    """Checks a teacher setting (a run's workdir, ``hf:DIR`` or ``cache:DIR``) by its
    files only."""
    if is_cache(spec):
        return plan_cache(spec, field)
    if hf.is_hf(spec):
        checkpoint = plan_hf(spec, field)
        if not checkpoint.has_lm_head:
            saved_as = {"mlm": "*ForMaskedLM or *ForPreTraining", "clm": "*ForCausalLM"}
            raise ConfigError(
                f"{field}: {checkpoint.path} has no language-model head (no "
                f"{checkpoint.lm_head_key}); a teacher's soft labels come from it: use the "
                f"checkpoint saved as {saved_as[checkpoint.objective]}."
            )
        return TeacherPlan(spec, checkpoint.config, 0, checkpoint)
    return plan_pretraining_run(
        spec,
        field,
        "a pre-training teacher is a pre-training run (configs/pretrain.py, "
        "configs/causal.py) or a Hugging Face *ForMaskedLM / *ForCausalLM directory "
        "(hf:DIR).",
    )


def plan_pretraining_run(spec: str, field: str, fix: str) -> TeacherPlan:
    """A pre-training run of this stack (its config, kind and newest checkpoint), checked
    by its files; a run of another kind is refused with ``fix``."""
    saved = read_run_config(spec, field)
    expect_kind(saved, spec, field, (PRETRAINING,), fix)
    return TeacherPlan(
        spec, saved_model_config(saved, spec, field), latest_teacher_step(spec, field), None
    )


def check_teacher_tokenizer(spec: str, tokenizer: tokenizers.Tokenizer, field: str) -> None:
    """Refuses a teacher (a run's workdir, ``hf:DIR`` or ``cache:DIR``) whose tokenizer
    differs from ``tokenizer``."""
    if is_cache(spec):
        manifest = teacher_cache.read_manifest(cache_path(spec), field)
        if manifest["identity"]["tokenizer"]["sha256"] != teacher_cache.tokenizer_hash(tokenizer):
            raise ConfigError(
                f"{field}: the cache in {cache_path(spec)} was built with another tokenizer "
                "(its tokenizer hash differs from this run's); set data.tokenizer_path to the "
                "tokenizer the cache was built with, or rebuild the cache for this run."
            )
        return
    if not hf.is_hf(spec):
        check_same_tokenizer(spec, tokenizer, field)
        return
    path = hf.hf_path(spec)
    if hf_tokenizer(path, field).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{field}: the tokenizer of the Hugging Face teacher in {path} differs from the "
            f"student's; set data.tokenizer_path={path} (or leave it empty: a Hugging "
            "Face teacher's tokenizer is then used)."
        )


def hf_tokenizer(path: str, field: str) -> tokenizers.Tokenizer:
    """The tokenizer of a Hugging Face directory, errors as ``ConfigError``."""
    try:
        return hf.load_tokenizer(path, field)
    except hf.HFConversionError as e:
        raise ConfigError(str(e)) from None


def check_same_tokenizer(workdir: str, tokenizer: tokenizers.Tokenizer, field: str) -> None:
    """Refuses a run (in ``workdir``) whose ``tokenizer.json`` differs from ``tokenizer``."""
    path = os.path.join(workdir, TEACHER_TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {path} is missing; the teacher's tokenizer is unknown.")
    teacher_vocab = readers.load_tokenizer_file(
        path, f"{field}: the teacher's tokenizer"
    ).get_vocab()
    if teacher_vocab != tokenizer.get_vocab():
        raise ConfigError(
            f"{field}: the tokenizer of the teacher in {workdir} differs from the student's "
            f"(data.tokenizer_path / data.vocab_size); set data.tokenizer_path={path} so "
            "both use the same tokens."
        )


def boxed_params(model: nn.Module) -> Any:
    """``model``'s params as boxed abstract values (shapes and logical axis names)."""
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), **dummy_inputs(model, 8, 2), deterministic=True)[
            "params"
        ]
    )


def abstract_params(
    model: nn.Module, mesh: Mesh, rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES
) -> tuple[Any, Any]:
    """(abstract params on ``mesh``, their shardings) of ``model``: shapes only."""
    return sharding.abstract_on_mesh(boxed_params(model), mesh, rules)


def load_hf_on_mesh(
    checkpoint: hf.HFCheckpoint,
    abstract: Any,
    shardings: Any,
    field: str,
    *,
    head: str | None = None,
    allow_fresh: tuple[str, ...] = (),
) -> Any:
    """A frozen model's params converted from ``checkpoint`` into ``shardings``; parts
    allowed fresh are zeros (a teacher never uses them)."""
    template = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    params = load_hf_params(checkpoint, template, field, head=head, allow_fresh=allow_fresh)
    return sharding.put_on_mesh(params, shardings)


def load_hf_params(
    checkpoint: hf.HFCheckpoint,
    template: Any,
    field: str,
    *,
    head: str | None = None,
    allow_fresh: tuple[str, ...] = (),
) -> Any:
    """Converts a Hugging Face checkpoint into ``template``'s tree (NumPy), errors as
    ``ConfigError``; logs what was left fresh or dropped."""
    try:
        params, report = hf.load_params(
            checkpoint, template, head=head, allow_fresh=allow_fresh, field=field
        )
    except hf.HFConversionError as e:
        raise ConfigError(str(e)) from None
    if report.fresh or report.dropped:
        logging.info(
            "%s: %s -> %d parameters; fresh: %s; dropped: %s",
            field,
            checkpoint.path,
            len(report.loaded),
            ", ".join(report.fresh) or "none",
            ", ".join(report.dropped) or "none",
        )
    return params


def load_teacher(
    plan: TeacherPlan,
    mesh: Mesh,
    field: str = "teacher",
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
    index: int = 0,
) -> Teacher:
    """Restores (or converts) the teacher's parameters into their shardings on ``mesh``
    (laid out by ``rules``: the student's by default, see ``sharding.TEACHER_RULES``).
    A cache's teacher has no parameters: its outputs come with the batch (field names
    by ``index``, the teacher's place in the run's list)."""
    if plan.cache is not None:
        size = int(plan.cache["teacher"].get("num_params", 0))
        return Teacher(plan.workdir, plan.step, plan.configs, CachedTeacher(index, size), {}, {})
    model = make_lm(plan.config)
    abstract, shardings = abstract_params(model, mesh, rules)
    if plan.hf is not None:
        fresh = objective_for(plan.config).hf_teacher_fresh
        params = load_hf_on_mesh(plan.hf, abstract, shardings, field, head=None, allow_fresh=fresh)
    else:
        checkpointer = Checkpointer(
            os.path.join(plan.workdir, TEACHER_CHECKPOINT_DIR), async_save=False
        )
        try:
            params = checkpointer.restore_student_params(plan.step, abstract)
        finally:
            checkpointer.close()
    return Teacher(plan.workdir, plan.step, plan.configs, model, params, shardings, rules)
