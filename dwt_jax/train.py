"""The training loop: set-up, steps, evaluation, checkpoints and metrics.

``run(config, workdir)`` validates the whole config before touching the disk,
resumes from the latest checkpoint in ``workdir`` if there is one, and trains to
``config.train.num_steps``. SIGTERM/SIGINT finish the current step, save, and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from dwt_jax import sharding, steps
from dwt_jax.checkpoint import Checkpointer, check_resume_compatible, write_run_config
from dwt_jax.configuration import ConfigError, validate_config
from dwt_jax.data import pipeline
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import make_strategy
from dwt_jax.metrics import MetricsWriter, Progress
from dwt_jax.models.bert import make_model
from dwt_jax.optim import make_optimizer
from dwt_jax.state import TrainState, count_params, create_train_state, dummy_model_inputs

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class RunResult:
    """What a run ended with (for tests and notebooks)."""

    start_step: int
    final_step: int
    eval_metrics: dict[str, float]
    interrupted: bool = False


class _StopRequest:
    """Turns SIGTERM/SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # Not the main thread: leave signals be.
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:  # A second signal: stop now.
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_workdir(workdir: str) -> None:
    """Fails early if ``workdir`` cannot be created or written; creates nothing."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--workdir={workdir} cannot be written ({path} is not a writable directory); "
            "choose a directory you can write to."
        )


def _save_tokenizer(workdir: str, tokenizer: Any) -> None:
    path = os.path.join(workdir, TOKENIZER_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)


def _evaluate(eval_step, params: Any, eval_batches: list[dict[str, jax.Array]]) -> dict[str, float]:
    totals = None
    for batch in eval_batches:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    loss = float(totals["loss_sum"] / max(totals["weight_sum"], 1e-9))
    return {
        "eval/mlm_loss": loss,
        "eval/mlm_accuracy": float(totals["correct_sum"] / max(totals["weight_sum"], 1e-9)),
        "eval/perplexity": float(math.exp(min(loss, 80.0))),
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains (or resumes) the configured run in ``workdir``."""
    model_config = validate_config(config, jax.device_count())
    check_resume_compatible(workdir, config)
    _check_workdir(workdir)

    tokenizer = tokenizer_lib.get_tokenizer(config.data)
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.get_vocab_size()}); raise model.vocab_size."
        )
    os.makedirs(workdir, exist_ok=True)
    write_run_config(workdir, config)
    _save_tokenizer(workdir, tokenizer)

    mesh = sharding.make_mesh(config.mesh)
    model = make_model(model_config, head="mlm")
    strategy = make_strategy(config.distill)
    num_steps = config.train.num_steps
    optimizer, schedule = make_optimizer(config.optim, num_steps)
    materialise, abstract_state, state_shardings = create_train_state(
        seed=config.seed,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_model_inputs(config.data.seq_len, config.data.max_predictions),
        mesh=mesh,
    )

    host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_iter = pipeline.make_pretrain_iterator(
        config.data,
        tokenizer,
        split=config.data.train_split,
        global_batch_size=config.data.batch_size,
        seed=config.seed,
        **host,
    )
    eval_batches = [
        sharding.shard_batch(batch, mesh)
        for batch in pipeline.eval_batches(
            config.data,
            tokenizer,
            global_batch_size=config.data.eval_batch_size,
            num_batches=config.train.eval_batches,
            seed=config.seed,
            **host,
        )
    ]

    checkpointer = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    start_step = checkpointer.latest_step()
    if start_step is None:
        state, start_step = materialise(), 0
    else:
        logging.info("Resuming from step %d in %s", start_step, checkpointer.directory)
        state = checkpointer.restore(start_step, abstract_state, train_iter)

    n_student = count_params(state.params["student"])
    n_embed = count_params(state.params["student"]["bert"]["embeddings"])
    print(
        f"dwt_jax: student {n_student:,} parameters ({n_student - n_embed:,} non-embedding); "
        f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}; "
        f"{'resuming at step ' + str(start_step) if start_step else 'starting from scratch'}; "
        f"training to step {num_steps}.",
        flush=True,
    )

    batch_spec = pipeline.batch_spec(config.data, config.data.batch_size)
    batch_shardings = sharding.batch_shardings(batch_spec, mesh)
    train_step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        grad_accum_steps=config.optim.grad_accum_steps,
    )
    eval_step = steps.make_eval_step(
        model=model,
        mesh=mesh,
        params_shardings=state_shardings.params,
        batch_shardings=batch_shardings,
    )

    writer = MetricsWriter(workdir, tensorboard=config.log.tensorboard)
    progress = Progress(start_step=start_step, total_steps=num_steps, enabled=config.log.progress)
    try:
        with _StopRequest() as stop:
            result = _loop(
                config,
                state=state,
                start_step=start_step,
                train_iter=train_iter,
                train_step=train_step,
                eval_step=eval_step,
                eval_batches=eval_batches,
                checkpointer=checkpointer,
                writer=writer,
                progress=progress,
                mesh=mesh,
                stop=stop,
            )
    finally:
        checkpointer.close()
        writer.close()
        progress.close()
    return result


