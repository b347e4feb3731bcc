"""Damaged Hugging Face directories (``hf:DIR``): one ConfigError (HFConversionError) on
one line naming the field and the damaged path, never a traceback."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers

from dwt_jax import hf
from dwt_jax.errors import ConfigError
from dwt_jax.hf.convert import HFConversionError

FIELD = "teacher.workdirs[0]"


def raises(call, *parts) -> str:
    with pytest.raises(HFConversionError) as caught:
        call()
    assert isinstance(caught.value, ConfigError)  # The command lines' one-line errors.
    message = str(caught.value)
    assert "\n" not in message, message
    for part in (f"{FIELD}: ", *parts):
        assert str(part) in message, (part, message)
    return message


@pytest.fixture
def model_dir(hf_dirs, tmp_path):
    """A fresh copy of a tiny BERT MLM directory."""
    path = tmp_path / "model"
    shutil.copytree(hf_dirs["bert_mlm"][0], path)
    return path


def plan(path) -> hf.HFCheckpoint:
    return hf.plan(f"hf:{path}", FIELD)


def test_a_file_or_a_missing_directory(model_dir, tmp_path):
    weights = model_dir / "model.safetensors"
    raises(lambda: plan(weights), weights, "is a file, not a directory")
    raises(lambda: plan(tmp_path / "missing"), tmp_path / "missing", "does not exist")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"model_type": "bert",\n "hidden_size": 32\n "num_hidden_layers": 2}', "line 3"),
        (b"", "is empty"),
        (b'["bert"]', "not a JSON object"),
        (b'{"model_type": "b\xe9rt"}', "is not UTF-8"),
    ],
    ids=["invalid_json", "empty", "not_an_object", "latin1"],
)
def test_damaged_config_json(model_dir, content, problem):
    config = model_dir / "config.json"
    config.write_bytes(content)
    raises(lambda: plan(model_dir), config, problem)


def test_config_json_that_is_a_directory(model_dir):
    config = model_dir / "config.json"
    config.unlink()
    config.mkdir()
    raises(lambda: plan(model_dir), config, "is a directory, not a file")


def test_truncated_or_garbage_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for call in (lambda: plan(model_dir), lambda: hf.read_weights(str(model_dir), FIELD)):
        raises(call, f"cannot read {weights} as a safetensors file")
    weights.write_bytes(b"\x00" * 7)
    raises(lambda: plan(model_dir), weights, "safetensors")


def test_damaged_sharded_index(hf_dirs, tmp_path):
    _, model = hf_dirs["bert_mlm"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    index = sharded / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    index.write_text(index.read_text()[:50])
    raises(lambda: plan(sharded), index, "is not valid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    raises(lambda: plan(sharded), index, "'weight_map'")
    index.write_text(json.dumps(good))
    shard = sharded / sorted(set(good["weight_map"].values()))[0]
    shard.unlink()
    raises(lambda: plan(sharded), shard, "does not exist")


def test_garbage_pytorch_model_bin(hf_dirs, tmp_path):
    path, model = hf_dirs["bert_mlm"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(path, "config.json"), bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    weights = bin_dir / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:2000])
    for call in (lambda: plan(bin_dir), lambda: hf.read_weights(str(bin_dir), FIELD)):
        raises(call, f"cannot read {weights} as a PyTorch state dict")
    torch.save([1, 2, 3], weights)  # Readable, but no state dict.
    raises(lambda: hf.read_weights(str(bin_dir), FIELD), weights, "PyTorch state dict")


def test_damaged_tokenizer_files(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    assert hf.load_tokenizer(str(tmp_path), FIELD).get_vocab_size() == len(vocab)
    tokenizer_file = tmp_path / "tokenizer.json"
    good = tokenizer_file.read_text()
    tokenizer_file.write_text(good[: len(good) // 3])
    raises(lambda: hf.load_tokenizer(str(tmp_path), FIELD), tokenizer_file, "is not valid JSON")
    tokenizer_file.write_text(good)
    settings = tmp_path / "tokenizer_config.json"
    settings.write_bytes(b'{"do_lower_case": tru')
    raises(lambda: hf.load_tokenizer(str(tmp_path), FIELD), settings, "is not valid JSON")
    raises(lambda: hf.load_tokenizer(str(tmp_path / "missing"), FIELD), "does not exist")
    raises(lambda: hf.load_tokenizer(str(tokenizer_file), FIELD), "is a file, not a directory")


def test_empty_directory_says_what_it_lacks(tmp_path):
    (tmp_path / "empty").mkdir()
    raises(lambda: plan(tmp_path / "empty"), "has no config.json")
    raises(lambda: hf.load_tokenizer(str(tmp_path / "empty"), FIELD), "no tokenizer could be")
