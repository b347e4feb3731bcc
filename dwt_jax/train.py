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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from dwt_jax import distributed, hf, remap, sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax.checkpoint import (
    Checkpointer,
    check_resume_compatible,
    check_saved_state,
    write_run_config,
)
from dwt_jax.configuration import ConfigError, copy_config, validate_config
from dwt_jax.data import pipeline
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.distill import make_strategy
from dwt_jax.metrics import MetricsWriter, Progress
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
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

    def __enter__(self) -> _StopRequest:
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


class NonFiniteError(RuntimeError):
    """The loss or gradients stayed NaN/Inf for ``train.max_nonfinite_streak`` steps."""


def check_workdir(workdir: str) -> None:
    """Fails early if ``workdir`` cannot be created or written; creates nothing."""
    if "://" in workdir:
        # Checkpoints could go to an object store (Orbax can), but the run's other
        # files (config.json, metrics.jsonl, TensorBoard events) use the local
        # filesystem API: refuse rather than write to a local './gs:/...' directory.
        raise ConfigError(
            f"--workdir={workdir}: object-store URLs are not supported as workdirs yet; "
            "mount the bucket on every host (gcsfuse; launch/tpu_pod.sh does this for a "
            "gs:// --workdir) and pass the mounted path."
        )
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--workdir={workdir} cannot be written ({path} is not a writable directory); "
            "choose a directory you can write to."
        )


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


def _save_tokenizer(workdir: str, tokenizer: Any) -> None:
    path = os.path.join(workdir, TOKENIZER_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        tokenizer.save(path + ".tmp")
        os.replace(path + ".tmp", path)


def _evaluate(eval_step, params: Any, eval_batches: list[dict[str, jax.Array]], prefix: str):
    """Held-out MLM loss, accuracy and perplexity of one model, named ``<prefix>/...``."""
    totals = None
    for batch in eval_batches:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    loss = float(totals["loss_sum"] / max(totals["weight_sum"], 1e-9))
    return {
        f"{prefix}/mlm_loss": loss,
        f"{prefix}/mlm_accuracy": float(totals["correct_sum"] / max(totals["weight_sum"], 1e-9)),
        f"{prefix}/perplexity": float(math.exp(min(loss, 80.0))),
    }


def _teacher_prefix(index: int, count: int) -> str:
    return "teacher" if count == 1 else f"teacher{index}"


def _plan_teachers(config: ml_collections.ConfigDict) -> list[teachers_lib.TeacherPlan]:
    """Every configured teacher (a run's workdir or ``hf:DIR``), checked by its files."""
    return [
        teachers_lib.plan_teacher(spec, f"teacher.workdirs[{index}]")
        for index, spec in enumerate(config.teacher.workdirs)
    ]


_ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_dim",
    "max_len",
    "type_vocab_size",
    "position_offset",
    "norm",
)


