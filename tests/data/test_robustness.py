"""Bad input to the pre-training data path: handled with a warning, or a clear error.

Empty files, invalid UTF-8 (and BOMs, CRLF, NUL bytes, files that are not text), very
long lines, corpora smaller than one batch or without a token, and paths that are not
readable files; for local text files, their held-out files, the tokenizer trained on
them, TFDS-like records, and one tiny training run over all of it at once.
"""

from __future__ import annotations

import gzip
import logging
import os
import re

import ml_collections
import numpy as np
import pytest

from dwt_jax.data import corpus, pipeline, pretrain, textfiles
from dwt_jax.data import tokenizer as tokenizer_lib

B, L, M = 8, 32, 6  # Matches text_files_config / text_files_tokenizer.
GOOD_TEXT = (
    "alpha beta gamma delta river mountain\nforest ocean desert valley\n\n"
    "omega psi chi phi upsilon tau sigma rho\n\n"
    "kappa lambda mu nu xi omicron pi iota theta eta zeta epsilon\n"
)


@pytest.fixture
def config_for(tmp_path, data_config_factory):
    """A text_files data config over ``files`` (written under tmp_path) and ``eval_files``."""

    def make(files: dict[str, bytes | str], eval_files: dict[str, bytes | str] | None = None):
        eval_files = eval_files or {}
        paths = {}
        for name, content in {**files, **eval_files}.items():
            path = tmp_path / name
            if isinstance(content, str):
                content = content.encode("utf-8")
            path.write_bytes(content)
            paths[name] = str(path)
        return data_config_factory(
            source="text_files",
            text_files=[paths[n] for n in files],
            eval_text_files=[paths[n] for n in eval_files],
            tokenizer_cache_dir=str(tmp_path / "tokenizers"),
            vocab_size=200,
            seq_len=L,
            max_predictions=M,
        )

    return make


def texts(source) -> list[str]:
    return [tokenizer_lib.as_text(source[i]["text"]) for i in range(len(source))]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def unmasked(batch) -> np.ndarray:
    ids = batch["input_ids"].copy()
    for row in range(ids.shape[0]):
        num = int(batch["masked_weights"][row].sum())
        ids[row, batch["masked_positions"][row, :num]] = batch["masked_ids"][row, :num]
    return ids


def assert_batch(batch, batch_size=B):
    spec = pipeline.batch_spec(
        ml_collections.ConfigDict({"seq_len": L, "max_predictions": M}), batch_size
    )
    assert set(batch) == set(spec)
    for key, value in batch.items():
        assert value.shape == spec[key].shape and value.dtype == spec[key].dtype, key
    assert (batch["input_ids"][:, 0] == 2).all()  # Every row starts with [CLS].
    assert (batch["masked_weights"].sum(axis=1) >= 1).all()


def take(config, tokenizer, n, **kwargs):
    args = {"split": "train", "global_batch_size": B, "seed": 0, **kwargs}
    iterator = pipeline.make_pretrain_iterator(config, tokenizer, **args)
    return [next(iterator) for _ in range(n)]


