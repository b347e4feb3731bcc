"""The interface every training objective implements, and the plain MLM objective.

A strategy turns model outputs into a loss. The train step runs the student
inside ``value_and_grad`` and hands its outputs, with the teachers (a `Teachers`
sequence: outputs under ``stop_gradient``, computed on first use), the batch and a
`StepContext` (step, strategy state, adapters, key) to ``Strategy.loss``. By default
every teacher runs on the whole batch before the student, outside the gradient; a
strategy with ``teacher_forward = "lazy"`` runs them itself, on the rows it picks
(``Teachers.on_rows``), so a teacher forward on a selected subset really costs only
that subset. A strategy that learns from the updated student (a policy rewarded by
the student's loss after the update) sets ``has_after_update`` and implements
``after_update``. New objectives are new strategies; the step itself does not change.

Callers never test a strategy's name: they read what it declares (``mode``,
``num_teachers``, ``trains_ensemble``, ``needs_class_probabilities``,
``has_after_update``, ...), and ``from_config`` and ``check_setup`` refuse every
setting and every setup the strategy cannot run with (`ConfigError`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import ml_collections

from dwt_jax.distill.terms import head_settings, mlm_metrics
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig

# Model outputs as the step passes them: 'mlm_logits' [B,M,V] plus the model's `out`
# entries (e.g. 'masked_hidden', and 'hidden_states' when a strategy asks for them);
# a masked LM's also carry 'mlm_decoder', its (embedding [V,D], bias [V]).
ModelOutputs = Mapping[str, Any]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

MODES = ("pretrain", "finetune")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepContext:
    """What one (micro-)step hands a strategy besides the outputs and the batch.

    A pytree (every field a child), so it may cross ``jit``, ``scan`` and ``grad``
    boundaries; the train step builds it inside its traced function.
    """

    step: jax.Array | int = 0
    """The optimiser step (int32 [] in the train step; a Python int works too)."""
    state: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The strategy state (``init_state``'s structure), as of this (micro-)step."""
    adapters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The strategy's trained parameters (``init_adapters``' structure, unboxed)."""
    rng: jax.Array | None = None
    """A key for this (micro-)step, independent of the student's dropout key."""


@dataclasses.dataclass(frozen=True)
class StrategySetup:
    """The run a strategy is asked to train in, as ``check_setup`` sees it."""

    num_teachers: int
    """Teachers the train step will hand the strategy: an ensemble counts as its
    members, and a teacher the run trains first (``teacher.model``) counts."""
    num_teachers_is_minimum: bool = False
    """True if ``num_teachers`` counts teacher workdirs whose ensemble members are not
    counted yet: at least that many teachers. Only what a minimum decides is checked
    (too many, or none); check again once the members are counted."""
    is_regression: bool = False
    """The task has one score per example (C = 1), no class probabilities."""
    grad_accum_steps: int = 1
    """``optim.grad_accum_steps``."""
    task: str = ""
    """``data.task``, named in errors about the task."""


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


def _takes(low: int, high: int | None) -> str:
    return str(low) if low == high else f"{low} to {high if high is not None else 'any number'}"


