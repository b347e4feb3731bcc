"""Local text files as a corpus (``data.text_files``, ``data.eval_text_files``).

Files are read whole, up front, so that nothing about them can fail once training
runs:

- Documents are blocks of lines separated by blank (whitespace-only) lines; line
  endings are ``\n``, ``\r\n`` or ``\r`` (Python's universal newlines).
- A file that is empty or blank is skipped with a warning; if every file is, the
  split is a ``DataConfigError``. A directory, an unreadable file or a pattern that
  matches no file is a ``DataConfigError`` naming the field and the path.
- A leading UTF-8 byte-order mark is dropped. Invalid UTF-8 bytes are replaced by
  U+FFFD and NUL bytes removed, with one warning per file giving their count and
  first byte offset. A file that is not text (more than ``MAX_BAD_BYTE_FRACTION``
  of its bytes invalid or NUL, a UTF-16/32 byte-order mark, or a compressed file)
  is a ``DataConfigError``: convert it to UTF-8 text.
- A document longer than ``MAX_DOCUMENT_CHARS`` characters is split (after the
  validation hash, so no other document changes split) into pieces of at most that
  length, cut at a line break or a space where there is one in the piece's second
  half: each piece is then a document of its own. This bounds the tokenizer's
  memory (~130 bytes per character of one text), the tokenizer trainer's and the
  packer's state in each iterator checkpoint; documents are packed into rows of
  ``seq_len`` tokens whose chunks never attend to each other anyway. The same
  bound applies to long TFDS records (``split_text``, used by the pipeline and
  the tokenizer trainer).

Without ``data.eval_text_files``, the validation split is a deterministic ~5% of
the documents, chosen by a stable hash of their index (``embedded.is_validation``).
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from dwt_jax.data.embedded import VALIDATION_PERCENT, is_validation
from dwt_jax.errors import DataConfigError

_log = logging.getLogger(__name__)

# Longer documents are split into pieces of at most this many characters (module doc).
MAX_DOCUMENT_CHARS = 1_000_000
# A text file with a larger fraction of invalid UTF-8 or NUL bytes is refused as not text.
MAX_BAD_BYTE_FRACTION = 0.1
_SNIFF_BYTES = 1 << 16
_READ_BYTES = 1 << 24
# Leading bytes of files that are not UTF-8 text: what they are, and the fix.
_NOT_TEXT_MAGIC = (
    (codecs.BOM_UTF32_LE, "UTF-32 text", "convert it to UTF-8"),
    (codecs.BOM_UTF32_BE, "UTF-32 text", "convert it to UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16 text", "convert it to UTF-8"),
    (codecs.BOM_UTF16_BE, "UTF-16 text", "convert it to UTF-8"),
    (b"\x1f\x8b", "a gzip file", "decompress it"),
    (b"BZh", "a bzip2 file", "decompress it"),
    (b"\xfd7zXZ\x00", "an xz file", "decompress it"),
    (b"\x28\xb5\x2f\xfd", "a zstd file", "decompress it"),
    (b"PK\x03\x04", "a zip archive", "extract it"),
)
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_MAX_LISTED_PATHS = 5


class _TextListSource:
    """Random-access sequence of ``{"text": str}`` records held in memory."""

    def __init__(self, texts: Sequence[str]):
        self._texts = list(texts)

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"text": self._texts[index]}

    def __repr__(self) -> str:
        return f"_TextListSource({len(self._texts)} documents)"


def _names(paths: Sequence[str]) -> str:
    """``paths`` for a one-line message: the first few, then how many more."""
    shown = ", ".join(repr(p) for p in paths[:_MAX_LISTED_PATHS])
    more = len(paths) - _MAX_LISTED_PATHS
    return shown + (f" and {more} more" if more > 0 else "")


_warned: set[tuple[str, ...]] = set()


def _warn_once(key: tuple[str, ...], message: str, *args: Any) -> None:
    """Logs a warning once per process for ``key`` (the sources are read several times)."""
    if key not in _warned:
        _warned.add(key)
        _log.warning(message, *args)


def _file_key(path: str) -> tuple[str, ...]:
    try:
        stat = os.stat(path)
        return (os.path.realpath(path), str(stat.st_size), str(stat.st_mtime_ns))
    except OSError:
        return (os.path.realpath(path),)


def expand_files(patterns: Sequence[str], field: str) -> list[str]:
    """The files ``data.<field>`` names, in order: paths as given, globs sorted."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [m for m in sorted(glob.glob(expanded)) if os.path.isfile(m)]
        elif os.path.isdir(expanded):
            raise DataConfigError(
                f"data.{field}: {pattern!r} is a directory; list its files, e.g. with the "
                f"glob {os.path.join(pattern, '*.txt')!r}."
            )
        else:
            matches = [expanded] if os.path.isfile(expanded) else []
        if not matches:
            raise DataConfigError(
                f"data.{field}: no readable file matches {pattern!r}; "
                f"fix the path or glob in data.{field}."
            )
        unreadable = [m for m in matches if not os.access(m, os.R_OK)]
        if unreadable:
            raise DataConfigError(
                f"data.{field}: {_names(unreadable)} cannot be read (permission denied); "
                f"fix the permissions or remove it from data.{field}."
            )
        files.extend(matches)
    seen: set[str] = set()
    repeated = []
    for f in files:
        real = os.path.realpath(f)
        if real in seen:
            repeated.append(f)
        seen.add(real)
    if repeated:
        _warn_once(
            (field, "repeated", *map(os.path.realpath, repeated)),
            "data.%s names %s more than once: its documents are read (and trained on) "
            "that many times.",
            field,
            _names(repeated),
        )
    return files


