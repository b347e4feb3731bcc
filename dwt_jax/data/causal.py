"""Document packing with next-token targets for causal-LM training (numpy, one Grain dataset).

Packing (``CausalPackIterDataset``): a stream of tokenized documents becomes rows of
a fixed length L. Each document is the sequence ``[bos] tokens... eos`` (``bos`` only
when ``CausalSpecialIds.bos`` is set). Documents are laid out greedily: a document
fills the room left in the current row and continues in the next row as a new
chunk, so ``bos`` appears only at a document's true start and ``eos`` only at its
true end. Every chunk is one segment: attention stays inside it and positions
restart at 0 (docs/methods.md#data). A fragment shorter than
``min_chunk_tokens`` is not started at the end of a row (the row is padded instead)
unless it finishes its document. Empty documents are dropped; a source without any
token is a ``DataConfigError`` (at the end of a finite stream, or after
100,000 empty documents in a row of an endless one).

Row fields: ``input_ids`` int32[L] (``pad`` after the end), ``segment_ids`` int32[L]
(1, 2, 3, ... per chunk, 0 on padding), ``positions`` int32[L] (position inside the
chunk, 0 on padding), ``targets`` int32[L] (``input_ids[t + 1]`` when t + 1 is in
the same chunk, else 0) and ``target_weights`` float32[L] (1 exactly where a target
exists: every token of a chunk but its last; 0 on padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from dwt_jax.data import pretrain
from dwt_jax.errors import DataConfigError

CAUSAL_INT_KEYS = ("input_ids", "segment_ids", "positions", "targets")
CAUSAL_KEYS = (*CAUSAL_INT_KEYS, "target_weights")


@dataclasses.dataclass(frozen=True)
class CausalSpecialIds:
    """Ids the causal packer adds: ``eos`` ends every document, ``pad`` fills rows,
    ``bos`` (``None``: none) starts every document."""

    eos: int
    pad: int
    bos: int | None = None


def with_targets(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds ``targets`` and ``target_weights`` to a row of ids and segment ids."""
    ids, seg = row["input_ids"], row["segment_ids"]
    # Token t has a target iff token t + 1 is in the same chunk (never across chunks).
    has_next = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    targets = np.zeros_like(ids)
    targets[:-1] = np.where(has_next, ids[1:], 0)
    weights = np.zeros(ids.shape, np.float32)
    weights[:-1] = has_next
    return {**row, "targets": targets, "target_weights": weights}


class CausalRowPacker:
    """Greedy packer of documents into fixed-length causal rows (pure, no Grain).

    ``add(tokens)`` queues a document; ``pop_row()`` returns the next full row or
    ``None`` when the queued tokens do not fill one yet; ``flush()`` returns the
    last, partial row (or ``None``). The only state between rows is ``pending``: the
    not-yet-packed remainder of the current document, its ``bos``/``eos`` included
    (so a remainder without a leading ``bos`` is the middle of a document).
    """

    def __init__(self, seq_len: int, special: CausalSpecialIds, min_chunk_tokens: int = 8):
        if seq_len < 2:
            raise DataConfigError(
                f"data.seq_len must be >= 2 for causal LM rows (a token and its target); "
                f"got {seq_len}"
            )
        self.seq_len = seq_len
        self.special = special
        self.min_chunk_tokens = max(1, min(min_chunk_tokens, seq_len))
        self.pending = np.zeros(0, np.int32)
        self.reset_row()

    def reset_row(self) -> None:
        self._ids = np.full(self.seq_len, self.special.pad, np.int32)
        self._seg = np.zeros(self.seq_len, np.int32)
        self._pos = np.zeros(self.seq_len, np.int32)
        self._cursor = 0
        self._num_segments = 0

    def _take_row(self) -> dict[str, np.ndarray]:
        row = {"input_ids": self._ids, "segment_ids": self._seg, "positions": self._pos}
        self.reset_row()
        return with_targets(row)

    def add(self, tokens: np.ndarray) -> None:
        """Queues a document's tokens (no special tokens); call only when ``pending``
        is empty. An empty document is ignored."""
        if self.pending.size:
            raise RuntimeError("CausalRowPacker.add called before the previous document was packed")
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if not tokens.size:
            return
        head = [] if self.special.bos is None else [self.special.bos]
        self.pending = np.concatenate(
            [np.asarray(head, np.int32), tokens, np.asarray([self.special.eos], np.int32)]
        )

    def pop_row(self) -> dict[str, np.ndarray] | None:
        """Packs pending tokens; returns a row once one is complete, else ``None``."""
        while self.pending.size:
            room = self.seq_len - self._cursor
            take = min(room, self.pending.size)
            too_small = take < self.pending.size and take < self.min_chunk_tokens
            if take <= 0 or (too_small and self._cursor > 0):
                return self._take_row()
            start, stop = self._cursor, self._cursor + take
            self._num_segments += 1
            self._ids[start:stop] = self.pending[:take]
            self._seg[start:stop] = self._num_segments
            self._pos[start:stop] = np.arange(take, dtype=np.int32)
            self._cursor = stop
            self.pending = self.pending[take:]
            if self._cursor >= self.seq_len:
                return self._take_row()
        return None

    def flush(self) -> dict[str, np.ndarray] | None:
        """The partial last row, or ``None`` if nothing is left."""
        row = self.pop_row()
        if row is not None:
            return row
        return self._take_row() if self._cursor else None


def pack_causal_documents(
    docs: Sequence[np.ndarray],
    seq_len: int,
    special: CausalSpecialIds,
    min_chunk_tokens: int = 8,
) -> list[dict[str, np.ndarray]]:
    """Packs a finite list of token arrays into rows (reference for
    ``CausalPackIterDataset``)."""
    return pretrain.pack_with(CausalRowPacker(seq_len, special, min_chunk_tokens), docs)


class CausalPackIterDataset(grain.IterDataset):
    """Packs a dataset of int32 token arrays into causal rows of ``seq_len`` (see
    module doc)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        seq_len: int,
        special: CausalSpecialIds,
        min_chunk_tokens: int = 8,
        source_name: str = "the text source",
    ):
        super().__init__(parent)
        self._args = (seq_len, special, min_chunk_tokens)
        self._source_name = source_name
        CausalRowPacker(*self._args)  # Validate the arguments now, not at the first read.

    def __iter__(self) -> grain.DatasetIterator:
        return pretrain.PackIterator(
            self._parent.__iter__(), CausalRowPacker(*self._args), self._source_name
        )

    def __str__(self) -> str:
        return f"CausalPackIterDataset(seq_len={self._args[0]})"
