"""Tests of dwt_jax.data.tokenizer: fixed special ids, round trip, cache, loading."""

from __future__ import annotations

import os
import time

import pytest
import tokenizers

from dwt_jax.data import tokenizer as tokenizer_lib


def test_special_ids_are_fixed(embedded_tokenizer):
    special = tokenizer_lib.SpecialIds.from_tokenizer(embedded_tokenizer)
    assert special == tokenizer_lib.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert embedded_tokenizer.get_vocab_size() == 8192


def test_round_trip_plain_words_and_no_special_tokens_added(embedded_tokenizer):
    text = "The Quick brown Fox returns a List of Strings from the Module"
    encoding = embedded_tokenizer.encode(text)
    assert 2 not in encoding.ids and 3 not in encoding.ids  # No [CLS]/[SEP] by itself.
    assert embedded_tokenizer.decode(encoding.ids) == text.lower()


def test_cache_is_reused_and_keyed_by_vocab_size(text_files_config, text_files_tokenizer):
    path = tokenizer_lib.tokenizer_cache_path(text_files_config)
    assert os.path.isfile(path)
    mtime = os.path.getmtime(path)
    time.sleep(0.01)
    again = tokenizer_lib.get_tokenizer(text_files_config)
    assert os.path.getmtime(path) == mtime  # Loaded, not retrained.
    assert again.get_vocab() == text_files_tokenizer.get_vocab()
    bigger = text_files_config.copy_and_resolve_references()
    bigger.vocab_size = 220
    assert tokenizer_lib.tokenizer_cache_path(bigger) != path


def test_cache_key_changes_with_corpus(tmp_path, data_config_factory, text_corpus_writer):
    text_corpus_writer(tmp_path / "a.txt", num_docs=5)
    text_corpus_writer(tmp_path / "b.txt", num_docs=5, seed=1)
    config_a = data_config_factory(source="text_files", text_files=[str(tmp_path / "a.txt")])
    config_b = data_config_factory(source="text_files", text_files=[str(tmp_path / "b.txt")])
    assert tokenizer_lib.tokenizer_cache_path(config_a) != tokenizer_lib.tokenizer_cache_path(
        config_b
    )


def test_tokenizer_path_file_dir_and_vocab_txt(tmp_path, data_config_factory, text_files_tokenizer):
    file_path = tmp_path / "tok" / "tokenizer.json"
    file_path.parent.mkdir()
    hf_like = tokenizers.Tokenizer.from_str(text_files_tokenizer.to_str())
    hf_like.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    hf_like.save(str(file_path))
    vocab = sorted(text_files_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    sample = "alpha beta river"
    expected = text_files_tokenizer.encode(sample).ids
    for path in (file_path, file_path.parent, tmp_path / "bert"):
        loaded = tokenizer_lib.get_tokenizer(data_config_factory(tokenizer_path=str(path)))
        assert loaded.encode(sample).ids == expected  # Any post-processor is removed.


def test_tokenizer_path_errors(tmp_path, data_config_factory):
    with pytest.raises(ValueError, match=r"data\.tokenizer_path"):
        tokenizer_lib.get_tokenizer(data_config_factory(tokenizer_path=str(tmp_path / "none")))
    with pytest.raises(ValueError, match=r"tokenizer\.json nor vocab\.txt"):
        tokenizer_lib.get_tokenizer(data_config_factory(tokenizer_path=str(tmp_path)))
    (tmp_path / "vocab.txt").write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer_lib.get_tokenizer(data_config_factory(tokenizer_path=str(tmp_path)))
