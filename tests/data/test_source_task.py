"""The embedded 'source' task: sentences labelled with the documentation area they come from."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from dwt_jax.data import classification, corpus
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.data.corpus import DataConfigError


@pytest.fixture(scope="module")
def source_config(data_cache_dir, data_config_factory):
    return data_config_factory(
        source="embedded", task="source", tfds_data_dir=f"{data_cache_dir}/tfds", eval_split=""
    )


@pytest.fixture(scope="module")
def source_splits(source_config):
    """The prepared splits read back, ordered by idx."""
    builder = classification.source_builder(corpus.data_dir(source_config))
    out = {}
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        out[split] = sorted((source[i] for i in range(len(source))), key=lambda r: int(r["idx"]))
    return out


def test_source_areas():
    assert classification.source_area("topic/assert") == "topics"
    assert classification.source_area("stdlib/email/message.py") == "email"
    assert classification.source_area("stdlib/logging/__init__.py") == "logging"
    assert classification.source_area("stdlib/difflib.py") == "difflib"


def test_builder_matches_examples_and_labels_are_genuine(source_splits):
    expected = classification.source_examples()
    documents = corpus.embedded_documents()
    text_by_area = collections.defaultdict(list)
    for doc_id, text in documents:
        text_by_area[classification.source_area(doc_id)].append(" ".join(text.split()))
    joined = {area: "\n".join(texts) for area, texts in text_by_area.items()}
    for split in ("train", "validation"):
        got = [
            (tokenizer_lib.as_text(r["sentence"]), int(r["label"])) for r in source_splits[split]
        ]
        assert got == [(e["sentence"], e["label"]) for e in expected[split]]
        counts = collections.Counter(label for _, label in got)
        assert sorted(counts) == list(range(len(classification.SOURCE_LABELS)))  # all 8 classes
        for sentence, label in got[::25]:  # The sentence is in its area's text, no other's.
            area = classification.SOURCE_LABELS[label]
            assert sentence in joined[area]
            others = [a for a in classification.SOURCE_LABELS if a != area]
            assert not any(sentence in joined[a] for a in others)
    train = {s for s, _ in (e.values() for e in expected["train"])}
    assert not train & {e["sentence"] for e in expected["validation"]}
    assert len(expected["validation"]) >= 500 and len(expected["train"]) >= 3000


def test_iterator_and_eval_batches(source_config, source_splits):
    texts = [tokenizer_lib.as_text(r["sentence"]) for r in source_splits["train"][:800]]
    tokenizer = tokenizer_lib.train_tokenizer(texts, 300)
    tokenizer.post_processor = None
    batch = next(
        classification.make_classification_iterator(
            source_config, tokenizer, split="train", global_batch_size=8, seed=0
        )
    )
    assert batch["input_ids"].shape == (8, source_config.seq_len)
    assert np.all(batch["token_type_ids"] == 0)  # One sentence: segment A only.
    assert batch["labels"].dtype == np.int32 and batch["labels"].max() < 8
    batches = classification.classification_eval_batches(
        source_config, tokenizer, global_batch_size=64, max_examples=100
    )
    assert sum(float(b["example_weights"].sum()) for b in batches) == 100


def test_source_is_embedded_only(data_config_factory):
    with pytest.raises(DataConfigError, match=r"data\.source"):
        classification.task_from_config(data_config_factory(source="tfds", task="source"))
