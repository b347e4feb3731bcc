"""Tests of dwt_jax.data.pipeline: schema, determinism, checkpointing, sharding, eval."""

from __future__ import annotations

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dwt_jax.data import pipeline
from dwt_jax.data import tokenizer as tokenizer_lib

B, L, M = 8, 32, 6  # Matches text_files_config (seq_len=32, max_predictions=6).


def make_iter(config, tok, **kwargs):
    args = {"split": "train", "global_batch_size": B, "seed": 0, **kwargs}
    return pipeline.make_pretrain_iterator(config, tok, **args)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def unmasked(batch):
    """The batch's input ids before masking."""
    ids = batch["input_ids"].copy()
    for row in range(ids.shape[0]):
        num = int(batch["masked_weights"][row].sum())
        ids[row, batch["masked_positions"][row, :num]] = batch["masked_ids"][row, :num]
    return ids


def test_embedded_batch_schema(embedded_config, embedded_tokenizer):
    iterator = pipeline.make_pretrain_iterator(
        embedded_config, embedded_tokenizer, split="train", global_batch_size=32, seed=0
    )
    batch = next(iterator)
    spec = pipeline.batch_spec(embedded_config, 32)
    assert set(batch) == set(spec)
    for key, value in batch.items():
        assert value.shape == spec[key].shape and value.dtype == spec[key].dtype, key
    assert spec["input_ids"].shape == (32, 128) and spec["masked_weights"].shape == (32, 20)
    assert (batch["masked_weights"].sum(axis=1) >= 1).all()
    assert (batch["input_ids"][:, 0] == 2).all()  # Every row starts with [CLS].


def test_same_seed_same_batches_different_seed_different(text_files_config, text_files_tokenizer):
    a = take(make_iter(text_files_config, text_files_tokenizer, seed=3), 4)
    b = take(make_iter(text_files_config, text_files_tokenizer, seed=3), 4)
    c = take(make_iter(text_files_config, text_files_tokenizer, seed=4), 4)
    assert_same(a, b)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])


def test_get_state_set_state_continues_exactly(text_files_config, text_files_tokenizer):
    iterator = make_iter(text_files_config, text_files_tokenizer, seed=1)
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 5)
    restored = make_iter(text_files_config, text_files_tokenizer, seed=1)
    restored.set_state(state)
    assert_same(take(restored, 5), expected)


def test_orbax_checkpoint_restores_iterator(tmp_path, text_files_config, text_files_tokenizer):
    iterator = make_iter(text_files_config, text_files_tokenizer, seed=2)
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 3)
    restored = make_iter(text_files_config, text_files_tokenizer, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    assert_same(take(restored, 3), expected)


def test_epochs_cover_every_token_and_reshuffle(text_files_config, text_files_tokenizer):
    tokens_per_epoch = []
    for epoch_seed in (0, 1):
        it = make_iter(text_files_config, text_files_tokenizer, seed=epoch_seed, num_epochs=1)
        rows = np.concatenate([unmasked(b) for b in it])
        tokens_per_epoch.append(rows)
    a, b = tokens_per_epoch
    special = np.array([0, 1, 2, 3, 4])
    real_a, real_b = a[~np.isin(a, special)], b[~np.isin(b, special)]
    assert not np.array_equal(real_a[:200], real_b[:200])  # Different document order.
    # Same multiset of tokens up to the dropped remainder (< one batch of rows).
    counts_a = np.bincount(real_a, minlength=300)
    counts_b = np.bincount(real_b, minlength=300)
    assert np.abs(counts_a - counts_b).sum() <= 2 * B * L


def test_per_host_sharding_is_disjoint(text_files_config, text_files_tokenizer):
    doc_tags = []
    for index in range(2):
        it = make_iter(
            text_files_config,
            text_files_tokenizer,
            global_batch_size=2 * B,
            process_index=index,
            process_count=2,
            num_epochs=1,
            shuffle=False,
        )
        batches = list(it)
        assert batches and batches[0]["input_ids"].shape == (B, L)
        text = " ".join(
            text_files_tokenizer.decode(row.tolist()) for b in batches for row in unmasked(b)
        )
        doc_tags.append({w for w in text.split() if w.startswith("doc")})
    assert doc_tags[0] and doc_tags[1] and not doc_tags[0] & doc_tags[1]


def test_eval_batches_are_fixed_and_repeat(text_files_config, text_files_tokenizer):
    kwargs = {"global_batch_size": B, "num_batches": 12, "seed": 0}
    a = pipeline.eval_batches(text_files_config, text_files_tokenizer, **kwargs)
    b = pipeline.eval_batches(text_files_config, text_files_tokenizer, **kwargs)
    assert len(a) == 12  # The ~5% validation split is shorter; it repeats.
    assert_same(a, b)


def test_bad_batch_size_and_empty_shard(
    text_files_config, text_files_tokenizer, tmp_path, data_config_factory
):
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_iter(text_files_config, text_files_tokenizer, global_batch_size=9, process_count=2)
    (tmp_path / "one.txt").write_text("a single tiny document\n")
    config = data_config_factory(source="text_files", text_files=[str(tmp_path / "one.txt")])
    with pytest.raises(ValueError, match=r"data\.source='text_files'"):
        make_iter(
            config, text_files_tokenizer, process_index=1, process_count=2, global_batch_size=2
        )


def test_special_ids_required():
    tok = tokenizer_lib.new_wordpiece_tokenizer({"[UNK]": 0, "a": 1})
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer_lib.SpecialIds.from_tokenizer(tok)
