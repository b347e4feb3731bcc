"""The embedded fine-tuning tasks: offline TFDS builders made from the embedded corpus.

* ``'follows'`` (``DwtFollows``), built from the real prose of the embedded corpus
  (``embedded.embedded_documents()``): each pair of adjacent sentences (A, B) of a
  document gives one example; for half of the pairs (chosen by a stable hash of
  document id and pair index, so labels are exactly balanced) B is kept (label 1,
  ``'next'``), for the other half B is replaced by a sentence of a *different*
  document of the same split (label 0, ``'not_next'``). Train (8,786 pairs on
  CPython 3.11) and validation (1,609) are split by document
  (``is_follows_validation``).
* ``'source'`` (``DwtSource``): which of eight areas of the Python documentation a
  prose sentence comes from (``source_examples``).

Each is prepared once (< 1 s once the corpus is parsed) as a TFDS ``array_record``
dataset in ``data.tfds_data_dir``, like the embedded corpus; nothing is downloaded.
``EMBEDDED_TASKS`` maps a task name to its builder; ``classification.py`` reads them.
"""

from __future__ import annotations

import hashlib
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from dwt_jax.data import embedded

FOLLOWS_NAME = "dwt_follows"
FOLLOWS_LABELS = ("not_next", "next")
# Share of documents (besides embedded.is_validation's 5%) held out for 'follows' so
# that its validation split has >= 1,000 examples.
FOLLOWS_EXTRA_VALIDATION_PERCENT = 12
MIN_SENTENCE_CHARS = 20
MAX_SENTENCE_CHARS = 300

# ---------------------------------------------------------------------------
# The embedded 'follows' task.
# ---------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_RULE_LINE = re.compile(r"^\s*([*=~^#+-])\1{2,}\s*$")  # reST heading underlines
_CODE_LIKE = re.compile(r"[{}<>]|==|\w\(\w")


def _is_prose_sentence(s: str) -> bool:
    if not MIN_SENTENCE_CHARS <= len(s) <= MAX_SENTENCE_CHARS:
        return False
    if not (s[0].isupper() or s[0] in "\"'*`") or s[-1] not in ".!?":
        return False
    if sum(c.isalpha() or c == " " for c in s) < 0.75 * len(s):
        return False
    return not _CODE_LIKE.search(s)


def _is_code_paragraph(lines: list[str]) -> bool:
    return (
        lines[0][:1].isspace()  # indented block: code, literal or quote
        or any(">>>" in line or _RULE_LINE.match(line) for line in lines)
        or lines[-1].rstrip().endswith("::")  # reST: a literal block follows
    )


def sentence_runs(text: str, min_run: int = 2) -> list[list[str]]:
    """Runs of consecutive prose sentences of ``text`` (each run has >= ``min_run``).

    Paragraphs are separated by blank lines; code-like paragraphs (indented,
    doctests, reST headings and ``::`` blocks) are skipped, lines are joined, and
    sentences split after ``.!?`` before a capital letter. Sentences of
    20-300 characters that look like prose are kept; anything dropped ends a run,
    so two sentences of a run are adjacent in the document.
    """
    runs: list[list[str]] = []
    run: list[str] = []

    def close() -> None:
        nonlocal run
        if len(run) >= min_run:
            runs.append(run)
        run = []

    for paragraph in _PARAGRAPH_BREAK.split(text):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        if not lines or _is_code_paragraph(lines):
            close()
            continue
        joined = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_BREAK.split(joined):
            sentence = " ".join(sentence.split())
            if _is_prose_sentence(sentence):
                run.append(sentence)
            else:
                close()
    close()
    return runs


