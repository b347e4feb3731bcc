"""Decoders out: ``hf.export_decoder_dir`` and ``python -m dwt_jax.export`` of a decoder
run write a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load with no
missing or unexpected weight, as the right architecture, with the same logits; import
of the export gives back our parameters exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from decoder_helpers import (
    KINDS,
    batch,
    byte_bpe_tokenizer,
    decoder_dirs_fixture,  # noqa: F401  (the fixture decoder_dirs)
    load,
    max_diff_on,
    our_logits,
    their_logits,
)

from dwt_jax import export, hf
from dwt_jax.checkpoint import Checkpointer
from dwt_jax.state import TrainState

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama_gqa": "LlamaForCausalLM",
    "llama_tied": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "llama3_rope": "LlamaForCausalLM",
}


def _reload(out: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_reloads_in_transformers_with_the_same_logits(decoder_dirs, kind, tmp_path):
    path, original = decoder_dirs[kind]
    checkpoint, params, _ = load(path)
    out = str(tmp_path / "export")
    files = hf.export_decoder_dir(params, checkpoint.config, byte_bpe_tokenizer(), out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == [ARCHITECTURES[kind]]
    assert hf.decoder_config_from_hf(written)[0] == checkpoint.config
    reloaded = _reload(out)
    assert type(reloaded).__name__ == ARCHITECTURES[kind]
    rows = batch()
    mask = rows["attention_mask"][:2]
    theirs = their_logits(original, rows["input_ids"][:2], mask)
    again = their_logits(reloaded, rows["input_ids"][:2], mask)
    assert max_diff_on(again, theirs, mask) <= 1e-6
    ours = our_logits(checkpoint.config, params, rows)[:2]
    assert max_diff_on(ours, again, mask) < 1e-4
    # Import of the export is the identity on our parameters.
    _, back, report = load(out)
    assert report.dropped == ()
    flat_back, flat = hf.convert.flatten(back), hf.convert.flatten(params)
    assert flat_back.keys() == flat.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(flat_back[key], value, err_msg=key)


def test_exported_tokenizer_loads_with_its_special_tokens(decoder_dirs, tmp_path):
    checkpoint, params, _ = load(decoder_dirs["gpt2"][0])
    tokenizer = byte_bpe_tokenizer()
    out = str(tmp_path / "export")
    hf.export_decoder_dir(params, checkpoint.config, tokenizer, out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == theirs.pad_token == "<|endoftext|>"
    assert theirs.bos_token is None
    text = "the theme of the thesis"
    assert theirs(text)["input_ids"] == tokenizer.encode(text).ids
    assert theirs.decode(theirs(text)["input_ids"]) == text
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (0, 0, None)
    assert hf.load_tokenizer(out).get_vocab() == tokenizer.get_vocab()


def _fake_run(workdir: str, config, params, tokenizer) -> None:
    """A pre-training run's files: config.json, tokenizer.json, a committed checkpoint."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(config), "data": {}}, f)
    tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    state = TrainState(
        step=jnp.int32(3),
        params={"student": params},
        opt_state={},
        rng=jax.random.PRNGKey(0),
        strategy_state={},
        nonfinite_streak=jnp.int32(0),
        nonfinite_skipped=jnp.int32(0),
    )
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    checkpointer.save(3, state, data)
    checkpointer.close()


def test_export_command_writes_a_decoder_run(decoder_dirs, tmp_path):
    checkpoint, params, _ = load(decoder_dirs["qwen3"][0])
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    _fake_run(workdir, checkpoint.config, params, byte_bpe_tokenizer())
    files = export.export(workdir, out)
    assert "tokenizer_config.json" in files
    reloaded = _reload(out)
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    rows = batch()
    mask = rows["attention_mask"][:2]
    ours = our_logits(checkpoint.config, params, rows)[:2]
    assert max_diff_on(ours, their_logits(reloaded, rows["input_ids"][:2], mask), mask) < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_export_refuses_what_transformers_cannot_hold(decoder_dirs, tmp_path):
    checkpoint, params, _ = load(decoder_dirs["qwen2"][0])
    both = dataclasses.replace(checkpoint.config, qk_norm=True)
    with pytest.raises(hf.HFConversionError, match=r"qk_norm=True with model\.qkv_bias=True"):
        hf.export_decoder_dir(params, both, None, str(tmp_path / "a"))
    extra = {**params, "adapter": {"kernel": np.zeros((2, 2), np.float32)}}
    with pytest.raises(hf.HFConversionError, match="adapter/kernel"):
        hf.export_decoder_dir(extra, checkpoint.config, None, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b")  # Nothing half-written.
