"""Tests of dwt_jax.data.pretrain: packing invariants and MLM masking statistics."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from dwt_jax.data import pretrain

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = np.array([PAD, UNK, CLS, SEP, MASK], np.int32)
VOCAB = 1000


def random_docs(num_docs: int, seed: int = 0, max_len: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    return [rng.integers(5, VOCAB, n).astype(np.int32) for n in lengths]


def check_row(row: dict[str, np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Asserts the packing invariants of one row; returns its chunks' inner tokens."""
    ids, seg, pos = row["input_ids"], row["segment_ids"], row["positions"]
    for key in pretrain.ROW_KEYS:
        assert row[key].shape == (seq_len,) and row[key].dtype == np.int32
    assert not row["token_type_ids"].any()
    used = int((seg > 0).sum())
    assert (seg[:used] > 0).all() and not seg[used:].any()  # Padding only at the end.
    assert (ids[used:] == PAD).all() and not pos[used:].any()
    assert np.all(np.diff(seg[:used]) >= 0) and np.all(np.diff(seg[:used]) <= 1)
    assert used == 0 or seg[0] == 1
    chunks = []
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[where], np.arange(where.size))
        chunk = ids[where]
        assert chunk[0] == CLS and chunk[-1] == SEP and chunk.size >= 3
        assert not np.isin(chunk[1:-1], SPECIAL).any()
        chunks.append(chunk[1:-1])
    return chunks


@pytest.mark.parametrize("seq_len", [16, 128])
def test_packing_keeps_every_token_once_in_order(seq_len):
    docs = random_docs(60, max_len=3 * seq_len)
    rows = pretrain.pack_documents(docs, seq_len, CLS, SEP, PAD)
    chunks = [c for row in rows for c in check_row(row, seq_len)]
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(docs))
    used = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    assert used / (len(rows) * seq_len) > 0.85  # Greedy packing leaves little padding.


def test_long_document_is_split_into_consecutive_chunks():
    doc = np.arange(5, 5 + 40, dtype=np.int32)
    rows = pretrain.pack_documents([doc], 12, CLS, SEP, PAD)
    chunks = [c for row in rows for c in check_row(row, 12)]
    assert [len(c) for c in chunks] == [10, 10, 10, 10]
    np.testing.assert_array_equal(np.concatenate(chunks), doc)


def test_pack_iter_dataset_matches_reference_and_restores_mid_document():
    docs = random_docs(40, seed=3)
    ds = pretrain.PackIterDataset(
        grain.MapDataset.source(docs).to_iter_dataset(),
        seq_len=32,
        cls_id=CLS,
        sep_id=SEP,
        pad_id=PAD,
    )
    expected = pretrain.pack_documents(docs, 32, CLS, SEP, PAD)
    rows = list(ds)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        for key in pretrain.ROW_KEYS:
            np.testing.assert_array_equal(got[key], want[key])
    iterator = iter(ds)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    assert state["pending"]  # A document is in flight: the test covers mid-document state.
    restored = iter(ds)
    restored.set_state(state)
    for got, want in zip(restored, expected[7:], strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def mask_many(rows: np.ndarray, *, mask_prob=0.15, max_predictions=20, seed=0):
    rng = np.random.default_rng(seed)
    replacement = np.setdiff1d(np.arange(VOCAB, dtype=np.int32), SPECIAL)
    return [
        pretrain.mask_row(
            row,
            rng,
            special_ids=SPECIAL,
            mask_id=MASK,
            replacement_ids=replacement,
            mask_prob=mask_prob,
            max_predictions=max_predictions,
        )
        for row in rows
    ]


def packed_rows(num_docs=400, seq_len=128):
    return [
        r["input_ids"]
        for r in pretrain.pack_documents(random_docs(num_docs, seed=5), seq_len, CLS, SEP, PAD)
    ]


def test_masking_statistics():
    rows = packed_rows()
    outputs = mask_many(rows)
    selected = real = kept = masked = replaced = 0
    for row, out in zip(rows, outputs, strict=True):
        weights = out["masked_weights"]
        num = int(weights.sum())
        assert set(np.unique(weights)) <= {0.0, 1.0} and (weights[:num] == 1).all()
        pos, ids = out["masked_positions"][:num], out["masked_ids"][:num]
        assert np.all(np.diff(pos) > 0) and not out["masked_positions"][num:].any()
        assert not out["masked_ids"][num:].any()
        np.testing.assert_array_equal(ids, row[pos])
        assert not np.isin(row[pos], SPECIAL).any()  # Specials and padding never chosen.
        changed = out["input_ids"] != row
        assert not changed[np.setdiff1d(np.arange(row.size), pos)].any()
        new = out["input_ids"][pos]
        masked += int((new == MASK).sum())
        kept += int((new == ids).sum())
        replaced += int(((new != MASK) & (new != ids)).sum())
        assert not np.isin(new[new != MASK], SPECIAL).any()
        selected += num
        real += int((~np.isin(row, SPECIAL)).sum())
    assert abs(selected / real - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.03
    assert abs(kept / selected - 0.1) < 0.025  # Random replacements may hit the same id.
    assert abs(replaced / selected - 0.1) < 0.025


def test_masking_cap_and_minimum():
    rows = packed_rows(num_docs=100)
    for row, out in zip(rows, mask_many(rows, mask_prob=0.5, max_predictions=7), strict=True):
        real = int((~np.isin(row, SPECIAL)).sum())
        assert out["masked_weights"].sum() == min(7, max(1, round(real * 0.5)))
    tiny = np.array([CLS, 10, SEP, PAD, PAD], np.int32)
    (out,) = mask_many([tiny], max_predictions=3)
    assert out["masked_weights"].tolist() == [1.0, 0.0, 0.0]
    assert out["masked_positions"][0] == 1
    (out,) = mask_many([np.array([CLS, SEP, PAD], np.int32)], max_predictions=3)
    assert not out["masked_weights"].any()


def test_mask_transform_is_deterministic_per_seed_and_index():
    rows = [{"input_ids": r} for r in packed_rows(num_docs=40)]
    transform = pretrain.MaskTransform(
        special_ids=SPECIAL.tolist(),
        mask_id=MASK,
        vocab_size=VOCAB,
        mask_prob=0.15,
        max_predictions=20,
    )
    ds = grain.MapDataset.source(rows).to_iter_dataset()
    a = [r["masked_positions"] for r in ds.random_map(transform, seed=1)]
    b = [r["masked_positions"] for r in ds.random_map(transform, seed=1)]
    c = [r["masked_positions"] for r in ds.random_map(transform, seed=2)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    with pytest.raises(ValueError, match="mask_prob"):
        pretrain.MaskTransform(
            special_ids=[0], mask_id=4, vocab_size=10, mask_prob=0.0, max_predictions=2
        )
