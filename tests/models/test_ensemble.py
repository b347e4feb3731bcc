"""TeacherEnsemble: K encoders without their own pooler, one shared pooler and classifier."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax.models.bert import BertEncoder
from dwt_jax.models.config import BertConfig
from dwt_jax.models.ensemble import TeacherEnsemble, member_name, member_param_counts

B, L, V, C = 3, 12, 50, 4


def _config(hidden: int, layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        mlp_dim=2 * hidden,
        max_len=L,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        initializer_range=0.2,
        num_labels=C,
    )


# Member 1 is the widest (no projection); members 0 and 2 are narrower.
CONFIGS = (_config(8, 1), _config(16, 2), _config(12, 1))
WIDEST = 16


def _batch(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    lengths = np.array([L, 7, 9])
    real = np.arange(L)[None, :] < lengths[:, None]
    return {
        "input_ids": jnp.asarray(np.where(real, rng.integers(1, V, (B, L)), 0), jnp.int32),
        "segment_ids": jnp.asarray(real, jnp.int32),
        "positions": jnp.asarray(np.where(real, np.arange(L), 0), jnp.int32),
        "token_type_ids": jnp.asarray(real & (np.arange(L) >= 4), jnp.int32),
    }


@pytest.fixture(scope="module")
def model() -> TeacherEnsemble:
    return TeacherEnsemble(CONFIGS, C)


@pytest.fixture(scope="module")
def params(model: TeacherEnsemble) -> dict:
    """Random parameters in the initialiser's tree (compiling the initialiser itself
    takes half a minute on a loaded 2-core machine; its shapes are all we need)."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **_batch(), deterministic=True)["params"]
    )
    rng = np.random.default_rng(0)

    def leaf(path, x):
        if getattr(path[-1], "key", "") == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=x.shape), x.dtype)
        return jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes))


@pytest.fixture(scope="module")
def apply(model: TeacherEnsemble):
    return jax.jit(
        lambda p, batch: model.apply({"params": p}, **batch, deterministic=True),
    )


@pytest.fixture(scope="module")
def apply_hidden(model: TeacherEnsemble):
    return jax.jit(
        lambda p, batch: model.apply(
            {"params": p}, **batch, deterministic=True, output_hidden_states=True
        )
    )


@functools.cache
def _standalone_encoder(cfg: BertConfig):
    """A standalone `BertEncoder(cfg, add_pooler=False)`, jitted: (sequence, hidden states)."""

    def run(params, batch):
        seq_BxLxD, out = BertEncoder(cfg, add_pooler=False).apply(
            {"params": params},
            batch["input_ids"],
            batch["segment_ids"],
            batch["positions"],
            batch["token_type_ids"],
            True,
            True,
        )
        return seq_BxLxD, out["hidden_states"]

    return jax.jit(run)


def _member_by_hand(params: dict, k: int, batch: dict) -> np.ndarray:
    """Member k's logits: standalone encoder → [CLS] → projection? → shared head (NumPy)."""
    cfg = CONFIGS[k]
    seq_BxLxD, _ = _standalone_encoder(cfg)(params[member_name(k)], batch)
    cls = np.asarray(seq_BxLxD[:, 0], np.float64)
    if cfg.hidden_size != WIDEST:
        proj = params[f"projection_{k}"]
        cls = cls @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"], np.float64)
    pooler = params["pooler"]["dense"]
    pooled = np.tanh(cls @ np.asarray(pooler["kernel"], np.float64) + np.asarray(pooler["bias"]))
    head = params["classifier"]["dense"]
    return pooled @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)


def test_param_tree_names(params: dict) -> None:
    expected = {
        "teacher_0",
        "teacher_1",
        "teacher_2",
        "projection_0",
        "projection_2",
        "pooler",
        "classifier",
    }
    assert set(params) == expected
    for k in range(len(CONFIGS)):
        # The members are encoders without a pooler of their own.
        assert set(params[member_name(k)]) == {"embeddings", "encoder"}
        layers = params[member_name(k)]["encoder"]
        assert set(layers) == {f"layer_{i}" for i in range(CONFIGS[k].num_layers)}
        emb = params[member_name(k)]["embeddings"]["word_embeddings"]["embedding"]
        assert emb.shape == (V, CONFIGS[k].hidden_size)
    # Projections map a narrower member's [CLS] to the widest width.
    assert params["projection_0"]["kernel"].shape == (8, WIDEST)
    assert params["projection_2"]["kernel"].shape == (12, WIDEST)
    assert params["projection_2"]["bias"].shape == (WIDEST,)
    # One shared pooler and classifier, at the shared width.
    assert set(params["pooler"]) == {"dense"}
    assert params["pooler"]["dense"]["kernel"].shape == (WIDEST, WIDEST)
    assert set(params["classifier"]) == {"dense"}
    assert params["classifier"]["dense"]["kernel"].shape == (WIDEST, C)
    assert params["classifier"]["dense"]["bias"].shape == (C,)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    poolers = [p for p, _ in flat if any(getattr(e, "key", None) == "pooler" for e in p)]
    assert len(poolers) == 2  # kernel + bias, once.


