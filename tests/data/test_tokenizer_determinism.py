"""Deterministic tokenizer training: byte-identical across processes and hash seeds, the
tie order of ``bpe.learn_bpe`` against a naive reference, and exact word counting."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from testutil import REPO_ROOT
from tokenizers import normalizers, pre_tokenizers

from dwt_jax.data import bpe
from dwt_jax.data import tokenizer as tokenizer_lib

VOCAB_SIZE = 512
# Trains both kinds on the texts of argv[1] and saves them into the folder argv[2]. The
# package dwt_jax.data is stood in for so that its __init__ (grain, jax: ~5 s) is not
# run: the tokenizer modules import only readers, corpus and textfiles.
_TRAIN_SCRIPT = f"""
import json, sys, types
package = types.ModuleType("dwt_jax.data")
package.__path__ = [{os.path.join(REPO_ROOT, "dwt_jax", "data")!r}]
sys.modules["dwt_jax.data"] = package
from dwt_jax.data import tokenizer as t
texts = json.load(open(sys.argv[1], encoding="utf-8"))
t.train_tokenizer(texts, {VOCAB_SIZE}).save(sys.argv[2] + "/wordpiece.json")
t.train_bpe_tokenizer(texts, {VOCAB_SIZE}).save(sys.argv[2] + "/byte_bpe.json")
"""
# Whitespace and punctuation that pre-tokenizers treat specially: runs, tabs, CRLF, a
# no-break and an ideographic space, a control character, contractions, digits, CJK.
TRICKY = (
    "a  b\n\n  c\t d  \u3000x\x1c y it's  THEY'LL 12 345 ...!! naïve 東京 😀 \r\n end. "
    "\u00a0nbsp \u2028line  ## [MASK] <|endoftext|>\tz"
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~80 KB of the embedded corpus (its pydoc topics), plus non-ASCII text."""
    from pydoc_data import topics

    docs, size = [], 0
    for _, text in sorted(topics.topics.items()):
        docs.append(text)
        size += len(text)
        if size > 80_000:
            break
    return [*docs, TRICKY, "Ünïcödé façade — “quotes” 🙂 русский текст"]


@pytest.fixture(scope="module")
def trained(texts):
    return {
        "wordpiece": tokenizer_lib.train_tokenizer(texts, VOCAB_SIZE),
        "byte_bpe": tokenizer_lib.train_bpe_tokenizer(texts, VOCAB_SIZE),
    }


def test_two_processes_with_other_hash_seeds_give_byte_identical_files(tmp_path, texts, trained):
    corpus_file = tmp_path / "texts.json"
    corpus_file.write_text(json.dumps(texts), encoding="utf-8")
    runs = []
    for seed in ("1", "4242"):
        out = tmp_path / seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        command = [sys.executable, "-c", _TRAIN_SCRIPT, str(corpus_file), str(out)]
        runs.append((out, subprocess.Popen(command, env=env, stderr=subprocess.PIPE)))
    for _, process in runs:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    for kind, tokenizer in trained.items():
        first, second = ((out / f"{kind}.json").read_bytes() for out, _ in runs)
        assert first == second, kind
        # And the same as this process's training (a third hash seed).
        assert json.loads(first) == json.loads(tokenizer.to_str()), kind
        assert tokenizer.get_vocab_size() == VOCAB_SIZE


def _naive_bpe(word_counts, vocab_size, initial_symbols, prefix=""):
    """Reference BPE: every step recounts all pairs and merges the best by
    (count desc, left, right)."""
    vocab = list(dict.fromkeys([*initial_symbols, *sorted({s for w in word_counts for s in w})]))
    words = {tuple(w): c for w, c in word_counts.items()}
    merges = []
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        (left, right), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        new = left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)
        if new not in vocab:
            vocab.append(new)
        if (left, right) not in merges:
            merges.append((left, right))
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (left, right):
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return vocab, merges


def test_ties_go_to_the_smallest_pair_as_strings():
    # Every pair occurs twice except (z, z): 3 times. Then (a, b) < (b, a) < (c, d).
    counts = {("c", "d"): 2, ("b", "a"): 2, ("a", "b"): 2, ("z", "z", "z", "z"): 1, ("z",): 5}
    result = bpe.learn_bpe(counts, 9)
    assert result.merges == (("z", "z"), ("a", "b"), ("b", "a"), ("c", "d"))
    assert result.vocab == ("a", "b", "c", "d", "z", "zz", "ab", "ba", "cd")
    # The mapping's order does not matter.
    assert bpe.learn_bpe(dict(reversed(counts.items())), 9) == result