def plan_init(
    config: ml_collections.ConfigDict, model_config: BertConfig
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
        if not checkpoint.has_mlm_head and not config.init.get("fresh_mlm_head", False):
            raise ConfigError(
                f"init.workdir: {checkpoint.path} has no MLM head; use a *ForMaskedLM or "
                "*ForPreTraining checkpoint, or set init.fresh_mlm_head=True to start "
                "the head from random weights."
            )
    else:
        plan = teachers_lib.plan_teacher(spec, "init.workdir")
    for name in _ARCHITECTURE:
        theirs, ours = getattr(plan.config, name), getattr(model_config, name)
        if theirs != ours:
            raise ConfigError(
                f"init.workdir: the model in {spec} has {name}={theirs!r} but "
                f"model.{name}={ours!r}; set model.{name}={theirs!r} to start from it, or "
                "make it the teacher and grow it with teacher.student_init='remap'."
            )
    return plan


def _init_student(
    state: TrainState,
    plan: teachers_lib.TeacherPlan,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
) -> TrainState:
    """The fresh state with the student's weights from ``init.workdir``."""
    if plan.hf is not None:
        fresh = ("bert/pooler",) + (("cls",) if config.init.get("fresh_mlm_head") else ())
        template = sharding.to_host(state.params["student"])
        params = teachers_lib.load_hf_params(plan.hf, template, "init.workdir", allow_fresh=fresh)
        student = sharding.put_on_mesh(params, state_shardings.params["student"])
    else:
        params = teachers_lib.load_teacher(plan, mesh, "init.workdir").params
        student = jax.device_put(params, state_shardings.params["student"])
    return state.replace(params={**state.params, "student": student})


def _hf_tokenizer_source(config: ml_collections.ConfigDict) -> str:
    """The Hugging Face directory whose tokenizer the run uses when
    ``data.tokenizer_path`` is empty: the student's ``init.workdir``, else the first
    Hugging Face teacher; '' if neither comes from Hugging Face."""
    specs = [str(config.get("init", {}).get("workdir", "") or "")]
    specs += [str(s) for s in config.teacher.workdirs]
    return next((hf.hf_path(s) for s in specs if hf.is_hf(s)), "")


def with_tokenizer_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with ``data.tokenizer_path`` set to the Hugging Face models' directory
    when it is empty and the models come from Hugging Face (so the run's saved config
    says where its tokens came from)."""
    source = "" if config.data.tokenizer_path else _hf_tokenizer_source(config)
    if not source:
        return config
    config = copy_config(config)
    config.data.tokenizer_path = source
    return config


def _load_tokenizer(config: ml_collections.ConfigDict, model_config: BertConfig):
    tokenizer = tokenizer_lib.get_tokenizer(config.data)
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.get_vocab_size()}); raise model.vocab_size."
        )
    return tokenizer


def _make_data(config: ml_collections.ConfigDict, tokenizer: Any, mesh: jax.sharding.Mesh):
    """The train iterator (host-local batches) and the fixed eval batches (on the mesh)."""
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
    return train_iter, eval_batches


def run(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains (or resumes) the configured run in ``workdir``.

    Everything that can be checked cheaply (the config, the workdir, the teachers'
    files and tokenizers) is checked before anything is compiled or written.
    """
    model_config = validate_config(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    check_mesh_layout(mesh, config)
    config = with_tokenizer_source(config)
    check_resume_compatible(workdir, config)
    check_workdir(workdir)
    teacher_plans = _plan_teachers(config)
    init_plan = plan_init(config, model_config)
    tokenizer = distributed.shared_tokenizer(lambda: _load_tokenizer(config, model_config))
    for index, plan in enumerate(teacher_plans):
        teachers_lib.check_compatible(plan, model_config, tokenizer, f"teacher.workdirs[{index}]")
    # The data's own checks (empty or unreadable files, a corpus with no tokens) come
    # before the workdir exists, like every other bad input.
    with distributed.main_process_first("data"):
        train_iter, eval_batches = _make_data(config, tokenizer, mesh)
    os.makedirs(workdir, exist_ok=True)
    write_run_config(workdir, config)
    _save_tokenizer(workdir, tokenizer)

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
        teacher_configs=[plan.config for plan in teacher_plans],
    )
    # Before the teachers' weights are read.
    check_saved_state(os.path.join(workdir, CHECKPOINT_DIR), abstract_state)
    rules = sharding.configured_teacher_rules(config)
    teachers = [
        teachers_lib.load_teacher(plan, mesh, f"teacher.workdirs[{index}]", rules)
        for index, plan in enumerate(teacher_plans)
    ]

    checkpointer = make_checkpointer(workdir, config)
    start_step, state = checkpointer.restore_latest(abstract_state, train_iter)
    if start_step is None:
        state, start_step = materialise(), 0
        if init_plan is not None:
            state = _init_student(state, init_plan, config, mesh, state_shardings)
        elif config.teacher.student_init == "remap":
            state = _remap_student(state, teachers[0], model_config, config, state_shardings)
    else:
        logging.info("Resumed from step %d in %s", start_step, checkpointer.directory)
    _print_start(state, teachers, mesh, start_step, num_steps)

    batch_shardings = sharding.batch_shardings(
        pipeline.batch_spec(config.data, config.data.batch_size), mesh
    )
    compiled_step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        grad_accum_steps=config.optim.grad_accum_steps,
        teacher_models=[t.model for t in teachers],
        teacher_shardings=[t.shardings for t in teachers],
        teacher_rules=[t.rules for t in teachers],
    )
    teacher_params = tuple(t.params for t in teachers)

    student_eval_step = steps.make_eval_step(
        model=model,
        mesh=mesh,
        params_shardings=state_shardings.params["student"],
        batch_shardings=batch_shardings,
    )

    def evaluate(params: Any) -> dict[str, float]:
        return _evaluate(student_eval_step, params["student"], eval_batches, "eval")

    teacher_eval: dict[str, float] = {}
    for index, teacher in enumerate(teachers):
        teacher_step = steps.make_eval_step(
            model=teacher.model,
            mesh=mesh,
            params_shardings=teacher.shardings,
            batch_shardings=batch_shardings,
            rules=teacher.rules,
        )
        prefix = _teacher_prefix(index, len(teachers))
        teacher_eval.update(_evaluate(teacher_step, teacher.params, eval_batches, prefix))

    writer = MetricsWriter(workdir, tensorboard=config.log.tensorboard, resume_step=start_step)
    progress = Progress(start_step=start_step, total_steps=num_steps, enabled=config.log.progress)
    try:
        with _StopRequest() as stop:
            result = _loop(
                config,
                state=state,
                start_step=start_step,
                train_iter=train_iter,
                train_step=lambda state, batch: compiled_step(state, batch, teacher_params),
                evaluate=lambda params: {**evaluate(params), **teacher_eval},
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


def _remap_student(
    state: TrainState,
    teacher: teachers_lib.Teacher,
    student_config: BertConfig,
    config: ml_collections.ConfigDict,
    state_shardings: Any,
) -> TrainState:
    """The fresh state with the student grown from the teacher's weights (SPEC §6).

    Adam's moments are zero whatever the parameters are, so only params change.
    """
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


def _print_start(state: TrainState, teachers: list, mesh: Any, start_step: int, num_steps: int):
    if jax.process_index() != 0:
        return
    n_student = count_params(state.params["student"])
    n_embed = count_params(state.params["student"]["bert"]["embeddings"])
    teacher_text = "".join(
        f"; teacher {t.workdir} ({count_params(t.params):,} parameters, step {t.step})"
        for t in teachers
    )
    print(
        f"dwt_jax: model {n_student:,} parameters ({n_student - n_embed:,} non-embedding)"
        f"{teacher_text}; {jax.device_count()} device(s) on {jax.process_count()} "
        f"process(es), mesh {dict(mesh.shape)}; "
        f"{'resuming at step ' + str(start_step) if start_step else 'starting from scratch'}; "
        f"training to step {num_steps}.",
        flush=True,
    )


def _describe_mlm_eval(metrics: dict[str, float]) -> str:
    return (
        f"mlm_loss {metrics['eval/mlm_loss']:.4f}  accuracy {metrics['eval/mlm_accuracy']:.4f}  "
        f"perplexity {metrics['eval/perplexity']:.1f}"
    )


def _loop(
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
    stop: _StopRequest,
    describe_eval: Callable[[dict[str, float]], str] | None = None,
) -> RunResult:
    """Trains from ``start_step`` to ``config.train.num_steps``: steps, metrics one step
    late, evaluations, checkpoints, and a clean stop on SIGTERM/SIGINT."""
    describe_eval = describe_eval or _describe_mlm_eval
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
            _stop_nonfinite(at_step, max_streak, checkpointer)

    while step < num_steps:
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if step == start_step + 1:  # The first call compiled the step: time it apart.
            jax.block_until_ready(metrics)
            progress.message(
                f"Compiled and ran the first step in {time.monotonic() - window_start:.1f} s."
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
            writer.write(step, eval_metrics)
            progress.message(f"step {step}: eval {describe_eval(eval_metrics)}")
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


def _stop_nonfinite(step: int, streak: int, checkpointer: Checkpointer) -> None:
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
