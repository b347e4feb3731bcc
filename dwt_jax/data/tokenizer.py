"""BERT-style WordPiece tokenizers: trained on the configured corpus and cached, or loaded.

Trained tokenizers are lowercasing WordPiece models (``BertNormalizer``,
``BertPreTokenizer``) whose special tokens have fixed ids: ``[PAD]=0, [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4``. They have no post-processor: encoding a document
never adds ``[CLS]``/``[SEP]`` — the packer does (see ``pretrain.py``).

The trained ``tokenizer.json`` is cached under
``data.tokenizer_cache_dir/<corpus fingerprint>-v<vocab_size>/``: the same corpus
and size load it again, a different corpus or size trains a new one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from dwt_jax.data import corpus

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
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


def train_tokenizer(texts: Iterator[str] | Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a WordPiece tokenizer of ``vocab_size`` entries (specials first) on ``texts``."""
    tokenizer = new_wordpiece_tokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _corpus_texts(data_config: Any) -> Iterator[list[str]]:
    """The train split's texts in batches (see ``_TRAIN_BATCH``), long ones split."""
    source = corpus.load_text_source(data_config, data_config.get("train_split", "train"))
    batch: list[str] = []
    chars = 0
    for index in range(len(source)):
        for piece in corpus.split_long_documents([as_text(source[index]["text"])]):
            batch.append(piece)
            chars += len(piece)
            if len(batch) == _TRAIN_BATCH or chars >= _TRAIN_BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _load_path(path: str) -> tokenizers.Tokenizer:
    path = os.path.expanduser(path.removeprefix("hf:"))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            # A Hugging Face directory: through transformers, which honours its settings
            # (lower-casing of vocab.txt models, RoBERTa's vocab.json + merges.txt).
            from dwt_jax import hf

            try:
                return hf.load_tokenizer(path, "data.tokenizer_path")
            except hf.HFConversionError as e:
                raise corpus.DataConfigError(str(e)) from None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        vocab_file = os.path.join(path, "vocab.txt")
        if os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as f:
                vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
            return new_wordpiece_tokenizer(vocab)
        raise corpus.DataConfigError(
            f"data.tokenizer_path={path!r} holds neither tokenizer.json nor vocab.txt; "
            "point it at a tokenizer.json file or a Hugging Face model directory."
        )
    if os.path.isfile(path):
        return tokenizers.Tokenizer.from_file(path)
    raise corpus.DataConfigError(
        f"data.tokenizer_path={path!r} does not exist; fix it or set it to '' to train "
        "a tokenizer on the configured corpus."
    )


def tokenizer_cache_path(data_config: Any) -> str:
    """Where the trained tokenizer for this corpus and vocabulary size is cached."""
    cache_dir = os.path.expanduser(
        str(data_config.get("tokenizer_cache_dir", "") or _DEFAULT_CACHE_DIR)
    )
    key = f"{corpus.corpus_fingerprint(data_config)}-v{int(data_config.vocab_size)}"
    return os.path.join(cache_dir, key, "tokenizer.json")


def get_tokenizer(data_config: Any) -> tokenizers.Tokenizer:
    """The configured tokenizer, with no post-processor (no [CLS]/[SEP] added on encode).

    ``data.tokenizer_path`` (a tokenizer.json, a Hugging Face model directory, or a
    directory with tokenizer.json or a lower-cased BERT vocab.txt) is loaded if set;
    otherwise a WordPiece tokenizer of ``data.vocab_size`` is trained on the train
    split once and cached.
    """
    path = str(data_config.get("tokenizer_path", "") or "")
    if path:
        tokenizer = _load_path(path)
    else:
        cache_path = tokenizer_cache_path(data_config)
        if os.path.isfile(cache_path):
            tokenizer = tokenizers.Tokenizer.from_file(cache_path)
        else:
            logging.info(
                "Training a %d-entry WordPiece tokenizer -> %s",
                int(data_config.vocab_size),
                cache_path,
            )
            tokenizer = train_tokenizer(_corpus_texts(data_config), int(data_config.vocab_size))
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            # Write then rename so that concurrent hosts never read a half-written file.
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache_path), suffix=".json")
            os.close(fd)
            tokenizer.save(tmp)
            os.replace(tmp, cache_path)
    tokenizer.post_processor = None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    SpecialIds.from_tokenizer(tokenizer)
    return tokenizer
