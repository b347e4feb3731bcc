"""Tests of dwt_jax.data.causal (packing with next-token targets) and the causal pipeline."""

from __future__ import annotations

import base64
import json

import grain
import ml_collections
import numpy as np
import pytest

from dwt_jax.data import causal, pipeline
from dwt_jax.data.causal import CausalSpecialIds
from dwt_jax.errors import DataConfigError

PAD, BOS, EOS = 0, 2, 3
SPECIAL = CausalSpecialIds(eos=EOS, pad=PAD, bos=BOS)
NO_BOS = CausalSpecialIds(eos=EOS, pad=PAD, bos=None)
VOCAB = 1000  # Document tokens are drawn from [5, VOCAB): never a special id.
B = 4


def random_docs(num_docs: int, seed: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    return [rng.integers(5, VOCAB, n).astype(np.int32) for n in lengths]


def naive_pack(docs, seq_len: int, special: CausalSpecialIds, min_chunk: int = 8) -> list[dict]:
    """An independent reference: rows as lists of chunks, fields filled token by token."""
    min_chunk = max(1, min(min_chunk, seq_len))
    rows, chunks = [], []
    for doc in docs:
        if len(doc) == 0:
            continue
        seq = ([] if special.bos is None else [special.bos]) + [int(t) for t in doc]
        seq.append(special.eos)
        while seq:
            used = sum(len(c) for c in chunks)
            room = seq_len - used
            if room == 0 or (used and len(seq) > room and room < min_chunk):
                rows.append(chunks)
                chunks = []
                continue
            chunks.append(seq[:room])
            seq = seq[room:]
    if chunks:
        rows.append(chunks)
    out = []
    for chunks in rows:
        ids, seg, pos = [special.pad] * seq_len, [0] * seq_len, [0] * seq_len
        tgt, weight = [0] * seq_len, [0.0] * seq_len
        t = 0
        for s, chunk in enumerate(chunks, start=1):
            for i, token in enumerate(chunk):
                ids[t], seg[t], pos[t] = token, s, i
                if i + 1 < len(chunk):
                    tgt[t], weight[t] = chunk[i + 1], 1.0
                t += 1
        out.append(
            {
                "input_ids": np.array(ids, np.int32),
                "segment_ids": np.array(seg, np.int32),
                "positions": np.array(pos, np.int32),
                "targets": np.array(tgt, np.int32),
                "target_weights": np.array(weight, np.float32),
            }
        )
    return out


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(causal.CAUSAL_KEYS) == set(b)
        for key in causal.CAUSAL_KEYS:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_hand_made_rows_and_min_chunk_tokens():
    docs = [np.array([10, 11, 12], np.int32), np.array([20, 21], np.int32)]
    # min_chunk_tokens=8: the second document ([bos] 20 21 eos, 4 tokens) does not fit
    # in the 3 free slots and would leave a 3-token fragment: it starts a new row.
    rows = causal.pack_causal_documents(docs, 8, SPECIAL)
    assert len(rows) == 2
    assert rows[0]["input_ids"].tolist() == [2, 10, 11, 12, 3, 0, 0, 0]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert rows[0]["positions"].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert rows[0]["targets"].tolist() == [10, 11, 12, 3, 0, 0, 0, 0]
    assert rows[0]["target_weights"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert rows[1]["input_ids"].tolist() == [2, 20, 21, 3, 0, 0, 0, 0]
    # min_chunk_tokens=2: the fragment is started; the document's eos continues in row 2
    # as a chunk of its own, which predicts nothing.
    rows = causal.pack_causal_documents(docs, 8, SPECIAL, min_chunk_tokens=2)
    assert [r["input_ids"].tolist() for r in rows] == [
        [2, 10, 11, 12, 3, 2, 20, 21],
        [3, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert rows[0]["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rows[0]["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[0]["targets"].tolist() == [10, 11, 12, 3, 0, 20, 21, 0]
    assert rows[0]["target_weights"].tolist() == [1, 1, 1, 1, 0, 1, 1, 0]
    assert rows[1]["segment_ids"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert not rows[1]["target_weights"].any()
    # A fragment shorter than min_chunk_tokens that finishes its document is placed.
    rows = causal.pack_causal_documents([np.array([10]), np.array([20, 21])], 8, SPECIAL)
    assert [r["input_ids"].tolist() for r in rows] == [[2, 10, 3, 2, 20, 21, 3, 0]]
    # Without bos a document is just its tokens and eos.
    (row,) = causal.pack_causal_documents([np.array([10, 11])], 4, NO_BOS)
    assert row["input_ids"].tolist() == [10, 11, 3, 0]
    assert row["targets"].tolist() == [11, 3, 0, 0]


def test_long_document_spans_rows_with_bos_and_eos_once():
    doc = np.arange(5, 5 + 30, dtype=np.int32)
    rows = causal.pack_causal_documents([doc], 8, SPECIAL)
    assert len(rows) == 4  # [bos] + 30 tokens + eos = 32 = 4 full rows.
    ids = np.stack([r["input_ids"] for r in rows])
    np.testing.assert_array_equal(ids.reshape(-1), np.concatenate([[BOS], doc, [EOS]]))
    assert (ids == BOS).sum() == 1 and (ids == EOS).sum() == 1
    for row in rows:  # Every row is one chunk: positions restart, the last slot is unweighted.
        assert row["segment_ids"].tolist() == [1] * 8
        assert row["positions"].tolist() == list(range(8))
        assert row["target_weights"].tolist() == [1] * 7 + [0]
        np.testing.assert_array_equal(row["targets"][:7], row["input_ids"][1:])


@pytest.mark.parametrize(
    ("seq_len", "special", "min_chunk"),
    [(16, SPECIAL, 8), (64, SPECIAL, 8), (16, NO_BOS, 3), (5, SPECIAL, 8)],
)
def test_packer_matches_naive_reference_and_keeps_every_token(seq_len, special, min_chunk):
    docs = random_docs(80, seed=seq_len, max_len=3 * seq_len)
    rows = causal.pack_causal_documents(docs, seq_len, special, min_chunk_tokens=min_chunk)
    assert_rows_equal(rows, naive_pack(docs, seq_len, special, min_chunk))
    ids = np.concatenate([r["input_ids"] for r in rows])
    seg = np.concatenate([r["segment_ids"] for r in rows])
    real = ids[(seg > 0) & (ids >= 5)]
    np.testing.assert_array_equal(real, np.concatenate(docs))  # Each token once, in order.
    num_docs = sum(len(d) > 0 for d in docs)
    assert (ids[seg > 0] == EOS).sum() == num_docs
    assert (ids[seg > 0] == BOS).sum() == (num_docs if special.bos is not None else 0)
    for row in rows:
        s, w = row["segment_ids"], row["target_weights"]
        chunk_end = np.append(s[1:] != s[:-1], True)
        np.testing.assert_array_equal(w == 0, (s == 0) | chunk_end)
        assert not row["positions"][s == 0].any() and (row["input_ids"][s == 0] == PAD).all()


def test_pack_iter_dataset_matches_reference_and_restores_mid_document():
    docs = random_docs(40, seed=3, max_len=90)
    ds = causal.CausalPackIterDataset(
        grain.MapDataset.source(docs).to_iter_dataset(), seq_len=32, special=SPECIAL
    )
    expected = causal.pack_causal_documents(docs, 32, SPECIAL)
    assert_rows_equal(list(ds), expected)
    mid_document = 0
    for k in range(0, len(expected), 3):
        iterator = iter(ds)
        for _ in range(k):
            next(iterator)
        state = json.loads(json.dumps(iterator.get_state()))  # As a checkpoint stores it.
        pending = np.frombuffer(base64.b64decode(state["pending"]), "<i4")
        mid_document += bool(pending.size and pending[0] != BOS)
        restored = iter(ds)
        restored.set_state(state)
        assert_rows_equal(list(restored), expected[k:])
    assert mid_document >= 3  # States taken inside a document (its bos already emitted).


def test_empty_source_and_bad_seq_len_are_data_config_errors():
    empty = [np.zeros(0, np.int32)] * 5
    ds = causal.CausalPackIterDataset(
        grain.MapDataset.source(empty).to_iter_dataset(), seq_len=8, special=SPECIAL
    )
    with pytest.raises(DataConfigError, match="has no tokens"):
        next(iter(ds))
    with pytest.raises(DataConfigError, match=r"data\.seq_len"):
        causal.CausalRowPacker(1, SPECIAL)


# The Grain pipeline, on the shared text-files corpus and its WordPiece tokenizer
# ([PAD]=0, [CLS]=2 as bos, [SEP]=3 as eos), with a data config without MLM fields.


@pytest.fixture(scope="module")
def causal_config(text_files_config) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(text_files_config.to_dict())
    del config["max_predictions"], config["mask_prob"]
    return config


def make_iter(config, tok, **kwargs):
    args = {"special": SPECIAL, "split": "train", "global_batch_size": B, "seed": 0, **kwargs}
    return pipeline.make_causal_iterator(config, tok, **args)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def find_pending(state):
    if isinstance(state, dict):
        if "pending" in state:
            return state["pending"]
        return next((p for v in state.values() if (p := find_pending(v)) is not None), None)
    return None


def test_batches_match_spec_and_targets_are_next_tokens(causal_config, text_files_tokenizer):
    batch = next(make_iter(causal_config, text_files_tokenizer))
    spec = pipeline.causal_batch_spec(causal_config, B)
    assert set(batch) == set(spec)
    for key, value in batch.items():
        assert value.shape == spec[key].shape == (B, 32) and value.dtype == spec[key].dtype
    weights = batch["target_weights"][:, :-1] > 0
    np.testing.assert_array_equal(
        batch["targets"][:, :-1][weights], batch["input_ids"][:, 1:][weights]
    )
    assert weights.mean() > 0.8  # Long documents: few chunk ends, little padding.


def test_resume_continues_exactly_including_mid_document(causal_config, text_files_tokenizer):
    iterator = make_iter(causal_config, text_files_tokenizer, seed=1)
    uninterrupted = take(iterator, 12)
    mid_document = 0
    for k in (2, 5, 9):
        first = make_iter(causal_config, text_files_tokenizer, seed=1)
        take(first, k)
        state = json.loads(json.dumps(first.get_state()))
        pending = find_pending(state)
        assert pending is not None
        mid_document += len(pending) > 0
        restored = make_iter(causal_config, text_files_tokenizer, seed=1)
        restored.set_state(state)
        for got, want in zip(take(restored, 12 - k), uninterrupted[k:], strict=True):
            for key in causal.CAUSAL_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
    assert mid_document >= 1
    other_seed = next(make_iter(causal_config, text_files_tokenizer, seed=2))
    assert not np.array_equal(other_seed["input_ids"], uninterrupted[0]["input_ids"])


def test_per_process_slices_are_disjoint(causal_config, text_files_tokenizer):
    doc_tags = []
    for index in range(2):
        it = make_iter(
            causal_config,
            text_files_tokenizer,
            global_batch_size=2 * B,
            process_index=index,
            process_count=2,
            num_epochs=1,
            shuffle=False,
        )
        batches = list(it)
        assert batches and batches[0]["input_ids"].shape == (B, 32)
        text = " ".join(
            text_files_tokenizer.decode(row.tolist()) for b in batches for row in b["input_ids"]
        )
        doc_tags.append({w for w in text.split() if w.startswith("doc")})
    assert len(doc_tags[0]) > 20 and len(doc_tags[1]) > 20 and not doc_tags[0] & doc_tags[1]


def test_eval_batches_are_fixed(causal_config, text_files_tokenizer):
    kwargs = {"special": SPECIAL, "global_batch_size": B, "num_batches": 6, "seed": 0}
    a = pipeline.causal_eval_batches(causal_config, text_files_tokenizer, **kwargs)
    b = pipeline.causal_eval_batches(causal_config, text_files_tokenizer, **kwargs)
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        for key in causal.CAUSAL_KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    train = next(make_iter(causal_config, text_files_tokenizer, shuffle=False))
    assert not np.array_equal(a[0]["input_ids"], train["input_ids"])  # A held-out split.


def test_too_small_split_is_refused_at_set_up(tmp_path, causal_config, text_files_tokenizer):
    (tmp_path / "tiny.txt").write_text("alpha beta\n\ngamma delta\n\nepsilon zeta\n\neta theta\n")
    config = ml_collections.ConfigDict(causal_config.to_dict())
    config.text_files = (str(tmp_path / "tiny.txt"),)
    with pytest.raises(DataConfigError, match="cannot fill one batch"):
        make_iter(config, text_files_tokenizer, num_epochs=1)
    batch = next(make_iter(config, text_files_tokenizer))  # Endless epochs: rows repeat.
    assert batch["input_ids"].shape == (B, 32)
