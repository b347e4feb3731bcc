"""Tests for decoder growth (dwt_jax.remap.decoder through remap.remap_params): exact
depth-identity and HyperCloning width ('hypercloning') for GPT-2 and Llama-family models (GQA,
tied and untied heads, Qwen3 q/k norms, q/k/v biases), the layer copies of the
approximate depth methods, the approximate width methods, and the errors.

The source models are random: their structure comes from an abstract init of the real
model (`make_lm`), their values from a seeded NumPy generator (kernels N(0, 0.2), norm
scales 1 + N(0, 0.2), biases N(0, 0.1)), so no norm or bias keeps its trivial value.
(Values by NumPy rather than Flax's initialisers: their eager compilation per shape
would cost most of this file's time budget.)
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dwt_jax import remap
from dwt_jax.models import BertConfig, make_model
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.families import make_lm, model_config_from

V, L = 64, 16
_BASE = {"vocab_size": V, "hidden_size": 16, "num_layers": 2, "mlp_dim": 32, "max_len": L}
SOURCES = {
    "gpt2": {"family": "gpt2", "num_heads": 2},
    "llama_gqa": {"family": "llama", "num_heads": 4, "num_kv_heads": 2, "tie_embeddings": False},
    "llama_gqa_tied": {"family": "llama", "num_heads": 4, "num_kv_heads": 2},
    "qwen3": {
        "family": "llama",
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "qk_norm": True,
        "qkv_bias": True,
        "tie_embeddings": False,
    },
}


def config(name: str, **changes) -> DecoderConfig:
    return model_config_from({**_BASE, **SOURCES[name], **changes})


def grown(name: str, n: int, num_layers: int = 2) -> DecoderConfig:
    """The source `name` with hidden size, heads, KV heads and MLP width times n."""
    cfg = config(name)
    changes = {
        "hidden_size": n * cfg.hidden_size,
        "num_heads": n * cfg.num_heads,
        "mlp_dim": n * cfg.mlp_dim,
        "num_layers": num_layers,
    }
    if cfg.family == "llama":
        changes["num_kv_heads"] = n * cfg.num_kv_heads
    return config(name, **changes)


def packed_batch() -> dict[str, jax.Array]:
    """Row 0: documents of 9 and 5 tokens, then 2 padding; row 1: documents of 6 and 10."""
    segment_ids = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 6 + [2] * 10], np.int32)
    positions = np.zeros_like(segment_ids)
    for row in range(2):
        for segment in (1, 2):
            in_doc = segment_ids[row] == segment
            positions[row, in_doc] = np.arange(in_doc.sum())
    ids = np.random.default_rng(0).integers(1, V, segment_ids.shape)
    return {
        "input_ids": jnp.asarray(np.where(segment_ids > 0, ids, 0), jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(positions),
    }


REAL = np.asarray(packed_batch()["segment_ids"]) > 0


@functools.cache
def abstract_params(cfg: DecoderConfig) -> dict:
    """The target model's parameter shapes and dtypes (an abstract init)."""
    batch = packed_batch()
    variables = jax.eval_shape(
        lambda: make_lm(cfg).init(jax.random.key(0), **batch, deterministic=True)
    )
    return nn.meta.unbox(variables["params"])


