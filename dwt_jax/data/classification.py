"""Fine-tuning data: sentence(-pair) classification and regression batches.

Two sources (``data.source``):

* ``'embedded'`` — the offline task ``'follows'`` (``DwtFollows``), built from the
  real prose of the embedded corpus (``corpus.embedded_documents()``): each pair of
  adjacent sentences (A, B) of a document gives one example; for half of the pairs
  (chosen by a stable hash of document id and pair index, so labels are exactly
  balanced) B is kept (label 1, ``'next'``), for the other half B is replaced by a
  sentence of a *different* document of the same split (label 0, ``'not_next'``).
  Train (8,786 pairs on CPython 3.11) and validation (1,609) are split by document
  (``is_follows_validation``). It is prepared once (< 1 s once the corpus is parsed)
  as a TFDS ``array_record`` dataset in ``data.tfds_data_dir``, like the embedded
  corpus; nothing is downloaded.
* ``'tfds'`` — a GLUE task (``data.task='glue/mrpc'``, ...) that the user prepared
  in ``data.tfds_data_dir`` in the ``array_record`` format (``tfds build glue/mrpc
  --file_format=array_record --data_dir=...``), read with
  ``builder.as_data_source`` — the one call ``tfds.testing.mock_data`` replaces.

Rows are ``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]``), truncated longest-first to
``data.seq_len`` and padded. Batches are dicts of host-local numpy arrays
(B = global_batch_size // process_count, L = seq_len):
``input_ids``, ``segment_ids`` (1 on tokens, 0 on padding), ``positions`` (0..L-1),
``token_type_ids`` (0 for A with [CLS] and its [SEP], 1 for B and its [SEP]) int32[B, L];
``labels`` int32[B] (float32[B] for regression); ``example_weights`` float32[B]
(0 on the padding rows of the last eval batch).

Fields read from ``config.data`` (defaults in brackets):
  source          'embedded' (task 'follows') | 'tfds' (GLUE tasks)       ['embedded']
  task            a name of ``tasks.TASKS``                                ['follows']
  tfds_data_dir   where DwtFollows is built and GLUE is prepared
                                          ['~/.cache/dwt_jax/tensorflow_datasets']
  seq_len         row length L (>= 8)                                          [128]
  batch_size      global train batch when none is passed                        [32]
  eval_batch_size global eval batch when none is passed             [batch_size]
  train_split     split used for training                                  ['train']
  eval_split      split used for evaluation; '' = the task's (e.g.
                  'validation_matched' for MNLI)                                ['']
  worker_count    Grain worker processes for training (0: main process)          [0]
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
import tokenizers

from dwt_jax.data import corpus, pipeline
from dwt_jax.data.corpus import DataConfigError
from dwt_jax.data.tasks import TaskSpec, get_task
from dwt_jax.data.tokenizer import SpecialIds, as_text

FOLLOWS_NAME = "dwt_follows"
FOLLOWS_LABELS = ("not_next", "next")
# Share of documents (besides corpus.is_validation's 5%) held out for 'follows' so
# that its validation split has >= 1,000 examples.
FOLLOWS_EXTRA_VALIDATION_PERCENT = 12
MIN_SENTENCE_CHARS = 20
MAX_SENTENCE_CHARS = 300
MIN_SEQ_LEN = 8
ROW_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids")
_SEED_MOD = 2**32

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

    A superset of ``corpus.is_validation`` (so text held out of pre-training stays
    held out here) plus a further stable ``FOLLOWS_EXTRA_VALIDATION_PERCENT``.
    """
    if corpus.is_validation(doc_id):
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
    documents = corpus.embedded_documents() if documents is None else documents
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
    url_infos = None  # Nothing is downloaded (see corpus.DwtEmbeddedCorpus).

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
    return corpus.prepared_builder(DwtFollows, data_dir)


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
    documents = corpus.embedded_documents() if documents is None else documents
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
    return corpus.prepared_builder(DwtSource, data_dir)


EMBEDDED_TASKS = {"follows": follows_builder, "source": source_builder}


# ---------------------------------------------------------------------------
# Config and sources.
# ---------------------------------------------------------------------------


