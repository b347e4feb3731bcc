"""The Grain input pipelines for MLM and causal-LM training: host-local numpy batches,
checkpointable.

Pipeline: text source → per-host slice of documents → seeded shuffle (reshuffled
every epoch) → repeat → tokenize → pack to ``seq_len`` → (MLM only) mask (seeded by
element index) → batch (drop remainder) → optional worker processes. Both kinds
share every stage but packing and masking (``_batched_rows``). The returned
``grain.DatasetIterator`` supports ``get_state()/set_state()`` and
``grain.checkpoint.CheckpointSave/CheckpointRestore`` (Orbax): a restored iterator
yields exactly the batch the original would have yielded next.

MLM batches (``make_pretrain_iterator``) are dicts of host-local numpy arrays
(B = global_batch_size // process_count, L = seq_len, M = max_predictions):
``input_ids``, ``segment_ids``, ``positions``, ``token_type_ids`` int32[B, L];
``masked_positions``, ``masked_ids`` int32[B, M]; ``masked_weights`` float32[B, M].

Causal batches (``make_causal_iterator``; rows packed by ``causal``: ``[bos] tokens
eos`` per document): ``input_ids``, ``segment_ids``, ``positions``, ``targets``
int32[B, L] and ``target_weights`` float32[B, L] (1 where ``targets`` is the next
token of the same chunk; 0 at each chunk's last token and on padding).

Bad input is handled at set-up, not mid-run (local files: see ``textfiles``). A split
small enough to tokenize whole cheaply (at most 16 characters per token of one
batch) is counted before the pipeline starts: without a token it is a
``DataConfigError``, as are finite ``num_epochs`` that cannot fill one batch; fewer
rows per epoch than one batch is a warning (the documents repeat within each batch,
which also serves an eval split too short for ``num_batches`` batches). A larger
source that turns out to yield no token is refused by the packer. A record longer
than ``textfiles.MAX_DOCUMENT_CHARS`` is tokenized in pieces (``_Tokenize``).

Fields read from ``config.data`` (defaults in brackets):
  source            'embedded' | 'tfds' | 'text_files'                  ['embedded']
  tfds_name         TFDS dataset for source='tfds', e.g. 'wikipedia/20230601.en'  ['']
  tfds_data_dir     where the embedded corpus and TFDS datasets live
                                            ['~/.cache/dwt_jax/tensorflow_datasets']
  text_field        record field holding the text (source='tfds')            ['text']
  text_files        UTF-8 files / globs for source='text_files'; blank lines
                    separate documents                                          [()]
  eval_text_files   held-out files for source='text_files'; empty: ~5% of the
                    documents of text_files chosen by a stable hash             [()]
  train_split       split used for training                                 ['train']
  eval_split        split used for evaluation                          ['validation']
  tokenizer_path    tokenizer.json, or a directory with tokenizer.json / vocab.txt;
                    empty: train a WordPiece tokenizer on the corpus           ['']
  tokenizer_cache_dir  cache of trained tokenizers      ['~/.cache/dwt_jax/tokenizers']
  vocab_size        size of a trained tokenizer's vocabulary                  [8192]
  seq_len           packed row length L                                        [128]
  max_predictions   masked positions per row M (MLM only)                       [20]
  mask_prob         fraction of real tokens selected for MLM (MLM only)       [0.15]
  worker_count      Grain worker processes (0: in the main process)              [0]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import tokenizers
from absl import flags

from dwt_jax.data import causal, corpus, pretrain, textfiles
from dwt_jax.data.tokenizer import SpecialIds, as_text
from dwt_jax.errors import DataConfigError

_log = logging.getLogger(__name__)
_SEED_MOD = 2**32
# A split of at most this many characters per token of one batch (and at most one
# document per token) is tokenized whole at set-up to count its rows: see _check_size.
_SMALL_SPLIT_CHARS_PER_TOKEN = 16


class _Tokenize(grain.transforms.Map):
    """Record ``{"text": ...}`` → int32 token ids, no special tokens added.

    A text longer than ``textfiles.MAX_DOCUMENT_CHARS`` (a TFDS record; local files
    are split when read) is encoded in ``textfiles.split_text`` pieces, cut before
    whitespace, so the tokenizer's memory stays bounded; with a whitespace-splitting
    pre-tokenizer (BERT's) the ids are those of the whole text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer

    def _encode(self, text: str) -> np.ndarray:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32)

    def map(self, record: dict[str, Any]) -> np.ndarray:
        text = as_text(record["text"])
        if len(text) <= textfiles.MAX_DOCUMENT_CHARS:
            return self._encode(text)
        return np.concatenate([self._encode(piece) for piece in textfiles.split_text(text)])


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _source_name(data_config: Any, split: str | None = None) -> str:
    source = str(data_config.get("source", "embedded"))
    detail = {"tfds": "tfds_name", "text_files": "text_files"}.get(source)
    if (
        detail == "text_files"
        and split not in (None, data_config.get("train_split", "train"))
        and data_config.get("eval_text_files", None)
    ):
        detail = "eval_text_files"
    return f"data.source={source!r}" + (
        f" (data.{detail}={data_config.get(detail)!r})" if detail else ""
    )


