"""The decoder families (GPT-2, Llama): causal and document-aware attention, packed
rows, grouped-query attention, RoPE, the model interface the step reads, and the
config's checks. (Logits against Hugging Face's are in tests/hf/.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dwt_jax.models import decoder
from dwt_jax.models.families import make_lm, model_config_from

V, L = 61, 12
SIZES = {"vocab_size": V, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 48}
FAMILIES = {
    "gpt2": {"family": "gpt2"},
    "llama_gqa_untied": {"family": "llama", "num_kv_heads": 2, "tie_embeddings": False},
    "qwen3_like": {"family": "llama", "num_kv_heads": 1, "qk_norm": True, "qkv_bias": True},
}


def build(name: str, **extra):
    config = model_config_from({**SIZES, "max_len": 32, **FAMILIES[name], **extra})
    model = make_lm(config)
    ids = jnp.ones((1, L), jnp.int32)
    params = model.init(
        jax.random.PRNGKey(0), input_ids=ids, segment_ids=ids, positions=ids, deterministic=True
    )["params"]
    params = nn.meta.unbox(params)
    # Norm scales and biases away from 1 and 0, so that no test passes by their defaults.
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.PRNGKey(7)
    perturbed = []
    for index, (path, leaf) in enumerate(leaves):
        names = [p.key for p in path]
        if names[-1] in ("scale", "bias"):
            noise = jax.random.normal(jax.random.fold_in(key, index), leaf.shape)
            leaf = leaf + 0.3 * noise
        perturbed.append(leaf)
    return config, model, jax.tree_util.tree_unflatten(tree, perturbed)


def apply(model, params, ids, segments, positions, **kw):
    return model.apply(
        {"params": params},
        input_ids=jnp.asarray(ids, jnp.int32),
        segment_ids=jnp.asarray(segments, jnp.int32),
        positions=jnp.asarray(positions, jnp.int32),
        deterministic=True,
        **kw,
    )


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return build(request.param)


def test_packed_row_second_document_equals_it_alone(family):
    _, model, params = family
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, V, 5), rng.integers(0, V, 7)
    ids = np.concatenate([first, second])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    packed, _ = apply(model, params, ids, segments, positions)
    alone, _ = apply(model, params, second[None], np.ones((1, 7)), np.arange(7)[None])
    np.testing.assert_allclose(packed[0, 5:], alone[0], atol=1e-5)
    first_alone, _ = apply(model, params, first[None], np.ones((1, 5)), np.arange(5)[None])
    np.testing.assert_allclose(packed[0, :5], first_alone[0], atol=1e-5)


def test_a_token_never_sees_later_tokens(family):
    _, model, params = family
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (1, L))
    changed = ids.copy()
    changed[0, 8:] = (changed[0, 8:] + 1) % V
    ones, positions = np.ones((1, L)), np.arange(L)[None]
    before, _ = apply(model, params, ids, ones, positions)
    after, _ = apply(model, params, changed, ones, positions)
    np.testing.assert_array_equal(np.asarray(before[0, :8]), np.asarray(after[0, :8]))
    assert not np.allclose(before[0, 8:], after[0, 8:])


def test_padding_is_finite_and_changes_nothing(family):
    _, model, params = family
    ids = np.arange(L)[None] % V
    segments = np.array([[1] * 9 + [0] * 3])
    positions = np.array([list(range(9)) + [0] * 3])
    padded, _ = apply(model, params, ids, segments, positions)
    alone, _ = apply(model, params, ids[:, :9], np.ones((1, 9)), np.arange(9)[None])
    assert np.isfinite(np.asarray(padded)).all()
    np.testing.assert_allclose(padded[0, :9], alone[0], atol=1e-5)


def test_step_outputs_decode_to_the_logits(family):
    config, model, params = family
    ids, ones, positions = np.arange(L)[None] % V, np.ones((1, L)), np.arange(L)[None]
    logits, out = apply(model, params, ids, ones, positions, output_hidden_states=True)
    outputs = model.step_outputs(params, logits, out)
    decoder_VxD, bias_V = outputs["lm_decoder"]
    assert decoder_VxD.shape == (V, config.hidden_size) and bias_V is None  # No LM-head bias.
    recomputed = outputs["lm_hidden"] @ decoder_VxD.T
    np.testing.assert_allclose(recomputed, logits, atol=1e-5)
    assert len(outputs["hidden_states"]) == config.num_layers + 1
    np.testing.assert_array_equal(outputs["hidden_states"][-1], outputs["lm_hidden"])
    assert set(model.input_names) == {"input_ids", "segment_ids", "positions"}


def test_gqa_shares_key_value_heads():
    config, _, params = build("llama_gqa_untied")
    attention = params["model"]["layers_0"]["self_attn"]
    assert attention["q_proj"]["kernel"].shape == (32, 4, 8)
    assert attention["k_proj"]["kernel"].shape == (32, 2, 8)
    assert params["lm_head"]["kernel"].shape == (32, V)
    # Grouped-query attention equals full attention with each K/V head repeated.
    _, full_model, _ = build("llama_gqa_untied", num_kv_heads=4)
    full = jax.tree.map(lambda x: x, params)
    for i in range(config.num_layers):
        attn = full["model"][f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], 2, axis=1)}
    ids, ones, positions = np.arange(L)[None] % V, np.ones((1, L)), np.arange(L)[None]
    grouped, _ = apply(make_lm(config), params, ids, ones, positions)
    repeated, _ = apply(full_model, full, ids, ones, positions)
    np.testing.assert_allclose(grouped, repeated, atol=1e-5)


def test_rope_is_relative():
    """Scores of RoPE-rotated vectors depend on the positions' difference only."""
    config = model_config_from({**SIZES, "max_len": 32, "family": "llama"})
    inv_freq = decoder.rope_inverse_frequencies(config)
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        rq = decoder.apply_rope(q, jnp.array([[pq]]), inv_freq)
        rk = decoder.apply_rope(k, jnp.array([[pk]]), inv_freq)
        return float((rq * rk).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_llama3_rope_scaling_scales_only_low_frequencies():
    base = {**SIZES, "max_len": 32, "family": "llama", "head_dim": 64, "num_heads": 4}
    plain = decoder.rope_inverse_frequencies(model_config_from(base))
    scaled = decoder.rope_inverse_frequencies(
        model_config_from({**base, "rope_scaling": "llama3", "rope_original_max_len": 64})
    )
    wavelength = 2 * np.pi / np.asarray(plain)
    high = wavelength < 64 / 4  # Shorter than original_max / high_freq_factor: kept.
    low = wavelength > 64 / 1  # Longer than original_max / low_freq_factor: / factor.
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)
    assert high.any() and low.any()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"family": "llama", "num_kv_heads": 3}, "num_kv_heads=3 does not divide"),
        ({"family": "gpt2", "num_kv_heads": 2}, "GPT-2 has no grouped-query"),
        ({"family": "gpt2", "tie_embeddings": False}, "always its word embeddings"),
        ({"family": "mamba"}, "model.family='mamba' is unknown"),
        ({"family": "llama", "norm": "pre"}, "model.norm is not a field"),
        ({"family": "llama", "rope_scaling": "yarn"}, "model.rope_scaling='yarn' is unknown"),
    ],
)
def test_config_errors_name_the_field(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_config_from({**SIZES, "max_len": 32, **extra})