def _loop(
    config: ml_collections.ConfigDict,
    *,
    state: TrainState,
    start_step: int,
    train_iter: Any,
    train_step,
    eval_step,
    eval_batches: list[dict[str, jax.Array]],
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    progress: Progress,
    mesh: jax.sharding.Mesh,
    stop: _StopRequest,
) -> RunResult:
    num_steps = config.train.num_steps
    tokens_per_step = config.data.batch_size * config.data.seq_len
    log_every = config.log.every_steps
    eval_metrics: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # Metrics are fetched one step late.
    window_start, window_steps = time.monotonic(), 0
    step = start_step

    def flush_pending() -> None:
        nonlocal pending, window_start, window_steps
        if pending is None:
            return
        done_step, metrics = pending
        pending = None
        metrics = jax.device_get(metrics)  # Blocks until that step has run: time after it.
        elapsed = time.monotonic() - window_start
        metrics["perf/steps_per_s"] = window_steps / max(elapsed, 1e-9)
        metrics["perf/tokens_per_s"] = metrics["perf/steps_per_s"] * tokens_per_step
        values = writer.write(done_step, metrics)
        progress.update(done_step, values)
        window_start, window_steps = time.monotonic(), 0

    while step < num_steps:
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        if step == start_step + 1:  # The first call compiled the step: time it apart.
            jax.block_until_ready(metrics)
            progress.message(
                f"Compiled and ran the first step in {time.monotonic() - window_start:.1f} s."
            )
            window_start, window_steps = time.monotonic(), 0
        flush_pending()  # The previous log step's metrics, now that this step is queued.
        if step % log_every == 0 or step == num_steps:
            pending = (step, metrics)
        if step % config.train.eval_every == 0 or step == num_steps:
            flush_pending()
            eval_metrics = _evaluate(eval_step, state.params, eval_batches)
            writer.write(step, eval_metrics)
            progress.message(
                f"step {step}: eval mlm_loss {eval_metrics['eval/mlm_loss']:.4f}  "
                f"accuracy {eval_metrics['eval/mlm_accuracy']:.4f}  "
                f"perplexity {eval_metrics['eval/perplexity']:.1f}"
            )
            window_start, window_steps = time.monotonic(), 0
        if step % config.checkpoint.every_steps == 0 or step == num_steps or stop.requested:
            checkpointer.save(step, state, train_iter)
        if stop.requested:
            flush_pending()
            checkpointer.wait()
            progress.message(
                f"Stopped by {stop.requested} at step {step}; checkpoint saved in "
                f"{checkpointer.directory}. Run the same command again to resume."
            )
            return RunResult(start_step, step, eval_metrics, interrupted=True)
    flush_pending()
    checkpointer.wait()
    return RunResult(start_step, step, eval_metrics)