def _check_size(
    docs: grain.MapDataset,
    tokenize: _Tokenize,
    count_rows: Callable[[list[np.ndarray]], int],
    *,
    seq_len: int,
    batch_size: int,
    num_epochs: int | None,
    name: str,
) -> None:
    """Checks at set-up that a small split (see ``_SMALL_SPLIT_CHARS_PER_TOKEN``) can
    yield batches: no tokens at all, or fewer rows than one batch in ``num_epochs``
    epochs, is a ``DataConfigError``; fewer rows per epoch than one batch (endless
    epochs) is a warning. ``count_rows`` packs a list of token arrays and counts the
    rows. A larger split costs nothing here (its documents are not all read); it is
    assumed to fill batches."""
    slots = batch_size * seq_len
    if len(docs) > slots:
        return
    texts, chars = [], 0
    for index in range(len(docs)):
        texts.append(docs[index])
        chars += len(as_text(texts[-1]["text"]))
        if chars > _SMALL_SPLIT_CHARS_PER_TOKEN * slots:
            return
    rows = count_rows([tokenize.map(record) for record in texts])
    if rows == 0:
        raise DataConfigError(
            f"{name} has no tokens ({len(docs)} documents, all empty once tokenized); "
            "give it text, or check data.tokenizer_path."
        )
    if num_epochs is not None and rows * num_epochs < batch_size:
        raise DataConfigError(
            f"{name} packs into {rows} rows of data.seq_len={seq_len} tokens per epoch: "
            f"{num_epochs} epoch(s) cannot fill one batch of {batch_size} rows; give it "
            "more text, a smaller batch, or more epochs."
        )
    if rows < batch_size:
        _log.warning(
            "%s packs into %d rows of data.seq_len=%d tokens per epoch, fewer than one "
            "batch of %d rows: each batch repeats its documents.",
            name,
            rows,
            seq_len,
            batch_size,
        )


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
    """The host-local batch size; raises ``ValueError`` for a bad process layout."""
    batch_size = _local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return batch_size


def _batched_rows(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    split: str,
    batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    count_rows: Callable[[list[np.ndarray]], int],
    to_rows: Callable[[grain.IterDataset, str], grain.IterDataset],
) -> grain.IterDataset:
    """The stages every text pipeline shares (see module doc): ``to_rows(tokens, name)``
    turns the dataset of token arrays into one of rows (packing, then any per-row
    map); ``count_rows`` is its finite counterpart for ``_check_size``."""
    source = corpus.load_text_source(data_config, split)
    docs = grain.MapDataset.source(source)[process_index::process_count]
    name = f"{_source_name(data_config, split)} split {split!r}"
    if process_count > 1:
        name += f" (process {process_index} of {process_count})"
    if len(docs) == 0:
        raise DataConfigError(f"{name} has no documents; use a larger corpus or fewer processes.")
    tokenize = _Tokenize(tokenizer)
    _check_size(
        docs,
        tokenize,
        count_rows,
        seq_len=int(data_config.seq_len),
        batch_size=batch_size,
        num_epochs=num_epochs,
        name=name,
    )
    if shuffle:
        docs = docs.shuffle(seed=seed % _SEED_MOD)
    if num_epochs != 1:
        docs = docs.repeat(num_epochs)
    ds = to_rows(docs.to_iter_dataset().map(tokenize), name)
    ds = ds.batch(batch_size, drop_remainder=True)
    return with_workers(ds, data_config)