def test_equal_widths_have_no_projection() -> None:
    model = TeacherEnsemble((_config(8, 1), _config(8, 2)), C)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **_batch(), deterministic=True)["params"]
    )
    assert set(shapes) == {"teacher_0", "teacher_1", "pooler", "classifier"}


def test_logits_shape_and_dtype(params: dict, apply) -> None:
    logits, out = apply(params, _batch())
    assert logits.shape == (len(CONFIGS), B, C)
    assert logits.dtype == jnp.float32
    assert len(out["members"]) == len(CONFIGS)
    for member in out["members"]:
        assert member["pooled"].shape == (B, WIDEST)
        assert "hidden_states" not in member


def test_member_logits_match_hand_assembled_computation(params: dict, apply) -> None:
    batch = _batch(1)
    logits, _ = apply(params, batch)
    for k in range(len(CONFIGS)):
        expected = _member_by_hand(params, k, batch)
        np.testing.assert_allclose(np.asarray(logits[k]), expected, rtol=1e-5, atol=1e-5)
    # The members really differ (different encoders).
    assert not np.allclose(logits[0], logits[1], atol=1e-3)


def test_shared_classifier_changes_every_member(params: dict, apply) -> None:
    batch = _batch(2)
    logits, _ = apply(params, batch)
    changed = jax.tree.map(lambda x: x, params)
    changed["classifier"]["dense"]["kernel"] = params["classifier"]["dense"]["kernel"] * 1.5
    logits_changed, _ = apply(changed, batch)
    for k in range(len(CONFIGS)):
        assert np.max(np.abs(logits_changed[k] - logits[k])) > 1e-3, k
    # The shared pooler as well.
    changed = jax.tree.map(lambda x: x, params)
    changed["pooler"]["dense"]["bias"] = params["pooler"]["dense"]["bias"] + 0.5
    logits_changed, _ = apply(changed, batch)
    for k in range(len(CONFIGS)):
        assert np.max(np.abs(logits_changed[k] - logits[k])) > 1e-3, k


def test_member_params_change_only_that_member(params: dict, apply) -> None:
    batch = _batch(3)
    logits, _ = apply(params, batch)
    changed = jax.tree.map(lambda x: x, params)
    changed["teacher_2"] = jax.tree.map(lambda x: x * 1.3, params["teacher_2"])
    logits_changed, _ = apply(changed, batch)
    np.testing.assert_array_equal(logits_changed[0], logits[0])
    np.testing.assert_array_equal(logits_changed[1], logits[1])
    assert np.max(np.abs(logits_changed[2] - logits[2])) > 1e-3


def test_hidden_states_per_member(params: dict, apply_hidden) -> None:
    batch = _batch(4)
    logits, out = apply_hidden(params, batch)
    assert logits.shape == (len(CONFIGS), B, C)
    for k, (cfg, member) in enumerate(zip(CONFIGS, out["members"], strict=True)):
        hidden = member["hidden_states"]
        assert len(hidden) == cfg.num_layers + 1
        for h in hidden:
            assert h.shape == (B, L, cfg.hidden_size)
        _, standalone = _standalone_encoder(cfg)(params[member_name(k)], batch)
        for mine, theirs in zip(hidden, standalone, strict=True):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_member_param_counts(params: dict) -> None:
    counts = member_param_counts(params, len(CONFIGS))
    for k, count in enumerate(counts):
        assert count == sum(x.size for x in jax.tree.leaves(params[member_name(k)]))
    assert counts[1] > counts[2] > counts[0]


def test_no_members_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        TeacherEnsemble((), C).init(jax.random.key(0), **_batch(), deterministic=True)
