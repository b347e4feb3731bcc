"""Fine-tuning data: sentence(-pair) classification and regression batches.

Two sources (``data.source``):

* ``'embedded'`` — the offline tasks ``'follows'`` (does sentence B follow sentence
  A in the same document?) and ``'source'`` (which part of the Python documentation
  is a sentence from?), built from the embedded corpus and prepared once in
  ``data.tfds_data_dir`` (``embedded_tasks.py``; its names are importable from here
  too); nothing is downloaded.
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

import importlib
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
import tokenizers

from dwt_jax.data import corpus, pipeline
from dwt_jax.data.embedded_tasks import (
    EMBEDDED_TASKS,
    FOLLOWS_EXTRA_VALIDATION_PERCENT,
    FOLLOWS_LABELS,
    FOLLOWS_NAME,
    MAX_SENTENCE_CHARS,
    MIN_SENTENCE_CHARS,
    SOURCE_LABELS,
    SOURCE_NAME,
    SOURCE_VALIDATION_PERCENT,
    DwtFollows,
    DwtSource,
    follows_builder,
    follows_examples,
    is_follows_validation,
    sentence_runs,
    source_area,
    source_builder,
    source_examples,
)
from dwt_jax.data.tasks import TaskSpec, get_task
from dwt_jax.data.tokenizer import SpecialIds, as_text
from dwt_jax.errors import DataConfigError

__all__ = [
    "EMBEDDED_TASKS",
    "FOLLOWS_EXTRA_VALIDATION_PERCENT",
    "FOLLOWS_LABELS",
    "FOLLOWS_NAME",
    "MAX_SENTENCE_CHARS",
    "MIN_SENTENCE_CHARS",
    "MIN_SEQ_LEN",
    "ROW_KEYS",
    "SOURCE_LABELS",
    "SOURCE_NAME",
    "SOURCE_VALIDATION_PERCENT",
    "DataConfigError",
    "DwtFollows",
    "DwtSource",
    "build_row",
    "classification_batch_spec",
    "classification_eval_batches",
    "encode_record",
    "eval_split_name",
    "follows_builder",
    "follows_examples",
    "is_follows_validation",
    "load_task_source",
    "make_classification_dataset",
    "make_classification_iterator",
    "padding_row",
    "sentence_runs",
    "source_area",
    "source_builder",
    "source_examples",
    "task_from_config",
    "truncate_lengths",
]

MIN_SEQ_LEN = 8
ROW_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids")
_SEED_MOD = 2**32


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
    data_dir = corpus.data_dir(data_config)
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
