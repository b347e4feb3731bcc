"""The training loop every run kind shares: steps, metrics one step late, evaluations,
checkpoints, the non-finite streak stop, and a clean stop on SIGTERM/SIGINT.

`train_loop` takes what differs between run kinds as arguments (the compiled step,
the evaluation, the line an evaluation prints); `dwt_jax.driver` builds them from a
checked `RunPlan`. Nothing here knows which kind of run it drives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from dwt_jax import sharding
from dwt_jax.checkpoint import Checkpointer
from dwt_jax.errors import ConfigError, NonFiniteError
from dwt_jax.metrics import MetricsWriter, Progress
from dwt_jax.readers import check_workdir
from dwt_jax.state import TrainState

__all__ = [
    "CHECKPOINT_DIR",
    "TOKENIZER_FILE",
    "RunResult",
    "StopRequest",
    "TeacherPhases",
    "check_mesh_layout",
    "check_workdir",
    "make_checkpointer",
    "save_tokenizer",
    "stop_nonfinite",
    "train_loop",
]

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class RunResult:
    """What a run ended with (for tests and notebooks)."""

    start_step: int
    final_step: int
    eval_metrics: dict[str, float]
    interrupted: bool = False


@dataclasses.dataclass(frozen=True)
class TeacherPhases:
    """The strategy's decisions the loop applies on the host (built by the driver).

    ``after_eval(state, step, eval_metrics)`` gives (the state, metrics to log with the
    evaluation, a line to print or None): e.g. the 'gap' schedule's trigger.
    ``teacher_free_from(state)`` is the step from which the teachers are no longer
    read (None: not yet, or never); from it the loop trains with ``teacher_free_step()``
    (built and compiled once, at the switch), whose step runs no teacher."""

    after_eval: Callable[[TrainState, int, dict[str, float]], tuple[TrainState, dict, str | None]]
    teacher_free_from: Callable[[TrainState], int | None]
    teacher_free_step: Callable[[], Callable[[TrainState, Any], tuple[TrainState, Any]]]


class StopRequest:
    """Turns SIGTERM/SIGINT into a request to stop after the current step.

    One process: the signal sets ``requested`` and the loop stops after the step in
    flight. Several processes: every host must stop at the same step, so SIGTERM is
    left to JAX's pre-emption notifier (``jax.distributed`` watches it, and spreads
    the notice to every host), SIGINT is turned into a SIGTERM to this process, and
    the loop stops where ``Checkpointer.reached_preemption`` says all hosts agree.
    """

    def __init__(self) -> None:
        self.synchronised = jax.process_count() > 1
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        signals = (signal.SIGINT,) if self.synchronised else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            with contextlib.suppress(ValueError):  # Not the main thread: leave signals be.
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # A second signal: stop now.
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.synchronised:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier: all hosts stop.

    def should_stop(self, step: int, checkpointer: Checkpointer) -> bool:
        """Whether to save and stop after ``step`` (called once per step on every host)."""
        if not self.synchronised:
            return self.requested is not None
        if checkpointer.reached_preemption(step):
            self.requested = self.requested or "a pre-emption notice (SIGTERM)"
            return True
        return False

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_checkpointer(workdir: str, config: ml_collections.ConfigDict) -> Checkpointer:
    """The run's checkpoints in ``<workdir>/checkpoints`` (created if missing)."""
    return Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )


def check_mesh_layout(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> None:
    """Every process must hold its share of the train and eval batches (multi-host)."""
    try:
        for field in ("batch_size", "eval_batch_size"):
            sharding.check_batch_layout(mesh, int(config.data[field]))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def save_tokenizer(workdir: str, tokenizer: Any) -> None:
    """``tokenizer.json`` in ``workdir`` (process 0, atomically, once)."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)


def train_loop(
    config: ml_collections.ConfigDict,
    *,
    state: TrainState,
    start_step: int,
    train_iter: Any,
    train_step,
    evaluate,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    progress: Progress,
    mesh: jax.sharding.Mesh,
    stop: StopRequest,
    describe_eval: Callable[[dict[str, float]], str],
    phases: TeacherPhases | None = None,
) -> RunResult:
    """Trains from ``start_step`` to ``config.train.num_steps``: steps, metrics one step
    late, evaluations (and the strategy's decisions after them, ``phases``), the switch
    to a teacher-free step, checkpoints, and a clean stop on SIGTERM/SIGINT."""
    num_steps = config.train.num_steps
    tokens_per_step = config.data.batch_size * config.data.seq_len
    log_every = config.log.every_steps
    eval_metrics: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # Metrics are fetched one step late.
    step = start_step
    # Throughput is timed between two fetched steps: (window_step, window_start].
    window_start, window_step = time.monotonic(), step

    def flush_pending() -> None:
        nonlocal pending, window_start, window_step
        if pending is None:
            return
        done_step, metrics = pending
        pending = None
        metrics = jax.device_get(metrics)  # Blocks until that step has run: time after it.
        now = time.monotonic()
        if done_step > window_step:
            metrics["perf/steps_per_s"] = (done_step - window_step) / max(now - window_start, 1e-9)
            metrics["perf/tokens_per_s"] = metrics["perf/steps_per_s"] * tokens_per_step
        values = writer.write(done_step, metrics)
        progress.update(done_step, values)
        window_start, window_step = now, done_step

    if step >= num_steps:  # Already trained that far: report, train nothing.
        return RunResult(start_step, step, evaluate(state.params))
    if step == 0 and config.train.get("eval_at_start", False):  # The untrained model.
        initial = evaluate(state.params)
        writer.write(0, initial)
        progress.message(f"step 0: eval {describe_eval(initial)}")
    max_streak = int(config.train.get("max_nonfinite_streak", 0) or 0)
    previous_metrics: Any = None  # The last step's, for the non-finite streak.

    def check_streak(step_metrics: Any, at_step: int) -> None:
        """Ends the run if ``at_step`` (whose metrics these are) ends a streak of
        ``max_streak`` non-finite steps: one scalar fetched, one step late."""
        if not max_streak or step_metrics is None:
            return
        if int(jax.device_get(step_metrics["train/nonfinite_streak"])) >= max_streak:
            flush_pending()
            checkpointer.wait()
            stop_nonfinite(at_step, max_streak, checkpointer)

    switch_at = None if phases is None else phases.teacher_free_from(state)
    switched = False
    compiling = start_step + 1  # The step whose call compiles a train step.
    while step < num_steps:
        if not switched and switch_at is not None and step >= switch_at:
            flush_pending()  # The throughput window closes before the new step compiles.
            train_step, switched, compiling = phases.teacher_free_step(), True, step + 1
            progress.message(
                f"step {step}: the teachers' weight is 0 from here on; training without "
                "their forward pass (distill/teacher_free = 1)."
            )
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if step == compiling:  # This call compiled the step: time it apart.
            jax.block_until_ready(metrics)
            progress.message(
                f"Compiled and ran the first step in {time.monotonic() - window_start:.1f} s."
                if step == start_step + 1
                else f"Compiled and ran the teacher-free step in "
                f"{time.monotonic() - window_start:.1f} s."
            )
            window_start, window_step = time.monotonic(), step
        check_streak(previous_metrics, step - 1)  # That step has run by now or soon.
        previous_metrics = metrics
        flush_pending()  # The previous log step's metrics, now that this step is queued.
        if step % log_every == 0 or step == num_steps:
            pending = (step, metrics)
        if step % config.train.eval_every == 0 or step == num_steps:
            flush_pending()
            eval_metrics = evaluate(state.params)
            decision = None
            if phases is not None:
                state, extra, decision = phases.after_eval(state, step, eval_metrics)
                eval_metrics = {**eval_metrics, **extra}
                if not switched:
                    switch_at = phases.teacher_free_from(state)
            writer.write(step, eval_metrics)
            progress.message(f"step {step}: eval {describe_eval(eval_metrics)}")
            if decision:
                progress.message(decision)
            window_start, window_step = time.monotonic(), step
        stopping = stop.should_stop(step, checkpointer)
        if step % config.checkpoint.every_steps == 0 or step == num_steps or stopping:
            # Every line up to this step is written before its checkpoint can commit:
            # a resume from it rewrites the metrics after it, never before.
            flush_pending()
            checkpointer.save(step, state, train_iter)
        if stopping:
            flush_pending()
            checkpointer.wait()
            progress.message(
                f"Stopped by {stop.requested} at step {step}; checkpoint saved in "
                f"{checkpointer.directory}. Run the same command again to resume."
            )
            return RunResult(start_step, step, eval_metrics, interrupted=True)
    check_streak(previous_metrics, step)
    flush_pending()
    checkpointer.wait()
    return RunResult(start_step, step, eval_metrics)


def stop_nonfinite(step: int, streak: int, checkpointer: Checkpointer) -> None:
    """Ends the run after ``streak`` (= train.max_nonfinite_streak) consecutive
    non-finite steps ending at ``step``."""
    first = step - streak + 1
    # Checkpoints saved during the streak hold the same weights as the one before it.
    good = [s for s in checkpointer.all_steps() if s < first]
    where = (
        f"the last checkpoint before it is step {max(good)} in {checkpointer.directory}"
        if good
        else "no checkpoint was saved before it"
    )
    raise NonFiniteError(
        f"the loss or gradients were NaN/Inf at {streak} consecutive steps ({first} to "
        f"{step}; their updates were skipped, train.max_nonfinite_streak={streak}); {where}. "
        "Lower optim.learning_rate or raise optim.warmup_steps, check the data, and "
        "restart (it resumes from the newest checkpoint), or raise "
        "train.max_nonfinite_streak (0 = skip such steps without stopping)."
    )
