"""Deterministic byte-pair-encoding training: word counts in, ordered merges out.

Hugging Face ``tokenizers``' trainers break ties between equally frequent pairs by
ids that follow HashMap iteration order, so two trainings on the same corpus can
give different vocabularies. ``learn_bpe`` breaks every tie by a total order
instead — the higher count first, then the pair ``(left, right)`` compared as
strings (code point by code point, left symbol first) — and assigns initial
symbols their ids in a fixed order, so its result depends only on the counts.

It is the standard incremental algorithm: pair counts, a pair -> words index and a
heap with lazy deletion (an entry is used only while its count is the pair's
current count), so each merge touches only the words that hold the pair.

Words are counted with the ``tokenizers`` library's own normalizer and
pre-tokenizer objects (``count_words``), so that training splits text exactly as
encoding will. ``wordpiece_vocabulary`` and ``byte_level_bpe`` build the two
tokenizers' vocabularies from such counts (see ``docs/methods.md#data``).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The continuation prefix of WordPiece symbols that do not start a word.
WORDPIECE_PREFIX = "##"
# Where GPT-2's pre-tokenizer regex always ends a pre-token, so that a text cut there
# pre-tokenises to the same words: before a space that lies between two characters
# that are not whitespace (a pre-token holds whitespace only at its start, or is all
# whitespace). Python's \s covers every character the Rust regex treats as whitespace
# (and a few more, which only makes cuts rarer).
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)")


@dataclasses.dataclass(frozen=True)
class BpeResult:
    """``vocab``: every symbol in id order (initial symbols, then each merge's new
    symbol the first time it is made); ``merges``: the merged pairs in rank order."""

    vocab: tuple[str, ...]
    merges: tuple[tuple[str, str], ...]


def _merge_word(
    word: list[int],
    pair: tuple[int, int],
    new: int,
    count: int,
    delta: dict[tuple[int, int], int],
    new_pairs: list[tuple[int, int]],
) -> list[int] | None:
    """``word`` with every non-overlapping ``pair`` (from the left) replaced by ``new``,
    or ``None`` if it holds none. The changes to pair counts (``count`` per occurrence)
    go into ``delta`` and the pairs holding ``new`` into ``new_pairs``: only the merged
    pair and its neighbours change. The left neighbour is the symbol already merged,
    so that ``a b a b`` -> ``ab ab`` moves ``(b, a)`` to ``(ab, a)`` then to ``(ab, ab)``."""
    left, right = pair
    if left not in word:
        return None
    i, n = word.index(left), len(word)
    out = word[:i]
    while i < n:
        if word[i] == left and i + 1 < n and word[i + 1] == right:
            delta[pair] -= count
            if out:
                before = out[-1]
                delta[before, left] -= count
                delta[before, new] += count
                new_pairs.append((before, new))
            if i + 2 < n:
                after = word[i + 2]
                delta[right, after] -= count
                delta[new, after] += count
                new_pairs.append((new, after))
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out if len(out) != n else None


def learn_bpe(
    word_counts: Mapping[tuple[str, ...], int],
    vocab_size: int,
    *,
    initial_symbols: Sequence[str] = (),
    continuing_prefix: str = "",
) -> BpeResult:
    """Learns merges until the vocabulary has ``vocab_size`` symbols (or no pair is left).

    ``word_counts`` maps each word, already split into its initial symbols, to its
    count. The vocabulary starts with ``initial_symbols`` (in the given order), then
    the other symbols of the words in sorted order. Each step merges the most frequent
    adjacent pair, ties going to the smallest ``(left, right)`` as strings; the new
    symbol is ``left + right`` with ``continuing_prefix`` removed from ``right`` (the
    WordPiece ``##`` convention). A pair whose symbol already exists (``"a"+"bc"`` and
    ``"ab"+"c"``) is merged without growing the vocabulary, as Hugging Face's trainer does.
    """
    symbols: list[str] = []
    ids: dict[str, int] = {}

    def intern(symbol: str) -> int:
        if symbol not in ids:
            ids[symbol] = len(symbols)
            symbols.append(symbol)
        return ids[symbol]

    for symbol in initial_symbols:
        intern(symbol)
    for symbol in sorted({s for word in word_counts for s in word} - ids.keys()):
        intern(symbol)
    # Words of one symbol hold no pair; the order of the words never matters (counts
    # are summed), so the result does not depend on the mapping's order.
    words = [[ids[s] for s in w] for w, c in word_counts.items() if c > 0 and len(w) > 1]
    counts = [c for w, c in word_counts.items() if c > 0 and len(w) > 1]
    pair_counts: dict[tuple[int, int], int] = collections.defaultdict(int)
    where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += count
            where[pair].add(index)
    heap = [(-c, symbols[a], symbols[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    merged: set[tuple[int, int]] = set()
    while len(symbols) < vocab_size and heap:
        negative, left_s, right_s, left, right = heapq.heappop(heap)
        if pair_counts.get((left, right), 0) != -negative:
            continue  # A stale entry: the pair's count changed since it was pushed.
        if continuing_prefix and right_s.startswith(continuing_prefix):
            new = intern(left_s + right_s[len(continuing_prefix) :])
        else:
            new = intern(left_s + right_s)
        if (left, right) not in merged:  # A pair can come back if its symbols are remade.
            merged.add((left, right))
            merges.append((left_s, right_s))
        delta: dict[tuple[int, int], int] = collections.defaultdict(int)
        for index in where.pop((left, right)):
            new_pairs: list[tuple[int, int]] = []
            new_word = _merge_word(
                words[index], (left, right), new, counts[index], delta, new_pairs
            )
            if new_word is None:
                continue  # The index is stale: an earlier merge used the pair up.
            words[index] = new_word
            for pair in new_pairs:
                where[pair].add(index)
        for pair, change in delta.items():
            if change:
                count = pair_counts[pair] + change
                if count > 0:
                    pair_counts[pair] = count
                    heapq.heappush(heap, (-count, symbols[pair[0]], symbols[pair[1]], *pair))
                else:
                    del pair_counts[pair]
    return BpeResult(tuple(symbols), tuple(merges))


def _flatten(texts: Iterable[Any]) -> Iterable[str]:
    """Texts given one by one or in batches (lists of texts), as ``train_from_iterator``
    takes them."""
    for item in texts:
        if isinstance(item, str):
            yield item
        else:
            yield from item


def count_words(
    texts: Iterable[Any], normalizer: Any, pre_tokenizer: Any, *, spaces_separate: bool
) -> dict[str, int]:
    """How often each pre-token (word) occurs in ``texts`` (strings, or batches of them),
    split by the ``tokenizers`` objects ``normalizer`` (or ``None``) and ``pre_tokenizer``.

    The same counts as pre-tokenising every text, about twice as fast: texts are cut
    into chunks that no word spans — at every space when ``spaces_separate`` (true of
    BERT's normaliser and pre-tokenizer: the first turns all whitespace into spaces, the
    second splits at whitespace), else at ``_SAFE_CUT`` (byte-level) — and each
    distinct chunk is pre-tokenised once.
    """
    chunks: collections.Counter[str] = collections.Counter()
    for text in _flatten(texts):
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        chunks.update(text.split(" ") if spaces_separate else _SAFE_CUT.split(text))
    chunks.pop("", None)
    words: collections.Counter[str] = collections.Counter()
    for chunk, count in chunks.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
            words[word] += count
    return dict(words)


def wordpiece_vocabulary(
    word_counts: Mapping[str, int], vocab_size: int, *, prefix: str = WORDPIECE_PREFIX
) -> list[str]:
    """A WordPiece vocabulary of at most ``vocab_size`` symbols (more if the alphabet is
    larger), built as Hugging Face's WordPieceTrainer does: BPE over characters, every
    character but a word's first carrying ``prefix``. Every character of the words is
    in it as a word start (sorted), then each continuation character (sorted), then
    the merges' symbols, so a training word never encodes to the unknown token."""
    split = {
        (word[0], *(prefix + char for char in word[1:])): count
        for word, count in word_counts.items()
        if word and count > 0
    }
    starts = sorted({c for w in word_counts for c in w})
    continuations = sorted({prefix + c for w in word_counts for c in w[1:]})
    result = learn_bpe(
        split, vocab_size, initial_symbols=[*starts, *continuations], continuing_prefix=prefix
    )
    return list(result.vocab)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that stands for it in a
    byte-level BPE vocabulary (printable Latin-1 bytes map to themselves; the others,
    space included, to U+0100 onwards: the space is ``Ġ``)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def byte_level_bpe(
    word_counts: Mapping[str, int], vocab_size: int
) -> tuple[list[str], list[tuple[str, str]]]:
    """The vocabulary (the 256 byte symbols in byte order, then the merges' symbols) and
    the merges of a byte-level BPE of ``vocab_size`` symbols over byte-level words (as
    ``pre_tokenizers.ByteLevel`` gives them: one character per byte)."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    split = {tuple(w): c for w, c in word_counts.items() if w and c > 0}
    result = learn_bpe(split, vocab_size, initial_symbols=alphabet)
    return list(result.vocab), list(result.merges)