@pytest.mark.parametrize("prefix", ["", "##"])
def test_merges_match_a_naive_reference_on_words_full_of_ties(prefix):
    rng = np.random.default_rng(0)
    for trial in range(6):
        letters = "abc" if trial % 2 else "abcd"
        words = {}
        for _ in range(25):
            chars = [str(c) for c in rng.choice(list(letters), int(rng.integers(1, 7)))]
            key = (chars[0], *(prefix + c for c in chars[1:]))
            words[key] = words.get(key, 0) + int(rng.integers(1, 4))
        initial = sorted({s for w in words for s in w})
        vocab, merges = _naive_bpe(words, 40, initial, prefix)
        result = bpe.learn_bpe(words, 40, initial_symbols=initial, continuing_prefix=prefix)
        assert list(result.merges) == merges
        assert list(result.vocab) == vocab
        assert len(merges) > 10


def test_a_symbol_made_twice_is_one_vocabulary_entry():
    # "x"+"yz" and "xy"+"z" both make "xyz"; the second merge grows nothing.
    counts = {("x", "y", "z"): 3, ("y", "z"): 4, ("x", "y"): 2, ("q", "x", "y", "z", "q"): 1}
    vocab, merges = _naive_bpe(counts, 20, [])
    result = bpe.learn_bpe(counts, 20)
    assert list(result.vocab) == vocab and list(result.merges) == merges
    assert result.vocab.count("xyz") == 1


@pytest.mark.parametrize("kind", ["wordpiece", "byte_bpe"])
def test_word_counts_equal_pre_tokenizing_every_text(texts, kind):
    """count_words cuts texts into chunks first: the counts must not change."""
    normalizer = normalizers.BertNormalizer(lowercase=True) if kind == "wordpiece" else None
    pre = (
        pre_tokenizers.BertPreTokenizer()
        if kind == "wordpiece"
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    sample = [*texts[:3], TRICKY, " " + TRICKY + " ", TRICKY.replace(" ", "  ")]
    expected = collections.Counter()
    for text in sample:
        text = normalizer.normalize_str(text) if normalizer else text
        expected.update(word for word, _ in pre.pre_tokenize_str(text))
    counted = bpe.count_words(
        [sample[:2], *sample[2:]], normalizer, pre, spaces_separate=kind == "wordpiece"
    )
    assert counted == dict(expected)


def test_byte_bpe_round_trips_exactly_and_splits_as_trained(trained, texts):
    tokenizer = trained["byte_bpe"]
    for text in (TRICKY, texts[-1], texts[0][:2000], "  leading and trailing  "):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    vocab = tokenizer.get_vocab()
    byte_chars = [bpe.bytes_to_unicode()[b] for b in range(256)]
    assert [vocab[c] for c in byte_chars] == list(range(1, 257))
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert tokenizer.encode("a<|endoftext|>b").ids[1] == 0  # A special token.
    assert "Ġthe" in vocab  # Frequent words are merged whole, with their space.


def test_wordpiece_keeps_specials_first_and_knows_every_training_character(trained, texts):
    tokenizer = trained["wordpiece"]
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in tokenizer_lib.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(vocab) == VOCAB_SIZE
    unk = tokenizer_lib.SpecialIds.from_tokenizer(tokenizer).unk
    for text in texts[:-2]:
        assert unk not in tokenizer.encode(text).ids
    text = "Return the Value of the attribute"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text.lower()
    assert any(t.startswith("##") and len(t) > 3 for t in vocab)


def test_byte_lengths_of_byte_level_ids_sum_to_the_utf8_length(trained):
    tokenizer = trained["byte_bpe"]
    lengths = tokenizer_lib.token_byte_lengths(tokenizer)
    assert lengths.dtype == np.int32 and lengths.shape == (VOCAB_SIZE,)
    assert lengths[0] == 0 and (lengths[1:257] == 1).all()
    rng = np.random.default_rng(1)
    alphabet = [*"abc xyz\n\t.,'", "é", "ß", "東", "€", "😀", "\u00a0", "Ω"]
    for _ in range(5):
        text = "".join(rng.choice(alphabet, 300)) + " the end"
        ids = tokenizer.encode(text).ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    byte_of = {c: b for b, c in bpe.bytes_to_unicode().items()}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id:  # Not <|endoftext|>.
            assert lengths[token_id] == len(bytes(byte_of[c] for c in token)) == len(token)


def test_bytes_to_unicode_is_gpt2s_printable_bijection():
    table = bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    # Exactly what the tokenizers library's ByteLevel uses.
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert list(itertools.islice(table.items(), 3)) == [(33, "!"), (34, '"'), (35, "#")]
