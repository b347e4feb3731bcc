"""Tests of dwt_jax.data.classification: the 'follows' builder, tokenisation, the GLUE
path (through ``tfds.testing.mock_data``), iterators, eval batches and config errors."""

from __future__ import annotations

import itertools
import string

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from dwt_jax.data import classification, corpus, tasks
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.data.corpus import DataConfigError
from dwt_jax.data.tokenizer import SpecialIds

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def hand_tokenizer():
    """WordPiece over WORDS plus single letters (so any lowercase word tokenizes)."""
    letters = list(string.ascii_lowercase)
    vocab = [*tokenizer_lib.SPECIAL_TOKENS, *WORDS, *letters, *("##" + c for c in letters)]
    return tokenizer_lib.new_wordpiece_tokenizer({tok: i for i, tok in enumerate(vocab)})


def word_id(word):
    return len(tokenizer_lib.SPECIAL_TOKENS) + WORDS.index(word)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def rows_of(batches):
    """Each real row as one hashable tuple (input ids, token types, label)."""
    out = []
    for b in batches:
        for i in np.flatnonzero(b["example_weights"] > 0):
            label = b["labels"][i].item()
            out.append((*b["input_ids"][i], *b["token_type_ids"][i], label))
    return out


# --- the embedded 'follows' task ---------------------------------------------


@pytest.fixture(scope="session")
def follows_config(data_cache_dir, data_config_factory):
    return data_config_factory(
        source="embedded",
        task="follows",
        tfds_data_dir=f"{data_cache_dir}/tfds",
        eval_split="",
        seq_len=48,
    )


@pytest.fixture(scope="session")
def follows_splits(follows_config):
    """The prepared 'follows' splits read back, ordered by idx."""
    builder = classification.follows_builder(corpus.data_dir(follows_config))
    out = {}
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["idx"]))
        out[split] = records
    return out


@pytest.fixture(scope="session")
def follows_tokenizer(follows_splits):
    texts = [tokenizer_lib.as_text(r["sentence1"]) for r in follows_splits["train"][:1500]]
    tok = tokenizer_lib.train_tokenizer(texts, 300)
    tok.post_processor = None
    return tok


def test_follows_builder_matches_deterministic_examples(follows_splits):
    expected = classification.follows_examples()
    assert expected == classification.follows_examples()  # Deterministic.
    for split, records in follows_splits.items():
        assert len(records) == len(expected[split])
        for i, (record, example) in enumerate(zip(records, expected[split], strict=True)):
            assert int(record["idx"]) == i
            assert tokenizer_lib.as_text(record["sentence1"]) == example["sentence1"]
            assert tokenizer_lib.as_text(record["sentence2"]) == example["sentence2"]
            assert int(record["label"]) == example["label"]
    assert len(follows_splits["validation"]) >= 1000
    assert len(follows_splits["train"]) > 5 * len(follows_splits["validation"])


def test_follows_labels_balanced_and_pairs_genuine():
    docs = dict(corpus.embedded_documents())
    flat = {doc_id: " ".join(text.split()) for doc_id, text in docs.items()}
    for split, examples in classification.follows_examples().items():
        labels = np.array([e["label"] for e in examples])
        assert abs(labels.mean() - 0.5) < 0.02, split
        for e in examples:
            a, b = e["sentence1"], e["sentence2"]
            assert a in flat[e["doc_id"]]
            if e["label"] == 1:  # B follows A in the same document.
                assert e["sentence2_doc_id"] == e["doc_id"]
                assert f"{a} {b}" in flat[e["doc_id"]]
            else:  # B comes from another document and does not occur in A's.
                assert e["sentence2_doc_id"] != e["doc_id"]
                assert b in flat[e["sentence2_doc_id"]]
                assert b not in flat[e["doc_id"]]


def test_follows_splits_share_no_document():
    examples = classification.follows_examples()
    docs = {
        split: {e["doc_id"] for e in rows} | {e["sentence2_doc_id"] for e in rows}
        for split, rows in examples.items()
    }
    assert not docs["train"] & docs["validation"]
    for doc_id in docs["train"] | docs["validation"]:  # The pre-training held-out docs
        if corpus.is_validation(doc_id):  # stay held out here.
            assert doc_id in docs["validation"]
    for doc_id in docs["validation"]:
        assert classification.is_follows_validation(doc_id)


