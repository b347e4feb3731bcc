"""The embedded default corpus: offline English prose, built once as a TFDS dataset.

The embedded corpus is real English prose that exists offline on every CPython
install: the topics of ``pydoc_data.topics`` (one document per topic) and the
docstrings of the standard library (one document per module: its module, class
and function docstrings joined by blank lines). Docstrings are read by parsing
the stdlib sources with ``ast`` — never by importing modules, some of which
have side effects (``antigravity``, ``this``). It is materialised once as a
TFDS dataset in the ``array_record`` format (``DwtEmbeddedCorpus``) and read back
with random access; TensorFlow is not needed.

Its validation split is a deterministic ~5% of the documents, chosen by a stable
hash (``zlib.crc32``) of the document id (``is_validation``; local text files and
the embedded fine-tuning tasks hold out documents by the same rule).
``prepared_builder`` prepares any offline builder of this package (the embedded
tasks of ``embedded_tasks.py`` too).
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
import tokenize
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from dwt_jax import logs

EMBEDDED_NAME = "dwt_embedded_corpus"
MIN_DOCSTRING_CHARS = 100
VALIDATION_PERCENT = 5
# Folders of the stdlib whose docstrings are test scaffolding, not prose.
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


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


def embedded_builder(data_dir: str) -> DwtEmbeddedCorpus:
    """The embedded corpus builder, prepared in ``data_dir`` on first use (then only loaded)."""
    return prepared_builder(DwtEmbeddedCorpus, data_dir)


def prepared_builder(builder_cls: type, data_dir: str) -> Any:
    """An offline builder of this package in ``data_dir``, prepared (array_record) on
    first use, then only loaded."""
    # TFDS warns that a folder it is about to fill has no dataset_info.json, and shows
    # progress bars while it builds: only at --verbosity=1.
    with logs.quiet_dataset_build():
        builder = builder_cls(data_dir=os.path.expanduser(data_dir), file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return builder