class Strategy(abc.ABC):
    """A training objective: student and teacher outputs → loss and metrics."""

    name: ClassVar[str]
    """``distill.strategy``: the name the config chooses it by."""
    mode: ClassVar[str]
    """'pretrain' (masked LM on a corpus) or 'finetune' (a classification task): the
    pipeline the strategy belongs to."""
    num_teachers: ClassVar[tuple[int, int | None]] = (0, 0)
    """How many teachers the strategy takes: (at least, at most or None for any)."""
    objective: ClassVar[str | None] = None
    """The pre-training objective it trains ('mlm' or 'clm'), None if it trains
    either (the student's family decides)."""
    trains_ensemble: ClassVar[bool] = False
    """True if the trained model is a `TeacherEnsemble` (its 'logits' are [K,B,C])
    rather than one student: the teachers' co-finetuning."""
    needs_class_probabilities: ClassVar[bool] = False
    """True if the strategy reads class probabilities (uncertainty, cross-entropy of
    the gold label): it cannot run on a regression task."""
    decides_after_eval: bool = False
    """True if ``after_eval`` may change the state (the loop then fetches the state to
    the host after each evaluation); instances may set it (it may depend on the config)."""
    has_after_update: ClassVar[bool] = False
    """True if the strategy updates its state from the student after the optimiser
    step (``after_update``); such strategies take no gradient accumulation."""
    student_output_kwargs: Mapping[str, bool] = MappingProxyType({})
    """Extra keyword arguments for the student's forward (e.g. output_hidden_states=True);
    instances may override them (they may depend on the config)."""
    teacher_output_kwargs: Mapping[str, bool] = MappingProxyType({})
    """The same for every teacher's forward."""
    teacher_forward: str = "full"
    """'full': the step runs every teacher on the whole batch, outside the gradient;
    'lazy': the loss runs them (``teachers.on_rows``) on the rows it selects."""

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> Strategy:
        """Builds the strategy from the config's ``distill`` section, checking every
        setting of its own (`ConfigError` naming the field); by default it has none."""
        del distill_config
        return cls()

    def check_setup(self, setup: StrategySetup) -> None:
        """Raises `ConfigError` if the strategy cannot train in ``setup``: the number
        of teachers, the kind of task, gradient accumulation. Subclasses with checks
        of their own extend it (and call it first)."""
        if setup.is_regression and self.needs_class_probabilities:
            raise ConfigError(
                f"distill.strategy={self.name!r} needs class probabilities, but data.task="
                f"{setup.task!r} is a regression task; use 'task', 'avg_teachers', "
                "'random_teacher' or 'fixed_weights' with kd='mse'."
            )
        self._check_teacher_count(setup)
        if self.has_after_update and setup.grad_accum_steps != 1:
            raise ConfigError(
                f"distill.strategy={self.name!r} updates its policy after every optimiser "
                "step; set optim.grad_accum_steps=1."
            )

    def _check_teacher_count(self, setup: StrategySetup) -> None:
        low, high = self.num_teachers
        count = setup.num_teachers
        # No teacher workdir at all is exactly none; otherwise a minimum can be too many.
        enough = low <= count or (setup.num_teachers_is_minimum and count > 0)
        if enough and (high is None or count <= high):
            return
        name = self.name
        if self.mode == "pretrain":
            if count == 0:
                raise ConfigError(
                    f"distill.strategy={name!r} needs a teacher: list teacher workdirs in "
                    "teacher.workdirs, or give a teacher.model section to train one first."
                )
            raise ConfigError(
                f"teacher.workdirs lists {count} teacher(s) but distill.strategy={name!r} "
                f"takes {_takes(low, high)}; "
                + ("clear teacher.workdirs." if high == 0 else "list that many.")
            )
        if count == 0:
            raise ConfigError(
                f"distill.strategy={name!r} needs teachers: set teacher.workdirs to a "
                "fine-tuned teacher run (e.g. the 'teachers' stage of the pipeline)."
            )
        if high == 0:
            raise ConfigError(
                f"distill.strategy={name!r} takes no teacher but teacher.workdirs is set; "
                "clear it or pick a distillation strategy."
            )
        raise ConfigError(
            f"teacher.workdirs give {count} teacher(s) but distill.strategy={name!r} "
            f"takes {low} to {high or 'any number'}."
        )

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
        passed back to ``loss`` as ``ctx.adapters``. Empty by default.
        """
        del rng, student, teachers
        return {}

    @abc.abstractmethod
    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        """Returns (scalar loss, metrics with slash names, new strategy state).

        ``teachers`` is a `Teachers` sequence; ``ctx`` the step, the strategy state,
        the adapters and this (micro-)step's key.
        """

    def after_eval(
        self,
        state: Mapping[str, Any],
        step: int,
        student_loss: float,
        teacher_loss: float | None,
    ) -> tuple[dict[str, Any] | None, dict[str, float], str | None]:
        """A decision on the host after the evaluation at ``step``, from the held-out
        losses of the student and the (single, frozen) teacher, or None if there is not
        one: (the new strategy state, or None for unchanged; metrics to log with the
        evaluation; a line to print, or None). The state is checkpointed, so a resumed
        run decides as an uninterrupted one. None, {}, None by default."""
        del state, step, student_loss, teacher_loss
        return None, {}, None

    def teacher_free_from(self, state: Mapping[str, Any]) -> int | None:
        """The step from which the loss no longer reads the teachers (their weight is 0
        for good), given the strategy state (host values), or None (the default: never).
        From that step the run trains with :meth:`without_teachers`, whose step runs no
        teacher's forward pass."""
        del state
        return None

    def without_teachers(self) -> Strategy | None:
        """The strategy the run switches to at :meth:`teacher_free_from`'s step: the same
        loss and state with the teachers' terms gone (None by default: no switch)."""
        return None

    def after_update(
        self,
        *,
        student: ModelOutputs,
        student_after: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[dict[str, Any], Metrics]:
        """Updates the strategy state once the student has been updated.

        ``student`` are the student's outputs the loss saw (under ``stop_gradient``),
        ``student_after`` its deterministic outputs with the updated parameters;
        ``ctx`` holds the state the loss returned, the updated adapters and the same
        key ``loss`` got. Called only if ``has_after_update``.
        """
        del student, student_after, teachers, batch
        return dict(ctx.state), {}


class MLMStrategy(Strategy):
    """Pre-training alone: the masked-LM cross-entropy, no teacher. (On a causal
    batch it is the next-token cross-entropy: ``clm`` names that use.)"""

    name: ClassVar[str] = "mlm"
    mode: ClassVar[str] = "pretrain"
    objective: ClassVar[str | None] = "mlm"

    def __init__(self, *, fused: bool = True, chunk_size: int = 0, block_rows: int = 0) -> None:
        self.fused = fused
        self.chunk_size = chunk_size
        self.block_rows = block_rows

    @classmethod
    def from_config(cls, distill_config: ml_collections.ConfigDict) -> MLMStrategy:
        return cls(**head_settings(distill_config))

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        mlm_loss, metrics = mlm_metrics(
            student, batch, fused=self.fused, chunk_size=self.chunk_size,
            block_rows=self.block_rows,
        )  # fmt: skip
        return mlm_loss, metrics, dict(ctx.state)


class CLMStrategy(MLMStrategy):
    """Causal-LM pre-training alone: next-token cross-entropy on every real token of
    the packed documents, no teacher (docs/methods.md#decoders)."""

    name: ClassVar[str] = "clm"
    mode: ClassVar[str] = "pretrain"
    objective: ClassVar[str | None] = "clm"
