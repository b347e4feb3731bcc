"""Train and eval steps: learning, gradient accumulation, layouts, no recompiles.

Sharded == single-device steps (a DWT step, which includes the MLM loss, on three
meshes and every teacher layout) are in tests/test_sharding.py."""

from __future__ import annotations

import dwt_step_helpers
import jax
import numpy as np
import pytest
from testutil import load_config

from dwt_jax import sharding, steps
from dwt_jax.distill import MLMStrategy, make_strategy
from dwt_jax.errors import ConfigError
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.optim import make_optimizer
from dwt_jax.state import create_train_state, dummy_model_inputs

B, L, M = 8, 16, 4


def random_batch(seed: int, vocab: int) -> dict[str, np.ndarray]:
    return dwt_step_helpers.random_batch(seed, vocab, rows=B)


def build(mesh_shape=(1, 1, 1), *, dropout=0.0, grad_accum_steps=1, lr=3e-3, strategy=None):
    config = load_config("smoke")
    config.model.update(dropout_rate=dropout, attention_dropout_rate=dropout, vocab_size=64)
    config.optim.update(learning_rate=lr, warmup_steps=0, grad_accum_steps=grad_accum_steps)
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(config.mesh, devices)
    model = make_model(BertConfig.from_config(config.model))
    strategy = strategy or make_strategy(config.distill)
    optimizer, schedule = make_optimizer(config.optim, num_steps=100)
    materialise, _, shardings = create_train_state(
        seed=0,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_model_inputs(L, M),
        mesh=mesh,
    )
    batch_shardings = {k: sharding.batch_sharding(mesh, 2) for k in random_batch(0, 64)}
    train_step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
        grad_accum_steps=grad_accum_steps,
    )
    return materialise(), train_step, mesh


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    state, train_step, mesh = build(dropout=0.1)
    batch = sharding.shard_batch(random_batch(0, 64), mesh)
    losses = []
    for _ in range(25):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 25
    assert train_step.jitted._cache_size() == 1  # Compiled once for all 25 steps.
    for name in ("train/mlm_accuracy", "grads/global_norm", "optim/lr", "params/global_norm"):
        assert np.isfinite(float(metrics[name]))


def _one_step(mesh_shape, grad_accum_steps=1):
    state, train_step, mesh = build(mesh_shape, grad_accum_steps=grad_accum_steps)
    batch = sharding.shard_batch(random_batch(1, 64), mesh)
    state, metrics = train_step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_step():
    return _one_step((1, 1, 1))


def test_gradient_accumulation_matches_the_full_batch(single_device_step):
    params, metrics = single_device_step
    params_accum, metrics_accum = _one_step((1, 1, 1), grad_accum_steps=2)
    np.testing.assert_allclose(metrics_accum["train/loss"], metrics["train/loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_accum, params
    )


def test_parameters_are_sharded_by_the_logical_rules():
    state, _, _ = build((2, 2, 2))
    layer = state.params["student"]["bert"]["encoder"]["layer_0"]
    spec = lambda x: tuple(x.sharding.spec)
    assert spec(layer["attention"]["self"]["query"]["kernel"])[:2] == ("fsdp", "tensor")
    assert spec(layer["intermediate"]["dense"]["kernel"]) == ("fsdp", "tensor")
    word = state.params["student"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert spec(word) == ("tensor", "fsdp")
    mu = state.opt_state[1][0].mu["student"]["bert"]["embeddings"]["word_embeddings"]
    assert spec(mu["embedding"]) == ("tensor", "fsdp")  # Optimiser state follows params.


class _UpdatesItself(MLMStrategy):
    has_after_update = True


def test_step_refuses_accumulation_with_an_after_update_hook():
    """The plan refuses it first (Strategy.check_setup); the step, which cannot run the
    hook over micro-batches, refuses it too, while tracing."""
    state, train_step, mesh = build(grad_accum_steps=2, strategy=_UpdatesItself())
    batch = sharding.shard_batch(random_batch(0, 64), mesh)
    with pytest.raises(ConfigError, match=r"updates its policy .* set optim\.grad_accum_steps=1\."):
        train_step(state, batch)
