"""Tests of dwt_jax.readers: every malformation of a user's file is one ConfigError
that names the path (and the field), on one line."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers
from testutil import raises_one_line
from tokenizers import models

from dwt_jax import readers
from dwt_jax.errors import ConfigError, DataConfigError


def small_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "river": 5}
    return tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))


def raises(call, *parts: str, error: type[ConfigError] = ConfigError) -> str:
    """Runs ``call``; asserts one ``error`` on one line holding every part; returns it."""
    return raises_one_line(call, *parts, error=error)


@pytest.fixture
def files(tmp_path):
    """name -> path of a good or malformed file under tmp_path."""
    good_tokenizer = small_tokenizer().to_str()
    contents = {
        "good.json": b'{"a": [1, 2]}',
        "bom.json": b'\xef\xbb\xbf{"a": 1}',
        "bad.json": b'{\n  "a": 1,\n  "b" 2\n}',
        "empty.json": b" \n",
        "list.json": b"[1, 2]",
        "latin1.json": b'{"a": "caf\xe9"}',
        "latin1.txt": b"caf\xe9\n",
        "text.txt": b"one\r\ntwo\rthree\n",
        "tokenizer.json": good_tokenizer.encode(),
        "truncated.json": good_tokenizer[: len(good_tokenizer) // 2].encode(),
        "not_tokenizer.json": b'{"model": {"type": "Nothing"}}',
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir").mkdir()
    return {name: str(tmp_path / name) for name in [*contents, "dir"]}


def test_good_files_are_read(files):
    assert readers.read_json(files["good.json"], "x") == {"a": [1, 2]}
    assert readers.read_json(files["good.json"], "x", expect=dict) == {"a": [1, 2]}
    assert readers.read_json(files["bom.json"], "x") == {"a": 1}
    assert readers.read_text(files["text.txt"], "x") == "one\ntwo\nthree\n"  # As text mode.
    with open(files["text.txt"], encoding="utf-8") as f:
        assert readers.read_text(files["text.txt"], "x") == f.read()
    assert readers.read_bytes(files["latin1.txt"], "x") == b"caf\xe9\n"
    loaded = readers.load_tokenizer_file(files["tokenizer.json"], "x")
    assert loaded.to_str() == tokenizers.Tokenizer.from_file(files["tokenizer.json"]).to_str()
    assert readers.check_file(files["good.json"], "x") == files["good.json"]
    assert readers.check_directory(files["dir"], "x") == files["dir"]
    assert readers.load_with(files["good.json"], "x", os.path.getsize, kind="a file") == 13


@pytest.mark.parametrize(
    "read",
    [
        readers.check_file,
        readers.read_bytes,
        readers.read_text,
        readers.read_json,
        readers.load_tokenizer_file,
        lambda path, what: readers.load_with(path, what, open, kind="anything"),
    ],
    ids=["check_file", "read_bytes", "read_text", "read_json", "tokenizer", "load_with"],
)
def test_every_file_reader_refuses_missing_files_and_directories(read, files, tmp_path):
    missing = tmp_path / "missing.json"
    raises(lambda: read(missing, "data.tokenizer_path"), "data.tokenizer_path: ", missing)
    raises(lambda: read(files["dir"], "f"), files["dir"], "is a directory, not a file")
    under_file = os.path.join(files["good.json"], "x.json")  # A parent that is a file.
    raises(lambda: read(under_file, "f"), under_file, "is a file, not a directory")
    os.mkfifo(tmp_path / "fifo")  # Never opened: reading it would block.
    raises(lambda: read(tmp_path / "fifo", "f"), "fifo", "is not a regular file")


def test_unreadable_files_are_refused(files, monkeypatch):
    os.chmod(files["good.json"], 0)
    if os.geteuid() == 0:  # root reads any file: make it look unreadable.
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    for read in (readers.read_bytes, readers.read_text, readers.read_json):
        raises(lambda read=read: read(files["good.json"], "f"), files["good.json"], "permission")
    monkeypatch.undo()

    def failing_open(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setitem(readers.__dict__, "open", failing_open)  # Fails after the checks.
    for read in (readers.read_bytes, readers.read_text, readers.read_json):
        raises(
            lambda read=read: read(files["text.txt"], "f"),
            f"f: {files['text.txt']} cannot be read (Input/output error)",
        )


def test_invalid_utf8_is_refused_with_the_byte_offset(files):
    raises(lambda: readers.read_text(files["latin1.txt"], "f"), files["latin1.txt"], "byte 3")
    raises(
        lambda: readers.read_json(files["latin1.json"], "f"),
        files["latin1.json"],
        "is not UTF-8 JSON (byte 10",
    )
    raises(lambda: readers.load_tokenizer_file(files["latin1.json"], "f"), "is not UTF-8")


def test_invalid_json_names_the_line_and_column(files):
    message = raises(
        lambda: readers.read_json(
            files["bad.json"], "teacher.workdirs[0]", fix="restore it from a copy"
        ),
        f"teacher.workdirs[0]: {files['bad.json']} is not valid JSON (line 3, column 7",
        error=ConfigError,
    )
    assert message.endswith("; restore it from a copy.")
    raises(lambda: readers.read_json(files["empty.json"], "f"), files["empty.json"], "is empty")
    raises(
        lambda: readers.read_json(files["list.json"], "f", expect=dict),
        files["list.json"],
        "holds a JSON array, not a JSON object",
    )
    assert readers.read_json(files["list.json"], "f", expect=(list, dict)) == [1, 2]


def test_truncated_or_foreign_tokenizer_json(files):
    raises(
        lambda: readers.load_tokenizer_file(files["truncated.json"], "data.tokenizer_path"),
        f"data.tokenizer_path: {files['truncated.json']} is not valid JSON",
    )
    raises(
        lambda: readers.load_tokenizer_file(files["not_tokenizer.json"], "f"),
        files["not_tokenizer.json"],
        "is not a tokenizer.json that the tokenizers library can read",
    )


def test_check_directory(files, tmp_path):
    raises(
        lambda: readers.check_directory(files["good.json"], "data.tfds_data_dir"),
        f"data.tfds_data_dir: {files['good.json']} is a file, not a directory",
    )
    missing = tmp_path / "missing"
    raises(lambda: readers.check_directory(missing, "f"), missing, "does not exist")
    assert readers.check_directory(missing, "f", must_exist=False) == str(missing)
    for path in (files["good.json"], os.path.join(files["good.json"], "a", "b")):
        raises(
            lambda path=path: readers.check_directory(path, "data.tfds_data_dir", must_exist=False),
            "data.tfds_data_dir: ",
            path,
        )
    raises(lambda: readers.check_directory("", "f", must_exist=False), "f: '' does not exist")


def test_home_is_expanded(monkeypatch, files, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert readers.read_json("~/good.json", "x") == {"a": [1, 2]}
    assert readers.check_directory("~/dir", "x") == files["dir"]


def test_load_with_wraps_the_loaders_errors_but_not_config_errors(files):
    def broken(path: str) -> None:
        raise RuntimeError("header too large\n  at offset 8")

    raises(
        lambda: readers.load_with(files["good.json"], "f", broken, kind="a safetensors file"),
        f"f: cannot read {files['good.json']} as a safetensors file (header too large at offset 8)",
    )

    def refuses(path: str) -> None:
        raise DataConfigError("f: torch is not installed")

    with pytest.raises(DataConfigError, match=r"^f: torch is not installed$"):
        readers.load_with(files["good.json"], "f", refuses, kind="x")


def test_error_class_and_odd_paths(files, tmp_path):
    raises(lambda: readers.read_json(files["bad.json"], "f", error=DataConfigError), "f: ")
    odd = tmp_path / "new\nline.json"
    message = raises(lambda: readers.read_json(odd, "f"), "does not exist")
    assert repr(str(odd)) in message
    long = "x" * 5000
    assert len(readers.one_line(RuntimeError(long))) <= 300
    assert readers.one_line(RuntimeError()) == "RuntimeError"
    assert readers.one_line("a\n  b\tc") == "a b c"


def test_json_of_a_run_config_round_trips(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"hidden_size": 8}}, indent=2))
    assert readers.read_json(path, "--workdir", expect=dict) == {"model": {"hidden_size": 8}}
