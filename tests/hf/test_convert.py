"""The importer's strict check, checkpoint formats and config translation."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from hf_helpers import inputs, max_diff_on_tokens, our_outputs, template, their_outputs

from dwt_jax import hf
from dwt_jax.data.tokenizer import SpecialIds
from dwt_jax.hf.convert import HFConversionError, config_from_hf, import_params


def _state(path: str) -> dict[str, np.ndarray]:
    return hf.read_weights(path)


def _plan(path: str) -> hf.HFCheckpoint:
    return hf.plan(f"hf:{path}", "teacher.workdirs[0]")


def _import(path, state, head="mlm", **kw):
    checkpoint = _plan(path)
    kw.setdefault("allow_fresh", ("bert/pooler",) if head == "mlm" else ())
    return import_params(
        state,
        checkpoint.config,
        checkpoint.family,
        template(checkpoint.config, head),
        head=head,
        **kw,
    )


def test_an_unused_weight_is_named(hf_dirs):
    path, _ = hf_dirs["bert_mlm"]
    state = {**_state(path), "bert.encoder.layer.0.adapter.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(HFConversionError, match=r"not used .*bert\.encoder\.layer\.0\.adapter"):
        _import(path, state)
    # ...unless the caller drops it knowingly.
    _, report = _import(path, state, ignore=("bert.encoder.layer.0.adapter",))
    assert "bert.encoder.layer.0.adapter.weight" in report.dropped


def test_a_missing_weight_is_named(hf_dirs):
    path, _ = hf_dirs["bert_mlm"]
    state = _state(path)
    del state["bert.encoder.layer.1.intermediate.dense.bias"]
    with pytest.raises(HFConversionError, match=r"missing 1 .*layer\.1\.intermediate\.dense\.bias"):
        _import(path, state)


def test_a_misshapen_weight_is_named_with_both_shapes(hf_dirs):
    path, _ = hf_dirs["bert_mlm"]
    state = _state(path)
    state["bert.encoder.layer.0.output.dense.weight"] = np.zeros((32, 40), np.float32)
    with pytest.raises(
        HFConversionError, match=r"output\.dense\.weight is \(32, 40\), expected \(32, 48\)"
    ):
        _import(path, state)


def test_no_mlm_head_is_an_error_unless_a_fresh_head_is_asked_for(hf_dirs):
    path, _ = hf_dirs["bert_cls"]  # An encoder + classifier: no MLM head.
    state = _state(path)
    with pytest.raises(HFConversionError, match=r"no MLM head.*fresh"):
        _import(path, state)
    params, report = _import(path, state, allow_fresh=("bert/pooler", "cls"))
    assert all(k.startswith("cls/") for k in report.fresh)
    assert "classifier.weight" in report.dropped  # The other head: not needed, not refused.
    assert params["cls"]["predictions"]["bias"].shape == (97,)


def test_pretraining_checkpoint_drops_next_sentence_head_and_matches(hf_dirs):
    path, model = hf_dirs["bert_pretraining"]
    checkpoint = _plan(path)
    assert checkpoint.has_mlm_head
    params, report = _import(path, _state(path), allow_fresh=())  # Has its pooler.
    assert set(report.dropped) >= {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    batch = inputs("bert_pretraining")
    logits, out = our_outputs(checkpoint.config, params, "mlm", batch)
    theirs = their_outputs(model, batch)
    mask = batch["attention_mask"]
    assert max_diff_on_tokens(logits, theirs.prediction_logits.numpy(), mask) < 1e-4
    pooled = model.bert(
        input_ids=torch.tensor(batch["input_ids"]),
        attention_mask=torch.tensor(mask),
        token_type_ids=torch.tensor(batch["types"]),
    ).pooler_output
    np.testing.assert_allclose(np.asarray(out["pooled"]), pooled.detach().numpy(), atol=1e-4)


def test_old_layer_norm_names_and_a_bare_encoder_checkpoint(hf_dirs):
    """gamma/beta (TF-converted checkpoints) and keys without the 'bert.' prefix (BertModel)."""
    path, _ = hf_dirs["bert_pretraining"]
    state = _state(path)
    bare = {}
    for key, value in state.items():
        if not key.startswith("bert."):
            continue
        key = key[len("bert.") :]
        if "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        bare[key] = value
    checkpoint = _plan(path)
    encoder, report = import_params(
        bare,
        checkpoint.config,
        checkpoint.family,
        template(checkpoint.config, "mlm")["bert"],
        head="encoder",
    )
    reference, _ = _import(path, state, allow_fresh=())
    flat = hf.convert._flatten(encoder)
    for key, value in hf.convert._flatten(reference["bert"]).items():
        np.testing.assert_array_equal(flat[key], value, err_msg=key)
    assert report.fresh == ()


def test_an_untied_decoder_is_refused(hf_dirs):
    path, _ = hf_dirs["bert_mlm"]
    state = _state(path)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1.0
    with pytest.raises(HFConversionError, match="untied decoder"):
        _import(path, state)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    _, report = _import(path, state)  # A tied copy (older checkpoints) is fine.
    assert "cls.predictions.decoder.weight" in report.dropped


def test_pytorch_bin_and_sharded_safetensors_read_the_same_weights(hf_dirs, tmp_path):
    path, model = hf_dirs["bert_mlm"]
    reference = _state(path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(path, "config.json"), bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    from_bin = hf.read_weights(str(bin_dir))
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    from_shards = hf.read_weights(str(sharded))
    for key, value in reference.items():
        np.testing.assert_array_equal(from_bin[key], value, err_msg=key)
        np.testing.assert_array_equal(from_shards[key], value, err_msg=key)
    assert set(_plan(str(sharded)).keys) == set(reference)


def test_directory_problems_are_one_clear_error(hf_dirs, tmp_path):
    with pytest.raises(HFConversionError, match=r"teacher.workdirs\[0\]: .* has no config.json"):
        _plan(str(tmp_path))
    path, _ = hf_dirs["bert_mlm"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(path, "config.json"), no_weights)
    with pytest.raises(HFConversionError, match=r"has no model\.safetensors"):
        _plan(str(no_weights))
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HFConversionError, match=r"cannot read .*model\.safetensors"):
        hf.read_weights(str(truncated), "teacher.workdirs[0]")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new' is not supported"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"num_attention_heads": 5}, "not divisible"),
    ],
)
def test_config_json_that_our_encoder_cannot_compute_is_refused(hf_dirs, change, message):
    with open(os.path.join(hf_dirs["bert_mlm"][0], "config.json")) as f:
        raw = {**json.load(f), **change}
    with pytest.raises(HFConversionError, match=message):
        config_from_hf(raw)


def test_config_translation():
    raw = transformers.RobertaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=34,
        type_vocab_size=1,
    ).to_dict()
    cfg, family = config_from_hf(raw)
    assert family.model_type == "roberta"
    assert (cfg.position_offset, cfg.max_len, cfg.max_seq_len) == (2, 34, 32)
    assert (cfg.num_layers, cfg.mlp_dim, cfg.type_vocab_size) == (3, 20, 1)
    back = hf.config_to_hf(cfg, "mlm")
    assert back["architectures"] == ["RobertaForMaskedLM"]
    assert back["pad_token_id"] == 1
    del raw["intermediate_size"]
    with pytest.raises(HFConversionError, match="'intermediate_size' is missing"):
        config_from_hf(raw)


def test_tokenizer_from_a_cased_vocab_directory(tmp_path):
    """vocab.txt + tokenizer_config.json: transformers' settings (no lower-casing) hold."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False).save_pretrained(
        tmp_path
    )
    tokenizer = hf.load_tokenizer(str(tmp_path))
    ids = tokenizer.encode("Hello worlds", add_special_tokens=False).ids
    assert ids == [5, 7, 8]
    assert SpecialIds.from_tokenizer(tokenizer).as_tuple() == (0, 1, 2, 3, 4)


def test_special_ids_of_a_roberta_vocabulary():
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4, "a": 5}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    ids = SpecialIds.from_tokenizer(tokenizer)
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (1, 3, 0, 2, 4)
