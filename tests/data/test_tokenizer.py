"""Tests of dwt_jax.data.tokenizer: fixed special ids, round trip, cache, loading."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import tokenizers

from dwt_jax.data import corpus
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


# Byte-level BPE (decoders), causal special ids, per-token byte lengths.


def test_byte_bpe_is_trained_and_cached_apart_from_wordpiece(text_files_config, tmp_path):
    config = text_files_config.copy_and_resolve_references()
    config.tokenizer_cache_dir = str(tmp_path / "cache")
    config.vocab_size = 300
    # A cache file of the previous trainer (key without kind and version) is not read.
    old = tmp_path / "cache" / f"{corpus.corpus_fingerprint(config)}-v300"
    old.mkdir(parents=True)
    (old / "tokenizer.json").write_text("not a tokenizer")
    path = tokenizer_lib.tokenizer_cache_path(config, "byte_bpe")
    assert path != tokenizer_lib.tokenizer_cache_path(config, "wordpiece")
    assert tokenizer_lib.TRAINER_VERSION in path and "byte_bpe" in path
    tokenizer = tokenizer_lib.get_tokenizer(config, kind="byte_bpe")
    assert os.path.isfile(path) and tokenizer.get_vocab_size() == 300
    assert tokenizer_lib.causal_special_ids(tokenizer) == tokenizer_lib.CausalSpecialIds(0, 0, None)
    text = "alpha  Beta\n\nriver é"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    again = tokenizer_lib.get_tokenizer(config, kind="byte_bpe")
    assert again.to_str() == tokenizer.to_str()
    assert tokenizer_lib.get_tokenizer(config).get_vocab()["[MASK]"] == 4  # WordPiece.
    # A loaded byte-level tokenizer.json is checked for an end of document, not [CLS].
    loaded = tokenizer_lib.get_tokenizer(
        {**config.to_dict(), "tokenizer_path": path}, kind="byte_bpe"
    )
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer_lib.get_tokenizer({**config.to_dict(), "tokenizer_path": path})


def test_byte_bpe_errors(text_files_config, text_files_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="tokenizer kind 'bpe' is unknown"):
        tokenizer_lib.get_tokenizer(text_files_config, kind="bpe")
    with pytest.raises(tokenizer_lib.DataConfigError, match=r"data\.vocab_size=200 .*257"):
        tokenizer_lib.get_tokenizer(text_files_config, kind="byte_bpe")
    wordpiece = tmp_path / "wordpiece.json"
    text_files_tokenizer.save(str(wordpiece))
    pattern = r"data\.tokenizer_path: the tokenizer has no end-of-document token"
    with pytest.raises(tokenizer_lib.DataConfigError, match=pattern):
        tokenizer_lib.get_tokenizer({"tokenizer_path": str(wordpiece)}, kind="byte_bpe")


def _byte_level_tokenizer(tokens, specials=()):
    vocab = {c: i for i, c in enumerate(tokenizers.pre_tokenizers.ByteLevel.alphabet())}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    return tokenizer


def test_causal_special_ids_of_llama3_and_other_names():
    llama3 = _byte_level_tokenizer(
        [], ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>"]
    )
    ids = tokenizer_lib.causal_special_ids(llama3)
    assert ids == tokenizer_lib.CausalSpecialIds(eos=257, pad=258, bos=256)
    sentencepiece = _byte_level_tokenizer([], ["<unk>", "<s>", "</s>"])
    assert tokenizer_lib.causal_special_ids(sentencepiece) == (
        tokenizer_lib.CausalSpecialIds(eos=258, pad=258, bos=257)
    )
    # <|endoftext|> is preferred to <|im_end|> (Qwen), whatever their ids.
    qwen = _byte_level_tokenizer([], ["<|im_end|>", "<|endoftext|>"])
    assert tokenizer_lib.causal_special_ids(qwen).eos == 257
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.eos = 1


def test_token_byte_lengths_of_sentencepiece_style_and_wordpiece(text_files_tokenizer):
    # A Llama-2-style tokenizer: "▁" marks spaces, unknown characters fall back to bytes.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in ("▁", "a", "b", "▁a", "▁b", "é", "▁é"):
        vocab[token] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = tokenizers.decoders.Sequence(
        [
            tokenizers.decoders.Replace("▁", " "),
            tokenizers.decoders.ByteFallback(),
            tokenizers.decoders.Fuse(),
            tokenizers.decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    lengths = tokenizer_lib.token_byte_lengths(tokenizer)
    assert list(lengths[:3]) == [0, 0, 0] and (lengths[3:259] == 1).all()
    assert [lengths[vocab[t]] for t in ("▁", "▁a", "é", "▁é")] == [1, 2, 2, 3]
    text = "a b é€ ab"  # "€" is three byte-fallback tokens; the prepended "▁" one byte.
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert lengths[ids].sum() == len(text.encode("utf-8")) + 1
    # WordPiece: continuation pieces count without their "##".
    word_lengths = tokenizer_lib.token_byte_lengths(text_files_tokenizer)
    pieces = {t: i for t, i in text_files_tokenizer.get_vocab().items() if t.startswith("##")}
    assert pieces and all(word_lengths[i] == len(t) - 2 for t, i in pieces.items())
    assert word_lengths[text_files_tokenizer.token_to_id("alpha")] == 5
    assert list(word_lengths[:5]) == [0] * 5
