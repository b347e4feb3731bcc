"""Decoder checkpoints in: numerical parity with transformers (CPU PyTorch), the packed
rows, the weight-file formats and the strict loading check.

Tiny random GPT-2, Llama (grouped-query attention, tied and untied), Qwen2 (q/k/v
biases), Qwen3 (q/k norm, explicit head width), Mistral (a window as long as the
context) and Llama with Llama 3's RoPE scaling, each written by transformers: our
logits match theirs to 1e-4 (float32) on real tokens of a padded batch, and a packed
row's second document gets the logits of that document alone (1e-5).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from decoder_helpers import (
    DOC_A,
    DOC_B,
    KINDS,
    LENGTH,
    batch,
    decoder_dirs_fixture,  # noqa: F401  (the fixture decoder_dirs)
    load,
    max_diff_on,
    our_logits,
    template,
    their_logits,
)
from safetensors.numpy import load_file, save_file

from dwt_jax import hf

TOL = 1e-4
HALF = ["full_attention", "sliding_attention"]  # A window on one layer of two.
PACKED_TOL = 1e-5
# What each kind's config must say (beyond the sizes).
EXPECTED = {
    "gpt2": {"family": "gpt2", "mlp_dim": 128, "norm_eps": 1e-5, "tie_embeddings": True},
    "llama_gqa": {"num_kv_heads": 2, "rope_theta": 500.0, "tie_embeddings": False},
    "llama_tied": {"num_kv_heads": 1, "tie_embeddings": True, "norm_eps": 1e-6},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qk_norm": True, "head_dim": 16, "qkv_bias": False, "tie_embeddings": True},
    "mistral": {"sliding_window": 32, "num_kv_heads": 2},
    "llama3_rope": {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 16},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers_and_packed_documents_stay_apart(decoder_dirs, kind):
    path, model = decoder_dirs[kind]
    checkpoint, params, report = load(path)
    for field, value in EXPECTED[kind].items():
        assert getattr(checkpoint.config, field) == value, field
    assert checkpoint.objective == "clm" and checkpoint.has_lm_head
    assert report.fresh == () and report.dropped == ()
    rows = batch()
    ours = our_logits(checkpoint.config, params, rows)
    theirs = their_logits(model, rows["input_ids"], rows["attention_mask"])
    # Rows 0 and 1 are single documents (row 1 padded on the right); row 2's first
    # document is a prefix, so transformers' plain causal attention agrees there too.
    real = rows["attention_mask"].copy()
    real[2, DOC_A:] = 0
    assert max_diff_on(ours, theirs, real) < TOL
    assert float(np.std(theirs)) > 100 * TOL  # Not vacuous.
    # The packed row's second document, positions restarting at 0, is document B alone.
    np.testing.assert_allclose(ours[2, DOC_A:], ours[1, :DOC_B], atol=PACKED_TOL, rtol=0)
    alone = their_logits(model, rows["input_ids"][1:2, :DOC_B], np.ones((1, DOC_B), np.int64))
    np.testing.assert_allclose(ours[2, DOC_A:], alone[0], atol=TOL, rtol=0)
    # And it is not what the row would give if document A were visible.
    joined = their_logits(model, rows["input_ids"][2:3], np.ones((1, LENGTH), np.int64))
    assert np.abs(joined[0, DOC_A:] - alone[0]).max() > 100 * TOL


def test_llama3_rope_scaling_changes_the_logits(decoder_dirs):
    """The scaled model is not computed as if unscaled (the parity above is not luck)."""
    checkpoint, params, _ = load(decoder_dirs["llama3_rope"][0])
    plain = dataclasses.replace(checkpoint.config, rope_scaling="none")
    rows = batch()
    scaled = our_logits(checkpoint.config, params, rows)
    unscaled = our_logits(plain, params, rows)
    assert max_diff_on(scaled, unscaled, rows["attention_mask"]) > 100 * TOL


def _copy_config(path: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(path, "config.json"), out)


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in hf.convert.flatten(params).items()}


def test_sharded_bfloat16_and_torch_bin_checkpoints_load_the_same_params(decoder_dirs, tmp_path):
    path, model = decoder_dirs["llama_gqa"]
    _, reference, _ = load(path)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    binary = str(tmp_path / "bin")
    _copy_config(path, binary)
    torch.save(model.state_dict(), os.path.join(binary, "pytorch_model.bin"))
    bf16 = str(tmp_path / "bf16")  # As most decoders are published.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
    rounded = {
        k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in _flat(reference).items()
    }
    for directory, expected in (
        (sharded, _flat(reference)),
        (binary, _flat(reference)),
        (bf16, rounded),
    ):
        _, params, _ = load(directory)
        flat = _flat(params)
        assert flat.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(flat[key], value, err_msg=f"{directory}: {key}")


def _write_state(path: str, out: str, change) -> str:
    """A copy of the checkpoint in ``path`` whose state dict ``change`` edited."""
    state = load_file(os.path.join(path, "model.safetensors"))
    change(state)
    _copy_config(path, out)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def test_tied_checkpoint_may_carry_an_equal_head_and_gpt2_buffers(decoder_dirs, tmp_path):
    path, _ = decoder_dirs["llama_tied"]
    _, reference, _ = load(path)

    def with_head(state):
        state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()

    _, params, report = load(_write_state(path, str(tmp_path / "head"), with_head))
    assert report.dropped == ("lm_head.weight",)
    assert _flat(params).keys() == _flat(reference).keys()

    def other_head(state):
        state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0

    with pytest.raises(hf.HFConversionError, match=r"lm_head\.weight differs from"):
        load(_write_state(path, str(tmp_path / "other"), other_head))

    # An older GPT-2 checkpoint: a bare GPT2Model (no `transformer.` prefix) with the
    # attention-mask buffers and the tied head saved.
    path, _ = decoder_dirs["gpt2"]
    _, reference, _ = load(path)

    def old_gpt2(state):
        for key in list(state):
            state[key.removeprefix("transformer.")] = state.pop(key)
        state["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        state["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        state["lm_head.weight"] = state["wte.weight"].copy()

    _, params, report = load(_write_state(path, str(tmp_path / "gpt2"), old_gpt2))
    assert report.dropped == ("h.0.attn.bias", "h.0.attn.masked_bias", "lm_head.weight")
    for key, value in _flat(reference).items():
        np.testing.assert_array_equal(_flat(params)[key], value, err_msg=key)


def test_one_error_lists_every_missing_extra_and_misshapen_weight(decoder_dirs, tmp_path):
    path, _ = decoder_dirs["qwen2"]

    def damage(state):
        del state["model.layers.1.mlp.up_proj.weight"]
        state["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros(3, np.float32)
        state["model.layers.0.self_attn.k_proj.bias"] = np.zeros(8, np.float32)

    with pytest.raises(hf.HFConversionError) as error:
        load(_write_state(path, str(tmp_path / "damaged"), damage))
    message = str(error.value)
    assert "\n" not in message
    for key in (
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.self_attn.rotary_extra.weight",
        "model.layers.0.self_attn.k_proj.bias is (8,), expected (16,)",
        str(tmp_path / "damaged"),
    ):
        assert key in message, key


def test_bare_model_needs_a_head_or_a_fresh_one(decoder_dirs, tmp_path):
    path, _ = decoder_dirs["llama_gqa"]

    def bare(state):
        del state["lm_head.weight"]
        for key in list(state):
            state[key.removeprefix("model.")] = state.pop(key)

    bare_dir = _write_state(path, str(tmp_path / "bare"), bare)
    assert not hf.plan(f"hf:{bare_dir}", "test").has_lm_head
    with pytest.raises(hf.HFConversionError, match=r"lm_head\.weight.*allow_fresh"):
        load(bare_dir)
    checkpoint = hf.plan(f"hf:{bare_dir}", "test")
    fresh = {"lm_head": {"kernel": np.full((32, 128), 0.5, np.float32)}}
    shapes = template(checkpoint.config)
    params, report = hf.load_params(
        checkpoint, {**shapes, **fresh}, allow_fresh=("lm_head",), field="test"
    )
    assert report.fresh == ("lm_head/kernel",)
    assert np.all(params["lm_head"]["kernel"] == 0.5)


def _config_dir(tmp_path, kind_path: str, change: dict, name: str) -> str:
    with open(os.path.join(kind_path, "config.json")) as f:
        raw = {**json.load(f), **change}
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    return str(out)


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("gpt2", {"activation_function": "relu"}, "activation_function='relu'"),
        ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ("llama_gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ("llama_gqa", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ("llama_gqa", {"attention_bias": True}, "attention_bias=True"),
        ("llama_gqa", {"mlp_bias": True}, "mlp_bias=True"),
        (
            "qwen3",
            {
                "use_sliding_window": True,
                "sliding_window": 8,
                "layer_types": ["full_attention", "sliding_attention"],
            },
            "1 of 2",
        ),
        ("llama_gqa", {"architectures": ["LlamaForSequenceClassification"]}, "Sequence"),
        ("llama_gqa", {"model_type": "gptj"}, r"'gptj'.*GPT2LMHeadModel.*MistralForCausalLM"),
        ("llama_gqa", {"num_key_value_heads": 3}, "num_kv_heads=3"),
    ],
)
def test_settings_our_decoders_cannot_compute_are_refused(
    decoder_dirs, tmp_path, kind, change, message
):
    directory = _config_dir(tmp_path, decoder_dirs[kind][0], change, "case")
    with pytest.raises(hf.HFConversionError, match=message) as error:
        hf.plan(f"hf:{directory}", "teacher.workdirs[0]")
    assert "teacher.workdirs[0]" in str(error.value) and directory in str(error.value)


def test_an_encoder_where_a_decoder_is_asked_and_back(decoder_dirs, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    raw = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
    (bert / "config.json").write_text(json.dumps(raw))
    with pytest.raises(hf.HFConversionError) as error:
        hf.plan(f"hf:{bert}", "teacher.workdirs[0]", objective="clm")
    message = str(error.value)
    assert "BertForSequenceClassification" in message and "a decoder (causal LM)" in message
    assert all(f.architecture in message for f in hf.DECODER_FAMILIES.values())
    with pytest.raises(hf.HFConversionError, match=r"an encoder .*BertForMaskedLM"):
        hf.plan(f"hf:{decoder_dirs['gpt2'][0]}", "teacher.workdirs[0]", objective="mlm")
    with pytest.raises(ValueError, match="head='classifier'"):
        load(decoder_dirs["gpt2"][0], head="classifier")


def test_config_spellings_of_transformers_4_and_5_agree():
    v5 = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 40,
        "max_position_embeddings": 64,
        "rope_parameters": dict(KINDS_LLAMA3, rope_theta=123.0),
    }
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = 123.0
    v4["rope_scaling"] = {k: v for k, v in KINDS_LLAMA3.items() if k != "rope_type"}
    v4["rope_scaling"]["type"] = "llama3"
    (a, _), (b, _) = hf.decoder_config_from_hf(v5), hf.decoder_config_from_hf(v4)
    assert a == b and a.rope_theta == 123.0 and a.rope_original_max_len == 16
    assert a.num_kv_heads == 4 and a.head_dim == 8 and not a.tie_embeddings
    gpt2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 4}
    cfg, _ = hf.decoder_config_from_hf({**gpt2, "n_inner": None, "n_positions": 40})
    assert cfg.mlp_dim == 128 and cfg.max_len == 40
    mistral = {**v5, "model_type": "mistral", "sliding_window": None}
    assert hf.decoder_config_from_hf(mistral)[0].sliding_window == 0
    qwen = {**v5, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    assert hf.decoder_config_from_hf(qwen)[0].sliding_window == 0


KINDS_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 2.0,
    "original_max_position_embeddings": 16,
}
