"""The interface every training objective implements, and the plain MLM objective.

A strategy turns model outputs into a loss. The train step runs the student
inside ``value_and_grad`` and hands its outputs, with the teachers (a `Teachers`
sequence: outputs under ``stop_gradient``, computed on first use), to
``Strategy.loss``. By default every teacher runs on the whole batch before the
student, outside the gradient; a strategy with ``teacher_forward = "lazy"`` runs
them itself, on the rows it picks (``Teachers.on_rows``), so a teacher forward on a
selected subset really costs only that subset. A strategy that learns from the
updated student (a policy rewarded by the student's loss after the update) sets
``has_after_update`` and implements ``after_update``. New objectives are new
strategies; the step itself does not change.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import ml_collections

from dwt_jax import losses
from dwt_jax.models.config import BertConfig

# Model outputs as the step passes them: 'mlm_logits' [B,M,V] plus the model's `out`
# entries (e.g. 'masked_hidden', and 'hidden_states' when a strategy asks for them);
# a masked LM's also carry 'mlm_decoder', its (embedding [V,D], bias [V]).
ModelOutputs = Mapping[str, Any]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class Teachers(Sequence[ModelOutputs]):
    """The teachers' outputs on one (micro-)batch, as a sequence computed on first use.

    ``teachers[k]`` are teacher k's outputs on the whole batch; ``on_rows(rows)``
    runs every teacher on those rows only (a static number of them). ``sizes`` are
    the teachers' parameter counts (Python ints), e.g. to order them by size.
    """

    def __init__(
        self,
        run: Callable[[Batch], list[ModelOutputs]],
        batch: Batch,
        sizes: Sequence[int],
        outputs: list[ModelOutputs] | None = None,
    ) -> None:
        self._run = run
        self._batch = batch
        self.sizes = tuple(int(s) for s in sizes)
        self._outputs = outputs

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> ModelOutputs:  # type: ignore[override]
        return self.all()[index]

    def __iter__(self) -> Iterator[ModelOutputs]:
        return iter(self.all())

    def all(self) -> list[ModelOutputs]:
        """Every teacher's outputs on the whole batch (computed once)."""
        if self._outputs is None:
            self._outputs = self._run(self._batch)
        return self._outputs

    def on_rows(self, rows_N: jax.Array) -> list[ModelOutputs]:
        """Every teacher's outputs on batch rows ``rows_N`` only ([N] int indices)."""
        return self._run({name: value[rows_N] for name, value in self._batch.items()})


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
    # 'full': the step runs every teacher on the whole batch, outside the gradient;
    # 'lazy': the loss runs them (``teachers.on_rows``) on the rows it selects.
    teacher_forward: str = "full"
    # True if the strategy updates its state from the student after the optimiser
    # step (``after_update``); such strategies take no gradient accumulation.
    has_after_update: ClassVar[bool] = False

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> Strategy:
        """Builds the strategy from the config's ``distill`` section (by default it
        has no settings)."""
        del distill_config
        return cls()

    def init_state(
        self, rng: jax.Array, student: BertConfig, teachers: Sequence[BertConfig]
    ) -> dict[str, Any]:
        """State carried across steps and checkpointed (a reward baseline, a policy
        and its optimiser state); traced by shape at state creation, like adapters."""
        del rng, student, teachers
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
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """Returns (scalar loss, metrics with slash names, new strategy state).

        ``teachers`` is a `Teachers` sequence; ``rng`` a key for this (micro-)step,
        independent of the student's dropout key.
        """

    def after_update(
        self,
        *,
        student: ModelOutputs,
        student_after: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        step: jax.Array,
        state: Mapping[str, Any],
        rng: jax.Array,
    ) -> tuple[dict[str, Any], Metrics]:
        """Updates the strategy state once the student has been updated.

        ``student`` are the student's outputs the loss saw (under ``stop_gradient``),
        ``student_after`` its deterministic outputs with the updated parameters, and
        ``rng`` the same key ``loss`` got. Called only if ``has_after_update``.
        """
        del student, student_after, teachers, batch, step, rng
        return dict(state), {}