def task_from_config(data_config: Any) -> TaskSpec:
    """The configured task, after checking ``data.source``/``data.task``/``data.seq_len``.

    Raises ``DataConfigError`` (one line naming the field) on an unknown task, a
    source that does not offer the task, or a ``seq_len`` below 8.
    """
    source = str(data_config.get("source", "embedded"))
    name = str(data_config.get("task", "follows") or "follows")
    if source not in ("embedded", "tfds"):
        raise DataConfigError(
            f"data.source={source!r} cannot be fine-tuned on; use 'embedded' (tasks "
            "'follows', 'source') or 'tfds' (a GLUE task such as 'glue/mrpc')."
        )
    task = get_task(name)
    if source == "embedded" and task.name not in EMBEDDED_TASKS:
        raise DataConfigError(
            f"data.task={name!r} is read from TFDS: set data.source='tfds' (data.source="
            "'embedded' offers data.task='follows' or 'source')."
        )
    if source == "tfds" and task.name in EMBEDDED_TASKS:
        raise DataConfigError(
            f"data.task={name!r} is an embedded task: set data.source='embedded', or "
            "name a GLUE task such as 'glue/mrpc' in data.task."
        )
    seq_len = data_config.get("seq_len", 128)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise DataConfigError(
            f"data.seq_len={seq_len!r} must be an integer >= {MIN_SEQ_LEN} "
            "([CLS] A [SEP] B [SEP] needs room for both texts)."
        )
    return task


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _tfds_task_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    if name.startswith("glue/"):
        # TFDS registers its dataset modules lazily; GLUE's must be imported by name.
        importlib.import_module("tensorflow_datasets.text.glue")
    try:
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # TFDS raises several registry/config error types.
        raise DataConfigError(
            f"data.task={name!r} is not a TFDS dataset this TFDS knows ({_first_line(e)})."
        ) from e


def _open_split(builder: Any, name: str, split: str, data_dir: str) -> Sequence[Any]:
    """``builder.as_data_source(split)``; a DataConfigError says what to fix if it fails."""
    try:
        return builder.as_data_source(split=split)
    except Exception as e:
        if not builder.is_prepared():
            raise DataConfigError(
                f"data.task={name!r} is not prepared in data.tfds_data_dir={data_dir!r}; "
                f"prepare it there first: `tfds build {name} --file_format=array_record "
                f"--data_dir={data_dir}`."
            ) from e
        splits = sorted(builder.info.splits)
        raise DataConfigError(
            f"split {split!r} of data.task={name!r} cannot be read as array_record "
            f"({_first_line(e)}); set data.train_split / data.eval_split to one of {splits}, "
            "or re-prepare the dataset with --file_format=array_record."
        ) from e


def load_task_source(data_config: Any, split: str) -> Sequence[dict[str, Any]]:
    """Random-access source of the task's raw records (TFDS features) for ``split``.

    The embedded tasks are built in ``data.tfds_data_dir`` on first use; a GLUE task must
    already be prepared there (``DataConfigError`` saying how, otherwise).
    """
    task = task_from_config(data_config)
    data_dir = corpus._data_dir(data_config)
    if task.name in EMBEDDED_TASKS:
        builder = EMBEDDED_TASKS[task.name](data_dir)
    else:
        builder = _tfds_task_builder(task.name, data_dir)
    return _open_split(builder, task.name, str(split), data_dir)


def eval_split_name(data_config: Any, task: TaskSpec | None = None) -> str:
    """``data.eval_split`` if set, else the task's own evaluation split."""
    task = task or task_from_config(data_config)
    return str(data_config.get("eval_split", "") or task.eval_split)


# ---------------------------------------------------------------------------
# Tokenisation.
# ---------------------------------------------------------------------------


def truncate_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after longest-first truncation of two texts to ``budget`` tokens together.

    Equivalent to removing one token at a time from the longer text (from B on a
    tie) until they fit: the shorter text is kept whole if it takes at most half.
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if short <= budget - short:
        keep_short, keep_long = short, budget - short
        return (keep_short, keep_long) if len_a <= len_b else (keep_long, keep_short)
    return (budget + 1) // 2, budget // 2


def build_row(
    ids_a: Sequence[int], ids_b: Sequence[int] | None, seq_len: int, special: SpecialIds
) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] (B [SEP])`` truncated longest-first and padded to ``seq_len``."""
    if ids_b is None:
        len_a, len_b = min(len(ids_a), seq_len - 2), 0
    else:
        len_a, len_b = truncate_lengths(len(ids_a), len(ids_b), seq_len - 3)
    tokens = [special.cls, *ids_a[:len_a], special.sep]
    if ids_b is not None:
        tokens += [*ids_b[:len_b], special.sep]
    n = len(tokens)
    input_ids = np.full(seq_len, special.pad, np.int32)
    input_ids[:n] = tokens
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n] = 1
    token_type_ids = np.zeros(seq_len, np.int32)
    token_type_ids[len_a + 2 : n] = 1
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "positions": np.arange(seq_len, dtype=np.int32),
        "token_type_ids": token_type_ids,
    }


def _field(record: dict[str, Any], key: str, task: TaskSpec) -> Any:
    if key not in record:
        raise DataConfigError(
            f"records of data.task={task.name!r} lack feature {key!r} (features: "
            f"{sorted(record)}); the dataset does not match the task."
        )
    return record[key]


def encode_record(
    record: dict[str, Any],
    tokenizer: tokenizers.Tokenizer,
    task: TaskSpec,
    seq_len: int,
    special: SpecialIds,
) -> dict[str, np.ndarray]:
    """One raw task record → one row (module doc), with ``example_weights`` 1."""
    ids = [
        tokenizer.encode(as_text(_field(record, key, task)), add_special_tokens=False).ids
        for key in task.text_keys
    ]
    row = build_row(ids[0], ids[1] if task.is_pair else None, seq_len, special)
    label_dtype = np.float32 if task.is_regression else np.int32
    row["labels"] = np.asarray(_field(record, task.label_key, task), label_dtype).reshape(())
    row["example_weights"] = np.asarray(1.0, np.float32)
    return row


def padding_row(task: TaskSpec, seq_len: int, special: SpecialIds) -> dict[str, np.ndarray]:
    """A row of padding only, weight 0 (fills the last eval batch)."""
    return {
        "input_ids": np.full(seq_len, special.pad, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.arange(seq_len, dtype=np.int32),
        "token_type_ids": np.zeros(seq_len, np.int32),
        "labels": np.zeros((), np.float32 if task.is_regression else np.int32),
        "example_weights": np.zeros((), np.float32),
    }


class _EncodeRecord(grain.transforms.Map):
    """Grain transform: raw record → row (see ``encode_record``)."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, task: TaskSpec, seq_len: int, special: SpecialIds
    ):
        self._tokenizer = tokenizer
        self._task = task
        self._seq_len = seq_len
        self._special = special

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return encode_record(record, self._tokenizer, self._task, self._seq_len, self._special)


