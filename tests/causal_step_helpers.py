"""A causal DWT train step (a Llama student with grouped-query attention, a GPT-2
teacher of another width: families may differ when the vocabulary is one), built on
any mesh; and causal batches with the pipeline's schema."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import linen as nn
from testutil import load_config

from dwt_jax import sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax.distill import make_strategy
from dwt_jax.models.families import make_lm, model_config_from
from dwt_jax.optim import make_optimizer
from dwt_jax.state import create_train_state, dummy_inputs

B, L, V = 16, 16, 64


def causal_batch(seed: int, rows: int = B) -> dict[str, np.ndarray]:
    """Two documents per row (the second shorter, then padding): targets are the next
    token of the same document; the last token of each and the padding predict nothing."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, V, size=(rows, L)).astype(np.int32)
    first, second = 7, 6
    segment_ids = np.array([[1] * first + [2] * second + [0] * (L - first - second)] * rows)
    positions = np.array([list(range(first)) + list(range(second)) + [0] * (L - first - second)])
    positions = np.repeat(positions, rows, 0)
    same_next = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    targets = np.zeros_like(input_ids)
    targets[:, :-1] = np.where(same_next, input_ids[:, 1:], 0)
    weights = np.zeros((rows, L), np.float32)
    weights[:, :-1] = same_next
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
        "targets": targets,
        "target_weights": weights,
    }


def causal_config(divergence: str = "kl"):
    """configs/causal.py:smoke with vocabulary 64: a Llama student 2×32 (4 heads, 2 KV
    heads, untied head) and a GPT-2 teacher 1×16 (2 heads)."""
    config = load_config("smoke", name="causal")
    config.model.update(vocab_size=V, tie_embeddings=False, dropout_rate=0.1)
    config.teacher.model.update(family="gpt2", vocab_size=V, num_heads=2, num_kv_heads=0)
    config.optim.update(learning_rate=3e-3, warmup_steps=0)
    config.distill.divergence = divergence
    config.distill.vocab_chunk_size = 24  # Three slices, the last one short.
    return config


def teacher_host_params(config) -> Any:
    model = make_lm(model_config_from(config.teacher.model))
    params = model.init(jax.random.PRNGKey(1), **dummy_inputs(model, L), deterministic=True)
    return jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))


def build_causal_step(
    devices, mesh_shape: tuple[int, int, int], divergence: str = "kl", alpha_s=None
):
    """(initial state, compiled step, teacher params, mesh) of a causal DWT step; the
    step function also carries what built it (``.parts``: model, strategy, optimiser,
    schedule and shardings), to build another step for the same state."""
    config = causal_config(divergence)
    if alpha_s is not None:
        config.distill.alpha_s = alpha_s
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config.mesh, devices)
    student_cfg = model_config_from(config.model)
    teacher_cfg = model_config_from(config.teacher.model)
    model, teacher_model = make_lm(student_cfg), make_lm(teacher_cfg)
    _, teacher_shardings = teachers_lib.abstract_params(teacher_model, mesh)
    teacher_params = sharding.put_on_mesh(teacher_host_params(config), teacher_shardings)
    strategy = make_strategy(config.distill)
    optimizer, schedule = make_optimizer(config.optim, num_steps=100)
    materialise, _, shardings = create_train_state(
        seed=0,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_inputs(model, L),
        mesh=mesh,
        teacher_configs=[teacher_cfg],
    )
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in causal_batch(0).items()}
    train_step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        state_shardings=shardings,
        batch_shardings=batch_shardings,
        teacher_models=[teacher_model],
        teacher_shardings=[teacher_shardings],
    )
    train_step.parts = {
        "model": model,
        "strategy": strategy,
        "optimizer": optimizer,
        "schedule": schedule,
        "mesh": mesh,
        "state_shardings": shardings,
        "batch_shardings": batch_shardings,
    }
    return materialise(), train_step, (teacher_params,), mesh


def run_causal_steps(built, num_steps: int = 2) -> tuple[Any, list[dict[str, float]]]:
    """``num_steps`` updates on fixed batches: (params on the host, metrics per step)."""
    state, step, teacher_params, mesh = built
    history = []
    for index in range(num_steps):
        batch = sharding.shard_batch(causal_batch(index), mesh)
        state, metrics = step(state, batch, teacher_params)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return sharding.to_host(state.params), history
