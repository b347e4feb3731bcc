"""The pure train step, and its compiled form. (Held-out evaluation is the objective's:
``dwt_jax.objectives.base.make_evaluator``.)

``train_step`` is one pure function of (state, batch, teacher params). The student
runs inside ``value_and_grad``; every teacher runs before it, outside, under
``stop_gradient``; the strategy turns both, with a `StepContext` (step, strategy
state, adapters, key), into a loss. ``make_train_step`` binds the models, strategy
and optimiser and compiles it once with shardings and donation of the old state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from dwt_jax import sharding
from dwt_jax.distill import StepContext, Strategy, Teachers
from dwt_jax.errors import ConfigError
from dwt_jax.models.ensemble import TeacherEnsemble, member_param_counts
from dwt_jax.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def forward(
    model: nn.Module,
    params: Any,
    batch: Batch,
    *,
    deterministic: bool,
    dropout_rng: jax.Array | None = None,
    output_kwargs: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """One model's outputs on the batch, as the model names them (``step_outputs``).

    The model reads the batch fields it declares (``input_names``). `BertMLM`:
    'mlm_logits' [B,M,V] at the masked positions and 'mlm_decoder'; `BertClassifier`:
    'logits' [B,C]; `TeacherEnsemble`: 'logits' [K,B,C] and 'members'; a causal LM
    (`dwt_jax.models.decoder.CausalLM`): 'lm_logits' [B,L,V], 'lm_hidden', 'lm_decoder'.
    """
    inputs = {name: batch[name] for name in model.input_names}
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    logits, out = model.apply(
        {"params": params},
        **inputs,
        deterministic=deterministic,
        rngs=rngs,
        **(output_kwargs or {}),
    )
    return model.step_outputs(params, logits, out)


def teacher_sizes(teacher_models: Sequence[nn.Module], teacher_params: Sequence[Any]) -> list[int]:
    """Parameter counts of every teacher (an ensemble counts as its members)."""
    sizes: list[int] = []
    for t_model, t_params in zip(teacher_models, teacher_params, strict=True):
        if isinstance(t_model, TeacherEnsemble):
            sizes.extend(member_param_counts(t_params, len(t_model.configs)))
        elif hasattr(t_model, "num_params"):  # A cached teacher: its size, no params here.
            sizes.append(int(t_model.num_params))
        else:
            sizes.append(sum(int(x.size) for x in jax.tree.leaves(t_params)))
    return sizes


def run_teachers(
    teacher_models: Sequence[nn.Module],
    teacher_params: Sequence[Any],
    batch: Batch,
    output_kwargs: Mapping[str, bool] | None = None,
    teacher_rules: Sequence[sharding.Rules] | None = None,
) -> list[dict[str, Any]]:
    """Every teacher's deterministic outputs under ``stop_gradient``; an ensemble's
    members come out as separate teachers with their 'logits' [B,C].

    ``teacher_rules`` (one table per teacher, default the student's) lays out each
    teacher's activations as its parameters are laid out."""
    outputs: list[dict[str, Any]] = []
    rules_list = teacher_rules or [sharding.LOGICAL_AXIS_RULES] * len(teacher_models)
    for t_model, t_params, rules in zip(teacher_models, teacher_params, rules_list, strict=True):
        with nn.logical_axis_rules(rules):
            out = forward(t_model, t_params, batch, deterministic=True, output_kwargs=output_kwargs)
        if isinstance(t_model, TeacherEnsemble):
            outputs.extend(
                {**member, "logits": out["logits"][k]} for k, member in enumerate(out["members"])
            )
        else:
            outputs.append(out)
    return [jax.lax.stop_gradient(o) for o in outputs]


def _micro_step(
    params: dict[str, Any],
    batch: Batch,
    teacher_params: Sequence[Any],
    step: jax.Array,
    strategy_state: dict[str, Any],
    dropout_rng: jax.Array,
    *,
    model: nn.Module,
    teacher_models: Sequence[nn.Module],
    strategy: Strategy,
    teacher_rules: Sequence[sharding.Rules] | None = None,
) -> tuple[Any, Metrics, dict[str, Any], dict[str, Any], Teachers]:
    """Gradients, metrics, new strategy state, the student's outputs and the teachers
    for one (micro-)batch."""
    dropout_rng, strategy_rng = jax.random.split(dropout_rng)
    sizes = teacher_sizes(teacher_models, teacher_params)

    def run(rows_batch: Batch) -> list[dict[str, Any]]:
        return run_teachers(
            teacher_models,
            teacher_params,
            rows_batch,
            strategy.teacher_output_kwargs,
            teacher_rules,
        )

    # 'full': every teacher on the whole batch, here, outside the gradient.
    full_teachers = Teachers(run, batch, sizes)
    if strategy.teacher_forward == "full" and sizes:
        full_teachers.all()

    def loss_fn(trainable: dict[str, Any]):
        student_outputs = forward(
            model,
            trainable["student"],
            batch,
            deterministic=False,
            dropout_rng=dropout_rng,
            output_kwargs=strategy.student_output_kwargs,
        )
        # 'lazy': the strategy runs the teachers inside the loss, on rows it picks.
        teachers = (
            full_teachers if strategy.teacher_forward == "full" else Teachers(run, batch, sizes)
        )
        ctx = StepContext(
            step=step,
            state=strategy_state,
            adapters=trainable.get("adapters", {}),
            rng=strategy_rng,
        )
        loss, metrics, new_state = strategy.loss(student_outputs, teachers, batch, ctx)
        return loss, (metrics, new_state, jax.lax.stop_gradient(student_outputs))

    (loss, (metrics, new_state, student_outputs)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(params)
    return grads, {"train/loss": loss, **metrics}, new_state, student_outputs, full_teachers


def _split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] → [A, B/A, ...], micro-batch a = rows a, a+A, ... (keeps batch sharding)."""

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {name: split(value) for name, value in batch.items()}


def train_step(
    state: TrainState,
    batch: Batch,
    teacher_params: Sequence[Any],
    *,
    model: nn.Module,
    teacher_models: Sequence[nn.Module],
    strategy: Strategy,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    teacher_rules: Sequence[sharding.Rules] | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimiser update from one global batch (split into micro-batches if asked).

    The run's plan has checked the strategy's setup (``Strategy.check_setup``); the
    step only refuses what its own mechanics cannot do.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    micro = functools.partial(
        _micro_step,
        model=model,
        teacher_models=teacher_models,
        strategy=strategy,
        teacher_rules=teacher_rules,
    )
    if grad_accum_steps == 1:
        grads, metrics, strategy_state, student_outputs, teachers = micro(
            state.params, batch, teacher_params, state.step, state.strategy_state, step_rng
        )
    else:
        if strategy.has_after_update:  # The hook needs the one batch the update saw.
            raise ConfigError(
                f"distill.strategy={strategy.name!r} updates its policy after every "
                "optimiser step; set optim.grad_accum_steps=1."
            )

        def accumulate(carry, inputs):
            grad_sum, strategy_state = carry
            micro_batch, index = inputs
            grads, metrics, strategy_state, _, _ = micro(
                state.params,
                micro_batch,
                teacher_params,
                state.step,
                strategy_state,
                jax.random.fold_in(step_rng, index),
            )
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, strategy_state), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, strategy_state), metrics_A = jax.lax.scan(
            accumulate,
            (zeros, state.strategy_state),
            (_split_micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps)),
        )
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
        metrics = jax.tree.map(jnp.mean, metrics_A)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grads/global_norm"] = optax.global_norm(grads)
    metrics["params/global_norm"] = optax.global_norm(params)
    metrics["optim/lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    if strategy.has_after_update:
        student_after = forward(model, params["student"], batch, deterministic=True)
        strategy_state, after_metrics = strategy.after_update(
            student=student_outputs,
            student_after=jax.lax.stop_gradient(student_after),
            teachers=teachers,
            batch=batch,
            ctx=StepContext(
                step=state.step,
                state=strategy_state,
                adapters=params.get("adapters", {}),
                rng=jax.random.split(step_rng)[1],
            ),
        )
        metrics.update(after_metrics)
    # The non-finite guard: a step whose loss or gradients hold a NaN or an Inf
    # changes nothing but the step count (and the data position); the loop decides
    # when a streak of them ends the run (train.max_nonfinite_streak).
    finite = all_finite((metrics["train/loss"], grads))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    skipped = state.nonfinite_skipped + (~finite).astype(jnp.int32)
    metrics["train/nonfinite_streak"] = streak
    metrics["train/nonfinite_skipped"] = skipped
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        strategy_state=keep(strategy_state, state.strategy_state),
        nonfinite_streak=streak,
        nonfinite_skipped=skipped,
    )
    return new_state, metrics


def all_finite(tree: Any) -> jax.Array:
    """bool []: every element of every floating-point array in ``tree`` is finite."""
    checks = [
        jnp.isfinite(x).all()
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.stack(checks).all() if checks else jnp.asarray(True)


def make_train_step(
    *,
    model: nn.Module,
    strategy: Strategy,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: Any,
    batch_shardings: Any,
    grad_accum_steps: int = 1,
    teacher_models: Sequence[nn.Module] = (),
    teacher_shardings: Sequence[Any] = (),
    teacher_rules: Sequence[sharding.Rules] | None = None,
) -> Callable[[TrainState, Batch, Sequence[Any]], tuple[TrainState, Metrics]]:
    """``train_step`` compiled once: sharded in and out, the old state donated.

    ``teacher_rules`` gives each teacher's layout (``sharding.TEACHER_RULES``); its
    params must arrive in ``teacher_shardings`` made by the same rules."""
    step_fn = functools.partial(
        train_step,
        model=model,
        teacher_models=tuple(teacher_models),
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        grad_accum_steps=grad_accum_steps,
        teacher_rules=None if teacher_rules is None else tuple(teacher_rules),
    )
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, tuple(teacher_shardings)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    def run(state: TrainState, batch: Batch, teacher_params: Sequence[Any] = ()):
        with sharding.activate(mesh):
            return jitted(state, batch, tuple(teacher_params))

    run.jitted = jitted  # For lowering/inspection (e.g. counting compilations).
    return run