def random_params(cfg: DecoderConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def leaf(path: tuple, shape: jax.ShapeDtypeStruct) -> np.ndarray:
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        name = path[-1].key
        if name == "scale":
            return 1.0 + 0.2 * noise
        return (0.1 if name == "bias" else 0.2) * noise

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


@functools.cache
def source(name: str) -> tuple[DecoderConfig, dict, np.ndarray, np.ndarray]:
    """(config, params, logits [B,L,V], final hidden [B,L,D]) of a random source model."""
    cfg = config(name)
    params = random_params(cfg)
    return (cfg, params, *forward(cfg, params))


@functools.cache
def compiled_forward(cfg: DecoderConfig):
    """The jitted forward of `cfg` (one compilation costs less than eager dispatch)."""

    def apply(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits, out = make_lm(cfg).apply({"params": params}, **batch, deterministic=True)
        return logits, out["hidden"]

    return jax.jit(apply)


def forward(cfg: DecoderConfig, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B,L,V], final normed hidden [B,L,D]) on the packed batch."""
    logits, hidden = compiled_forward(cfg)(params, packed_batch())
    return np.asarray(logits), np.asarray(hidden)


def shapes(tree: dict) -> dict:
    return {
        jax.tree_util.keystr(path): (tuple(np.shape(x)), np.dtype(x.dtype))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def grow_and_check(
    name: str, target: DecoderConfig, **kwargs
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Grows source `name` into `target`; checks the tree's structure against the target
    model's abstract init; returns (params, logits, hidden)."""
    cfg, params, _, _ = source(name)
    student = remap.remap_params(params, cfg, target, **kwargs)
    assert shapes(student) == shapes(abstract_params(target))
    return (student, *forward(target, student))


def assert_close_on_real_tokens(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got[REAL], want[REAL], rtol=0, atol=1e-5)


def block(tree: dict, family: str, index: int) -> dict:
    return (
        tree["transformer"][f"h_{index}"] if family == "gpt2" else tree["model"][f"layers_{index}"]
    )


@pytest.mark.parametrize("name", list(SOURCES))
def test_depth_identity_is_exact_and_appends_zeroed_copies_of_the_last_block(name: str):
    cfg, params, logits, hidden = source(name)
    student, got_logits, got_hidden = grow_and_check(
        name, dataclasses.replace(cfg, num_layers=4), depth="identity", width="hypercloning"
    )
    assert_close_on_real_tokens(got_logits, logits)
    assert_close_on_real_tokens(got_hidden, hidden)
    assert np.abs(logits[REAL]).max() > 1.0  # the check is not comparing near-zero logits
    for j in (2, 3):
        new, last = block(student, cfg.family, j), block(params, cfg.family, 1)
        if cfg.family == "gpt2":
            zeroed = [new["attn"]["c_proj"][k] for k in ("kernel", "bias")]
            zeroed += [new["mlp"]["c_proj"][k] for k in ("kernel", "bias")]
            np.testing.assert_array_equal(
                new["attn"]["c_attn"]["kernel"], last["attn"]["c_attn"]["kernel"]
            )
            np.testing.assert_array_equal(new["ln_1"]["bias"], last["ln_1"]["bias"])
        else:
            zeroed = [new["self_attn"]["o_proj"]["kernel"], new["mlp"]["down_proj"]["kernel"]]
            np.testing.assert_array_equal(
                new["mlp"]["up_proj"]["kernel"], last["mlp"]["up_proj"]["kernel"]
            )
            np.testing.assert_array_equal(
                new["input_layernorm"]["scale"], last["input_layernorm"]["scale"]
            )
        assert all(not np.any(z) for z in zeroed)


@pytest.mark.parametrize("name", list(SOURCES))
def test_hypercloning_doubles_the_width_exactly(name: str):
    """Logits equal the source's; the final hidden is repeat(h) (untied head) or
    repeat(h)/2 (tied: the final norm is divided so that the duplicated table sums back)."""
    cfg, params, logits, hidden = source(name)
    student, got_logits, got_hidden = grow_and_check(name, grown(name, 2), width="hypercloning")
    assert_close_on_real_tokens(got_logits, logits)
    assert_close_on_real_tokens(got_hidden, np.tile(hidden, 2) / (2 if cfg.tied else 1))
    # Every hidden unit copied twice: the embedding table is [E, E]; the head is divided.
    table = (
        student["transformer"]["wte"] if cfg.family == "gpt2" else student["model"]["embed_tokens"]
    )
    source_table = (
        params["transformer"]["wte"] if cfg.family == "gpt2" else params["model"]["embed_tokens"]
    )
    np.testing.assert_array_equal(table["embedding"], np.tile(source_table["embedding"], 2))
    if not cfg.tied:
        np.testing.assert_allclose(
            student["lm_head"]["kernel"], np.tile(params["lm_head"]["kernel"], (2, 1)) / 2
        )


def test_hypercloning_triples_the_width_of_a_gqa_model_exactly():
    _, _, logits, hidden = source("llama_gqa")
    _, got_logits, got_hidden = grow_and_check(
        "llama_gqa", grown("llama_gqa", 3), width="hypercloning"
    )
    assert_close_on_real_tokens(got_logits, logits)
    assert_close_on_real_tokens(got_hidden, np.tile(hidden, 3))


def test_hypercloning_is_exact_with_non_integer_head_and_mlp_factors():
    """Only the hidden size must be a multiple: heads 4->6 (KV 2->3) and MLP 32->40 copy
    some units once, some twice, and each copy count divides its own rows."""
    _, _, logits, _ = source("llama_gqa_tied")
    target = config(
        "llama_gqa_tied", hidden_size=32, num_heads=6, num_kv_heads=3, head_dim=4, mlp_dim=40
    )
    _, got_logits, _ = grow_and_check("llama_gqa_tied", target, width="hypercloning")
    assert_close_on_real_tokens(got_logits, logits)


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_depth_identity_and_width_hypercloning_together_are_exact(name: str):
    _, _, logits, _ = source(name)
    _, got_logits, _ = grow_and_check(
        name, grown(name, 2, num_layers=3), depth="identity", width="hypercloning"
    )
    assert_close_on_real_tokens(got_logits, logits)


def test_a_tied_source_grows_into_an_untied_student_exactly():
    _, params, logits, _ = source("llama_gqa_tied")
    target = dataclasses.replace(grown("llama_gqa_tied", 2), tie_embeddings=False)
    student, got_logits, _ = grow_and_check("llama_gqa_tied", target, width="hypercloning")
    assert_close_on_real_tokens(got_logits, logits)
    table = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_allclose(student["lm_head"]["kernel"], np.tile(table.T, (2, 1)) / 2)


@pytest.mark.parametrize(
    ("method", "sources"),
    [("fna", (0, 1, 1, 1, 1)), ("stack", (0, 1, 0, 1, 0)), ("interleave", (0, 0, 0, 1, 1))],
)
@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_approximate_depth_methods_copy_the_right_blocks(name: str, method: str, sources: tuple):
    cfg, params, _, _ = source(name)
    student = remap.remap_params(
        params, cfg, dataclasses.replace(cfg, num_layers=5), depth=method, width="hypercloning"
    )
    for j, i in enumerate(sources):
        jax.tree.map(
            np.testing.assert_array_equal,
            block(student, cfg.family, j),
            block(params, cfg.family, i),
        )


def test_fpi_with_random_units_grows_any_width_deterministically_and_approximately():
    cfg, params, logits, _ = source("qwen3")
    target = config("qwen3", hidden_size=24, num_heads=6, num_kv_heads=3, mlp_dim=40)
    first, got_logits, _ = grow_and_check("qwen3", target, width="fpi", seed=3)
    again = remap.remap_params(params, cfg, target, width="fpi", seed=3)
    other = remap.remap_params(params, cfg, target, width="fpi", seed=4)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True)
    )
    maps = remap.decoder_unit_maps(cfg, target, seed=3)
    # Query heads follow their key/value head: new KV head g' serves copies of g(g')'s heads.
    np.testing.assert_array_equal(maps.heads[0][4:], 2 * maps.kv_heads[0][2] + np.arange(2))

    # Approximate (norm statistics change with unequal copies), yet far closer to the
    # source than a random model of the target's shape.
    def kl(student_logits: np.ndarray) -> float:
        log_p = jax.nn.log_softmax(logits[REAL])
        log_q = jax.nn.log_softmax(student_logits[REAL])
        return float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)))

    random_logits, _ = forward(target, random_params(target, seed=9))
    assert 0 < kl(got_logits) < 0.2 * kl(random_logits), (kl(got_logits), kl(random_logits))


