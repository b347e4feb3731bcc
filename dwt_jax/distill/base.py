"""The interface every training objective implements, and the plain MLM objective.

A strategy turns model outputs into a loss. The train step runs the student
inside ``value_and_grad`` and every teacher outside it, under ``stop_gradient``,
then hands all outputs to ``Strategy.loss``. New objectives (DWT, multi-teacher
KD, ...) are new strategies; the step itself does not change.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import ml_collections

from dwt_jax import losses
from dwt_jax.models.config import BertConfig

# Model outputs as the step passes them: 'mlm_logits' [B,M,V] plus the model's `out`
# entries (e.g. 'masked_hidden', and 'hidden_states' when a strategy asks for them).
ModelOutputs = Mapping[str, Any]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class Strategy(abc.ABC):
    """A training objective: student and teacher outputs → loss and metrics."""

    name: ClassVar[str]
    # How many teachers the strategy takes: (at least, at most or None for any number).
    num_teachers: ClassVar[tuple[int, int | None]] = (0, 0)
    # Extra keyword arguments for the student's forward (e.g. output_hidden_states=True);
    # instances may override them (they may depend on the config).
    student_output_kwargs: Mapping[str, bool] = MappingProxyType({})
    # The same for every teacher's forward.
    teacher_output_kwargs: Mapping[str, bool] = MappingProxyType({})

    @classmethod
    @abc.abstractmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> Strategy:
        """Builds the strategy from the config's ``distill`` section."""

    def init_state(self) -> dict[str, Any]:
        """Non-trainable state carried across steps (e.g. a reward baseline)."""
        return {}

    def init_adapters(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        """Parameters trained beside the student (e.g. projections), logically boxed.

        Called inside ``jax.eval_shape``/``jit`` at state creation; the result lives
        in ``state.params['adapters']``, is checkpointed with the student and is
        passed back to ``loss`` as ``adapters``. Empty by default.
        """
        del rng, student, teachers
        return {}

    @abc.abstractmethod
    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        step: jax.Array,
        state: Mapping[str, Any],
        adapters: Mapping[str, Any] = MappingProxyType({}),
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """Returns (scalar loss, metrics with slash names, new strategy state)."""


def mlm_metrics(student: ModelOutputs, batch: Batch) -> tuple[jax.Array, Metrics]:
    """The student's masked-LM loss and accuracy: every strategy reports these."""
    _, mlm_loss = losses.mlm_cross_entropy(
        student["mlm_logits"], batch["masked_ids"], batch["masked_weights"]
    )
    _, accuracy = losses.mlm_accuracy(
        student["mlm_logits"], batch["masked_ids"], batch["masked_weights"]
    )
    return mlm_loss, {"train/mlm_loss": mlm_loss, "train/mlm_accuracy": accuracy}


class MLMStrategy(Strategy):
    """Pre-training alone: the masked-LM cross-entropy, no teacher."""

    name = "mlm"

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> MLMStrategy:
        del distill_config
        return cls()

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        step: jax.Array,
        state: Mapping[str, Any],
        adapters: Mapping[str, Any] = MappingProxyType({}),
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        del teachers, step, adapters
        mlm_loss, metrics = mlm_metrics(student, batch)
        return mlm_loss, metrics, dict(state)