def reference_read(paths) -> list[str]:
    """The text-mode reader the corpus had before it handled damaged files."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            block = []
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    docs.append("\n".join(block))
                    block = []
            if block:
                docs.append("\n".join(block))
    return docs


# 1. Empty files.


def test_empty_and_blank_files_are_skipped_with_a_warning(config_for, text_files_tokenizer, caplog):
    caplog.set_level(logging.WARNING)
    config = config_for({"empty.txt": b"", "blank.txt": " \n\n\t\r\n\n", "good.txt": GOOD_TEXT})
    train = corpus.load_text_source(config, "train")
    assert len(texts(train)) == 3 and texts(train)[1].startswith("omega")
    [message] = [m for m in warnings_of(caplog) if "empty" in m]
    assert "data.text_files" in message and "empty.txt" in message and "blank.txt" in message
    assert "good.txt" not in message
    corpus.load_text_source(config, "train")  # Read again: not warned again.
    assert len([m for m in warnings_of(caplog) if "empty" in m]) == 1
    for batch in take(config, text_files_tokenizer, 2):
        assert_batch(batch)


def test_all_files_empty_is_a_config_error_naming_the_field_and_files(config_for):
    config = config_for({"a.txt": b"", "b.txt": b"\n  \n"})
    pattern = r"data\.text_files: every file is empty.*a\.txt.*b\.txt"
    with pytest.raises(corpus.DataConfigError, match=pattern):
        corpus.load_text_source(config, "train")
    with pytest.raises(corpus.DataConfigError, match=pattern):  # Before training a tokenizer.
        tokenizer_lib.get_tokenizer(config)
    config = config_for({"good.txt": GOOD_TEXT}, {"held_out.txt": b"\n\n"})
    with pytest.raises(corpus.DataConfigError, match=r"data\.eval_text_files.*held_out\.txt"):
        corpus.load_text_source(config, "validation")


# 2. Invalid UTF-8, BOM, CRLF, NUL bytes; files that are not text.


@pytest.mark.parametrize("read_bytes", [None, 5])
def test_invalid_utf8_bom_crlf_and_nul_bytes(config_for, caplog, monkeypatch, read_bytes):
    caplog.set_level(logging.WARNING)
    if read_bytes:
        monkeypatch.setattr(textfiles, "_READ_BYTES", read_bytes)
    content = (
        b"\xef\xbb\xbfalpha caf\xe9 beta\r\nsecond \xff\xfe line\r\n\r\n"
        b"gamma\x00delta\rold mac line\r\rlast doc \xe2\x82\n"
    )
    config = config_for({"damaged.txt": content})
    docs = texts(corpus.load_text_source(config, "train"))
    assert docs == [
        "alpha caf\ufffd beta\nsecond \ufffd\ufffd line",  # BOM dropped, one U+FFFD per byte.
        "gammadelta\nold mac line",  # NUL dropped; a bare CR ends a line.
        "last doc \ufffd",  # A truncated sequence is one U+FFFD.
    ]
    [message] = warnings_of(caplog)
    assert "data.text_files" in message and "damaged.txt" in message
    assert "5 invalid UTF-8 bytes (first at byte 12)" in message  # Offsets count the BOM.
    nul_at = content.index(b"\x00")
    assert f"1 NUL bytes (first at byte {nul_at})" in message
    corpus.load_text_source(config, "train")
    assert len(warnings_of(caplog)) == 1  # Once per file.


@pytest.mark.parametrize("read_bytes", [None, 1, 777])
def test_reader_matches_the_text_mode_reader_on_everything_but_nul_and_bom(
    tmp_path, monkeypatch, read_bytes
):
    """Good data and stray invalid bytes read exactly as before (resume exactness),
    whatever the size of the chunks the file is read in."""
    if read_bytes:
        monkeypatch.setattr(textfiles, "_READ_BYTES", read_bytes)
    rng = np.random.default_rng(0)
    pieces = [b"alpha", b" beta", b"\t", b"caf\xc3\xa9", b"\xe2\x80\xa8", b"\x0c", b"  ", b"\n"]
    pieces += [b"\n\n", b"\r\n", b"\r", b"\r\n\r\n", b" \n", b"\xff", b"\xe2\x82", b"\xc3"]
    weights = np.array([20, 20, 3, 5, 1, 1, 3, 8, 3, 4, 2, 2, 2, 1, 1, 1], float)
    paths = []
    for index in range(12):
        size = int(rng.integers(2_000, 6_000))
        chosen = rng.choice(len(pieces), size, p=weights / weights.sum())
        path = tmp_path / f"f{index}.txt"
        path.write_bytes(b"".join(pieces[i] for i in chosen))  # Crosses 8 KiB buffer ends.
        paths.append(str(path))
    assert corpus.read_text_documents(paths) == reference_read(paths)


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (gzip.compress(GOOD_TEXT.encode() * 50), "like a gzip file); decompress it or"),
        (GOOD_TEXT.encode("utf-16"), "like UTF-16 text); convert it to UTF-8 or"),
        (bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)), "convert it to"),
    ],
    ids=["gzip", "utf16", "binary"],
)
def test_files_that_are_not_text_are_refused(config_for, content, hint):
    config = config_for({"good.txt": GOOD_TEXT, "not_text.txt": content})
    pattern = r"data\.text_files: '[^']*not_text\.txt' is not UTF-8 text \(.*first at byte"
    with pytest.raises(corpus.DataConfigError, match=pattern) as error:
        corpus.load_text_source(config, "train")
    assert hint in str(error.value) and "\n" not in str(error.value)


# 3. Very long lines and documents.


def test_split_text_cuts_at_whitespace_and_joins_back():
    text = "aaaa bbbb\ncccc dddd eeee"
    assert corpus.split_text(text, 10) == ["aaaa bbbb", "\ncccc", " dddd eeee"]
    assert corpus.split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # No whitespace.
    rng = np.random.default_rng(1)
    long = "".join(rng.choice(list("ab \n"), 10_000, p=[0.45, 0.45, 0.08, 0.02]))
    pieces = corpus.split_text(long, 300)
    assert "".join(pieces) == long and max(map(len, pieces)) <= 300
    assert corpus.split_text(text, 100) == [text]


def test_long_line_is_split_into_bounded_documents(
    config_for, text_files_tokenizer, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(textfiles, "MAX_DOCUMENT_CHARS", 500)
    words = np.array(GOOD_TEXT.split())[np.random.default_rng(0).integers(0, 26, 3_000)]
    line = " ".join(words)  # ~20k characters, no line break.
    config = config_for({"good.txt": GOOD_TEXT, "long.txt": line + "\n\nshort tail doc\n"})
    docs = texts(corpus.load_text_source(config, "train"))
    pieces = docs[3:-1]
    assert len(pieces) > 30 and max(map(len, docs)) <= 500
    assert "".join(pieces) == line and docs[-1] == "short tail doc"
    message = next(m for m in warnings_of(caplog) if "longer than" in m)
    assert "long.txt" in message and f"the longest: {len(line)}" in message
    # The pieces tokenize to the tokens of the whole line (cuts are before spaces).
    whole = text_files_tokenizer.encode(line, add_special_tokens=False).ids
    split = [i for p in pieces for i in text_files_tokenizer.encode(p).ids]
    assert split == whole
    for batch in take(config, text_files_tokenizer, 3):
        assert_batch(batch)
    # The tokenizer trainer gets bounded texts too.
    batches = list(tokenizer_lib._corpus_texts(config))
    assert max(len(t) for batch in batches for t in batch) <= 500
    assert tokenizer_lib.get_tokenizer(config).get_vocab_size() > 30


def test_long_record_is_tokenized_in_pieces_to_the_same_ids(text_files_tokenizer, monkeypatch):
    """A TFDS record is not split into documents, but encoded piecewise (bounded memory)."""
    words = np.array(GOOD_TEXT.split())[np.random.default_rng(2).integers(0, 26, 2_000)]
    record = {"text": " ".join(words).encode("utf-8")}
    tokenize = pipeline._Tokenize(text_files_tokenizer)
    expected = tokenize.map(record)
    monkeypatch.setattr(textfiles, "MAX_DOCUMENT_CHARS", 100)
    np.testing.assert_array_equal(tokenize.map(record), expected)


def test_invalid_utf8_in_a_record_is_replaced_with_a_warning(caplog):
    caplog.set_level(logging.WARNING)
    assert tokenizer_lib.as_text(b"ok \xff text") == "ok \ufffd text"
    assert any("not valid UTF-8 (byte 3 of 9" in m for m in warnings_of(caplog))
    assert tokenizer_lib.as_text(b"fine") == "fine"


# 4. Corpora smaller than one batch, and without a token.


def test_corpus_smaller_than_one_batch_repeats_with_a_warning(
    config_for, text_files_tokenizer, caplog
):
    caplog.set_level(logging.WARNING)
    config = config_for({"one.txt": "alpha beta gamma\n"})
    batches = take(config, text_files_tokenizer, 3)
    for batch in batches:
        assert_batch(batch)
        words = set(text_files_tokenizer.decode(unmasked(batch).ravel().tolist()).split())
        assert words == {"alpha", "beta", "gamma"}
    [message] = [m for m in warnings_of(caplog) if "fewer than one batch" in m]
    assert "data.text_files" in message and "split 'train'" in message


def test_finite_epochs_that_cannot_fill_a_batch_are_a_config_error(
    config_for, text_files_tokenizer
):
    config = config_for({"one.txt": "alpha beta gamma\n"})
    with pytest.raises(corpus.DataConfigError, match=r"data\.text_files.*cannot fill one batch"):
        take(config, text_files_tokenizer, 1, num_epochs=1)
    assert len(take(config, text_files_tokenizer, 1, num_epochs=100)) == 1


def test_corpus_without_tokens_is_a_config_error(config_for, text_files_tokenizer):
    no_tokens = "\x01\x02 \ufffd\n\n\x7f\n"  # Text, but the normaliser removes all of it.
    config = config_for({"junk.txt": no_tokens})
    for epochs in (None, 1):
        with pytest.raises(corpus.DataConfigError, match=r"data\.text_files.*has no tokens"):
            take(config, text_files_tokenizer, 1, num_epochs=epochs)
    config = config_for({"good.txt": GOOD_TEXT}, {"junk_eval.txt": no_tokens})
    with pytest.raises(corpus.DataConfigError, match=r"data\.eval_text_files.*has no tokens"):
        pipeline.eval_batches(
            config, text_files_tokenizer, global_batch_size=B, num_batches=2, seed=0
        )


@pytest.mark.parametrize("endless", [True, False])
def test_packer_never_spins_or_stops_silently_on_empty_documents(monkeypatch, endless):
    """Larger sources are not counted at set-up; the packer itself refuses no tokens."""
    import grain

    monkeypatch.setattr(pretrain, "_MAX_CONSECUTIVE_EMPTY", 50)
    docs = grain.MapDataset.source([np.zeros(0, np.int32)] * 10)
    ds = (docs.repeat(None) if endless else docs).to_iter_dataset()
    packed = pretrain.PackIterDataset(ds, seq_len=L, cls_id=2, sep_id=3, pad_id=0, source_name="X")
    with pytest.raises(corpus.DataConfigError, match=r"^X "):
        next(iter(packed))


def test_small_eval_split_repeats_to_fill_the_eval_batches(config_for, text_files_tokenizer):
    config = config_for({"good.txt": GOOD_TEXT}, {"eval.txt": "river ocean\n"})
    kwargs = {"global_batch_size": B, "num_batches": 3, "seed": 0}
    batches = pipeline.eval_batches(config, text_files_tokenizer, **kwargs)
    assert len(batches) == 3
    for batch in batches:
        assert_batch(batch)
        words = set(text_files_tokenizer.decode(unmasked(batch).ravel().tolist()).split())
        assert words == {"river", "ocean"}


def test_held_out_split_of_a_small_corpus_names_eval_text_files(config_for):
    config = config_for({"good.txt": GOOD_TEXT})
    assert len(corpus.load_text_source(config, "train")) == 3
    with pytest.raises(corpus.DataConfigError, match=r"set data\.eval_text_files"):
        corpus.load_text_source(config, "validation")


# 5. Paths that are not readable files.


def test_directories_globs_and_unreadable_files(tmp_path, config_for, data_config_factory):
    (tmp_path / "dir").mkdir()
    for files, pattern in [
        ([str(tmp_path / "dir")], r"data\.text_files: '[^']*dir' is a directory"),
        ([str(tmp_path / "dir" / "*.txt")], r"data\.text_files: no readable file matches"),
        ([str(tmp_path / "missing.txt")], r"data\.text_files: no readable file matches"),
    ]:
        config = data_config_factory(source="text_files", text_files=files)
        with pytest.raises(corpus.DataConfigError, match=pattern):
            corpus.load_text_source(config, "train")
    if os.geteuid() != 0:  # root reads any file.
        config = config_for({"secret.txt": GOOD_TEXT})
        os.chmod(tmp_path / "secret.txt", 0)
        with pytest.raises(corpus.DataConfigError, match=r"data\.text_files: .*secret\.txt"):
            corpus.load_text_source(config, "train")


def test_repeated_and_shared_files_are_warned_about(config_for, caplog):
    caplog.set_level(logging.WARNING)
    config = config_for({"a.txt": GOOD_TEXT}, {"eval.txt": "river ocean\n"})
    config.text_files = [*config.text_files, *config.text_files]
    config.eval_text_files = [*config.eval_text_files, config.text_files[0]]
    assert len(corpus.load_text_source(config, "train")) == 6
    assert len(corpus.load_text_source(config, "validation")) == 4
    messages = warnings_of(caplog)
    assert any(re.search(r"data\.text_files names .*a\.txt.* more than once", m) for m in messages)
    assert any(re.search(r"data\.eval_text_files: .*a\.txt.* also in", m) for m in messages)


# End to end: a tiny training run over all of it.


def test_training_runs_on_a_damaged_tiny_corpus(tmp_path, monkeypatch, caplog):
    from testutil import load_config

    from dwt_jax import train
    from dwt_jax.metrics import read_metrics

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(textfiles, "MAX_DOCUMENT_CHARS", 300)
    words = np.array(GOOD_TEXT.split())[np.random.default_rng(3).integers(0, 26, 150)]
    files = {
        "empty.txt": b"",
        "damaged.txt": b"\xef\xbb\xbfalpha caf\xe9 beta\r\n\r\ngamma\x00 delta \xff river\r\n",
        "long.txt": (" ".join(words) + "\n").encode(),  # ~1000 characters on one line.
        "eval.txt": b"ocean desert valley\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    config = load_config("smoke")
    config.data.source = "text_files"
    config.data.text_files = tuple(
        str(tmp_path / n) for n in ("empty.txt", "damaged.txt", "long.txt")
    )
    config.data.eval_text_files = (str(tmp_path / "eval.txt"),)
    config.data.tokenizer_cache_dir = str(tmp_path / "tokenizers")
    config.train.num_steps = 2
    config.train.eval_every = 2
    config.checkpoint.every_steps = 2
    result = train.run(config, str(tmp_path / "run"))
    assert (result.start_step, result.final_step) == (0, 2)
    lines = read_metrics(str(tmp_path / "run"))
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert np.isfinite(result.eval_metrics["eval/mlm_loss"])
    messages = " | ".join(warnings_of(caplog))
    for expected in ("empty.txt", "damaged.txt", "longer than 300", "fewer than one batch"):
        assert expected in messages
    # Fewer rows than one batch, for training and for evaluation.
    assert len(re.findall("fewer than one batch", messages)) >= 2


def test_training_on_only_empty_files_stops_before_the_workdir_exists(tmp_path):
    from testutil import load_config

    from dwt_jax import train
    from dwt_jax.configuration import ConfigError

    (tmp_path / "a.txt").write_bytes(b"\n\n")
    config = load_config("smoke")
    config.data.source = "text_files"
    config.data.text_files = (str(tmp_path / "a.txt"),)
    config.data.tokenizer_cache_dir = str(tmp_path / "tokenizers")
    with pytest.raises(ConfigError, match=r"data\.text_files: every file is empty"):
        train.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