def make_pretrain_dataset(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    split: str,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """The pre-training ``grain.IterDataset`` of host-local batches (see module doc)."""
    batch_size = _check_processes(global_batch_size, process_index, process_count)
    special = SpecialIds.from_tokenizer(tokenizer)

    def count_rows(tokens: list[np.ndarray]) -> int:
        seq_len = int(data_config.seq_len)
        return len(pretrain.pack_documents(tokens, seq_len, special.cls, special.sep, special.pad))

    def to_rows(ds: grain.IterDataset, name: str) -> grain.IterDataset:
        ds = pretrain.PackIterDataset(
            ds,
            seq_len=int(data_config.seq_len),
            cls_id=special.cls,
            sep_id=special.sep,
            pad_id=special.pad,
            source_name=name,
        )
        mask = pretrain.MaskTransform(
            special_ids=special.as_tuple(),
            mask_id=special.mask,
            vocab_size=tokenizer.get_vocab_size(),
            mask_prob=float(data_config.get("mask_prob", 0.15)),
            max_predictions=int(data_config.max_predictions),
        )
        # A seed distinct from the shuffle's, so masks and document order are independent.
        return ds.random_map(mask, seed=(seed * 7919 + 1) % _SEED_MOD)

    return _batched_rows(
        data_config,
        tokenizer,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        count_rows=count_rows,
        to_rows=to_rows,
    )


def with_workers(ds: grain.IterDataset, data_config: Any) -> grain.IterDataset:
    """``ds`` prefetched by ``data.worker_count`` worker processes (0: as it is)."""
    worker_count = int(data_config.get("worker_count", 0) or 0)
    if worker_count > 0:
        # Grain's workers read absl flags; outside an absl app they are not parsed yet.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def make_pretrain_iterator(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    split: str,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of host-local MLM batches (keys and shapes: module doc).

    ``num_epochs=None`` repeats forever. Each process reads a disjoint slice of the
    documents (``process_index::process_count``) and yields
    ``global_batch_size // process_count`` rows per batch.
    """
    ds = make_pretrain_dataset(
        data_config,
        tokenizer,
        split=split,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
    )
    return iter(ds)


def eval_batches(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    global_batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    """``num_batches`` fixed held-out batches (same every call; the split repeats if short).

    Reads ``data.eval_split`` in order, without shuffling, with masks fixed by ``seed``.
    """
    split = str(data_config.get("eval_split", "validation"))
    iterator = make_pretrain_iterator(
        data_config,
        tokenizer,
        split=split,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=False,
        num_epochs=None,
    )
    return _take_and_close(iterator, num_batches)


def _take_and_close(iterator: grain.DatasetIterator, num: int) -> list[dict[str, np.ndarray]]:
    batches = [next(iterator) for _ in range(num)]
    if hasattr(iterator, "close"):
        iterator.close()
    return batches


def batch_spec(data_config: Any, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one GLOBAL batch, for compiling before any data is read."""
    L, M = int(data_config.seq_len), int(data_config.max_predictions)
    B = int(global_batch_size)
    spec = {key: jax.ShapeDtypeStruct((B, L), np.int32) for key in pretrain.ROW_KEYS}
    spec["masked_positions"] = jax.ShapeDtypeStruct((B, M), np.int32)
    spec["masked_ids"] = jax.ShapeDtypeStruct((B, M), np.int32)
    spec["masked_weights"] = jax.ShapeDtypeStruct((B, M), np.float32)
    return spec


def make_causal_dataset(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    special: causal.CausalSpecialIds,
    split: str,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """The causal-LM ``grain.IterDataset`` of host-local batches (see module doc).

    Reads ``data.seq_len`` and the source fields; not ``data.max_predictions`` or
    ``data.mask_prob``."""
    batch_size = _check_processes(global_batch_size, process_index, process_count)

    def count_rows(tokens: list[np.ndarray]) -> int:
        return len(causal.pack_causal_documents(tokens, int(data_config.seq_len), special))

    def to_rows(ds: grain.IterDataset, name: str) -> grain.IterDataset:
        return causal.CausalPackIterDataset(
            ds, seq_len=int(data_config.seq_len), special=special, source_name=name
        )

    return _batched_rows(
        data_config,
        tokenizer,
        split=split,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        count_rows=count_rows,
        to_rows=to_rows,
    )


def make_causal_iterator(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    special: causal.CausalSpecialIds,
    **options: Any,
) -> grain.DatasetIterator:
    """A checkpointable iterator of host-local causal-LM batches (keys and shapes: module
    doc); ``options`` are ``make_causal_dataset``'s (split, batch size, process slice,
    seed, shuffle, epochs), as in ``make_pretrain_iterator``."""
    return iter(make_causal_dataset(data_config, tokenizer, special=special, **options))


def causal_eval_batches(
    data_config: Any,
    tokenizer: tokenizers.Tokenizer,
    *,
    special: causal.CausalSpecialIds,
    num_batches: int,
    **options: Any,
) -> list[dict[str, np.ndarray]]:
    """``num_batches`` fixed held-out causal batches (same every call; the split repeats
    if short), read from ``data.eval_split`` in order, without shuffling; ``options``
    are the batch size, the process slice and the seed."""
    iterator = make_causal_iterator(
        data_config,
        tokenizer,
        special=special,
        split=str(data_config.get("eval_split", "validation")),
        shuffle=False,
        num_epochs=None,
        **options,
    )
    return _take_and_close(iterator, num_batches)


def causal_batch_spec(data_config: Any, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one GLOBAL causal batch, for compiling before any data is read."""
    shape = (int(global_batch_size), int(data_config.seq_len))
    spec = {key: jax.ShapeDtypeStruct(shape, np.int32) for key in causal.CAUSAL_INT_KEYS}
    spec["target_weights"] = jax.ShapeDtypeStruct(shape, np.float32)
    return spec
