"""Packing and MLM masking for BERT-style pre-training (pure numpy, plus one Grain dataset).

Packing (``PackIterDataset``): a stream of tokenized documents becomes rows of a
fixed length L. A row is a concatenation of chunks ``[CLS] tokens... [SEP]``;
each chunk is one segment. Documents are laid out greedily: a document fills the
room left in the current row and continues in the next row as a new chunk, so a
document longer than L-2 tokens is split into consecutive chunks. A fragment
shorter than ``min_chunk_tokens`` is not started at the end of a row (the row is
padded instead) unless it finishes its document. Empty documents are dropped; a
source without any token is a ``DataConfigError`` (at the end of a finite stream,
or after ``_MAX_CONSECUTIVE_EMPTY`` empty documents in a row of an endless one)
rather than an empty stream or an endless search for a row.

Row fields (all int32[L]): ``input_ids`` (0=[PAD] after the end), ``segment_ids``
(1, 2, 3, ... per chunk, 0 on padding), ``positions`` (position inside the chunk,
0 on padding), ``token_type_ids`` (all 0).

Masking (``mask_row``): ``mask_prob`` of a row's real tokens (not special,
not padding) are selected, at least 1 and at most M=``max_predictions``; of those
80% become [MASK], 10% a random non-special token, 10% stay. Adds
``masked_positions`` int32[M] (sorted, 0-padded), ``masked_ids`` int32[M] (original
ids, 0-padded) and ``masked_weights`` float32[M] (1 real, 0 padding).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from dwt_jax.errors import DataConfigError

ROW_KEYS = ("input_ids", "segment_ids", "positions", "token_type_ids")
MASK_KEYS = ("masked_positions", "masked_ids", "masked_weights")
# A stream of only empty documents would otherwise make the packer spin forever.
_MAX_CONSECUTIVE_EMPTY = 100_000


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row: each field int32[seq_len]."""
    return {
        "input_ids": np.full(seq_len, pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "token_type_ids": np.zeros(seq_len, np.int32),
    }


class RowPacker:
    """Greedy packer of token sequences into fixed-length rows (pure, no Grain).

    ``add(tokens)`` queues a document; ``pop_row()`` returns the next full row or
    ``None`` when the queued tokens do not fill one yet; ``flush()`` returns the
    last, partial row (or ``None``). The only state between rows is ``pending``:
    the not-yet-packed remainder of the current document.
    """

    def __init__(
        self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, min_chunk_tokens: int = 8
    ):
        if seq_len < 3:
            raise DataConfigError(
                f"data.seq_len must be >= 3 (room for [CLS] x [SEP]); got {seq_len}"
            )
        self.seq_len = seq_len
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.min_chunk_tokens = max(1, min(min_chunk_tokens, seq_len - 2))
        self.pending = np.zeros(0, np.int32)
        self.reset_row()

    def reset_row(self) -> None:
        self._row = empty_row(self.seq_len, self.pad_id)
        self._cursor = 0
        self._num_segments = 0

    def _take_row(self) -> dict[str, np.ndarray]:
        row = self._row
        self.reset_row()
        return row

    def add(self, tokens: np.ndarray) -> None:
        """Queues a document's tokens; call only when ``pending`` is empty."""
        if self.pending.size:
            raise RuntimeError("RowPacker.add called before the previous document was packed")
        self.pending = np.asarray(tokens, np.int32).reshape(-1)

    def pop_row(self) -> dict[str, np.ndarray] | None:
        """Packs pending tokens; returns a row once one is complete, else ``None``."""
        while self.pending.size:
            room = self.seq_len - self._cursor - 2
            take = min(room, self.pending.size)
            too_small = take < self.pending.size and take < self.min_chunk_tokens
            if take <= 0 or (too_small and self._cursor > 0):
                return self._take_row()
            start, stop = self._cursor, self._cursor + take + 2
            self._num_segments += 1
            self._row["input_ids"][start] = self.cls_id
            self._row["input_ids"][start + 1 : stop - 1] = self.pending[:take]
            self._row["input_ids"][stop - 1] = self.sep_id
            self._row["segment_ids"][start:stop] = self._num_segments
            self._row["positions"][start:stop] = np.arange(take + 2, dtype=np.int32)
            self._cursor = stop
            self.pending = self.pending[take:]
            if self._cursor > self.seq_len - 3:  # No room left for even one token.
                return self._take_row()
        return None

    def flush(self) -> dict[str, np.ndarray] | None:
        """The partial last row, or ``None`` if nothing is left."""
        row = self.pop_row()
        if row is not None:
            return row
        return self._take_row() if self._cursor else None


def pack_documents(
    docs: Sequence[np.ndarray], seq_len: int, cls_id: int, sep_id: int, pad_id: int
) -> list[dict[str, np.ndarray]]:
    """Packs a finite list of token arrays into rows (reference for ``PackIterDataset``)."""
    return pack_with(RowPacker(seq_len, cls_id, sep_id, pad_id), docs)


def pack_with(packer: Any, docs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every row ``packer`` makes of a finite list of token arrays (empty ones skipped)."""
    rows = []
    for doc in docs:
        if len(doc):
            packer.add(doc)
            while (row := packer.pop_row()) is not None:
                rows.append(row)
    while (row := packer.flush()) is not None:
        rows.append(row)
    return rows


def _encode_tokens(tokens: np.ndarray) -> str:
    return base64.b64encode(np.asarray(tokens, "<i4").tobytes()).decode("ascii")


def _decode_tokens(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<i4").astype(np.int32)


class PackIterator(grain.DatasetIterator):
    """Rows from a stream of token arrays through ``packer`` (a `RowPacker`, or any
    packer with ``add``, ``pop_row``, ``flush``, ``reset_row`` and ``pending``), with
    a checkpointable state: the parent's position and the unpacked remainder."""

    def __init__(self, parent: grain.DatasetIterator, packer: RowPacker, source_name: str):
        super().__init__(parent)
        self._packer = packer
        self._source_name = source_name
        self._exhausted = False
        self._any_row = False  # Not part of the state: a restored iterator had rows.

    def __next__(self) -> dict[str, np.ndarray]:
        empty_in_a_row = 0
        while True:
            row = self._packer.pop_row()
            if row is not None:
                self._any_row = True
                return row
            if self._exhausted:
                row = self._packer.flush()
                if row is None:
                    if not self._any_row:
                        raise DataConfigError(
                            f"{self._source_name} has no tokens (every document is empty "
                            "once tokenized); check the text source and data.tokenizer_path."
                        )
                    raise StopIteration
                self._any_row = True
                return row
            try:
                tokens = next(self._parent)
            except StopIteration:
                self._exhausted = True
                continue
            if len(tokens) == 0:
                empty_in_a_row += 1
                if empty_in_a_row > _MAX_CONSECUTIVE_EMPTY:
                    raise DataConfigError(
                        f"{self._source_name} gave {empty_in_a_row} documents in a row "
                        "without a token; check the text source (data.text_field) and "
                        "data.tokenizer_path."
                    )
                continue
            empty_in_a_row = 0
            self._packer.add(tokens)

    def get_state(self) -> dict[str, Any]:
        # Between rows the packer's partially built row is always empty, so the
        # state is the parent's position plus the unpacked remainder of a document.
        return {
            "parent": self._parent.get_state(),
            "pending": _encode_tokens(self._packer.pending),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._packer.pending = _decode_tokens(state["pending"])
        self._packer.reset_row()
        self._exhausted = bool(state["exhausted"])
        self._any_row = True


class PackIterDataset(grain.IterDataset):
    """Packs a dataset of int32 token arrays into rows of ``seq_len`` (see module doc)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        seq_len: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        min_chunk_tokens: int = 8,
        source_name: str = "the text source",
    ):
        super().__init__(parent)
        self._args = (seq_len, cls_id, sep_id, pad_id, min_chunk_tokens)
        self._source_name = source_name
        RowPacker(*self._args)  # Validate the arguments now, not at the first read.

    def __iter__(self) -> grain.DatasetIterator:
        return PackIterator(self._parent.__iter__(), RowPacker(*self._args), self._source_name)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._args[0]})"


def mask_row(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    special_ids: np.ndarray,
    mask_id: int,
    replacement_ids: np.ndarray,
    mask_prob: float,
    max_predictions: int,
) -> dict[str, np.ndarray]:
    """MLM-masks one row ``input_ids`` int32[L].

    Returns ``input_ids`` int32[L] (masked), ``masked_positions`` int32[M],
    ``masked_ids`` int32[M] and ``masked_weights`` float32[M] with M=max_predictions.
    ``special_ids`` are never selected; random replacements come from ``replacement_ids``.
    """
    ids = np.array(input_ids, np.int32, copy=True)
    candidates = np.flatnonzero(~np.isin(ids, special_ids))
    num = min(max_predictions, max(1, round(candidates.size * mask_prob))) if candidates.size else 0
    positions = np.sort(rng.choice(candidates, size=num, replace=False)).astype(np.int32)
    original = ids[positions]
    action = rng.random(num)
    to_mask = action < 0.8
    to_random = (action >= 0.8) & (action < 0.9)
    ids[positions[to_mask]] = mask_id
    ids[positions[to_random]] = rng.choice(replacement_ids, size=int(to_random.sum()))
    masked_positions = np.zeros(max_predictions, np.int32)
    masked_ids = np.zeros(max_predictions, np.int32)
    masked_weights = np.zeros(max_predictions, np.float32)
    masked_positions[:num] = positions
    masked_ids[:num] = original
    masked_weights[:num] = 1.0
    return {
        "input_ids": ids,
        "masked_positions": masked_positions,
        "masked_ids": masked_ids,
        "masked_weights": masked_weights,
    }


class MaskTransform(grain.transforms.RandomMap):
    """Grain ``RandomMap`` applying ``mask_row`` to a packed row (picklable for workers)."""

    def __init__(
        self,
        *,
        special_ids: Sequence[int],
        mask_id: int,
        vocab_size: int,
        mask_prob: float,
        max_predictions: int,
    ):
        if not 0.0 < mask_prob <= 1.0:
            raise DataConfigError(f"data.mask_prob must be in (0, 1]; got {mask_prob}")
        if max_predictions < 1:
            raise DataConfigError(f"data.max_predictions must be >= 1; got {max_predictions}")
        self._special_ids = np.asarray(sorted(set(special_ids)), np.int32)
        self._replacement_ids = np.setdiff1d(
            np.arange(vocab_size, dtype=np.int32), self._special_ids
        )
        if self._replacement_ids.size == 0:
            raise DataConfigError(
                f"the tokenizer's {vocab_size}-entry vocabulary has only special tokens; "
                "train it on text (data.vocab_size) or check data.tokenizer_path."
            )
        self._mask_id = mask_id
        self._mask_prob = mask_prob
        self._max_predictions = max_predictions

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        masked = mask_row(
            element["input_ids"],
            rng,
            special_ids=self._special_ids,
            mask_id=self._mask_id,
            replacement_ids=self._replacement_ids,
            mask_prob=self._mask_prob,
            max_predictions=self._max_predictions,
        )
        return {**element, **masked}
