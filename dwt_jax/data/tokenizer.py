"""Tokenizers: trained on the configured corpus and cached, or loaded.

Two kinds are trained (``get_tokenizer``'s ``kind``), both deterministically — the
same corpus gives a byte-identical ``tokenizer.json`` on every machine, whatever the
hash seed (the merges come from ``bpe.learn_bpe``, whose ties follow a total order):

- ``'wordpiece'`` (encoders): lowercasing WordPiece models (``BertNormalizer``,
  ``BertPreTokenizer``) whose special tokens have fixed ids: ``[PAD]=0, [UNK]=1,
  [CLS]=2, [SEP]=3, [MASK]=4``.
- ``'byte_bpe'`` (decoders): GPT-2-style byte-level BPE (every byte in the vocabulary,
  so any text round-trips exactly) with ``<|endoftext|>=0``, the end of a document
  and the padding (``causal_special_ids``).

Neither has a post-processor: encoding a document never adds special tokens — the
packer does (see ``pretrain.py``).

The trained ``tokenizer.json`` is cached under ``data.tokenizer_cache_dir/<corpus
fingerprint>-<kind>-<trainer version>-v<vocab_size>/``: the same corpus, kind and size
load it again; anything else (an older trainer's cache too) trains a new one.

``data.tokenizer_path`` names a ``tokenizer.json``, a directory holding one or a BERT
``vocab.txt``, or a Hugging Face model directory (read through transformers:
``load_hf_tokenizer``, which ``dwt_jax.hf.load_tokenizer`` also uses). A file there (or
in the cache) that is missing, not UTF-8, not JSON or not a tokenizer is a
``DataConfigError`` naming its path (``dwt_jax.readers``), never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from dwt_jax import readers
from dwt_jax.data import bpe, corpus, textfiles
from dwt_jax.data.causal import CausalSpecialIds
from dwt_jax.errors import ConfigError, DataConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
END_OF_TEXT = "<|endoftext|>"
TOKENIZER_KINDS = ("wordpiece", "byte_bpe")
# Part of the cache key: a change to what the trainers produce bumps it, so that no
# cache of an older trainer is reused (t1 was Hugging Face's WordPieceTrainer).
TRAINER_VERSION = "t2"
# Causal roles' token names, first found wins (GPT-2/Qwen, Llama 3, SentencePiece,
# ChatML, Gemma; pads: Gemma/SentencePiece, some GPT-NeoX ports, BERT, Llama 3.1).
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
# SentencePiece's word-boundary mark and byte-fallback tokens.
_METASPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Each role's names: BERT's, then RoBERTa's.
_SPECIAL_NAMES = tuple(
    zip(SPECIAL_TOKENS, ("<pad>", "<unk>", "<s>", "</s>", "<mask>"), strict=True)
)
_DEFAULT_CACHE_DIR = "~/.cache/dwt_jax/tokenizers"
# The trainer gets the corpus in batches of at most this many texts and characters
# (its memory is ~70 bytes per character of a batch); longer texts are split first.
_TRAIN_BATCH = 256
_TRAIN_BATCH_CHARS = 4_000_000
# Records with invalid UTF-8 are logged this many times per process, then counted.
_MAX_INVALID_TEXT_WARNINGS = 5
_invalid_texts = 0


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the packer and the masker need."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer) -> SpecialIds:
        """Reads the ids from ``tokenizer`` (BERT's ``[PAD]``... or RoBERTa's ``<pad>``...
        names); raises ``ValueError`` if one is missing."""
        ids = {}
        for role, names in zip(("pad", "unk", "cls", "sep", "mask"), _SPECIAL_NAMES, strict=True):
            found = [
                tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None
            ]
            ids[role] = found[0] if found else None
        missing = [SPECIAL_TOKENS[i] for i, v in enumerate(ids.values()) if v is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks special tokens {missing}; BERT-style pre-training needs "
                f"all of {list(SPECIAL_TOKENS)} (or RoBERTa's {[n[1] for n in _SPECIAL_NAMES]}; "
                "check data.tokenizer_path)."
            )
        return cls(*(int(v) for v in ids.values()))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


def _first_id(tokenizer: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return None


def causal_special_ids(tokenizer: tokenizers.Tokenizer) -> CausalSpecialIds:
    """The causal special ids of ``tokenizer`` (names: ``EOS_NAMES``, ``PAD_NAMES``,
    ``BOS_NAMES``, first found wins); a ``DataConfigError`` if it has no end-of-document
    token, which packing documents into one sequence needs."""
    eos = _first_id(tokenizer, EOS_NAMES)
    if eos is None:
        raise DataConfigError(
            f"{_PATH_FIELD}: the tokenizer has no end-of-document token (none of "
            f"{list(EOS_NAMES)}), which a causal LM needs between packed documents; point "
            f"{_PATH_FIELD} at a decoder's tokenizer, or set it to '' to train one."
        )
    pad = _first_id(tokenizer, PAD_NAMES)
    return CausalSpecialIds(
        eos=eos, pad=eos if pad is None else pad, bos=_first_id(tokenizer, BOS_NAMES)
    )


def _components(spec: Any) -> Iterator[dict[str, Any]]:
    """The components of one tokenizer.json section, nested ``Sequence``s flattened."""
    if isinstance(spec, dict):
        yield spec
        for key in ("normalizers", "pretokenizers", "decoders"):
            for part in spec.get(key) or ():
                yield from _components(part)


def _surface_style(spec: dict[str, Any]) -> str:
    """How a token's string spells its text: 'byte_level' (GPT-2's byte characters),
    'metaspace' (SentencePiece's ``\u2581`` and ``<0xNN>``), 'wordpiece' or 'other'."""
    decoder_types = {c.get("type") for c in _components(spec.get("decoder"))}
    pre_types = {c.get("type") for c in _components(spec.get("pre_tokenizer"))}
    if "ByteLevel" in decoder_types or (not decoder_types and "ByteLevel" in pre_types):
        return "byte_level"
    replaces_metaspace = any(
        c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == _METASPACE
        for c in _components(spec.get("decoder"))
    )
    if replaces_metaspace or {"Metaspace", "ByteFallback"} & (decoder_types | pre_types):
        return "metaspace"
    return "wordpiece" if "WordPiece" in decoder_types else "other"


def token_byte_lengths(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """int32 [vocab]: the UTF-8 bytes of text each token id stands for, so that a text's
    bytes are the sum over its ids (bits per byte: ``docs/methods.md#bits-per-byte``).

    Byte-level BPE: one byte per character of the token (GPT-2's byte alphabet, ``Ġ`` is
    a space); SentencePiece style: ``\u2581`` is one space byte, ``<0xNN>`` one byte;
    WordPiece: the token without its ``##`` prefix; otherwise the decoded token's bytes.
    Special tokens are 0 (they stand for no text); other added tokens match their
    content literally, so they count its bytes. Ids that no token has are 0.
    """
    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(
        tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1
    )
    lengths = np.zeros(size, np.int32)
    style = _surface_style(spec)
    byte_of = {c: b for b, c in bpe.bytes_to_unicode().items()}
    prefix = (spec.get("model") or {}).get("continuing_subword_prefix") or "##"
    if style == "other":
        decoded = tokenizer.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
        surfaces = dict(zip(vocab.values(), (len(d.encode("utf-8")) for d in decoded), strict=True))
    for token, token_id in vocab.items():
        if style == "byte_level":
            n = sum(1 if c in byte_of else len(c.encode("utf-8")) for c in token)
        elif style == "metaspace":
            n = 1 if _BYTE_TOKEN.fullmatch(token) else len(token.replace(_METASPACE, " ").encode())
        elif style == "wordpiece":
            n = len(token.removeprefix(prefix).encode("utf-8"))
        else:
            n = surfaces[token_id]
        lengths[token_id] = n
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        lengths[token_id] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def as_text(value: Any) -> str:
    """A record's text as ``str`` (TFDS text features come back as UTF-8 ``bytes``;
    invalid bytes become U+FFFD, with a warning for the first few such records)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            _warn_invalid_text(e, len(value))
            return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # numpy scalar / 0-d array of bytes or str
        return as_text(value.item())
    return str(value)


def _warn_invalid_text(error: UnicodeDecodeError, size: int) -> None:
    global _invalid_texts
    _invalid_texts += 1
    if _invalid_texts <= _MAX_INVALID_TEXT_WARNINGS:
        logging.warning(
            "A record's text is not valid UTF-8 (byte %d of %d: %s); invalid bytes are "
            "read as U+FFFD%s.",
            error.start,
            size,
            error.reason,
            "; further such records are not logged"
            if _invalid_texts == _MAX_INVALID_TEXT_WARNINGS
            else "",
        )


def new_wordpiece_tokenizer(vocab: dict[str, int] | None = None) -> tokenizers.Tokenizer:
    """An (untrained unless ``vocab`` is given) lowercasing BERT WordPiece tokenizer."""
    model = (
        models.WordPiece(vocab=vocab, unk_token="[UNK]")
        if vocab
        else models.WordPiece(unk_token="[UNK]")
    )
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def train_tokenizer(
    texts: Iterable[str] | Iterable[Sequence[str]], vocab_size: int
) -> tokenizers.Tokenizer:
    """Trains a WordPiece tokenizer of ``vocab_size`` entries (specials first) on ``texts``
    (strings, or batches of them), deterministically (``bpe.wordpiece_vocabulary``: more
    entries if the corpus has more distinct characters, fewer if it runs out of pairs)."""
    tokenizer = new_wordpiece_tokenizer()
    counts = bpe.count_words(
        texts, tokenizer.normalizer, tokenizer.pre_tokenizer, spaces_separate=True
    )
    learned = bpe.wordpiece_vocabulary(counts, vocab_size - len(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in learned:
        vocab.setdefault(token, len(vocab))
    tokenizer = new_wordpiece_tokenizer(vocab)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str] | Iterable[Sequence[str]], vocab_size: int
) -> tokenizers.Tokenizer:
    """Trains a GPT-2-style byte-level BPE tokenizer of ``vocab_size`` entries on ``texts``
    (strings, or batches of them), deterministically: ``<|endoftext|>`` is id 0, the 256
    bytes ids 1-256 (in byte order), then the merges' symbols (``bpe.byte_level_bpe``)."""
    if vocab_size < 257:
        raise DataConfigError(
            f"data.vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it "
            f"holds {END_OF_TEXT} and all 256 bytes; set data.vocab_size to 257 or more."
        )
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts = bpe.count_words(texts, None, pre_tokenizer, spaces_separate=False)
    symbols, merges = bpe.byte_level_bpe(counts, vocab_size - 1)
    vocab = {END_OF_TEXT: 0}
    for token in symbols:
        vocab.setdefault(token, len(vocab))
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def _corpus_texts(data_config: Any) -> Iterator[list[str]]:
    """The train split's texts in batches (see ``_TRAIN_BATCH``), long ones split."""
    source = corpus.load_text_source(data_config, data_config.get("train_split", "train"))
    batch: list[str] = []
    chars = 0
    for index in range(len(source)):
        for piece in textfiles.split_long_documents([as_text(source[index]["text"])]):
            batch.append(piece)
            chars += len(piece)
            if len(batch) == _TRAIN_BATCH or chars >= _TRAIN_BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


_PATH_FIELD = "data.tokenizer_path"
_PATH_FIX = "fix or replace it, or set data.tokenizer_path to '' to train a tokenizer"
_CACHE_FIX = "delete it to train the tokenizer again"
# The files of a Hugging Face directory that transformers may parse for its tokenizer.
_HF_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "config.json")
_HF_TEXT_FILES = ("vocab.txt", "merges.txt")


def _read_vocab(
    path: str, field: str, *, error: type[ConfigError] = DataConfigError
) -> dict[str, int]:
    """``{token: line index}`` of a BERT ``vocab.txt`` (UTF-8, one token a line, as
    text mode reads it); a file that cannot be read is ``error`` naming it."""
    lines = readers.read_text(path, field, fix=_PATH_FIX, error=error).split("\n")
    if lines[-1] == "":  # The text ends with a line break (or is empty).
        lines.pop()
    return {line: i for i, line in enumerate(lines)}


def _check_hf_tokenizer_files(path: str, field: str, error: type[ConfigError]) -> None:
    """Raises ``error`` naming the first tokenizer file of the Hugging Face directory
    ``path`` that is damaged (not UTF-8, not JSON, not a tokenizer)."""
    fix = f"restore it from the model's source, or point {field} at another directory"
    for name in _HF_JSON_FILES:
        if os.path.exists(os.path.join(path, name)):
            readers.read_json(os.path.join(path, name), field, expect=dict, fix=fix, error=error)
    for name in _HF_TEXT_FILES:
        if os.path.exists(os.path.join(path, name)):
            readers.read_text(os.path.join(path, name), field, fix=fix, error=error)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        readers.load_tokenizer_file(
            os.path.join(path, "tokenizer.json"), field, fix=fix, error=error
        )


def load_hf_tokenizer(
    path: str, field: str, *, error: type[ConfigError] = DataConfigError
) -> tokenizers.Tokenizer:
    """The fast tokenizer of a Hugging Face directory (through transformers, so that
    ``tokenizer_config.json`` settings such as lower-casing are honoured); ``error``
    (one line naming ``field`` and, if one is damaged, the file) if none loads."""
    import transformers

    fix = f"point {field} at a Hugging Face model directory"
    path = readers.check_directory(path, field, fix=fix, error=error)
    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        _check_hf_tokenizer_files(path, field, error)
        raise error(
            f"{field}: no tokenizer could be loaded from {path} ({readers.one_line(e)}); it "
            "needs tokenizer.json, or vocab.txt / vocab.json+merges.txt with "
            "tokenizer_config.json."
        ) from None
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise error(f"{field}: the tokenizer in {path} has no fast (Rust) version.")
    return tokenizers.Tokenizer.from_str(backend.to_str())


def _load_path(path: str) -> tokenizers.Tokenizer:
    path = os.path.expanduser(path.removeprefix("hf:"))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            # A Hugging Face directory: through transformers, which honours its settings
            # (lower-casing of vocab.txt models, RoBERTa's vocab.json + merges.txt).
            return load_hf_tokenizer(path, _PATH_FIELD)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return readers.load_tokenizer_file(
                os.path.join(path, "tokenizer.json"),
                _PATH_FIELD,
                fix=_PATH_FIX,
                error=DataConfigError,
            )
        vocab_file = os.path.join(path, "vocab.txt")
        if os.path.isfile(vocab_file):
            return new_wordpiece_tokenizer(_read_vocab(vocab_file, _PATH_FIELD))
        raise DataConfigError(
            f"data.tokenizer_path={path!r} holds neither tokenizer.json nor vocab.txt; "
            "point it at a tokenizer.json file or a Hugging Face model directory."
        )
    if os.path.exists(path):
        return readers.load_tokenizer_file(path, _PATH_FIELD, fix=_PATH_FIX, error=DataConfigError)
    raise DataConfigError(
        f"data.tokenizer_path={path!r} does not exist; fix it or set it to '' to train "
        "a tokenizer on the configured corpus."
    )


def _check_kind(kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is unknown; use one of {TOKENIZER_KINDS}.")


def tokenizer_cache_path(data_config: Any, kind: str = "wordpiece") -> str:
    """Where the trained tokenizer of this kind, corpus and vocabulary size is cached."""
    _check_kind(kind)
    cache_dir = readers.check_directory(
        str(data_config.get("tokenizer_cache_dir", "") or _DEFAULT_CACHE_DIR),
        "data.tokenizer_cache_dir",
        must_exist=False,
        fix="set data.tokenizer_cache_dir to a directory (or a path where one can be created)",
        error=DataConfigError,
    )
    fingerprint = corpus.corpus_fingerprint(data_config)
    key = f"{fingerprint}-{kind}-{TRAINER_VERSION}-v{int(data_config.vocab_size)}"
    return os.path.join(cache_dir, key, "tokenizer.json")


def get_tokenizer(data_config: Any, kind: str = "wordpiece") -> tokenizers.Tokenizer:
    """The configured tokenizer, with no post-processor (no special tokens added on encode).

    ``data.tokenizer_path`` (a tokenizer.json, a Hugging Face model directory, or a
    directory with tokenizer.json or a lower-cased BERT vocab.txt) is loaded if set;
    otherwise a tokenizer of ``kind`` ('wordpiece' for encoders, 'byte_bpe' for decoders)
    and ``data.vocab_size`` is trained on the train split once and cached. It must have
    the special tokens of its use: BERT's (``SpecialIds``) for 'wordpiece', an end of
    document (``causal_special_ids``) for 'byte_bpe'.
    """
    _check_kind(kind)
    path = str(data_config.get("tokenizer_path", "") or "")
    if path:
        tokenizer = _load_path(path)
    else:
        cache_path = tokenizer_cache_path(data_config, kind)
        if os.path.isfile(cache_path):
            tokenizer = readers.load_tokenizer_file(
                cache_path, "data.tokenizer_cache_dir", fix=_CACHE_FIX, error=DataConfigError
            )
        else:
            logging.info(
                "Training a %d-entry %s tokenizer -> %s",
                int(data_config.vocab_size),
                kind,
                cache_path,
            )
            train = train_tokenizer if kind == "wordpiece" else train_bpe_tokenizer
            tokenizer = train(_corpus_texts(data_config), int(data_config.vocab_size))
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            # Write then rename so that concurrent hosts never read a half-written file.
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_path), suffix=".json")
            os.close(fd)
            tokenizer.save(tmp)
            os.replace(tmp, cache_path)
    tokenizer.post_processor = None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if kind == "wordpiece":
        SpecialIds.from_tokenizer(tokenizer)
    else:
        causal_special_ids(tokenizer)
    return tokenizer
