"""Damaged files and directories that a data config names: one DataConfigError naming
the field and the path, raised before anything is built or trained."""

from __future__ import annotations

import pathlib

import pytest
import tokenizers
from testutil import raises_one_line

from dwt_jax import readers
from dwt_jax.data import classification, corpus, embedded
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.errors import DataConfigError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alpha", "beta", "river"]


def raises(call, *parts: str) -> str:
    return raises_one_line(call, *parts, error=DataConfigError)


@pytest.fixture
def tokenizer_json() -> str:
    return tokenizer_lib.new_wordpiece_tokenizer({t: i for i, t in enumerate(VOCAB)}).to_str()


@pytest.fixture
def never_built(monkeypatch):
    """Fails the test if a TFDS builder is constructed or a tokenizer trained."""

    def fail(*args, **kwargs):
        raise AssertionError("built before the config was checked")

    monkeypatch.setattr(corpus, "embedded_builder", fail)
    monkeypatch.setattr(embedded, "prepared_builder", fail)
    monkeypatch.setattr(corpus.tfds, "builder", fail)
    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", fail)


def test_truncated_tokenizer_json_as_a_file_or_in_a_directory(
    tmp_path, data_config_factory, tokenizer_json
):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(tokenizer_json[: len(tokenizer_json) // 2])
    for given in (path, path.parent):
        config = data_config_factory(tokenizer_path=str(given))
        raises(
            lambda config=config: tokenizer_lib.get_tokenizer(config),
            f"data.tokenizer_path: {path} is not valid JSON (line 1, column",
        )
    path.write_text('{"model": {"type": "Nothing"}}')
    config = data_config_factory(tokenizer_path=str(path))
    raises(lambda: tokenizer_lib.get_tokenizer(config), path, "tokenizers library can read")
    path.write_bytes(b'{"caf\xe9": 1}')
    raises(lambda: tokenizer_lib.get_tokenizer(config), path, "is not UTF-8")


def test_vocab_txt_that_is_not_utf8(tmp_path, data_config_factory):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes("\n".join(VOCAB).encode() + b"\ncaf\xe9\n")
    config = data_config_factory(tokenizer_path=str(tmp_path))
    raises(lambda: tokenizer_lib.get_tokenizer(config), f"data.tokenizer_path: {vocab}", "UTF-8")


def test_vocab_txt_is_read_as_text_mode_reads_it(tmp_path, data_config_factory):
    (tmp_path / "vocab.txt").write_bytes("\r\n".join(VOCAB).encode() + b"\r\n\r\nlast")
    loaded = tokenizer_lib.get_tokenizer(data_config_factory(tokenizer_path=str(tmp_path)))
    with open(tmp_path / "vocab.txt", encoding="utf-8") as f:
        expected = {line.rstrip("\n"): i for i, line in enumerate(f)}
    assert loaded.get_vocab() == expected
    assert len(expected) == len(VOCAB) + 2  # '' and 'last'.


def test_damaged_files_of_a_hugging_face_tokenizer_directory(tmp_path, data_config_factory):
    import transformers

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = data_config_factory(tokenizer_path=f"hf:{tmp_path}")
    assert tokenizer_lib.get_tokenizer(config).get_vocab_size() == len(VOCAB)
    tokenizer_file = tmp_path / "tokenizer.json"
    good = tokenizer_file.read_text()
    tokenizer_file.write_text(good[: len(good) // 2])
    raises(lambda: tokenizer_lib.get_tokenizer(config), f"{tokenizer_file} is not valid JSON")
    tokenizer_file.write_text(good)
    settings = tmp_path / "tokenizer_config.json"
    settings.write_text('["not", "an", "object"]')
    raises(lambda: tokenizer_lib.get_tokenizer(config), settings, "not a JSON object")


def test_damaged_tokenizer_cache_says_to_delete_it(tmp_path, data_config_factory, tokenizer_json):
    (tmp_path / "a.txt").write_text("alpha beta river\n")
    config = data_config_factory(
        source="text_files",
        text_files=[str(tmp_path / "a.txt")],
        tokenizer_cache_dir=str(tmp_path / "cache"),
    )
    cache = pathlib.Path(tokenizer_lib.tokenizer_cache_path(config)).parent
    cache.mkdir(parents=True)
    (cache / "tokenizer.json").write_text(tokenizer_json[:100])
    raises(
        lambda: tokenizer_lib.get_tokenizer(config),
        f"data.tokenizer_cache_dir: {cache / 'tokenizer.json'} is not valid JSON",
        "delete it",
    )


def test_tokenizer_cache_dir_that_is_a_file(tmp_path, data_config_factory, never_built):
    (tmp_path / "a.txt").write_text("alpha beta river\n")
    config = data_config_factory(
        source="text_files",
        text_files=[str(tmp_path / "a.txt")],
        tokenizer_cache_dir=str(tmp_path / "a.txt"),
    )
    raises(
        lambda: tokenizer_lib.get_tokenizer(config),
        f"data.tokenizer_cache_dir: {tmp_path / 'a.txt'} is a file, not a directory",
    )


@pytest.mark.parametrize("below", [False, True], ids=["file", "below_a_file"])
def test_tfds_data_dir_that_is_a_file_before_anything_is_built(
    tmp_path, data_config_factory, never_built, below
):
    not_a_dir = tmp_path / "not_a_dir"
    not_a_dir.write_text("x")
    given = not_a_dir / "tfds" if below else not_a_dir
    embedded_config = data_config_factory(tfds_data_dir=str(given))
    tfds_config = data_config_factory(
        source="tfds", tfds_name="glue/mrpc", tfds_data_dir=str(given)
    )
    task_config = data_config_factory(task="follows", tfds_data_dir=str(given))
    glue_config = data_config_factory(source="tfds", task="glue/mrpc", tfds_data_dir=str(given))
    calls = [
        lambda: corpus.load_text_source(embedded_config, "train"),
        lambda: corpus.load_text_source(tfds_config, "train"),
        lambda: corpus.tfds_builder("glue/mrpc", str(given)),
        lambda: corpus.corpus_fingerprint(embedded_config),
        lambda: tokenizer_lib.get_tokenizer(embedded_config),
        lambda: classification.load_task_source(task_config, "train"),
        lambda: classification.load_task_source(glue_config, "train"),
    ]
    for call in calls:
        raises(call, "data.tfds_data_dir: ", given, "set data.tfds_data_dir to a directory")


def test_tfds_data_dir_that_does_not_exist_yet_is_fine(tmp_path, data_config_factory):
    config = data_config_factory(tfds_data_dir=str(tmp_path / "new" / "tfds"))
    assert corpus.data_dir(config) == str(tmp_path / "new" / "tfds")
    with pytest.raises(DataConfigError, match=r"is not prepared in data\.tfds_data_dir="):
        corpus.tfds_builder("mnist", str(tmp_path / "new" / "tfds"))


def test_tokenizer_files_read_as_before(tmp_path, tokenizer_json):
    """The guarded reader gives the tokenizer Tokenizer.from_file gives."""
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json)
    ours = readers.load_tokenizer_file(path, "data.tokenizer_path")
    theirs = tokenizers.Tokenizer.from_file(str(path))
    assert ours.to_str() == theirs.to_str()
    assert ours.encode("alpha river").ids == theirs.encode("alpha river").ids
