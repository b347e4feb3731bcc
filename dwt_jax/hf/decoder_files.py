"""Writing a decoder (GPT-2 or Llama family) as a Hugging Face causal-LM directory:
``config.json`` (``decoder_convert.decoder_config_to_hf``), ``model.safetensors`` and
the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, with the end-of-text,
beginning-of-text and padding tokens the tokenizer has), loadable with
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import tokenizers

from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.errors import ConfigError
from dwt_jax.hf.decoder_convert import (
    decoder_config_to_hf,
    export_decoder_params,
    export_family,
)
from dwt_jax.hf.files import copy_tokenizer_files, write_atomically, write_model_files
from dwt_jax.models.decoder_config import DecoderConfig


def causal_token_ids(tokenizer: tokenizers.Tokenizer | None) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a causal tokenizer
    (``tokenizer.causal_special_ids``; the padding is the end of text when it has no
    pad token); all None without a tokenizer or an end-of-text token."""
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is None:
        return ids
    try:
        special = tokenizer_lib.causal_special_ids(tokenizer)
    except ConfigError:
        return ids
    return {"bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": special.pad}


def write_causal_tokenizer(
    tokenizer: tokenizers.Tokenizer, out: str, max_length: int
) -> dict[str, int | None]:
    """Writes ``tokenizer`` as Hugging Face tokenizer files (a fast tokenizer: its
    ``tokenizer.json`` unchanged, and a ``tokenizer_config.json`` naming its special
    tokens); returns the token ids for ``config.json``."""
    import transformers

    ids = causal_token_ids(tokenizer)
    names = {
        name.removesuffix("_id"): tokenizer.id_to_token(token_id)
        for name, token_id in ids.items()
        if token_id is not None
    }
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.to_str()),
        model_max_length=max_length,
        **names,
    )
    fast.save_pretrained(out)
    config_file = os.path.join(out, "tokenizer_config.json")
    with open(config_file) as f:
        tokenizer_config = json.load(f)
    # transformers 5 names its own class; 4 knows only this one (5 reads it too).
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w") as f:
        json.dump(tokenizer_config, f, indent=2, sort_keys=True)
    return ids


def export_decoder_dir(
    params: Mapping[str, Any],
    config: DecoderConfig,
    tokenizer: tokenizers.Tokenizer | None,
    out: str,
    *,
    tokenizer_dir: str | None = None,
) -> list[str]:
    """Writes our causal LM (``params`` of ``config``) as a transformers directory
    ``out`` (absent or empty; written whole or not at all); returns its files.

    The model type follows the config (``decoder_convert.export_family``). Tokenizer
    files are copied from ``tokenizer_dir`` (a Hugging Face directory the run's
    tokenizer came from) when given, else written from ``tokenizer`` (if any)."""
    export_family(config)  # A config transformers cannot hold fails before any file.

    def fill(tmp: str) -> None:
        state = export_decoder_params(params, config)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
            ids = causal_token_ids(tokenizer)
        elif tokenizer is not None:
            ids = write_causal_tokenizer(tokenizer, tmp, config.max_len)
        else:
            ids = causal_token_ids(None)
        write_model_files(tmp, state, decoder_config_to_hf(config, ids))

    return write_atomically(out, fill)
