"""Dropout with a counter-based hash for its random bits (cheap on CPU, any mesh).

JAX's default PRNG (threefry2x32, 20 rounds per pair of words) costs more than the
layer it masks when the mask is large: in the issue-7 benchmark step (student 4×256,
batch 32×128) the dropout masks took about a third of the step on a 2-core CPU. Here
each element's bit comes from a 32-bit integer hash of its position and a per-call
seed instead:

    seed_0, seed_1 = 2 words of threefry(make_rng('dropout'))        # once per call
    r_i = mix(mix(row_i ^ seed_0) ^ (col_i + seed_1))                 # per element
    keep_i = r_i >= round(rate · 2³²)

``row_i`` is the element's index along the first axis and ``col_i`` its flat index
within that row, so up to 2³² elements per row get distinct counters. ``mix`` is
Wellons's "lowbias32" (two multiply/xor-shift rounds; bias ≈ 0.17, near the best
known for two rounds). The hash fuses into the consumer of the mask, so no mask is
stored for the backward pass, and ``iota`` is partitioned by XLA like any array:
the mask of an element is the same on one device and on any mesh.

This is not a cryptographic generator and its streams are not threefry's: the keep
probability is exact to 2⁻³², elements are pairwise uncorrelated in the tests'
measurements, and different calls (layers, steps) draw independent seeds from the
threefry key Flax gives each call. ``model.dropout_rng='threefry'`` restores Flax's
``nn.Dropout``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwt_jax.models.config import DROPOUT_RNGS


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32: a 32-bit integer hash with strong avalanche (uint32 → uint32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 pseudo-random bits of ``shape`` from a uint32[2] ``seed``.

    Element ``i`` gets ``mix(mix(row ^ seed[0]) ^ (col + seed[1]))`` with ``row`` its
    index on axis 0 and ``col`` its flat (row-major) index over the other axes.
    """
    seed = jnp.asarray(seed, jnp.uint32)
    if seed.shape != (2,):
        raise ValueError(f"seed must be uint32[2], got shape {seed.shape}")
    if not shape:
        return hash_bits(seed, (1,))[0]
    row = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    col = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):
        col = col + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride = (stride * shape[axis]) % 2**32
    return _mix(_mix(row ^ seed[0]) ^ (col + seed[1]))


def keep_threshold(rate: float) -> int:
    """The uint32 threshold t with P(bits ≥ t) = 1 − rate (to 2⁻³²)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return min(round(rate * 2**32), 2**32 - 1)


def hash_dropout(x: jax.Array, rate: float, seed: jax.Array) -> jax.Array:
    """Inverted dropout of ``x``: zero with probability ``rate``, else ``x / (1 − rate)``."""
    if rate == 0.0:
        return x
    keep = hash_bits(seed, x.shape) >= jnp.uint32(keep_threshold(rate))
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (``rate``, ``__call__(x, deterministic)``) choosing
    its random bits by ``rng``: 'hash' (above) or 'threefry' (``nn.Dropout``)."""

    rate: float
    rng: str = "hash"
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.rng not in DROPOUT_RNGS:
            raise ValueError(
                f"model.dropout_rng={self.rng!r} is unknown: use one of {DROPOUT_RNGS}."
            )
        if self.rng == "threefry":
            return nn.Dropout(self.rate, rng_collection=self.rng_collection)(
                x, deterministic=deterministic
            )
        if deterministic or self.rate == 0.0:
            return x
        key = self.make_rng(self.rng_collection)
        return hash_dropout(x, self.rate, jax.random.bits(key, (2,), jnp.uint32))
