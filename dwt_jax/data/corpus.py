"""Text sources: the embedded default corpus, any prepared TFDS dataset, local text files.

The embedded corpus is real English prose that exists offline on every CPython
install: the topics of ``pydoc_data.topics`` (one document per topic) and the
docstrings of the standard library (one document per module: its module, class
and function docstrings joined by blank lines). Docstrings are read by parsing
the stdlib sources with ``ast`` — never by importing modules, some of which
have side effects (``antigravity``, ``this``). It is materialised once as a
TFDS dataset in the ``array_record`` format (``DwtEmbeddedCorpus``) and read back
with random access; TensorFlow is not needed.

Every source is returned as a random-access sequence of ``{"text": str|bytes}``
records (``load_text_source``). The validation split of the embedded corpus and
of local text files is a deterministic ~5% of the documents, chosen by a stable
hash (``zlib.crc32``) of the document id.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sys
import sysconfig
import tokenize
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from dwt_jax.configuration import ConfigError

EMBEDDED_NAME = "dwt_embedded_corpus"
MIN_DOCSTRING_CHARS = 100
VALIDATION_PERCENT = 5
_DEFAULT_TFDS_DIR = "~/.cache/dwt_jax/tensorflow_datasets"
# Folders of the stdlib whose docstrings are test scaffolding, not prose.
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


class DataConfigError(ConfigError):
    """A data config names something that does not exist or is not prepared."""


def is_validation(doc_id: str | int) -> bool:
    """Whether a document belongs to the held-out split (stable across runs/hosts)."""
    return zlib.crc32(str(doc_id).encode("utf-8")) % 100 < VALIDATION_PERCENT


def _module_docstrings(path: Path) -> list[str]:
    """Docstrings (>= MIN_DOCSTRING_CHARS) of a module, its classes and functions."""
    try:
        with tokenize.open(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
            tree = ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append(doc.strip())
    return docs


def _stdlib_files(stdlib_dir: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("test_"))
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(root, name))
    return sorted(files)


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[tuple[str, str], ...]:
    """All ``(doc_id, text)`` pairs of the embedded corpus, sorted by id."""
    from pydoc_data import topics  # Data only: no import side effects.

    docs = [(f"topic/{name}", text.strip()) for name, text in topics.topics.items()]
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(stdlib_dir):
        docstrings = _module_docstrings(path)
        if docstrings:
            rel = path.relative_to(stdlib_dir).as_posix()
            docs.append((f"stdlib/{rel}", "\n\n".join(docstrings)))
    return tuple(sorted(d for d in docs if len(d[1]) >= MIN_DOCSTRING_CHARS))


class DwtEmbeddedCorpus(tfds.core.GeneratorBasedBuilder):
    """The embedded default corpus: pydoc topics and stdlib docstrings."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "pydoc_data topics + stdlib docstrings (parsed with ast)."
    }
    # Nothing is downloaded, so there are no URL checksums to look up; looking them up
    # would import `importlib_resources`, which TFDS does not declare as a dependency.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Offline English prose from CPython {sys.version.split()[0]}.",
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        docs = embedded_documents()
        return {
            "train": self._generate_examples([d for d in docs if not is_validation(d[0])]),
            "validation": self._generate_examples([d for d in docs if is_validation(d[0])]),
        }

    def _generate_examples(self, docs: list[tuple[str, str]]) -> Iterator:
        for doc_id, text in docs:
            yield doc_id, {"id": doc_id, "text": text}


def _data_dir(data_config: Any) -> str:
    return os.path.expanduser(str(data_config.get("tfds_data_dir", "") or _DEFAULT_TFDS_DIR))


def embedded_builder(data_dir: str) -> DwtEmbeddedCorpus:
    """The embedded corpus builder, prepared in ``data_dir`` on first use (then only loaded)."""
    return prepared_builder(DwtEmbeddedCorpus, data_dir)


def prepared_builder(builder_cls: type, data_dir: str) -> Any:
    """An offline builder of this package in ``data_dir``, prepared (array_record) on
    first use, then only loaded."""
    builder = builder_cls(data_dir=os.path.expanduser(data_dir), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return builder


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


def _expand_files(patterns: Sequence[str], field: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataConfigError(
                f"data.{field}: no readable file matches {pattern!r}; "
                f"fix the path or glob in data.{field}."
            )
        files.extend(matches)
    return files


def read_text_documents(paths: Sequence[str]) -> list[str]:
    """Documents of UTF-8 text files: blocks separated by blank lines (invalid bytes replaced)."""
    docs: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    docs.append("\n".join(block))
                    block = []
            if block:
                docs.append("\n".join(block))
    return docs


def _text_files_source(data_config: Any, split: str) -> _TextListSource:
    files = _expand_files(data_config.text_files, "text_files")
    eval_patterns = list(data_config.get("eval_text_files", None) or [])
    train_split = data_config.get("train_split", "train")
    if eval_patterns:
        if split == train_split:
            return _TextListSource(read_text_documents(files))
        return _TextListSource(read_text_documents(_expand_files(eval_patterns, "eval_text_files")))
    docs = read_text_documents(files)
    held_out = split != train_split
    return _TextListSource([d for i, d in enumerate(docs) if is_validation(i) == held_out])


def _tfds_source(data_config: Any, split: str) -> _FieldSource:
    name = str(data_config.get("tfds_name", "") or "")
    if not name:
        raise DataConfigError("data.tfds_name is empty; set it, e.g. 'wikipedia/20230601.en'.")
    data_dir = _data_dir(data_config)
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # TFDS raises several registry/config error types.
        raise DataConfigError(
            f"data.tfds_name={name!r} is not a known TFDS dataset ({type(e).__name__}: {e}); "
            "check the name with `tfds.list_builders()`."
        ) from e
    if not builder.is_prepared():
        raise DataConfigError(
            f"data.tfds_name={name!r} is not prepared in data.tfds_data_dir={data_dir!r}; "
            f"prepare it there first in array_record format, e.g. `tfds build {name} "
            f"--data_dir={data_dir} --file_format=array_record`."
        )
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
        return embedded_builder(_data_dir(data_config)).as_data_source(split=split)
    if source == "tfds":
        return _tfds_source(data_config, split)
    if source == "text_files":
        return _text_files_source(data_config, split)
    raise DataConfigError(
        f"data.source={source!r} is unknown; use 'embedded', 'tfds' or 'text_files'."
    )


def corpus_fingerprint(data_config: Any) -> str:
    """A short stable id of the configured corpus (keys the tokenizer cache)."""
    source = str(data_config.get("source", "embedded"))
    if source == "embedded":
        builder = embedded_builder(_data_dir(data_config))
        sizes = {k: v.num_examples for k, v in sorted(builder.info.splits.items())}
        parts = [EMBEDDED_NAME, str(builder.version), sys.version.split()[0], repr(sizes)]
    elif source == "tfds":
        parts = [str(data_config.tfds_name), str(data_config.get("text_field", "text"))]
    elif source == "text_files":
        parts = []
        for path in _expand_files(data_config.text_files, "text_files"):
            stat = os.stat(path)
            parts.append(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}")
    else:
        raise DataConfigError(
            f"data.source={source!r} is unknown; use 'embedded', 'tfds' or 'text_files'."
        )
    return hashlib.sha1("\n".join([source, *parts]).encode("utf-8")).hexdigest()[:16]
