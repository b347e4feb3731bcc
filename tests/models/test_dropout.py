"""The hash dropout: keep rate, scaling, independence, determinism, mesh invariance."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwt_jax.models.dropout import Dropout, hash_bits, hash_dropout, keep_threshold

SEED = jnp.array([12345, 678], jnp.uint32)


@pytest.fixture(scope="module")
def bits() -> np.ndarray:
    return np.asarray(jax.jit(hash_bits, static_argnums=1)(SEED, (64, 8, 128, 128)))


def test_keep_rate_is_exact_within_sampling_error(bits):
    for rate in (0.1, 0.5, 0.9):
        kept = (bits >= keep_threshold(rate)).mean()
        sigma = np.sqrt(rate * (1 - rate) / bits.size)
        assert abs(kept - (1 - rate)) < 5 * sigma, (rate, kept)


def test_bits_are_uniform_and_uncorrelated(bits):
    # Uniform over 256 bins of the top byte: chi-square far below the 0.1% tail (≈330).
    counts = np.bincount((bits >> 24).ravel(), minlength=256)
    expected = bits.size / 256
    assert ((counts - expected) ** 2 / expected).sum() < 330
    # Neighbours along every axis, and rows, are uncorrelated (|r| < 5/sqrt(n)).
    u = bits.astype(np.float64) / 2**32 - 0.5
    for axis in range(u.ndim):
        a, b = np.moveaxis(u, axis, 0)[:-1].ravel(), np.moveaxis(u, axis, 0)[1:].ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size), axis
    # Every bit position is a fair coin.
    for bit in (0, 1, 15, 16, 31):
        assert abs(((bits >> bit) & 1).mean() - 0.5) < 5 * 0.5 / np.sqrt(bits.size), bit


def test_seeds_give_independent_masks():
    shape = (256, 1024)
    base = np.asarray(hash_bits(SEED, shape)) >= keep_threshold(0.5)
    for other in ([12345, 679], [12344, 678], [0, 0]):
        mask = np.asarray(hash_bits(jnp.array(other, jnp.uint32), shape)) >= keep_threshold(0.5)
        agree = (mask == base).mean()
        assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(base.size), other
    again = np.asarray(hash_bits(SEED, shape)) >= keep_threshold(0.5)
    np.testing.assert_array_equal(again, base)


def test_dropout_zeroes_or_scales():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 64)) + 3.0, jnp.float32)
    y = np.asarray(hash_dropout(x, 0.25, SEED))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0 < kept.mean() < 1
    assert hash_dropout(x, 0.0, SEED) is x
    with pytest.raises(ValueError, match="dropout rate"):
        keep_threshold(1.0)


def test_mask_is_the_same_on_any_mesh():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("a", "b"))
    shape = (8, 6, 16)
    out = NamedSharding(mesh, PartitionSpec("a", None, "b"))
    sharded = jax.jit(hash_bits, static_argnums=1, out_shardings=out)(SEED, shape)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(hash_bits(SEED, shape)))


class _TwoSites(nn.Module):
    rng: str

    @nn.compact
    def __call__(self, x, deterministic):
        return Dropout(0.5, self.rng)(x, deterministic), Dropout(0.5, self.rng)(x, deterministic)


def test_module_draws_a_seed_per_site_and_per_key():
    x = jnp.ones((64, 64))
    first, second = _TwoSites("hash").apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    assert 0.3 < float((first != second).mean()) < 0.7  # Two sites, two masks.
    again, _ = _TwoSites("hash").apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(again, first)
    other, _ = _TwoSites("hash").apply({}, x, False, rngs={"dropout": jax.random.key(1)})
    assert 0.3 < float((other != first).mean()) < 0.7
    same, _ = _TwoSites("hash").apply({}, x, True)
    np.testing.assert_array_equal(same, x)


def test_threefry_option_is_flax_dropout():
    x = jnp.ones((16, 16))
    key = jax.random.key(3)
    ours = Dropout(0.3, "threefry").apply({}, x, False, rngs={"dropout": key})
    flax_y = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
    # Flax's module sits one scope deeper, so the bits differ; the law is the same.
    for y in (np.asarray(ours), np.asarray(flax_y)):
        assert np.all(np.isclose(y, 0.0) | np.isclose(y, 1 / 0.7)), y
        assert 0.4 < np.isclose(y, 1 / 0.7).mean() < 0.95
    with pytest.raises(ValueError, match="dropout_rng"):
        Dropout(0.3, "philox").apply({}, x, False, rngs={"dropout": key})
