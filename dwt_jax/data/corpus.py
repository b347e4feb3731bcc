"""Text sources: the embedded default corpus, any prepared TFDS dataset, local text files.

Every source is returned as a random-access sequence of ``{"text": str|bytes}``
records (``load_text_source``), selected by ``data.source``:

- ``'embedded'``: offline English prose from the Python install, built once as a
  TFDS dataset in ``data.tfds_data_dir`` (``embedded.py``).
- ``'tfds'``: any TFDS dataset (``data.tfds_name``) that the user prepared in
  ``data.tfds_data_dir`` in the ``array_record`` format; its ``data.text_field``
  feature is the text.
- ``'text_files'``: local UTF-8 text files, read whole and up front, with damaged,
  empty and very long files handled as ``textfiles.py`` says.

The validation split of the embedded corpus and of local text files is a
deterministic ~5% of the documents, chosen by a stable hash (``zlib.crc32``) of the
document id (``is_validation``). ``data.tfds_data_dir`` must be a directory or a
path where one can be created: anything else is a ``DataConfigError`` naming it,
raised before any dataset is built (``data_dir``).

The names of ``embedded.py`` and ``textfiles.py`` are importable from here too.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from dwt_jax import readers
from dwt_jax.data.embedded import (
    EMBEDDED_NAME,
    MIN_DOCSTRING_CHARS,
    VALIDATION_PERCENT,
    DwtEmbeddedCorpus,
    embedded_builder,
    embedded_documents,
    is_validation,
    prepared_builder,
)
from dwt_jax.data.textfiles import (
    MAX_BAD_BYTE_FRACTION,
    MAX_DOCUMENT_CHARS,
    expand_files,
    read_text_documents,
    split_long_documents,
    split_text,
    text_files_source,
)
from dwt_jax.errors import DataConfigError

__all__ = [
    "DEFAULT_TFDS_DIR",
    "EMBEDDED_NAME",
    "MAX_BAD_BYTE_FRACTION",
    "MAX_DOCUMENT_CHARS",
    "MIN_DOCSTRING_CHARS",
    "VALIDATION_PERCENT",
    "DataConfigError",
    "DwtEmbeddedCorpus",
    "corpus_fingerprint",
    "data_dir",
    "embedded_builder",
    "embedded_documents",
    "expand_files",
    "is_validation",
    "load_text_source",
    "prepared_builder",
    "read_text_documents",
    "split_long_documents",
    "split_text",
    "text_files_source",
    "tfds_builder",
]

DEFAULT_TFDS_DIR = "~/.cache/dwt_jax/tensorflow_datasets"
_TFDS_DIR_FIX = "set data.tfds_data_dir to a directory (or to a path where one can be created)"


def data_dir(data_config: Any) -> str:
    """``data.tfds_data_dir`` (default ``DEFAULT_TFDS_DIR``), user-expanded; a
    ``DataConfigError`` naming the field if it is a file or cannot be created."""
    path = str(data_config.get("tfds_data_dir", "") or DEFAULT_TFDS_DIR)
    return check_tfds_dir(path)


def check_tfds_dir(path: str) -> str:
    """``path`` (a ``data.tfds_data_dir``) user-expanded, if it is a directory or can be
    created; a ``DataConfigError`` naming ``data.tfds_data_dir`` otherwise."""
    return readers.check_directory(
        path, "data.tfds_data_dir", must_exist=False, fix=_TFDS_DIR_FIX, error=DataConfigError
    )


class _FieldSource:
    """Renames a TFDS record field to ``text`` and keeps random access."""

    def __init__(self, source: Sequence[Any], field: str, name: str):
        self._source = source
        self._field = field
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        if self._field not in record:
            raise DataConfigError(
                f"data.text_field={self._field!r} is not a feature of TFDS dataset "
                f"{self._name!r} (features: {sorted(record)}); set data.text_field."
            )
        return {"text": record[self._field]}

    def __repr__(self) -> str:
        return f"_FieldSource({self._name!r}, field={self._field!r}, n={len(self)})"


def tfds_builder(name: str, data_dir: str) -> Any:
    """The TFDS builder of ``data.tfds_name``, known and prepared (array_record) in
    ``data_dir``; a DataConfigError says what to fix otherwise. Reads nothing else."""
    data_dir = check_tfds_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # TFDS raises several registry/config error types.
        raise DataConfigError(
            f"data.tfds_name={name!r} is not a TFDS dataset ({type(e).__name__}); check "
            "the name against tfds.list_builders(), e.g. 'wikipedia/20230601.en'."
        ) from e
    if not builder.is_prepared():
        raise DataConfigError(
            f"data.tfds_name={name!r} is not prepared in data.tfds_data_dir={data_dir!r}; "
            f"prepare it there first: `tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record`."
        )
    return builder


def _tfds_source(data_config: Any, split: str) -> _FieldSource:
    name = str(data_config.get("tfds_name", "") or "")
    if not name:
        raise DataConfigError("data.tfds_name is empty; set it, e.g. 'wikipedia/20230601.en'.")
    builder = tfds_builder(name, data_dir(data_config))
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:
        raise DataConfigError(
            f"TFDS dataset {name!r} has no split {split!r} readable as array_record "
            f"({e}); set data.train_split / data.eval_split or re-prepare with "
            "--file_format=array_record."
        ) from e
    return _FieldSource(source, str(data_config.get("text_field", "text") or "text"), name)


def load_text_source(data_config: Any, split: str) -> Sequence[dict[str, Any]]:
    """Random-access source of ``{"text": str | bytes}`` records for ``split``.

    ``data_config.source`` selects the backend: ``"embedded"`` (built once in
    ``data.tfds_data_dir``), ``"tfds"`` (``data.tfds_name``, prepared in array_record)
    or ``"text_files"`` (``data.text_files``; ``data.eval_text_files`` for eval).
    Raises ``DataConfigError`` (a ``ValueError``) on an unknown or missing source.
    """
    source = str(data_config.get("source", "embedded"))
    if source == "embedded":
        return embedded_builder(data_dir(data_config)).as_data_source(split=split)
    if source == "tfds":
        return _tfds_source(data_config, split)
    if source == "text_files":
        return text_files_source(data_config, split)
    raise DataConfigError(
        f"data.source={source!r} is unknown; use 'embedded', 'tfds' or 'text_files'."
    )


def corpus_fingerprint(data_config: Any) -> str:
    """A short stable id of the configured corpus (keys the tokenizer cache)."""
    source = str(data_config.get("source", "embedded"))
    if source == "embedded":
        builder = embedded_builder(data_dir(data_config))
        sizes = {k: v.num_examples for k, v in sorted(builder.info.splits.items())}
        parts = [EMBEDDED_NAME, str(builder.version), sys.version.split()[0], repr(sizes)]
    elif source == "tfds":
        parts = [str(data_config.tfds_name), str(data_config.get("text_field", "text"))]
    elif source == "text_files":
        parts = []
        for path in expand_files(data_config.text_files, "text_files"):
            stat = os.stat(path)
            parts.append(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}")
    else:
        raise DataConfigError(
            f"data.source={source!r} is unknown; use 'embedded', 'tfds' or 'text_files'."
        )
    return hashlib.sha1("\n".join([source, *parts]).encode("utf-8")).hexdigest()[:16]
