"""Tests of dwt_jax.data.corpus: the embedded builder, text files, TFDS by name, errors."""

from __future__ import annotations

import os
import re
import sys

import pytest
import tensorflow_datasets as tfds

from dwt_jax.data import corpus


class DwtTinyTestCorpus(tfds.core.GeneratorBasedBuilder):
    """A tiny named TFDS dataset standing in for e.g. wikipedia."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"title": tfds.features.Text(), "body": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(0, 12),
            "validation": self._generate_examples(100, 3),
        }

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            yield i, {"title": f"t{i}", "body": f"document number {i} body text"}


def test_embedded_corpus_is_built_once_and_split(embedded_config, embedded_tokenizer):
    del embedded_tokenizer  # Ensures the corpus was built (and reused) by the session.
    data_dir = embedded_config.tfds_data_dir
    train = corpus.load_text_source(embedded_config, "train")
    valid = corpus.load_text_source(embedded_config, "validation")
    assert len(train) > 300 and len(valid) > 5
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.10
    files = sorted(os.listdir(os.path.join(data_dir, corpus.EMBEDDED_NAME, "1.0.0")))
    assert any("array_record" in f for f in files)
    mtimes = {
        f: os.path.getmtime(os.path.join(data_dir, corpus.EMBEDDED_NAME, "1.0.0", f)) for f in files
    }
    again = corpus.load_text_source(embedded_config, "train")  # Loads; does not rebuild.
    assert len(again) == len(train)
    for f, mtime in mtimes.items():
        assert os.path.getmtime(os.path.join(data_dir, corpus.EMBEDDED_NAME, "1.0.0", f)) == mtime
    ids_train = {train[i]["id"] for i in range(len(train))}
    ids_valid = {valid[i]["id"] for i in range(len(valid))}
    assert not ids_train & ids_valid
    assert all(corpus.is_validation(i.decode()) for i in ids_valid)
    texts = [train[i]["text"] for i in range(len(train))]
    assert all(len(t) >= corpus.MIN_DOCSTRING_CHARS for t in texts)


def test_embedded_documents_are_deterministic_and_skip_tests():
    docs = corpus.embedded_documents()
    assert list(docs) == sorted(docs)
    ids = [doc_id for doc_id, _ in docs]
    assert len(ids) == len(set(ids))
    assert any(i.startswith("topic/") for i in ids) and any(i.startswith("stdlib/") for i in ids)
    assert not any("/test/" in i or "idle_test" in i or "site-packages" in i for i in ids)
    # Docstrings are parsed, never imported: modules with import side effects stay unloaded.
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert sum(len(t) for _, t in docs) > 1_000_000


def test_text_files_split_by_blank_lines_and_hash(
    tmp_path, data_config_factory, text_corpus_writer
):
    docs = text_corpus_writer(tmp_path / "a.txt", num_docs=200)
    config = data_config_factory(source="text_files", text_files=[str(tmp_path / "a.txt")])
    train = corpus.load_text_source(config, "train")
    valid = corpus.load_text_source(config, "validation")
    assert len(train) + len(valid) == len(docs)
    assert 0 < len(valid) < 30
    got = sorted(
        [train[i]["text"] for i in range(len(train))]
        + [valid[i]["text"] for i in range(len(valid))]
    )
    assert got == sorted(docs)


def test_text_files_eval_files_and_invalid_utf8(tmp_path, data_config_factory):
    (tmp_path / "train.txt").write_bytes(b"first doc\nline two\n\n\n\nsecond \xff doc\n")
    (tmp_path / "eval.txt").write_text("held out\n", encoding="utf-8")
    config = data_config_factory(
        source="text_files",
        text_files=[str(tmp_path / "train.txt")],
        eval_text_files=[str(tmp_path / "eval.txt")],
    )
    train = corpus.load_text_source(config, "train")
    assert [train[i]["text"] for i in range(len(train))] == [
        "first doc\nline two",
        "second \ufffd doc",
    ]
    valid = corpus.load_text_source(config, "validation")
    assert [valid[0]["text"]] == ["held out"] and len(valid) == 1


def test_tfds_by_name(tmp_path, data_config_factory):
    builder = DwtTinyTestCorpus(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    config = data_config_factory(
        source="tfds",
        tfds_name="dwt_tiny_test_corpus",
        tfds_data_dir=str(tmp_path),
        text_field="body",
    )
    train = corpus.load_text_source(config, "train")
    assert len(train) == 12
    texts = sorted(train[i]["text"].decode() for i in range(len(train)))
    assert texts[0] == "document number 0 body text"
    assert len(corpus.load_text_source(config, "validation")) == 3
    bad_field = data_config_factory(**{**config.to_dict(), "text_field": "nope"})
    with pytest.raises(ValueError, match=r"data\.text_field"):
        corpus.load_text_source(bad_field, "train")[0]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"source": "nope"}, "data.source"),
        ({"source": "text_files", "text_files": ["/nonexistent/x.txt"]}, "data.text_files"),
        ({"source": "text_files", "text_files": ["/nonexistent/*.txt"]}, "data.text_files"),
        ({"source": "tfds", "tfds_name": "no_such_dataset_xyz"}, "data.tfds_name"),
        ({"source": "tfds", "tfds_name": ""}, "data.tfds_name"),
    ],
)
def test_clear_errors(tmp_path, data_config_factory, overrides, field):
    config = data_config_factory(tfds_data_dir=str(tmp_path), **overrides)
    with pytest.raises(corpus.DataConfigError, match=re.escape(field)):
        corpus.load_text_source(config, "train")


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path, data_config_factory):
    config = data_config_factory(source="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared"):
        corpus.load_text_source(config, "train")
