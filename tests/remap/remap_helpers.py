"""Shared tiny configs, teachers and a packed batch for the tests/remap tests."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax.models import BertConfig, make_model

B, L, M, V = 2, 16, 4, 50
TEACHER = BertConfig(
    vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=L, norm="pre"
)
STUDENT = dataclasses.replace(TEACHER, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64)


def packed_batch(seed: int = 0) -> dict[str, jax.Array]:
    """Two packed segments per row (lengths 9+5 and 6+10), padding after the first row's."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    for row, lengths in enumerate(((9, 5), (6, 10))):
        start = 0
        for segment, length in enumerate(lengths, start=1):
            segment_ids[row, start : start + length] = segment
            positions[row, start : start + length] = np.arange(length)
            start += length
    real = segment_ids > 0
    return {
        "input_ids": jnp.asarray(np.where(real, rng.integers(1, V, (B, L)), 0), jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(positions),
        "token_type_ids": jnp.asarray(real & (positions >= 3), jnp.int32),
        "masked_positions": jnp.asarray([[1, 4, 10, 13], [0, 5, 8, 15]], jnp.int32),
    }


def init_params(cfg: BertConfig, seed: int = 0, head: str = "mlm") -> dict[str, Any]:
    """A fresh (unboxed) parameter tree."""
    variables = make_model(cfg, head).init(
        jax.random.key(seed), **packed_batch(), deterministic=True
    )
    return nn.meta.unbox(variables["params"])


@functools.cache
def trained_like(cfg: BertConfig, seed: int = 0, head: str = "mlm") -> dict[str, Any]:
    """A fresh init with N(0, 0.1) added to every leaf (biases and LayerNorms included),
    so no parameter keeps its trivial initial value and outputs are far from uniform."""
    params = init_params(cfg, seed, head)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed + 1000)
    noisy = [np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def forward(cfg: BertConfig, params: dict[str, Any], batch: dict | None = None) -> tuple:
    """(MLM logits [B,M,V], last hidden states [B,L,D]) with dropout off."""
    logits, out = make_model(cfg).apply(
        {"params": params},
        **(batch or packed_batch()),
        deterministic=True,
        output_hidden_states=True,
    )
    return np.asarray(logits), np.asarray(out["hidden_states"][-1])


def mlm_kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(p_teacher || p_student) over masked positions."""
    log_p = jax.nn.log_softmax(jnp.asarray(teacher_logits), axis=-1)
    log_q = jax.nn.log_softmax(jnp.asarray(student_logits), axis=-1)
    return float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)))