def test_sentence_runs_skip_code_and_keep_adjacency():
    text = (
        "This is the first sentence here. And this is the second one here.\n"
        "It wraps onto a new line here.\n\n"
        "    indented_code(x) = 1. Not prose at all here.\n\n"
        ">>> print('a doctest line here.')\n\n"
        "Short. A sentence after a short one is kept. Another sentence in the same run."
    )
    assert classification.sentence_runs(text) == [
        [
            "This is the first sentence here.",
            "And this is the second one here.",
            "It wraps onto a new line here.",
        ],
        ["A sentence after a short one is kept.", "Another sentence in the same run."],
    ]


# --- tokenisation --------------------------------------------------------------


def test_truncate_lengths_is_longest_first():
    def one_at_a_time(a, b, budget):
        while a + b > budget:
            if a > b:
                a -= 1
            else:
                b -= 1
        return a, b

    for a, b, budget in itertools.product(range(14), range(14), range(16)):
        assert classification.truncate_lengths(a, b, budget) == one_at_a_time(a, b, budget)


def test_build_row_pair_layout_and_padding():
    row = classification.build_row([10, 11], [20, 21, 22], 10, SPECIAL)
    np.testing.assert_array_equal(row["input_ids"], [2, 10, 11, 3, 20, 21, 22, 3, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["token_type_ids"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["positions"], np.arange(10))
    assert all(v.dtype == np.int32 for v in row.values())


def test_build_row_single_and_truncation():
    row = classification.build_row(list(range(10, 30)), None, 8, SPECIAL)
    np.testing.assert_array_equal(row["input_ids"], [2, 10, 11, 12, 13, 14, 15, 3])
    np.testing.assert_array_equal(row["token_type_ids"], np.zeros(8))
    np.testing.assert_array_equal(row["segment_ids"], np.ones(8))
    # Longest first: A (9 tokens) is cut to fit, B (2 tokens) is kept whole.
    row = classification.build_row(list(range(10, 19)), [50, 51], 10, SPECIAL)
    np.testing.assert_array_equal(row["input_ids"], [2, 10, 11, 12, 13, 14, 3, 50, 51, 3])
    np.testing.assert_array_equal(row["token_type_ids"], [0] * 7 + [1] * 3)
    # Both long: they end up equally long.
    row = classification.build_row(list(range(10, 19)), list(range(50, 70)), 11, SPECIAL)
    np.testing.assert_array_equal(row["input_ids"], [2, 10, 11, 12, 13, 3, 50, 51, 52, 53, 3])


def test_encode_record_with_hand_tokenizer():
    tok = hand_tokenizer()
    pair = tasks.get_task("glue/mrpc")
    record = {"sentence1": b"Alpha beta", "sentence2": "gamma", "label": np.int64(1), "idx": 3}
    row = classification.encode_record(record, tok, pair, 8, SPECIAL)
    ids = [2, word_id("alpha"), word_id("beta"), 3, word_id("gamma"), 3, 0, 0]
    np.testing.assert_array_equal(row["input_ids"], ids)
    np.testing.assert_array_equal(row["token_type_ids"], [0, 0, 0, 0, 1, 1, 0, 0])
    assert row["labels"].dtype == np.int32 and row["labels"] == 1
    assert row["example_weights"].dtype == np.float32 and row["example_weights"] == 1.0
    record = {"sentence1": "delta " * 9, "sentence2": "eta", "label": np.float32(3.5)}
    row = classification.encode_record(record, tok, tasks.get_task("glue/stsb"), 8, SPECIAL)
    ids = [2, *[word_id("delta")] * 4, 3, word_id("eta"), 3]
    np.testing.assert_array_equal(row["input_ids"], ids)
    assert row["labels"].dtype == np.float32 and row["labels"] == 3.5
    with pytest.raises(DataConfigError, match="'sentence2'"):
        classification.encode_record({"sentence1": "a", "label": 0}, tok, pair, 8, SPECIAL)


# --- GLUE through tfds.testing.mock_data -------------------------------------


def glue_config(factory, tmp_path, task, **kw):
    return factory(
        source="tfds",
        task=task,
        tfds_data_dir=str(tmp_path / "tfds"),
        eval_split="",
        seq_len=24,
        **kw,
    )


def mock_glue(num_examples):
    """Mocks `DatasetBuilder.as_data_source` (what `load_task_source` calls) with
    deterministic random records; USE_CODE: no metadata files needed."""
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )


@pytest.mark.parametrize("task", ["glue/mrpc", "glue/stsb", "glue/cola"])
def test_glue_iterator_matches_batch_spec(task, tmp_path, data_config_factory):
    config = glue_config(data_config_factory, tmp_path, task)
    spec = classification.classification_batch_spec(config, 8, tasks.get_task(task))
    with mock_glue(20):
        iterator = classification.make_classification_iterator(
            config, hand_tokenizer(), split="train", global_batch_size=8, seed=0
        )
        batches = take(iterator, 4)  # More than one epoch of 20 examples.
    for batch in batches:
        assert set(batch) == set(spec)
        for key, value in batch.items():
            assert value.shape == spec[key].shape and value.dtype == spec[key].dtype, key
        assert (batch["input_ids"][:, 0] == SPECIAL.cls).all()
        assert (batch["example_weights"] == 1).all()
        num_sep = (batch["input_ids"] == SPECIAL.sep).sum(axis=1)
        assert (num_sep == (1 if task == "glue/cola" else 2)).all()
    if task == "glue/stsb":
        assert batches[0]["labels"].dtype == np.float32
        assert np.any(batches[0]["labels"] != np.round(batches[0]["labels"]))
    else:
        assert batches[0]["labels"].dtype == np.int32
        assert set(np.concatenate([b["labels"] for b in batches])) <= {0, 1}
    if task == "glue/cola":
        assert (batches[0]["token_type_ids"] == 0).all()


@pytest.mark.parametrize("task", ["glue/mrpc", "glue/stsb"])
def test_glue_eval_covers_every_example_once(task, tmp_path, data_config_factory):
    config = glue_config(data_config_factory, tmp_path, task)
    spec = tasks.get_task(task)
    tok = hand_tokenizer()
    with mock_glue(37):
        source = classification.load_task_source(config, "validation")
        expected = [
            classification.encode_record(source[i], tok, spec, 24, SPECIAL) for i in range(37)
        ]
        batches = classification.classification_eval_batches(config, tok, global_batch_size=8)
        shards = [
            classification.classification_eval_batches(
                config, tok, global_batch_size=8, process_index=p, process_count=2
            )
            for p in range(2)
        ]
        head = classification.classification_eval_batches(
            config, tok, global_batch_size=8, max_examples=10
        )
    assert len(batches) == 5  # ceil(37 / 8)
    weights = np.concatenate([b["example_weights"] for b in batches])
    np.testing.assert_array_equal(weights, [1] * 37 + [0] * 3)
    labels = np.concatenate([b["labels"] for b in batches])
    assert labels.dtype == (np.float32 if spec.is_regression else np.int32)
    for key in expected[0]:
        got = np.concatenate([b[key] for b in batches])[:37]
        np.testing.assert_array_equal(got, np.stack([r[key] for r in expected]), err_msg=key)
    padding = batches[-1]
    assert (padding["input_ids"][5:] == SPECIAL.pad).all()
    assert (padding["segment_ids"][5:] == 0).all()
    # Two processes: 4 local rows a batch, the same number of batches each (19 and
    # 18 examples -> 5 batches), and together every example exactly once.
    assert [len(s) for s in shards] == [5, 5]
    assert all(b["input_ids"].shape == (4, 24) for s in shards for b in s)
    real = [rows_of(s) for s in shards]
    assert len(real[0]) == 19 and len(real[1]) == 18
    assert sorted(real[0] + real[1]) == sorted(rows_of(batches))
    assert rows_of(head) == rows_of(batches)[:10]
    assert len(head) == 2 and head[-1]["example_weights"].sum() == 2


def test_glue_process_shards_are_disjoint(tmp_path, data_config_factory):
    config = glue_config(data_config_factory, tmp_path, "glue/mrpc")
    tok = hand_tokenizer()
    with mock_glue(40):
        shards = [
            list(
                classification.make_classification_iterator(
                    config,
                    tok,
                    split="train",
                    global_batch_size=4,
                    seed=5,
                    process_index=p,
                    process_count=2,
                    num_epochs=1,
                )
            )
            for p in range(2)
        ]
        everything = classification.classification_eval_batches(config, tok, global_batch_size=8)
    rows = [rows_of(s) for s in shards]
    assert len(rows[0]) == len(rows[1]) == 20
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(rows_of(everything))


def test_glue_epochs_are_reshuffled(tmp_path, data_config_factory):
    config = glue_config(data_config_factory, tmp_path, "glue/mrpc")
    with mock_glue(16):
        iterator = classification.make_classification_iterator(
            config, hand_tokenizer(), split="train", global_batch_size=4, seed=1
        )
        first, second = rows_of(take(iterator, 4)), rows_of(take(iterator, 4))
    assert sorted(first) == sorted(second) and first != second


# --- iterators over 'follows' -------------------------------------------------


def make_iter(config, tok, **kwargs):
    args = {"split": "train", "global_batch_size": 8, "seed": 0, **kwargs}
    return classification.make_classification_iterator(config, tok, **args)


def test_follows_iterator_schema_and_determinism(follows_config, follows_tokenizer):
    a = take(make_iter(follows_config, follows_tokenizer, seed=3), 3)
    b = take(make_iter(follows_config, follows_tokenizer, seed=3), 3)
    c = take(make_iter(follows_config, follows_tokenizer, seed=4), 3)
    assert_same(a, b)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    spec = classification.classification_batch_spec(follows_config, 8)
    for key, value in a[0].items():
        assert value.shape == spec[key].shape and value.dtype == spec[key].dtype, key
    assert spec["input_ids"].shape == (8, 48) and spec["labels"].dtype == np.int32


def test_get_state_set_state_continues_exactly(follows_config, follows_tokenizer):
    iterator = make_iter(follows_config, follows_tokenizer, seed=1)
    take(iterator, 4)
    state = iterator.get_state()
    expected = take(iterator, 3)
    restored = make_iter(follows_config, follows_tokenizer, seed=1)
    restored.set_state(state)
    assert_same(take(restored, 3), expected)


def test_orbax_checkpoint_restores_iterator(tmp_path, follows_config, follows_tokenizer):
    iterator = make_iter(follows_config, follows_tokenizer, seed=2, process_count=2)
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 3)
    restored = make_iter(follows_config, follows_tokenizer, seed=2, process_count=2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    assert_same(take(restored, 3), expected)


def test_follows_eval_uses_validation_split(follows_config, follows_tokenizer, follows_splits):
    batches = classification.classification_eval_batches(
        follows_config, follows_tokenizer, global_batch_size=256
    )
    n = len(follows_splits["validation"])
    weights = np.concatenate([b["example_weights"] for b in batches])
    assert weights.sum() == n and len(weights) == 256 * len(batches) and len(weights) - n < 256
    labels = np.concatenate([b["labels"] for b in batches])[:n]
    source = classification.load_task_source(follows_config, "validation")
    np.testing.assert_array_equal(labels, [int(source[i]["label"]) for i in range(n)])


# --- config errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"task": "glue/nope", "source": "tfds"}, "data.task"),
        ({"task": "glue/mrpc", "source": "embedded"}, "data.source"),
        ({"task": "follows", "source": "tfds"}, "data.source"),
        ({"task": "follows", "source": "text_files"}, "data.source"),
        ({"task": "follows", "seq_len": 7}, "data.seq_len"),
    ],
)
def test_config_errors_name_the_field(overrides, field, data_config_factory):
    config = data_config_factory(**overrides)
    with pytest.raises(DataConfigError) as info:
        classification.task_from_config(config)
    assert field in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataConfigError):  # Raised before any data is read.
        classification.make_classification_iterator(config, hand_tokenizer(), seed=0)


def test_missing_split_names_the_split_fields(follows_config):
    with pytest.raises(DataConfigError) as info:
        classification.load_task_source(follows_config, "test")
    message = str(info.value)
    assert "data.train_split" in message and "'validation'" in message and "\n" not in message


def test_unprepared_glue_says_how_to_prepare(tmp_path, data_config_factory):
    config = glue_config(data_config_factory, tmp_path, "glue/mrpc")
    with pytest.raises(DataConfigError) as info:
        classification.classification_eval_batches(config, hand_tokenizer(), global_batch_size=8)
    message = str(info.value)
    assert "data.tfds_data_dir" in message and "data.task" in message
    assert "tfds build glue/mrpc --file_format=array_record" in message
    assert "\n" not in message
    assert not (tmp_path / "tfds" / "downloads").exists()  # Nothing was fetched.


def test_eval_split_defaults_to_the_tasks(tmp_path, data_config_factory):
    mnli = glue_config(data_config_factory, tmp_path, "glue/mnli")
    assert classification.eval_split_name(mnli) == "validation_matched"
    mnli.eval_split = "validation_mismatched"
    assert classification.eval_split_name(mnli) == "validation_mismatched"
