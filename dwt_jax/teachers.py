"""Teachers: frozen models loaded from the workdir of a run of this stack.

A teacher's workdir holds ``config.json`` (its model section says its shape),
``tokenizer.json`` and ``checkpoints/<step>/state``. Only the parameters are
restored (Orbax partial restore: no optimiser state is read), straight into the
shardings the logical-axis rules give on the student's mesh. Teachers are never
part of the train state, so never in the student's checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import tokenizers
from flax import linen as nn
from jax.sharding import Mesh

from dwt_jax import sharding
from dwt_jax.checkpoint import CONFIG_FILE, Checkpointer
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


def read_run_config(workdir: str, field: str) -> dict[str, Any]:
    """The saved ``config.json`` of the run in ``workdir``; errors name ``field``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(
            f"{field}: {workdir} is not a dwt_jax run ({CONFIG_FILE} missing); point it at "
            "the --workdir of a finished run."
        )
    with open(path) as f:
        return json.load(f)


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
    steps = (
        [int(name) for name in os.listdir(directory) if name.isdigit()]
        if os.path.isdir(directory)
        else []
    )
    if not steps:
        raise ConfigError(
            f"{field}: {workdir} has no checkpoint; train the teacher first (or let the "
            "pipeline do it by leaving teacher.workdirs empty)."
        )
    return max(steps)


def check_compatible(
    workdir: str,
    teacher_config: BertConfig,
    student_config: BertConfig,
    student_tokenizer: tokenizers.Tokenizer,
    field: str,
) -> None:
    """Refuses a teacher whose vocabulary or tokenizer differs from the student's."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ConfigError(
            f"{field}: the teacher in {workdir} has model.vocab_size="
            f"{teacher_config.vocab_size} but the student has {student_config.vocab_size}; "
            "soft labels need one vocabulary: use the teacher's vocab_size and tokenizer."
        )
    check_same_tokenizer(workdir, student_tokenizer, field)


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


def load_teacher(workdir: str, config: BertConfig, mesh: Mesh, *, step: int) -> Teacher:
    """Restores the teacher's parameters at ``step`` into their shardings on ``mesh``."""
    model = make_model(config, head="mlm")
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), **dummy_model_inputs(8, 2), deterministic=True)[
            "params"
        ]
    )
    abstract, shardings = sharding.abstract_on_mesh(boxed, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, TEACHER_CHECKPOINT_DIR), async_save=False)
    try:
        params = checkpointer.restore_student_params(step, abstract)
    finally:
        checkpointer.close()
    return Teacher(workdir, step, config, model, params, shardings)
