"""Shared fixtures: the embedded corpus and its tokenizer are built once per session."""

from __future__ import annotations

import ml_collections
import pytest
import tokenizers

from dwt_jax.data import tokenizer as tokenizer_lib

_WORD_TEXT = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
    "rho sigma tau upsilon phi chi psi omega river mountain forest ocean desert valley"
)
WORDS = _WORD_TEXT.split()


def make_data_config(**overrides) -> ml_collections.ConfigDict:
    """A data config with the documented defaults, overridden by ``overrides``."""
    config = ml_collections.ConfigDict(
        {
            "source": "embedded",
            "tfds_name": "",
            "tfds_data_dir": "~/.cache/dwt_jax/tensorflow_datasets",
            "text_field": "text",
            "text_files": (),
            "eval_text_files": (),
            "train_split": "train",
            "eval_split": "validation",
            "tokenizer_path": "",
            "tokenizer_cache_dir": "~/.cache/dwt_jax/tokenizers",
            "vocab_size": 8192,
            "seq_len": 128,
            "max_predictions": 20,
            "mask_prob": 0.15,
            "worker_count": 0,
        }
    )
    config.update(overrides)
    return config


def write_text_corpus(path, num_docs: int, seed: int = 0, words_per_doc: int = 60) -> list[str]:
    """Writes ``num_docs`` blank-line-separated documents of plain words; returns them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for i in range(num_docs):
        n = int(rng.integers(words_per_doc // 4, words_per_doc * 2))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), n)]
        docs.append(f"doc{i} " + " ".join(words))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return docs


@pytest.fixture(scope="session")
def embedded_config(data_cache_dir) -> ml_collections.ConfigDict:
    """The embedded corpus in the session's cache (shared with the training tests)."""
    return make_data_config(
        tfds_data_dir=f"{data_cache_dir}/tfds", tokenizer_cache_dir=f"{data_cache_dir}/tokenizers"
    )


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_config) -> tokenizers.Tokenizer:
    return tokenizer_lib.get_tokenizer(embedded_config)


@pytest.fixture(scope="session")
def text_files_config(tmp_path_factory) -> ml_collections.ConfigDict:
    root = tmp_path_factory.mktemp("text_files")
    write_text_corpus(root / "corpus.txt", num_docs=400)
    return make_data_config(
        source="text_files",
        text_files=(str(root / "*.txt"),),
        tokenizer_cache_dir=str(root / "tokenizers"),
        vocab_size=200,
        seq_len=32,
        max_predictions=6,
    )


@pytest.fixture(scope="session")
def text_files_tokenizer(text_files_config) -> tokenizers.Tokenizer:
    return tokenizer_lib.get_tokenizer(text_files_config)


@pytest.fixture(scope="session")
def data_config_factory():
    """``make_data_config`` as a fixture (test modules here are not an importable package)."""
    return make_data_config


@pytest.fixture(scope="session")
def text_corpus_writer():
    """``write_text_corpus`` as a fixture."""
    return write_text_corpus
