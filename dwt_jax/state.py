"""The train state, and its creation: by shape first, then sharded, then materialised."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from dwt_jax import sharding
from dwt_jax.distill import Strategy
from dwt_jax.models.config import BertConfig

MODEL_INPUT_NAMES = ("input_ids", "segment_ids", "positions", "token_type_ids")


@flax.struct.dataclass
class TrainState:
    """Everything a train step updates; saved whole in checkpoints (teachers never are).

    ``params`` holds the student under 'student' and, beside it, whatever a strategy
    trains with it (projections, a policy network): one optimiser covers them all.
    """

    step: jax.Array  # int32 [], the number of updates applied so far.
    params: dict[str, Any]
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2], the root key; step keys are fold_in(rng, step).
    strategy_state: dict[str, Any]
    # Steps whose loss or gradients were not finite: their updates were skipped
    # (params, optimiser and strategy state kept). int32 [] each.
    nonfinite_streak: jax.Array  # Consecutive, up to and including the last step.
    nonfinite_skipped: jax.Array  # In the whole run.


def dummy_model_inputs(seq_len: int, max_predictions: int) -> dict[str, jax.Array]:
    """Inputs of the right rank and dtype for tracing a BERT model (batch of one)."""
    inputs = {name: jnp.ones((1, seq_len), jnp.int32) for name in MODEL_INPUT_NAMES}
    inputs["masked_positions"] = jnp.zeros((1, max_predictions), jnp.int32)
    return inputs


def dummy_inputs(model: nn.Module, seq_len: int, max_predictions: int = 2) -> dict[str, jax.Array]:
    """Inputs of the right rank and dtype for tracing ``model`` (batch of one): every
    field it reads (``model.input_names``) as [1, L], masked positions as [1, M]."""
    inputs = {name: jnp.ones((1, seq_len), jnp.int32) for name in model.input_names}
    if "masked_positions" in inputs:
        inputs["masked_positions"] = jnp.zeros((1, max_predictions), jnp.int32)
    return inputs


def init_boxed_state(
    rng: jax.Array,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    strategy: Strategy,
    model_inputs: dict[str, jax.Array],
    teacher_configs: tuple[BertConfig, ...],
) -> TrainState:
    params_rng, adapters_rng, state_rng = jax.random.split(rng, 3)
    student = model.init(params_rng, **model_inputs, deterministic=True)["params"]
    params = {"student": student}
    # A `TeacherEnsemble` being co-finetuned has several configs and no `config`.
    student_config = getattr(model, "config", None)
    adapters = strategy.init_adapters(adapters_rng, student_config, teacher_configs)
    if adapters:
        params["adapters"] = adapters
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=state_rng,
        strategy_state=strategy.init_state(
            jax.random.fold_in(adapters_rng, 1), student_config, teacher_configs
        ),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_skipped=jnp.zeros((), jnp.int32),
    )


def create_train_state(
    *,
    seed: int,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    strategy: Strategy,
    model_inputs: dict[str, jax.Array],
    mesh: Mesh,
    teacher_configs: Sequence[BertConfig] = (),
) -> tuple[Callable[[], TrainState], TrainState, Any]:
    """Plans the state by shape and returns (materialise, abstract state, shardings).

    Nothing is allocated until ``materialise()`` is called: the abstract state (shapes
    only) is enough to restore a checkpoint into, and each parameter is created
    directly in its shard by a jitted init with ``out_shardings``.
    """
    init_fn = functools.partial(
        init_boxed_state,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=model_inputs,
        teacher_configs=tuple(teacher_configs),
    )
    rng = jax.random.PRNGKey(seed)
    abstract, shardings = sharding.abstract_on_mesh(jax.eval_shape(init_fn, rng), mesh)
    jitted = jax.jit(lambda key: nn.meta.unbox(init_fn(key)), out_shardings=shardings)

    # Traced without the mesh context: out_shardings alone place every parameter
    # (constraints inside initialisers would see DenseGeneral's flattened kernels).
    return functools.partial(jitted, rng), abstract, shardings


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
