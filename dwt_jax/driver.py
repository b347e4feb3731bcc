"""The one run driver: a checked `RunPlan` in, a trained (or resumed) run out.

Every kind of run (pre-training, fine-tuning, co-finetuning) goes through `execute`:

    resume guard → mesh → tokenizer (+ teachers' tokenizers) → data → model, state
    → saved-state check → initial weights planned → workdir written → teachers
    loaded → restore or initialise → compile → teacher eval → start line → loop

What differs between kinds is asked of the plan's `RunKind` (how the model is built,
what the data and eval are, how teachers and initial weights load) and of the
strategy (`dwt_jax.distill.base.Strategy`), never branched on by name. A plan is
made once by ``RunKind.check`` (`dwt_jax.train.PRETRAIN`,
`dwt_jax.finetune.run.FINETUNE`); `execute` trusts it and validates nothing again.
Everything that can be found wrong with the inputs is found before the workdir
is created.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from dwt_jax import distributed, loop, sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax.checkpoint import check_resume_compatible, check_saved_state, write_run_config
from dwt_jax.config_files import fields_as_in
from dwt_jax.distill.base import Strategy
from dwt_jax.metrics import MetricsWriter, Progress
from dwt_jax.models.config import BertConfig
from dwt_jax.optim import make_optimizer
from dwt_jax.state import TrainState, create_train_state
from dwt_jax.teachers import Teacher, TeacherPlan


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run, checked: everything `execute` needs, nothing it must check again.

    Attributes:
      kind: the `RunKind` that made the plan and builds the run's parts.
      config: the run's config (the tokenizer source resolved), saved as config.json.
      workdir: where the run's checkpoints, metrics and tokenizer go.
      mesh_shape: the resolved mesh axis sizes.
      strategy: the training objective, built from ``config.distill``.
      models: the trained model's architecture(s): one, or an ensemble's members.
      teachers: the teachers, checked by their files (or by the stage that makes them).
      task: the fine-tuning task (None in pre-training).
      details: what only the kind reads (e.g. the student's initial weights).
    """

    kind: RunKind
    config: ml_collections.ConfigDict
    workdir: str
    mesh_shape: Mapping[str, int]
    strategy: Strategy
    models: tuple[BertConfig, ...]
    teachers: tuple[TeacherPlan, ...] = ()
    task: Any = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def teacher_configs(self) -> list[BertConfig]:
        """Every teacher model's config (an ensemble contributes each member)."""
        return [c for plan in self.teachers for c in plan.configs]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How a run evaluates: ``evaluate(params)`` gives the student's held-out metrics;
    ``teachers`` the frozen teachers' (computed once); ``describe`` the progress line
    of an evaluation."""

    evaluate: Callable[[Any], dict[str, float]]
    teachers: dict[str, float]
    describe: Callable[[dict[str, float]], str]
    loss_name: str = "loss"
    """The held-out loss's metric name after 'eval/' (the student) and 'teacher/'."""


@dataclasses.dataclass(frozen=True)
class Produced:
    """A run that an earlier stage of the same pipeline will produce: its model
    section and the field that named it in the user's config (for messages)."""

    kind: str  # The producing stage's mode: 'pretrain' or 'finetune'.
    config: ml_collections.ConfigDict  # The producing stage's config.
    field: str  # The user's field it comes from, e.g. 'teacher.model'.


