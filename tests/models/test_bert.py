"""Tests for dwt_jax.models: masking, packing, heads, axis names, remat, bf16, config."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dwt_jax.models import BertConfig, BertEncoder, attention_mask, make_model
from dwt_jax.models.bert import BertLayer

B, L, M, V = 2, 16, 4, 100
TINY = BertConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=L)


def make_batch(seed: int = 0, lengths: tuple[int, ...] = (16, 11)) -> dict[str, jax.Array]:
    """One single-segment sequence per row, padded after `lengths[b]` tokens."""
    rng = np.random.default_rng(seed)
    real_BxL = np.arange(L)[None, :] < np.array(lengths)[:, None]
    return {
        "input_ids": jnp.asarray(np.where(real_BxL, rng.integers(1, V, (B, L)), 0), jnp.int32),
        "segment_ids": jnp.asarray(real_BxL, jnp.int32),
        "positions": jnp.asarray(np.where(real_BxL, np.arange(L), 0), jnp.int32),
        "token_type_ids": jnp.asarray(real_BxL & (np.arange(L) >= 5), jnp.int32),
        "masked_positions": jnp.asarray([[1, 3, 7, 15], [0, 2, 9, 10]], jnp.int32),
    }


def init_params(cfg: BertConfig, head: str = "mlm") -> dict:
    boxed = make_model(cfg, head).init(jax.random.key(0), **make_batch(), deterministic=True)
    return nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def boxed() -> dict:
    return make_model(TINY).init(jax.random.key(0), **make_batch(), deterministic=True)


@pytest.fixture(scope="module")
def params(boxed: dict) -> dict:
    return nn.meta.unbox(boxed)


def run_mlm(cfg: BertConfig, variables: dict, batch: dict, **kwargs) -> tuple:
    kwargs.setdefault("deterministic", True)
    return make_model(cfg).apply(variables, **batch, **kwargs)


def run_encoder(variables: dict, batch: dict) -> jax.Array:
    args = {k: v for k, v in batch.items() if k != "masked_positions"}
    seq_BxLxD, _ = BertEncoder(TINY).apply(
        {"params": variables["params"]["bert"]}, **args, deterministic=True
    )
    return seq_BxLxD


def test_param_tree_and_logical_axis_names(boxed: dict) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    paths = set()
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert len(leaf.names) == leaf.value.ndim, name
        assert leaf.value.dtype == jnp.float32, name
        paths.add(name)
    assert "params/bert/encoder/layer_1/attention/self/query/kernel" in paths
    assert "params/bert/pooler/dense/kernel" in paths
    assert "params/cls/predictions/bias" in paths
    assert not any("decoder" in p for p in paths)
    q = nn.meta.unbox(boxed)["params"]["bert"]["encoder"]["layer_0"]["attention"]["self"]
    assert q["query"]["kernel"].shape == (32, 4, 8)
    assert q["query"]["bias"].shape == (4, 8)


def test_padding_does_not_change_real_tokens(params: dict) -> None:
    batch = make_batch()
    seq_BxLxD = run_encoder(params, batch)
    other_pad = dict(batch, input_ids=batch["input_ids"].at[1, 11:].set(7))
    np.testing.assert_allclose(run_encoder(params, other_pad)[1, :11], seq_BxLxD[1, :11], atol=1e-5)
    # The same 11 real tokens, unpadded to length 11.
    short = {k: v[1:2, :11] for k, v in batch.items() if k != "masked_positions"}
    short_seq, _ = BertEncoder(TINY).apply(
        {"params": params["params"]["bert"]}, **short, deterministic=True
    )
    np.testing.assert_allclose(short_seq[0], seq_BxLxD[1, :11], atol=1e-5)
    assert np.isfinite(np.asarray(seq_BxLxD)).all()


def test_padding_only_row_is_finite(params: dict) -> None:
    batch = make_batch(lengths=(16, 0))
    logits_BxMxV, out = run_mlm(TINY, params, batch, output_hidden_states=True)
    assert np.isfinite(np.asarray(logits_BxMxV)).all()
    assert all(np.isfinite(np.asarray(h)).all() for h in out["hidden_states"])


def test_packed_segments_do_not_attend_to_each_other(params: dict) -> None:
    rng = np.random.default_rng(1)
    seg1, seg2 = 6, 7
    segment_ids = np.array([[1] * seg1 + [2] * seg2 + [0] * (L - seg1 - seg2)] * B)
    positions = np.array([list(range(seg1)) + list(range(seg2)) + [0] * (L - seg1 - seg2)] * B)
    ids = rng.integers(1, V, (B, L)) * (segment_ids > 0)
    ids[1, seg1 : seg1 + seg2] = rng.integers(1, V, seg2)  # row 1: other segment-2 tokens
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids, jnp.int32),
        "positions": jnp.asarray(positions, jnp.int32),
        "token_type_ids": jnp.zeros((B, L), jnp.int32),
    }
    ids[1, :seg1] = ids[0, :seg1]
    batch["input_ids"] = jnp.asarray(ids, jnp.int32)
    seq_BxLxD = run_encoder(params, batch)
    np.testing.assert_allclose(seq_BxLxD[0, :seg1], seq_BxLxD[1, :seg1], atol=1e-5)
    assert not np.allclose(seq_BxLxD[0, seg1 : seg1 + seg2], seq_BxLxD[1, seg1 : seg1 + seg2])
    # Segment 2 alone, positions restarted, equals segment 2 inside the pack.
    alone = {k: v[:1, seg1 : seg1 + seg2] for k, v in batch.items()}
    alone["segment_ids"] = jnp.ones_like(alone["segment_ids"])
    alone_seq = run_encoder(params, alone)
    np.testing.assert_allclose(alone_seq[0], seq_BxLxD[0, seg1 : seg1 + seg2], atol=1e-5)


def test_attention_mask() -> None:
    mask = attention_mask(jnp.array([[1, 1, 2, 0]]))
    expected = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(mask[0, 0], np.array(expected, bool))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_mlm_logits_gather_and_tied_decoder(params: dict) -> None:
    batch = make_batch()
    logits_BxMxV, out = run_mlm(TINY, params, batch)
    assert logits_BxMxV.shape == (B, M, V) and logits_BxMxV.dtype == jnp.float32
    assert out["masked_hidden"].shape == (B, M, 32)
    # Reference: full-sequence encoder, head by hand at every position, then gather.
    p = jax.tree.map(np.asarray, params["params"])
    seq_BxLxD = np.asarray(run_encoder(params, batch), np.float64)
    t = p["cls"]["predictions"]["transform"]
    h = _gelu(seq_BxLxD @ t["dense"]["kernel"] + t["dense"]["bias"])
    h = _layer_norm(h, t["LayerNorm"], TINY.layer_norm_eps)
    embedding_VxD = p["bert"]["embeddings"]["word_embeddings"]["embedding"]
    full_BxLxV = h @ embedding_VxD.T + p["cls"]["predictions"]["bias"]
    expected = np.take_along_axis(full_BxLxV, np.asarray(batch["masked_positions"])[..., None], 1)
    np.testing.assert_allclose(logits_BxMxV, expected, atol=1e-4)
    # Tied: a vocabulary row absent from the input changes only its own logit. (A constant
    # bump would not: the transformed hidden state sums to zero after its LayerNorm.)
    unused = next(v for v in range(1, V) if v not in np.asarray(batch["input_ids"]))
    path = ("params", "bert", "embeddings", "word_embeddings", "embedding")
    bumped = jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            x.at[unused].add(jnp.linspace(-1.0, 1.0, 32)) if tuple(k.key for k in kp) == path else x
        ),
        params,
    )
    new_logits, _ = run_mlm(TINY, bumped, batch)
    changed = ~np.isclose(new_logits, logits_BxMxV, atol=1e-6).all(axis=(0, 1))
    assert changed.nonzero()[0].tolist() == [unused]


def test_optional_outputs_only_when_asked(params: dict) -> None:
    batch = make_batch()
    _, out = run_mlm(TINY, params, batch)
    assert set(out) == {"pooled", "masked_hidden"}
    _, out = run_mlm(TINY, params, batch, output_hidden_states=True, output_attentions=True)
    assert len(out["hidden_states"]) == TINY.num_layers + 1
    assert all(h.shape == (B, L, 32) for h in out["hidden_states"])
    assert len(out["attentions"]) == TINY.num_layers
    assert all(a.shape == (B, 4, L, L) for a in out["attentions"])
    np.testing.assert_allclose(out["hidden_states"][-1], run_encoder(params, batch), atol=1e-6)


def test_dropout_only_when_not_deterministic(params: dict) -> None:
    batch = make_batch()
    ref, _ = run_mlm(TINY, params, batch)
    same, _ = run_mlm(TINY, params, batch, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(ref, same)
    drop1, _ = run_mlm(
        TINY, params, batch, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    drop2, _ = run_mlm(
        TINY, params, batch, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    assert not np.allclose(drop1, ref) and not np.allclose(drop1, drop2)


def test_pre_ln_has_final_layer_norm(params: dict) -> None:
    cfg = dataclasses.replace(TINY, norm="pre")
    variables = init_params(cfg)
    assert "final_LayerNorm" in variables["params"]["bert"]["encoder"]
    assert "final_LayerNorm" not in params["params"]["bert"]["encoder"]
    logits_BxMxV, _ = run_mlm(cfg, variables, make_batch())
    assert logits_BxMxV.shape == (B, M, V) and np.isfinite(np.asarray(logits_BxMxV)).all()


def test_bfloat16_compute(params: dict) -> None:
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    init = functools.partial(make_model(cfg).init, deterministic=True, **make_batch())
    shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    logits16, _ = run_mlm(cfg, params, make_batch())
    logits32, _ = run_mlm(TINY, params, make_batch())
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits32, atol=0.1)


def _loss_and_grads(cfg: BertConfig, variables: dict) -> tuple:
    batch = make_batch()

    def loss_fn(p: dict) -> jax.Array:
        logits_BxMxV, _ = run_mlm(
            cfg, {"params": p}, batch, deterministic=False, rngs={"dropout": jax.random.key(5)}
        )
        return -jax.nn.log_softmax(logits_BxMxV)[..., 0].mean()

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


@pytest.fixture(scope="module")
def reference_loss_and_grads(params: dict) -> tuple:
    return _loss_and_grads(TINY, params)


@pytest.mark.parametrize("remat", ["full", "dots", "minimal"])
def test_remat_matches_none(params: dict, reference_loss_and_grads: tuple, remat: str) -> None:
    loss, grads = reference_loss_and_grads
    loss_r, grads_r = _loss_and_grads(dataclasses.replace(TINY, remat=remat), params)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)


def test_classifier() -> None:
    variables = init_params(TINY, "classifier")
    assert set(variables["params"]) == {"bert", "classifier"}
    assert variables["params"]["classifier"]["dense"]["kernel"].shape == (32, TINY.num_labels)
    logits_BxC, out = make_model(TINY, "classifier").apply(
        variables, **make_batch(), deterministic=True
    )
    assert logits_BxC.shape == (B, TINY.num_labels) and out["pooled"].shape == (B, 32)


def test_one_layer_matches_numpy_reference() -> None:
    cfg = dataclasses.replace(TINY, num_layers=1)
    rng = np.random.default_rng(2)
    x_BxLxD = rng.normal(size=(B, L, 32)).astype(np.float32)
    segment_ids = np.array([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4])
    mask = attention_mask(jnp.asarray(segment_ids))
    layer = BertLayer(cfg)
    variables = nn.meta.unbox(layer.init(jax.random.key(1), x_BxLxD, mask, True, False))
    variables = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), variables)
    got, _ = layer.apply(variables, x_BxLxD, mask, True, False)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    a, eps = p["attention"], cfg.layer_norm_eps
    qkv = [
        np.einsum("bld,dhk->bhlk", x_BxLxD, a["self"][n]["kernel"])
        + a["self"][n]["bias"][None, :, None, :]
        for n in ("query", "key", "value")
    ]
    scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(cfg.head_dim)
    scores = np.where(np.asarray(mask), scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ qkv[2]).transpose(0, 2, 1, 3)  # [B,L,H,K]
    attn = np.einsum("blhk,hkd->bld", ctx, a["output"]["dense"]["kernel"])
    h = _layer_norm(x_BxLxD + attn + a["output"]["dense"]["bias"], a["output"]["LayerNorm"], eps)
    inter = _gelu(h @ p["intermediate"]["dense"]["kernel"] + p["intermediate"]["dense"]["bias"])
    o = p["output"]
    expected = _layer_norm(
        h + inter @ o["dense"]["kernel"] + o["dense"]["bias"], o["LayerNorm"], eps
    )
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(got)[real], expected[real], atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"num_heads": 5}, "model.hidden_size"),
        ({"norm": "sandwich"}, "model.norm"),
        ({"dtype": "float16"}, "model.dtype"),
        ({"remat": "some"}, "model.remat"),
        ({"dropout_rate": 1.0}, "model.dropout_rate"),
        ({"attention_dropout_rate": -0.1}, "model.attention_dropout_rate"),
    ],
)
def test_config_validation(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **overrides)


def test_from_config() -> None:
    section = ml_collections.ConfigDict(dataclasses.asdict(TINY))
    assert BertConfig.from_config(section) == TINY
    assert TINY.head_dim == 8
    section.unknown_field = 1
    with pytest.raises(ValueError, match=r"model\.unknown_field"):
        BertConfig.from_config(section)
    with pytest.raises(ValueError, match=r"model\.max_len"):
        BertConfig.from_config(
            {k: v for k, v in dataclasses.asdict(TINY).items() if k != "max_len"}
        )
    with pytest.raises(ValueError, match="head"):
        make_model(TINY, "seq2seq")
