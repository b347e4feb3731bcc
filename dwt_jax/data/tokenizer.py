"""BERT-style WordPiece tokenizers: trained on the configured corpus and cached, or loaded.

Trained tokenizers are lowercasing WordPiece models (``BertNormalizer``,
``BertPreTokenizer``) whose special tokens have fixed ids: ``[PAD]=0, [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4``. They have no post-processor: encoding a document
never adds ``[CLS]``/``[SEP]`` — the packer does (see ``pretrain.py``).

The trained ``tokenizer.json`` is cached under
``data.tokenizer_cache_dir/<corpus fingerprint>-v<vocab_size>/``: the same corpus
and size load it again, a different corpus or size trains a new one.

``data.tokenizer_path`` names a ``tokenizer.json``, a directory holding one or a BERT
``vocab.txt``, or a Hugging Face model directory (read through transformers:
``load_hf_tokenizer``, which ``dwt_jax.hf.load_tokenizer`` also uses). A file there (or
in the cache) that is missing, not UTF-8, not JSON or not a tokenizer is a
``DataConfigError`` naming its path (``dwt_jax.readers``), never a traceback.
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

from dwt_jax import readers
from dwt_jax.data import corpus, textfiles
from dwt_jax.errors import ConfigError, DataConfigError

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


def tokenizer_cache_path(data_config: Any) -> str:
    """Where the trained tokenizer for this corpus and vocabulary size is cached."""
    cache_dir = readers.check_directory(
        str(data_config.get("tokenizer_cache_dir", "") or _DEFAULT_CACHE_DIR),
        "data.tokenizer_cache_dir",
        must_exist=False,
        fix="set data.tokenizer_cache_dir to a directory (or a path where one can be created)",
        error=DataConfigError,
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
            tokenizer = readers.load_tokenizer_file(
                cache_path, "data.tokenizer_cache_dir", fix=_CACHE_FIX, error=DataConfigError
            )
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