class RunKind(abc.ABC):
    """What one kind of run (pre-training, fine-tuning) does differently."""

    mode: ClassVar[str]  # The saved config's ``mode``.
    reference: ClassVar[str]  # The shipped config that sets every field it reads.

    def check(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        produced: Mapping[str, Produced] | None = None,
    ) -> RunPlan:
        """Checks the config, the runs it names and its data by their files (runs in
        ``produced`` by the stage that makes them) into a plan; writes nothing. A
        field the config lacks is named as the kind's reference config has it."""
        with fields_as_in(config, self.reference):
            return self.make_plan(config, workdir, produced or {})

    @abc.abstractmethod
    def make_plan(
        self, config: ml_collections.ConfigDict, workdir: str, produced: Mapping[str, Produced]
    ) -> RunPlan:
        """The checks of `check` (the kind's own), and the plan they give."""

    def saved_config(self, plan: RunPlan) -> ml_collections.ConfigDict:
        """The config written as the run's config.json."""
        return plan.config

    @abc.abstractmethod
    def load_tokenizer(self, plan: RunPlan) -> Any:
        """The run's tokenizer (a `tokenizers.Tokenizer`)."""

    @abc.abstractmethod
    def check_tokenizer(self, plan: RunPlan, tokenizer: Any) -> None:
        """Refuses a tokenizer the model cannot embed (the teachers' tokenizers are
        checked against it by the driver)."""

    @abc.abstractmethod
    def make_data(self, plan: RunPlan, tokenizer: Any, mesh: jax.sharding.Mesh) -> tuple[Any, list]:
        """(the train iterator of host-local batches, the eval batches on the mesh)."""

    @abc.abstractmethod
    def batch_spec(self, plan: RunPlan) -> dict[str, Any]:
        """Shapes and dtypes of a global train batch."""

    @abc.abstractmethod
    def make_model(self, plan: RunPlan) -> nn.Module:
        """The trained model."""

    @abc.abstractmethod
    def model_inputs(self, plan: RunPlan) -> dict[str, Any]:
        """Dummy inputs that trace the model's parameters by shape."""

    def plan_initial_weights(
        self, plan: RunPlan, abstract_state: TrainState, mesh: jax.sharding.Mesh
    ) -> Any:
        """The initial weights to load, checked against the state's shapes (before the
        workdir is written); None when the run starts from random weights."""
        del plan, abstract_state, mesh
        return None

    @abc.abstractmethod
    def load_teachers(self, plan: RunPlan, mesh: jax.sharding.Mesh) -> list[Teacher]:
        """The frozen teachers, on the mesh."""

    def initialise(
        self,
        plan: RunPlan,
        state: TrainState,
        initial: Any,
        teachers: Sequence[Teacher],
        mesh: jax.sharding.Mesh,
        state_shardings: Any,
    ) -> tuple[TrainState, list[str]]:
        """The fresh state with its initial weights (``initial``, from
        `plan_initial_weights`); and where they came from."""
        del plan, initial, teachers, mesh, state_shardings
        return state, []

    @abc.abstractmethod
    def evaluation(
        self,
        plan: RunPlan,
        model: nn.Module,
        mesh: jax.sharding.Mesh,
        params_shardings: Any,
        batch_shardings: Any,
        teachers: Sequence[Teacher],
        eval_batches: list,
        tokenizer: Any,
    ) -> Evaluation:
        """The run's evaluation (the teachers' evaluated here, once); ``tokenizer`` is
        the run's (e.g. the bytes of each token, for bits per byte)."""

    @abc.abstractmethod
    def start_line(
        self,
        plan: RunPlan,
        state: TrainState,
        teachers: Sequence[Teacher],
        mesh: jax.sharding.Mesh,
        start_step: int,
        sources: Sequence[str],
        teacher_metrics: Mapping[str, float],
    ) -> str:
        """The line printed when the run starts."""


def start_text(start_step: int, mesh: jax.sharding.Mesh) -> str:
    """Devices, mesh and where the run starts: the end of every start line."""
    return (
        f"{jax.device_count()} device(s) on {jax.process_count()} process(es), mesh "
        f"{dict(mesh.shape)}; "
        f"{'resuming at step ' + str(start_step) if start_step else 'starting from scratch'}"
    )


def teacher_loss(metrics: dict[str, float], loss_name: str) -> float | None:
    """The teachers' held-out loss a student is compared with: the one teacher's
    (``teacher/<loss>``), or with several the best of them (``teacher<k>/<loss>``): the
    student has caught up with its teachers once it has passed the best one."""
    if f"teacher/{loss_name}" in metrics:
        return metrics[f"teacher/{loss_name}"]
    several = [
        v for k, v in metrics.items()
        if k.startswith("teacher") and k.endswith(f"/{loss_name}") and k.split("/")[0][7:].isdigit()
    ]  # fmt: skip
    return min(several) if several else None


def teacher_phases(
    plan: RunPlan, loss_name: str, teacher_free_step: Callable[[], Any]
) -> loop.TeacherPhases:
    """The strategy's host-side decisions for the loop: after each evaluation, from the
    student's and the teacher's held-out loss (a no-op by default); and the switch to
    ``teacher_free_step`` from the step ``teacher_free_from`` names (never by default,
    and never for a strategy without a teacher-free form)."""
    strategy = plan.strategy
    switches = strategy.without_teachers() is not None

    def after_eval(state: TrainState, step: int, metrics: dict[str, float]):
        student_loss = metrics.get(f"eval/{loss_name}")
        if student_loss is None or not strategy.decides_after_eval:
            return state, {}, None
        host = sharding.to_host(state.strategy_state)  # Every process, multi-host too.
        new, extra, line = strategy.after_eval(
            host, step, student_loss, teacher_loss(metrics, loss_name)
        )
        if new is not None:
            shardings = jax.tree.map(lambda x: x.sharding, state.strategy_state)
            typed = jax.tree.map(lambda v, old: np.asarray(v, old.dtype), new, host)
            state = state.replace(strategy_state=sharding.put_on_mesh(typed, shardings))
        return state, extra, line

    return loop.TeacherPhases(
        after_eval=after_eval,
        teacher_free_from=lambda state: (
            strategy.teacher_free_from(sharding.to_host(state.strategy_state)) if switches else None
        ),
        teacher_free_step=teacher_free_step,
    )