class _Damage:
    """Invalid UTF-8 and NUL bytes met while decoding one file (offsets in bytes)."""

    def __init__(self) -> None:
        self.bad = self.nul = 0
        self.first_bad = self.first_nul = -1

    def decode(self, raw: bytes, offset: int) -> str:
        """``raw`` (bytes at ``offset`` of the file) as text: invalid bytes → U+FFFD
        (as ``errors='replace'`` does), NUL bytes removed."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.first_bad < 0:
                self.first_bad = offset + e.start
            escaped = raw.decode("utf-8", "surrogateescape")  # One surrogate per bad byte.
            self.bad += len(escaped) - len(_ESCAPED_BYTE.sub("", escaped))
            text = raw.decode("utf-8", "replace")
        if "\x00" in text:
            if self.first_nul < 0:
                self.first_nul = offset + raw.index(b"\x00")
            self.nul += text.count("\x00")
            text = text.replace("\x00", "")
        return text

    def describe(self) -> str:
        parts = []
        if self.bad:
            parts.append(f"{self.bad} invalid UTF-8 bytes (first at byte {self.first_bad})")
        if self.nul:
            parts.append(f"{self.nul} NUL bytes (first at byte {self.first_nul})")
        return " and ".join(parts)


def _check_is_text(damage: _Damage, size: int, head: bytes, path: str, field: str) -> None:
    """Raises ``DataConfigError`` if ``damage`` in ``size`` bytes says the file is not text."""
    if damage.bad + damage.nul <= MAX_BAD_BYTE_FRACTION * size:
        return
    what, fix = next(
        ((w, f) for magic, w, f in _NOT_TEXT_MAGIC if head.startswith(magic)),
        ("", "convert it to UTF-8 text"),
    )
    raise DataConfigError(
        f"data.{field}: {path!r} is not UTF-8 text ({damage.describe()} in its first "
        f"{size} bytes{'; it looks like ' + what if what else ''}); {fix} or remove it "
        f"from data.{field}."
    )


def _read_text_file(path: str, field: str) -> tuple[list[str], _Damage]:
    """The documents of one file (see the module doc) and the damage met decoding it."""
    docs: list[str] = []
    block: list[str] = []
    damage = _Damage()
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            # Check the head first: a compressed or binary file is refused before it is read.
            decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
            decoder.decode(head, final=len(head) < _SNIFF_BYTES)
            whole = head[: len(head) - len(decoder.getstate()[0])]  # Not a cut character.
            sniff = _Damage()
            sniff.decode(whole, 0)
            _check_is_text(sniff, len(whole), head, path, field)
            f.seek(0)
            offset = 0
            # Chunks of whole lines: b"\n" is never inside a UTF-8 sequence or a "\r\n".
            while chunk := f.read(_READ_BYTES):
                if not chunk.endswith(b"\n"):
                    chunk += f.readline()
                start = offset
                offset += len(chunk)
                if start == 0 and chunk.startswith(codecs.BOM_UTF8):
                    chunk, start = chunk[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
                text = damage.decode(chunk, start)
                if "\r" in text:  # Universal newlines, as text mode reads them.
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                lines = text.split("\n")
                if text.endswith("\n"):
                    lines.pop()
                for line in lines:
                    if line.strip():
                        block.append(line)
                    elif block:
                        docs.append("\n".join(block))
                        block = []
            if block:
                docs.append("\n".join(block))
    except OSError as e:
        raise DataConfigError(
            f"data.{field}: cannot read {path!r} ({e.strerror or e}); fix it or remove it "
            f"from data.{field}."
        ) from None
    _check_is_text(damage, offset, head, path, field)
    return docs, damage


def read_text_documents(paths: Sequence[str], field: str = "text_files") -> list[str]:
    """Documents of the UTF-8 text files ``paths`` (of ``data.<field>``): blocks of lines
    separated by blank lines, in file order. Empty files are skipped and damaged bytes
    handled as the module doc says; raises ``DataConfigError`` if no file has text."""
    docs: list[str] = []
    empty: list[str] = []
    for path in paths:
        file_docs, damage = _read_text_file(path, field)
        if not file_docs:
            empty.append(path)
        if damage.bad or damage.nul:
            _warn_once(
                ("damage", *_file_key(path)),
                "data.%s: %r has %s; invalid bytes are read as U+FFFD and NUL bytes "
                "dropped (if the file is not UTF-8, convert it, e.g. `iconv -f latin1 "
                "-t utf-8`).",
                field,
                path,
                damage.describe(),
            )
        long_docs = [len(d) for d in file_docs if len(d) > MAX_DOCUMENT_CHARS]
        if long_docs:
            _warn_once(
                ("long", str(MAX_DOCUMENT_CHARS), *_file_key(path)),
                "data.%s: %r has %d documents longer than %d characters (the longest: %d); "
                "each is split into documents of at most %d characters.",
                field,
                path,
                len(long_docs),
                MAX_DOCUMENT_CHARS,
                max(long_docs),
                MAX_DOCUMENT_CHARS,
            )
        docs.extend(file_docs)
    if not docs:
        raise DataConfigError(
            f"data.{field}: every file is empty or blank ({_names(empty)}); point data.{field} "
            "at files with text (documents are separated by blank lines)."
        )
    if empty:
        _warn_once(
            (field, "empty", *(k for p in empty for k in _file_key(p))),
            "data.%s: skipping %d empty or blank file(s): %s.",
            field,
            len(empty),
            _names(empty),
        )
    return docs


def split_text(text: str, max_chars: int | None = None) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``max_chars`` characters
    (default ``MAX_DOCUMENT_CHARS``) that join back to ``text``: each cut is before the
    last line break, else the last space, in the second half of the piece, else hard."""
    max_chars = MAX_DOCUMENT_CHARS if max_chars is None else int(max_chars)
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2; got {max_chars}")
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        stop = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, stop)
        if cut < 0:
            cut = text.rfind(" ", start + max_chars // 2, stop)
        if cut < 0:
            cut = stop
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def split_long_documents(docs: Sequence[str], max_chars: int | None = None) -> list[str]:
    """``docs`` with each document longer than ``max_chars`` (default
    ``MAX_DOCUMENT_CHARS``) replaced by its ``split_text`` pieces."""
    max_chars = MAX_DOCUMENT_CHARS if max_chars is None else int(max_chars)
    if all(len(d) <= max_chars for d in docs):
        return list(docs)
    return [piece for d in docs for piece in split_text(d, max_chars)]


def _first_validation_index() -> int:
    index = 0
    while not is_validation(index):
        index += 1
    return index


def text_files_source(data_config: Any, split: str) -> _TextListSource:
    """The ``split`` of ``data.text_files`` (or of ``data.eval_text_files``, if set,
    for any split but ``data.train_split``) as ``{"text": str}`` records."""
    files = expand_files(data_config.text_files, "text_files")
    eval_patterns = list(data_config.get("eval_text_files", None) or [])
    train_split = data_config.get("train_split", "train")
    if eval_patterns:
        if split == train_split:
            return _TextListSource(split_long_documents(read_text_documents(files)))
        eval_files = expand_files(eval_patterns, "eval_text_files")
        shared = sorted(
            {os.path.realpath(f) for f in files} & {os.path.realpath(f) for f in eval_files}
        )
        if shared:
            _warn_once(
                ("eval_overlap", *shared),
                "data.eval_text_files: %s is also in data.text_files (its documents are "
                "both trained and evaluated on).",
                _names(shared),
            )
        docs = read_text_documents(eval_files, "eval_text_files")
        return _TextListSource(split_long_documents(docs))
    docs = read_text_documents(files)
    held_out = split != train_split
    kept = [d for i, d in enumerate(docs) if is_validation(i) == held_out]
    if not kept:
        raise DataConfigError(
            f"data.text_files: none of its {len(docs)} documents falls in split {split!r} "
            f"(~{VALIDATION_PERCENT}% of documents, chosen by a hash of their index, are "
            f"held out; the first is document {_first_validation_index()}); set "
            "data.eval_text_files to held-out files."
        )
    return _TextListSource(split_long_documents(kept))