def mlm_terms(
    student: ModelOutputs,
    batch: Batch,
    *,
    teacher: ModelOutputs | None = None,
    temperature: float | jax.Array = 1.0,
    fused: bool = True,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """Batch means over the masked positions: 'mlm_loss', 'accuracy' and, with a
    teacher, 'kl' = KL(p_t^τ ‖ p_s^τ) (not scaled by τ²).

    ``fused`` (and outputs that carry 'masked_hidden' and 'mlm_decoder', as the
    step's ``forward`` gives them): the decoder and the losses run together in
    ``chunk_size`` vocabulary slices (``losses.fused_mlm_losses``) and the [B,M,V]
    logits are never built. Otherwise they are computed from 'mlm_logits'. Accuracy
    counts ties for the largest logit as correct in the fused form (argmax, the
    first index, otherwise); ties of float32 logits do not occur in practice.
    """
    weights = batch["masked_weights"]
    models = [student] if teacher is None else [student, teacher]
    if fused and all("mlm_decoder" in m and "masked_hidden" in m for m in models):
        per_position = losses.fused_mlm_losses(
            student["masked_hidden"],
            *student["mlm_decoder"],
            batch["masked_ids"],
            teacher=None
            if teacher is None
            else (teacher["masked_hidden"], *teacher["mlm_decoder"]),
            temperature=temperature,
            chunk_size=chunk_size,
        )
        terms = {
            "mlm_loss": losses.weighted_mean(per_position["ce"], weights),
            "accuracy": losses.weighted_mean(per_position["correct"], weights),
        }
        if teacher is not None:
            terms["kl"] = losses.weighted_mean(per_position["kl"], weights)
        return terms
    logits = student["mlm_logits"]
    terms = {
        "mlm_loss": losses.mlm_cross_entropy(logits, batch["masked_ids"], weights)[1],
        "accuracy": losses.mlm_accuracy(logits, batch["masked_ids"], weights)[1],
    }
    if teacher is not None:
        terms["kl"] = losses.kl_divergence(
            logits,
            teacher["mlm_logits"],
            weights,
            temperature=temperature,
            scale_by_temperature_squared=False,
        )[1]
    return terms


def mlm_metrics(
    student: ModelOutputs, batch: Batch, *, fused: bool = True, chunk_size: int = 0
) -> tuple[jax.Array, Metrics]:
    """The student's masked-LM loss and accuracy: every strategy reports these."""
    terms = mlm_terms(student, batch, fused=fused, chunk_size=chunk_size)
    return terms["mlm_loss"], {
        "train/mlm_loss": terms["mlm_loss"],
        "train/mlm_accuracy": terms["accuracy"],
    }


def head_settings(distill_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``fused_mlm_head`` and ``vocab_chunk_size`` of the ``distill`` section, checked."""
    fused = distill_config.get("fused_mlm_head", True)
    chunk = distill_config.get("vocab_chunk_size", 0)
    if not isinstance(fused, bool):
        raise ValueError(f"distill.fused_mlm_head={fused!r}: must be True or False.")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(
            f"distill.vocab_chunk_size={chunk!r}: must be an integer >= 0 "
            "(0 = the whole vocabulary in one slice)."
        )
    return {"fused": fused, "chunk_size": chunk}


class MLMStrategy(Strategy):
    """Pre-training alone: the masked-LM cross-entropy, no teacher."""

    name = "mlm"

    def __init__(self, *, fused: bool = True, chunk_size: int = 0) -> None:
        self.fused = fused
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> MLMStrategy:
        return cls(**head_settings(distill_config))

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        step: jax.Array,
        state: Mapping[str, Any],
        adapters: Mapping[str, Any] = MappingProxyType({}),
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        del teachers, step, adapters, rng
        mlm_loss, metrics = mlm_metrics(
            student, batch, fused=self.fused, chunk_size=self.chunk_size
        )
        return mlm_loss, metrics, dict(state)
