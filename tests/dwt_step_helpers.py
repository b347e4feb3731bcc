"""A DWT train step with a teacher of another shape, built on any mesh.

Shared by the in-process mesh tests (tests/test_sharding.py) and the two-process
worker (tests/multihost_worker.py), so both compare the same computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from testutil import load_config

from dwt_jax import sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax.distill import make_strategy
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.optim import make_optimizer
from dwt_jax.state import TrainState, create_train_state, dummy_model_inputs

B, L, M, V = 16, 16, 4, 64


@contextlib.contextmanager
def fewer_xla_passes() -> Iterator[None]:
    """Compile with fewer XLA optimisation passes (compiling dominates these tests;
    the sharded and the single-device steps are compiled alike, and the SPMD
    partitioner still runs). Subprocesses get JAX_DISABLE_MOST_OPTIMIZATIONS=1."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def random_batch(seed: int, vocab: int = V, rows: int = B) -> dict[str, np.ndarray]:
    """A global batch with the pipeline's schema: two packed segments per row."""
    rng = np.random.default_rng(seed)
    B = rows
    input_ids = rng.integers(5, vocab, size=(B, L)).astype(np.int32)
    segment_ids = np.repeat([[1] * (L // 2) + [2] * (L // 2)], B, 0).astype(np.int32)
    positions = np.tile(np.arange(L // 2), (B, 2)).astype(np.int32)
    masked_positions = np.sort(
        np.stack([rng.choice(L, M, replace=False) for _ in range(B)]), -1
    ).astype(np.int32)
    masked_ids = np.take_along_axis(input_ids, masked_positions, 1)
    masked_input = input_ids.copy()
    np.put_along_axis(masked_input, masked_positions, 4, 1)
    return {
        "input_ids": masked_input,
        "segment_ids": segment_ids,
        "positions": positions,
        "token_type_ids": np.zeros((B, L), np.int32),
        "masked_positions": masked_positions,
        "masked_ids": masked_ids,
        "masked_weights": np.ones((B, M), np.float32),
    }


def dwt_config(dropout: float = 0.1, hidden_weight: float = 0.5):
    """configs/base.py:smoke, vocabulary 64: student 2×32, teacher 1×16 (2 heads)."""
    config = load_config("smoke", name="base")
    config.model.update(vocab_size=V, dropout_rate=dropout, attention_dropout_rate=dropout)
    config.teacher.model.update(vocab_size=V, hidden_size=16, mlp_dim=48)
    config.optim.update(learning_rate=3e-3, warmup_steps=0)
    config.distill.hidden_weight = hidden_weight
    return config


@dataclasses.dataclass
class DWTStep:
    state: TrainState
    step: Any
    teacher_params: Any
    mesh: jax.sharding.Mesh


def teacher_host_params(config) -> Any:
    """The teacher's weights as host NumPy arrays (seed 1), the same on every process."""
    model = make_model(BertConfig.from_config(config.teacher.model))
    params = model.init(jax.random.PRNGKey(1), **dummy_model_inputs(L, M), deterministic=True)
    return jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))


def build_dwt_step(
    devices, mesh_shape: tuple[int, int, int], *, teacher_sharding: str = "student", **kw
) -> DWTStep:
    config = dwt_config(**kw)
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config.mesh, devices)
    student_cfg = BertConfig.from_config(config.model)
    teacher_cfg = BertConfig.from_config(config.teacher.model)
    model, teacher_model = make_model(student_cfg), make_model(teacher_cfg)
    rules = sharding.teacher_rules(teacher_sharding)
    _, teacher_shardings = teachers_lib.abstract_params(teacher_model, mesh, rules)
    teacher_params = sharding.put_on_mesh(teacher_host_params(config), teacher_shardings)
    strategy = make_strategy(config.distill)
    optimizer, schedule = make_optimizer(config.optim, num_steps=100)
    materialise, _, shardings = create_train_state(
        seed=0,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_model_inputs(L, M),
        mesh=mesh,
        teacher_configs=[teacher_cfg],
    )
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in random_batch(0).items()}
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
        teacher_rules=[rules],
    )
    return DWTStep(materialise(), train_step, (teacher_params,), mesh)


def local_rows(global_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous slice of a global batch (process p: p-th block)."""
    count, index = jax.process_count(), jax.process_index()
    return {k: np.split(v, count)[index] for k, v in global_batch.items()}


def run_steps(built: DWTStep, num_steps: int = 2) -> tuple[Any, list[dict[str, float]]]:
    """``num_steps`` updates on fixed batches; (params on the host, metrics per step)."""
    state, history = built.state, []
    for index in range(num_steps):
        batch = sharding.shard_batch(local_rows(random_batch(index)), built.mesh)
        state, metrics = built.step(state, batch, built.teacher_params)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return sharding.to_host(state.params), history