def _hash64(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_follows_validation(doc_id: str) -> bool:
    """Whether a document's pairs go to the 'follows' validation split.

    A superset of ``embedded.is_validation`` (so text held out of pre-training stays
    held out here) plus a further stable ``FOLLOWS_EXTRA_VALIDATION_PERCENT``.
    """
    if embedded.is_validation(doc_id):
        return True
    return zlib.crc32(f"follows/{doc_id}".encode()) % 100 < FOLLOWS_EXTRA_VALIDATION_PERCENT


def _negative(
    h: int, position: int, pool: list[tuple[str, list[str]]], own_text: str
) -> tuple[str, str] | None:
    """``(doc_id, sentence)`` from a document other than ``pool[position]``, chosen by
    the hash ``h``, that does not also occur in this document's text ``own_text``."""
    first = (h >> 1) % (len(pool) - 1)
    first += first >= position  # Never the document itself.
    for step in range(len(pool)):
        index = (first + step) % len(pool)
        other_id, candidates = pool[index]
        if index == position or not candidates:
            continue
        start = (h >> 33) % len(candidates)
        for j in range(len(candidates)):
            sentence = candidates[(start + j) % len(candidates)]
            if sentence not in own_text:
                return other_id, sentence
    return None


def _split_examples(docs: Sequence[tuple[str, str, list[list[str]]]]) -> list[dict[str, Any]]:
    """Examples of one split from ``(doc_id, text, sentence runs)`` of its documents."""
    texts = {doc_id: text for doc_id, text, runs in docs if runs}
    docs = [(doc_id, runs) for doc_id, _, runs in docs if runs]
    if len(docs) < 2:
        raise ValueError("'follows' needs sentence pairs from at least two documents per split")
    # A negative's B is drawn from sentences that are the B of some pair (not first in
    # their run), so that both labels see the same kind of second sentence.
    pool = [(doc_id, [run[i] for run in runs for i in range(1, len(run))]) for doc_id, runs in docs]
    pairs = [
        (position, doc_id, k, a, b)
        for position, (doc_id, runs) in enumerate(docs)
        for k, (a, b) in enumerate(
            (run[i], run[i + 1]) for run in runs for i in range(len(run) - 1)
        )
    ]
    hashes = [_hash64("follows", doc_id, str(k)) for _, doc_id, k, _, _ in pairs]
    # A hash-seeded coin per pair with exactly balanced labels: in hash order, pairs
    # alternate between keeping B ('next') and replacing it ('not_next').
    replace = [False] * len(pairs)
    for rank, i in enumerate(sorted(range(len(pairs)), key=hashes.__getitem__)):
        replace[i] = rank % 2 == 1
    own_texts: dict[str, str] = {}  # Whitespace-normalised, as sentences are.
    examples = []
    for i, (position, doc_id, _, a, b) in enumerate(pairs):
        example = {"sentence1": a, "sentence2": b, "label": 1}
        example.update(doc_id=doc_id, sentence2_doc_id=doc_id)
        if replace[i]:
            if doc_id not in own_texts:
                own_texts[doc_id] = " ".join(texts[doc_id].split())
            negative = _negative(hashes[i], position, pool, own_texts[doc_id])
            if negative is not None:
                example.update(sentence2=negative[1], label=0, sentence2_doc_id=negative[0])
        examples.append(example)
    return examples


def follows_examples(
    documents: Sequence[tuple[str, str]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The 'follows' examples per split, in order (default: the embedded documents).

    Each example holds ``sentence1``, ``sentence2``, ``label`` (1 = B follows A) and,
    for tests, ``doc_id`` / ``sentence2_doc_id`` (where A and B come from).
    """
    documents = embedded.embedded_documents() if documents is None else documents
    by_split: dict[str, list[tuple[str, str, list[list[str]]]]] = {"train": [], "validation": []}
    for doc_id, text in documents:
        split = "validation" if is_follows_validation(doc_id) else "train"
        by_split[split].append((doc_id, text, sentence_runs(text)))
    return {split: _split_examples(docs) for split, docs in by_split.items()}


class _EmbeddedTask:
    """What the embedded tasks' TFDS builders share: text features, a class label, an
    index, and examples made in this process from the embedded corpus (no download)."""

    TEXT_KEYS: ClassVar[tuple[str, ...]]
    LABELS: ClassVar[tuple[str, ...]]
    DESCRIPTION: ClassVar[str]
    # () -> {split: [example dict]}: the task's examples, made from the embedded corpus.
    make_examples: ClassVar[Callable[[], dict[str, list[dict[str, Any]]]]]
    url_infos = None  # Nothing is downloaded (see embedded.DwtEmbeddedCorpus).

    def _info(self) -> tfds.core.DatasetInfo:
        features = {key: tfds.features.Text() for key in self.TEXT_KEYS}
        features["label"] = tfds.features.ClassLabel(names=list(self.LABELS))
        features["idx"] = np.int32
        return self.dataset_info_from_configs(  # type: ignore[attr-defined]
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        return {
            split: self._generate_examples(rows) for split, rows in self.make_examples().items()
        }

    def _generate_examples(self, rows: list[dict[str, Any]]) -> Iterator:
        for i, row in enumerate(rows):
            example = {key: row[key] for key in self.TEXT_KEYS}
            yield i, {**example, "label": row["label"], "idx": i}


class DwtFollows(_EmbeddedTask, tfds.core.GeneratorBasedBuilder):
    """Does sentence B follow sentence A in the same document? (embedded, offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Adjacent sentence pairs of the embedded corpus; 50% B from another doc."
    }
    TEXT_KEYS = ("sentence1", "sentence2")
    LABELS = FOLLOWS_LABELS

    DESCRIPTION = (
        "Sentence pairs from the embedded corpus of CPython "
        f"{sys.version.split()[0]}: label 'next' if B follows A in one document, "
        "'not_next' if B was drawn from another document."
    )
    make_examples = staticmethod(follows_examples)


def follows_builder(data_dir: str) -> DwtFollows:
    """The 'follows' builder, prepared in ``data_dir`` on first use (then only loaded)."""
    return embedded.prepared_builder(DwtFollows, data_dir)


# ---------------------------------------------------------------------------
# The embedded 'source' task: which part of the Python documentation a sentence is from.
# ---------------------------------------------------------------------------

SOURCE_NAME = "dwt_source"
# The eight areas of the embedded corpus with the most prose (language reference topics
# and seven standard-library packages), in a fixed order: the class ids.
SOURCE_LABELS = (
    "topics",
    "idlelib",
    "tkinter",
    "email",
    "asyncio",
    "distutils",
    "logging",
    "xml",
)
SOURCE_VALIDATION_PERCENT = 15


def source_area(doc_id: str) -> str:
    """The documentation area of an embedded document: 'topics' or the stdlib package."""
    if doc_id.startswith("topic/"):
        return "topics"
    return doc_id.split("/", 1)[1].split("/")[0].split(".")[0]


def source_examples(
    documents: Sequence[tuple[str, str]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The 'source' examples per split: every prose sentence of the eight areas.

    A sentence that occurs in more than one area (e.g. "Return the value.") is
    dropped, any other repeat is kept once; the split is a stable hash of the
    sentence (``SOURCE_VALIDATION_PERCENT`` to validation).
    """
    documents = embedded.embedded_documents() if documents is None else documents
    areas: dict[str, set[str]] = {}
    order: list[str] = []
    for doc_id, text in documents:
        area = source_area(doc_id)
        if area not in SOURCE_LABELS:
            continue
        for run in sentence_runs(text, min_run=1):
            for sentence in run:
                if sentence not in areas:
                    areas[sentence] = set()
                    order.append(sentence)
                areas[sentence].add(area)
    by_split: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for sentence in order:
        if len(areas[sentence]) != 1:
            continue
        (area,) = areas[sentence]
        h = zlib.crc32(f"source/{sentence}".encode()) % 100
        split = "validation" if h < SOURCE_VALIDATION_PERCENT else "train"
        by_split[split].append({"sentence": sentence, "label": SOURCE_LABELS.index(area)})
    return by_split


class DwtSource(_EmbeddedTask, tfds.core.GeneratorBasedBuilder):
    """Which part of the Python documentation is this sentence from? (embedded, offline)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Prose sentences of 8 areas of the embedded corpus, labelled by area."
    }
    TEXT_KEYS = ("sentence",)
    LABELS = SOURCE_LABELS

    DESCRIPTION = (
        "Sentences from the embedded corpus of CPython "
        f"{sys.version.split()[0]}, labelled with the documentation area they "
        f"come from: {', '.join(SOURCE_LABELS)}."
    )
    make_examples = staticmethod(source_examples)


def source_builder(data_dir: str) -> DwtSource:
    """The 'source' builder, prepared in ``data_dir`` on first use (then only loaded)."""
    return embedded.prepared_builder(DwtSource, data_dir)


EMBEDDED_TASKS = {"follows": follows_builder, "source": source_builder}
