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
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import tokenizers
from flax import linen as nn
from jax.sharding import Mesh

from dwt_jax import hf, sharding
from dwt_jax.checkpoint import CONFIG_FILE, Checkpointer, check_manifest, saved_steps
from dwt_jax.configuration import ConfigError
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.state import dummy_model_inputs

TEACHER_TOKENIZER_FILE = "tokenizer.json"
TEACHER_CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher on the mesh: its model, config, params and their shardings."""

    workdir: str
    step: int
    config: BertConfig
    model: nn.Module
    params: Any
    shardings: Any
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES  # How params and activations are laid out.


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
    with open(path) as f:
        saved = json.load(f)
    if "model_type" in saved and "model" not in saved:
        raise ConfigError(
            f"{field}: {workdir} is a Hugging Face model directory; write it as "
            f"'{hf.PREFIX}{workdir}'."
        )
    return saved


def teacher_model_config(workdir: str, field: str) -> BertConfig:
    """The teacher's model config from its ``config.json``; errors name ``field``."""
    saved = read_run_config(workdir, field)
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        return BertConfig.from_config(saved["model"])
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
      config: its model config.
      step: the checkpoint step of a run (0 for a Hugging Face directory).
      hf: the Hugging Face checkpoint, or None for a run of this stack.
    """

    workdir: str
    config: BertConfig
    step: int
    hf: hf.HFCheckpoint | None = None


def plan_hf(spec: str, field: str) -> hf.HFCheckpoint:
    """``hf.plan`` with its errors as ``ConfigError``s naming ``field``."""
    try:
        return hf.plan(spec, field)
    except hf.HFConversionError as e:
        raise ConfigError(str(e)) from None


def plan_teacher(spec: str, field: str) -> TeacherPlan:
    """Checks a teacher setting (a run's workdir or ``hf:DIR``) by its files only."""
    if hf.is_hf(spec):
        checkpoint = plan_hf(spec, field)
        if not checkpoint.has_mlm_head:
            raise ConfigError(
                f"{field}: {checkpoint.path} has no MLM head (no "
                f"{checkpoint.family.mlm_head[0][1]}); a teacher's soft labels come from it: "
                "use the checkpoint saved as *ForMaskedLM or *ForPreTraining."
            )
        return TeacherPlan(spec, checkpoint.config, 0, checkpoint)
    return TeacherPlan(
        spec, teacher_model_config(spec, field), latest_teacher_step(spec, field), None
    )


def check_compatible(
    plan: TeacherPlan,
    student_config: BertConfig,
    student_tokenizer: tokenizers.Tokenizer,
    field: str,
) -> None:
    """Refuses a teacher whose vocabulary or tokenizer differs from the student's."""
    if plan.config.vocab_size != student_config.vocab_size:
        raise ConfigError(
            f"{field}: the teacher in {plan.workdir} has model.vocab_size="
            f"{plan.config.vocab_size} but the student has {student_config.vocab_size}; "
            "soft labels need one vocabulary: use the teacher's vocab_size and tokenizer."
        )
    check_teacher_tokenizer(plan.workdir, student_tokenizer, field)


def check_teacher_tokenizer(spec: str, tokenizer: tokenizers.Tokenizer, field: str) -> None:
    """Refuses a teacher (a run's workdir or ``hf:DIR``) whose tokenizer differs from
    ``tokenizer``."""
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
    teacher_vocab = tokenizers.Tokenizer.from_file(path).get_vocab()
    if teacher_vocab != tokenizer.get_vocab():
        raise ConfigError(
            f"{field}: the tokenizer of the teacher in {workdir} differs from the student's "
            f"(data.tokenizer_path / data.vocab_size); set data.tokenizer_path={path} so "
            "both use the same tokens."
        )


def boxed_params(model: nn.Module) -> Any:
    """``model``'s params as boxed abstract values (shapes and logical axis names)."""
    return jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), **dummy_model_inputs(8, 2), deterministic=True)[
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
    head: str = "mlm",
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
    head: str = "mlm",
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
) -> Teacher:
    """Restores (or converts) the teacher's parameters into their shardings on ``mesh``
    (laid out by ``rules``: the student's by default, see ``sharding.TEACHER_RULES``)."""
    model = make_model(plan.config, head="mlm")
    abstract, shardings = abstract_params(model, mesh, rules)
    if plan.hf is not None:
        # The pooler is not used by the MLM head; *ForMaskedLM checkpoints have none.
        params = load_hf_on_mesh(plan.hf, abstract, shardings, field, allow_fresh=("bert/pooler",))
    else:
        checkpointer = Checkpointer(
            os.path.join(plan.workdir, TEACHER_CHECKPOINT_DIR), async_save=False
        )
        try:
            params = checkpointer.restore_student_params(plan.step, abstract)
        finally:
            checkpointer.close()
    return Teacher(plan.workdir, plan.step, plan.config, model, params, shardings, rules)
