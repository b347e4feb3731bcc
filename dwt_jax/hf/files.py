"""Hugging Face model directories on disk: read config, weights and tokenizer; write them.

A directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` when torch is installed),
and its tokenizer (``tokenizer.json``, or ``vocab.txt``/``vocab.json`` with
``tokenizer_config.json``). ``plan`` reads only the config and the weight *names*,
so every check runs before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tokenizers

from dwt_jax.hf.convert import (
    HFConversionError,
    ImportReport,
    config_from_hf,
    config_to_hf,
    export_params,
    import_params,
)
from dwt_jax.hf.names import Family
from dwt_jax.models.config import BertConfig

PREFIX = "hf:"
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


def is_hf(spec: str) -> bool:
    """Whether a workdir setting names a Hugging Face directory (``hf:DIR``)."""
    return str(spec).startswith(PREFIX)


def hf_path(spec: str) -> str:
    """The directory of an ``hf:DIR`` setting, user-expanded."""
    return os.path.expanduser(str(spec)[len(PREFIX) :])


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face model directory, checked but not loaded.

    Attributes:
      path: the directory.
      config: our model config.
      family: its model family (BERT or RoBERTa naming).
      keys: the weight names in the checkpoint (as written).
      raw_config: the ``config.json`` dict.
    """

    path: str
    config: BertConfig
    family: Family
    keys: tuple[str, ...]
    raw_config: dict[str, Any]

    def has(self, prefix: str) -> bool:
        """Whether some weight's name starts with ``prefix`` (e.g. ``'cls.predictions.'``)."""
        return any(k.startswith(prefix) for k in self.keys)

    @property
    def has_mlm_head(self) -> bool:
        heads = {theirs for _, theirs, _ in self.family.mlm_head}
        return all(k in self.keys for k in heads)