def test_fpi_with_random_units_is_exact_at_an_unchanged_hidden_size():
    _, _, logits, _ = source("llama_gqa")
    target = config("llama_gqa", num_heads=6, num_kv_heads=3, head_dim=4, mlp_dim=44)
    _, got_logits, _ = grow_and_check("llama_gqa", target, width="fpi", seed=1)
    assert_close_on_real_tokens(got_logits, logits)


def test_aki_takes_new_units_from_the_next_block():
    cfg, params, _, _ = source("llama_gqa")
    target = grown("llama_gqa", 2)
    aki = remap.remap_params(params, cfg, target, width="aki", seed=1)
    fpi = remap.remap_params(params, cfg, target, width="fpi", seed=1)
    maps = remap.decoder_unit_maps(cfg, target, seed=1)
    g_D, g_F = maps.hidden, maps.mlp[0]
    counts = remap.copy_counts(g_D, 16)[g_D][:, None]
    up_aki = aki["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # [D split, F copy]
    up_next = params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"][g_D][:, g_F] / counts
    np.testing.assert_array_equal(
        up_aki[:, :32], fpi["model"]["layers_0"]["mlp"]["up_proj"]["kernel"][:, :32]
    )
    np.testing.assert_allclose(up_aki[:, 32:], up_next[:, 32:])
    jax.tree.map(np.testing.assert_array_equal, aki["model"]["layers_1"], fpi["model"]["layers_1"])


def test_noise_copies_the_corner_and_new_positions_come_from_the_template():
    cfg, params, _, _ = source("gpt2")
    target = config("gpt2", hidden_size=24, num_heads=3, mlp_dim=40, max_len=2 * L)
    template = random_params(target, seed=5)
    student = remap.remap_params(
        params, cfg, target, width="noise", noise_std=0.5, student_template=template
    )
    assert shapes(student) == shapes(abstract_params(target))
    fc_s, fc_t = (
        student["transformer"]["h_0"]["mlp"]["c_fc"],
        params["transformer"]["h_0"]["mlp"]["c_fc"],
    )
    np.testing.assert_array_equal(fc_s["kernel"][:16, :32], fc_t["kernel"])
    assert np.std(fc_s["kernel"][16:]) == pytest.approx(0.5, abs=0.1)
    wpe_s = student["transformer"]["wpe"]["embedding"]
    np.testing.assert_array_equal(wpe_s[:L, :16], params["transformer"]["wpe"]["embedding"])
    np.testing.assert_array_equal(wpe_s[L:], template["transformer"]["wpe"]["embedding"][L:])


def _bert(hidden_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=V,
        hidden_size=hidden_size,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
        max_len=L,
        norm="pre",
    )


@pytest.mark.parametrize(
    ("teacher", "student", "width", "message"),
    [
        (
            "llama_gqa",
            {"vocab_size": 80},
            "hypercloning",
            r"model.vocab_size=64 but the student's is 80",
        ),
        (
            "gpt2",
            {"family": "llama"},
            "hypercloning",
            r"model.family='gpt2' but student model.family='llama'",
        ),
        (
            "llama_gqa",
            {"hidden_size": 24, "num_heads": 6, "num_kv_heads": 3},
            "hypercloning",
            r"model.hidden_size=24 is not a multiple of the teacher's 16",
        ),
        ("llama_gqa", {"hidden_size": 32}, "fpi", r"model.head_dim=8 but the teacher's is 4"),
        ("gpt2", {"hidden_size": 32}, "hypercloning", r"model.head_dim=16 .*model.num_heads=4"),
        (
            "llama_gqa",
            {"num_heads": 8, "num_kv_heads": 8, "head_dim": 4},
            "hypercloning",
            r"model.num_kv_heads=8 gives 1 query heads per key/value head but the teacher has 2",
        ),
        ("llama_gqa", {"tie_embeddings": True}, "hypercloning", r"model.tie_embeddings=False"),
        ("llama_gqa", {"mlp_dim": 16}, "noise", r"model.mlp_dim=16 is smaller"),
        ("llama_gqa", {"qk_norm": True}, "hypercloning", r"model.qk_norm=False"),
        ("llama_gqa", {"rope_theta": 500000.0}, "hypercloning", r"model.rope_theta=10000.0"),
        ("llama_gqa", {}, "wide", r"width='wide' is unknown"),
    ],
    ids=[
        "vocab",
        "family",
        "hypercloning_factor",
        "head_dim",
        "gpt2_heads",
        "gqa",
        "tied",
        "smaller",
        "qk_norm",
        "rope",
        "method",
    ],
)
def test_configs_that_cannot_be_grown_raise_naming_the_field(
    teacher: str, student: dict, width: str, message: str
):
    cfg, params, _, _ = source(teacher)
    target = config(teacher, **student)
    with pytest.raises(ValueError, match=message):
        remap.remap_params(params, cfg, target, width=width)


def test_mixing_bert_and_decoders_and_a_wrong_teacher_config_raise():
    cfg, params, _, _ = source("llama_gqa")
    with pytest.raises(
        ValueError, match=r"teacher model.family='bert' but student model.family='llama'"
    ):
        remap.remap_params({}, _bert(16), cfg)
    wrong = dataclasses.replace(cfg, mlp_dim=48)
    with pytest.raises(ValueError, match=r"layers_0/mlp/(gate|up|down)_proj/kernel: teacher shape"):
        remap.remap_params(params, wrong, grown("llama_gqa", 2))


def random_params_bert(cfg: BertConfig) -> dict:
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(
        lambda: make_model(cfg, "mlm").init(
            jax.random.key(0),
            input_ids=ids,
            segment_ids=ids + 1,
            positions=ids,
            token_type_ids=ids,
            masked_positions=ids[:, :1],
            deterministic=True,
        )
    )
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), nn.meta.unbox(abstract["params"])
    )


def test_bert_hypercloning_is_fpi_with_cyclic_units_and_refuses_other_widths():
    teacher = _bert(16)
    params = random_params_bert(teacher)
    cloned = remap.remap_params(params, teacher, _bert(32), width="hypercloning")
    cyclic = remap.remap_params(params, teacher, _bert(32), width="fpi", new_units="cyclic")
    jax.tree.map(np.testing.assert_array_equal, cloned, cyclic)
    with pytest.raises(ValueError, match=r"model.hidden_size=24 is not a multiple"):
        remap.remap_params(params, teacher, _bert(24), width="hypercloning")