def execute(plan: RunPlan) -> loop.RunResult:
    """Trains (or resumes) the planned run in ``plan.workdir``."""
    kind, config, workdir = plan.kind, plan.config, plan.workdir
    saved_config = kind.saved_config(plan)
    check_resume_compatible(workdir, saved_config)
    loop.check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    loop.check_mesh_layout(mesh, config)
    tokenizer = distributed.shared_tokenizer(lambda: kind.load_tokenizer(plan))
    kind.check_tokenizer(plan, tokenizer)
    for index, teacher in enumerate(plan.teachers):
        if not teacher.produced:  # A teacher a stage makes shares the run's tokenizer.
            field = teachers_lib.teacher_field(config, index)
            teachers_lib.check_teacher_tokenizer(teacher.workdir, tokenizer, field)
    # The data's own checks (empty or unreadable files, a corpus with no tokens) come
    # before the workdir exists, like every other bad input.
    with distributed.main_process_first("data"):
        train_iter, eval_batches = kind.make_data(plan, tokenizer, mesh)

    model = kind.make_model(plan)
    num_steps = int(config.train.num_steps)
    optimizer, schedule = make_optimizer(config.optim, num_steps)
    materialise, abstract_state, state_shardings = create_train_state(
        seed=config.seed,
        model=model,
        optimizer=optimizer,
        strategy=plan.strategy,
        model_inputs=kind.model_inputs(plan),
        mesh=mesh,
        teacher_configs=plan.teacher_configs,
    )
    check_saved_state(os.path.join(workdir, loop.CHECKPOINT_DIR), abstract_state)
    initial = kind.plan_initial_weights(plan, abstract_state, mesh)

    os.makedirs(workdir, exist_ok=True)
    write_run_config(workdir, saved_config)
    loop.save_tokenizer(workdir, tokenizer)
    teachers = kind.load_teachers(plan, mesh)

    checkpointer = loop.make_checkpointer(workdir, config)
    start_step, state = checkpointer.restore_latest(abstract_state, train_iter)
    sources: list[str] = []
    if start_step is None:
        state, start_step = materialise(), 0
        state, sources = kind.initialise(plan, state, initial, teachers, mesh, state_shardings)
    else:
        logging.info("Resumed from step %d in %s", start_step, checkpointer.directory)

    batch_shardings = sharding.batch_shardings(kind.batch_spec(plan), mesh)
    step_parts = {
        "model": model,
        "optimizer": optimizer,
        "schedule": schedule,
        "mesh": mesh,
        "state_shardings": state_shardings,
        "batch_shardings": batch_shardings,
        "grad_accum_steps": int(config.optim.grad_accum_steps),
    }
    compiled_step = steps.make_train_step(
        strategy=plan.strategy,
        teacher_models=[t.model for t in teachers],
        teacher_shardings=[t.shardings for t in teachers],
        teacher_rules=[t.rules for t in teachers],
        **step_parts,
    )
    teacher_params = tuple(t.params for t in teachers)

    def teacher_free_step() -> Callable[[TrainState, Any], Any]:
        """The train step without teachers, compiled at the switch (same state)."""
        compiled = steps.make_train_step(strategy=plan.strategy.without_teachers(), **step_parts)
        return lambda s, b: compiled(s, b, ())

    evaluation = kind.evaluation(
        plan,
        model,
        mesh,
        state_shardings.params["student"],
        batch_shardings,
        teachers,
        eval_batches,
        tokenizer,
    )
    if jax.process_index() == 0:
        line = kind.start_line(
            plan, state, teachers, mesh, start_step, sources, evaluation.teachers
        )
        print(line, flush=True)

    writer = MetricsWriter(workdir, tensorboard=config.log.tensorboard, resume_step=start_step)
    progress = Progress(start_step=start_step, total_steps=num_steps, enabled=config.log.progress)
    try:
        with loop.StopRequest() as stop:
            return loop.train_loop(
                config,
                state=state,
                start_step=start_step,
                train_iter=train_iter,
                train_step=lambda s, b: compiled_step(s, b, teacher_params),
                evaluate=lambda params: {
                    **evaluation.evaluate(params["student"]),
                    **evaluation.teachers,
                },
                checkpointer=checkpointer,
                writer=writer,
                progress=progress,
                mesh=mesh,
                stop=stop,
                describe_eval=evaluation.describe,
                phases=teacher_phases(plan, evaluation.loss_name, teacher_free_step),
            )
    finally:
        checkpointer.close()
        writer.close()
        progress.close()