def _weight_files(path: str, field: str) -> tuple[str, list[str]]:
    """('safetensors'|'torch', files) of the directory's weights."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(os.path.join(path, SAFETENSORS)):
        return "safetensors", [os.path.join(path, SAFETENSORS)]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return "safetensors", [os.path.join(path, s) for s in shards]
    if os.path.isfile(os.path.join(path, TORCH_BIN)):
        return "torch", [os.path.join(path, TORCH_BIN)]
    raise HFConversionError(
        f"{field}: {path} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}; point it "
        "at a Hugging Face model directory (save_pretrained's output)."
    )


def _load_torch(file: str, field: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise HFConversionError(
            f"{field}: {file} is a PyTorch checkpoint and torch is not installed; install "
            "the CPU build (pip install torch==2.13.0) or convert it to model.safetensors."
        ) from None
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def read_weights(path: str, field: str = "hf") -> dict[str, np.ndarray]:
    """Every weight of the directory as float32 NumPy arrays."""
    kind, files = _weight_files(path, field)
    weights: dict[str, np.ndarray] = {}
    for file in files:
        try:
            if kind == "torch":
                weights.update(_load_torch(file, field))
            else:
                from safetensors.numpy import load_file

                weights.update(load_file(file))
        except HFConversionError:
            raise
        except Exception as e:  # A truncated or foreign file: say which one.
            raise HFConversionError(f"{field}: cannot read {file} ({e}).") from None
    return {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in weights.items()}


def _weight_names(path: str, field: str) -> tuple[str, ...]:
    kind, files = _weight_files(path, field)
    if kind == "torch":
        return tuple(read_weights(path, field))
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                names += list(f.keys())
        except Exception as e:
            raise HFConversionError(f"{field}: cannot read {file} ({e}).") from None
    return tuple(names)


def plan(spec: str, field: str) -> HFCheckpoint:
    """Checks an ``hf:DIR`` (or plain directory) setting: config and weight names only."""
    path = hf_path(spec) if is_hf(spec) else os.path.expanduser(spec)
    config_file = os.path.join(path, CONFIG)
    if not os.path.isfile(config_file):
        raise HFConversionError(
            f"{field}: {path} has no {CONFIG}; point it at a Hugging Face model directory "
            "(download one where you have internet, e.g. with save_pretrained)."
        )
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFConversionError(f"{field}: {config_file} is not readable JSON ({e}).") from None
    cfg, family = config_from_hf(raw, f"{field}: {config_file}")
    return HFCheckpoint(path, cfg, family, _weight_names(path, field), raw)


def load_params(
    checkpoint: HFCheckpoint,
    template: Mapping[str, Any],
    *,
    head: str = "mlm",
    allow_fresh: Iterable[str] = (),
    ignore: Iterable[str] = (),
    field: str = "hf",
) -> tuple[dict[str, Any], ImportReport]:
    """Reads the weights and fills ``template`` (see ``convert.import_params``)."""
    return import_params(
        read_weights(checkpoint.path, field),
        checkpoint.config,
        checkpoint.family,
        template,
        head=head,
        allow_fresh=allow_fresh,
        ignore=ignore,
        source=f"{field}: {checkpoint.path}",
    )


def load_tokenizer(path: str, field: str = "hf") -> tokenizers.Tokenizer:
    """The fast tokenizer of a Hugging Face directory (through transformers, so that
    ``tokenizer_config.json`` settings such as lower-casing are honoured)."""
    import transformers

    try:
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise HFConversionError(
            f"{field}: no tokenizer could be loaded from {path} ({e}); it needs "
            "tokenizer.json, or vocab.txt / vocab.json+merges.txt with tokenizer_config.json."
        ) from None
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HFConversionError(f"{field}: the tokenizer in {path} has no fast (Rust) version.")
    return tokenizers.Tokenizer.from_str(backend.to_str())


def _bert_tokenizer_files(tokenizer: tokenizers.Tokenizer, out: str, max_length: int) -> None:
    """Writes a tokenizer trained by this stack as Hugging Face tokenizer files: the
    ``tokenizer.json`` with BERT's ``[CLS] A [SEP] B [SEP]`` template, and for WordPiece
    a ``vocab.txt`` and ``tokenizer_class='BertTokenizer'`` (so that transformers also
    returns ``token_type_ids``)."""
    import transformers
    from tokenizers import processors

    from dwt_jax.data.tokenizer import SpecialIds

    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    ids = SpecialIds.from_tokenizer(tok)
    names = {
        role: tok.id_to_token(getattr(ids, role)) for role in ("pad", "unk", "cls", "sep", "mask")
    }
    cls, sep = names["cls"], names["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, ids.cls), (sep, ids.sep)],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=names["pad"],
        unk_token=names["unk"],
        cls_token=cls,
        sep_token=sep,
        mask_token=names["mask"],
        model_max_length=max_length,
    )
    fast.save_pretrained(out)
    if isinstance(tok.model, tokenizers.models.WordPiece):
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{t}\n" for t, _ in vocab)
        config_file = os.path.join(out, "tokenizer_config.json")
        with open(config_file) as f:
            tokenizer_config = json.load(f)
        tokenizer_config["tokenizer_class"] = "BertTokenizer"
        with open(config_file, "w") as f:
            json.dump(tokenizer_config, f, indent=2, sort_keys=True)


def write_dir(
    out: str,
    params: Mapping[str, Any],
    cfg: BertConfig,
    head: str,
    tokenizer: tokenizers.Tokenizer | None = None,
    tokenizer_dir: str | None = None,
    *,
    problem_type: str | None = None,
) -> list[str]:
    """Writes a Hugging Face model directory; returns the files written.

    The directory is built next to ``out`` and renamed into place, so a crash never
    leaves a half-written model under ``out``. Tokenizer files are copied from
    ``tokenizer_dir`` (an imported model's directory) when given, else generated
    from ``tokenizer``.
    """
    from safetensors.numpy import save_file

    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise HFConversionError(f"--out={out} exists and is not empty; pick a new directory.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        state = export_params(params, cfg, head)
        save_file(state, os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
        hf = config_to_hf(cfg, head, problem_type=problem_type)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy(os.path.join(tokenizer_dir, name), tmp)
        elif tokenizer is not None:
            _bert_tokenizer_files(tokenizer, tmp, cfg.max_seq_len)
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.listdir(out))