# ---------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return global_batch_size // process_count


def make_classification_dataset(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    split: str | None = None,
    global_batch_size: int | None = None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """The training ``grain.IterDataset`` of host-local batches (see module doc).

    ``split`` defaults to ``data.train_split``, ``global_batch_size`` to
    ``data.batch_size``.
    """
    task = task_from_config(data_config)
    split = str(split or data_config.get("train_split", "train") or "train")
    source = load_task_source(data_config, split)
    if global_batch_size is None:
        global_batch_size = int(data_config.get("batch_size", 32))
    batch_size = _local_batch_size(int(global_batch_size), process_index, process_count)
    special = SpecialIds.from_tokenizer(tokenizer)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise DataConfigError(
            f"split {split!r} of data.task={task.name!r} has no examples for process "
            f"{process_index} of {process_count}; check data.train_split."
        )
    if shuffle:
        ds = ds.shuffle(seed=seed % _SEED_MOD)  # Reshuffled every epoch by repeat().
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_EncodeRecord(tokenizer, task, int(data_config.get("seq_len", 128)), special))
    ds = ds.batch(batch_size, drop_remainder=True)
    return pipeline.with_workers(ds.to_iter_dataset(), data_config)


def make_classification_iterator(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    split: str | None = None,
    global_batch_size: int | None = None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of host-local training batches (module doc).

    Each process reads a disjoint slice (``process_index::process_count``) of the
    split and yields ``global_batch_size // process_count`` rows per batch; the
    seeded shuffle changes every epoch, ``num_epochs=None`` repeats forever and
    incomplete batches are dropped. ``get_state()/set_state()`` and
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` resume exactly.
    """
    ds = make_classification_dataset(
        data_config,
        tokenizer,
        split=split,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        shuffle=shuffle,
        num_epochs=num_epochs,
    )
    return iter(ds)


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def classification_eval_batches(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    global_batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The evaluation split once, in order, as host-local batches.

    Reads ``data.eval_split`` (default: the task's, e.g. ``validation_matched`` for
    MNLI); ``max_examples`` keeps only the first examples. Process ``p`` gets examples
    ``p, p + process_count, ...``; every process gets the same number of batches
    and the last ones are filled with padding rows of ``example_weights`` 0.
    ``global_batch_size`` defaults to ``data.eval_batch_size`` (or ``data.batch_size``).
    """
    task = task_from_config(data_config)
    split = eval_split_name(data_config, task)
    source = load_task_source(data_config, split)
    if global_batch_size is None:
        global_batch_size = int(
            data_config.get("eval_batch_size", 0) or data_config.get("batch_size", 32)
        )
    batch_size = _local_batch_size(int(global_batch_size), process_index, process_count)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be positive or None")
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    if n == 0:
        raise DataConfigError(
            f"split {split!r} of data.task={task.name!r} is empty; check data.eval_split."
        )
    seq_len = int(data_config.get("seq_len", 128))
    special = SpecialIds.from_tokenizer(tokenizer)
    rows = [
        encode_record(source[i], tokenizer, task, seq_len, special)
        for i in range(process_index, n, process_count)
    ]
    num_batches = math.ceil(math.ceil(n / process_count) / batch_size)
    rows += [padding_row(task, seq_len, special)] * (num_batches * batch_size - len(rows))
    return [_stack(rows[i * batch_size : (i + 1) * batch_size]) for i in range(num_batches)]


def classification_batch_spec(
    data_config: Any, global_batch_size: int, task: TaskSpec | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one GLOBAL batch, for compiling before any data is read."""
    task = task or task_from_config(data_config)
    L, B = int(data_config.get("seq_len", 128)), int(global_batch_size)
    spec = {key: jax.ShapeDtypeStruct((B, L), np.int32) for key in ROW_KEYS}
    spec["labels"] = jax.ShapeDtypeStruct((B,), np.float32 if task.is_regression else np.int32)
    spec["example_weights"] = jax.ShapeDtypeStruct((B,), np.float32)
    return spec
