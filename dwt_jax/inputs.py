"""Up-front checks of the data a run reads: read-only look-ups, nothing is built.

Every run kind calls these while it is checked (before anything is compiled or
written): the tokenizer a config names exists, the text files match, a TFDS dataset
(or a GLUE task) is prepared where the config says. The embedded corpus and tasks
are built on first use, so there is nothing to look up for them.
"""

from __future__ import annotations

import os
from typing import Any

from dwt_jax import hf, logs
from dwt_jax.data import classification, corpus
from dwt_jax.errors import ConfigError


def check_tokenizer_path(data: Any) -> None:
    """``data.tokenizer_path``, if set, exists (a file or a Hugging Face directory)."""
    path = str(data.get("tokenizer_path", "") or "")
    if path and not os.path.exists(os.path.expanduser(path.removeprefix(hf.PREFIX))):
        raise ConfigError(
            f"data.tokenizer_path={path!r} does not exist; fix it or set it to '' to train "
            "a tokenizer on the configured corpus."
        )


def check_pretrain_data(data: Any) -> None:
    """The pre-training corpus and tokenizer exist."""
    check_tokenizer_path(data)
    corpus.data_dir(data)  # A file there is refused before anything is built.
    if data.source == "text_files":
        for field in ("text_files", "eval_text_files"):
            corpus.expand_files(data.get(field, ()) or (), field)
    if data.source == "tfds":
        with logs.only_errors():
            corpus.tfds_builder(data.tfds_name, corpus.data_dir(data))


def check_task_data(data: Any, splits: tuple[str, ...]) -> None:
    """The fine-tuning task's tokenizer and (for a TFDS task) its prepared splits."""
    check_tokenizer_path(data)
    corpus.data_dir(data)  # A file there is refused before anything is built.
    if data.source == "tfds":
        with logs.only_errors():
            for split in splits:
                classification.load_task_source(data, split)
