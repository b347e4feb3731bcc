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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tokenizers

from dwt_jax import readers
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.hf.convert import (
    HFConversionError,
    ImportReport,
    config_from_hf,
    config_to_hf,
    export_params,
    import_params,
)
from dwt_jax.hf.decoder_convert import (
    decoder_config_from_hf,
    import_decoder_params,
    supported_decoders,
)
from dwt_jax.hf.decoder_names import DECODER_FAMILIES, DecoderFamily
from dwt_jax.hf.names import FAMILIES, Family
from dwt_jax.models.config import BertConfig
from dwt_jax.models.decoder_config import DecoderConfig

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
_DIR_FIX = (
    "point it at a Hugging Face model directory (download one where you have internet, "
    "e.g. with save_pretrained)"
)
_FILE_FIX = "restore it from the model's source (e.g. save it again with save_pretrained)"


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
      config: our model config: a ``BertConfig`` (encoders) or a ``DecoderConfig``.
      family: its model family: ``Family`` (BERT or RoBERTa naming) or
        ``DecoderFamily`` (GPT-2, Llama, Qwen2, Qwen3, Mistral).
      keys: the weight names in the checkpoint (as written).
      raw_config: the ``config.json`` dict.
    """

    path: str
    config: BertConfig | DecoderConfig
    family: Family | DecoderFamily
    keys: tuple[str, ...]
    raw_config: dict[str, Any]

    def has(self, prefix: str) -> bool:
        """Whether some weight's name starts with ``prefix`` (e.g. ``'cls.predictions.'``)."""
        return any(k.startswith(prefix) for k in self.keys)

    @property
    def objective(self) -> str:
        """'mlm' (an encoder) or 'clm' (a decoder)."""
        return self.config.objective

    @property
    def has_mlm_head(self) -> bool:
        """Whether an encoder checkpoint has its MLM head (False for a decoder)."""
        if isinstance(self.family, DecoderFamily):
            return False
        heads = {theirs for _, theirs, _ in self.family.mlm_head}
        return all(k in self.keys for k in heads)

    @property
    def lm_head_key(self) -> str:
        """The first weight of the pre-training head (for messages)."""
        if isinstance(self.family, DecoderFamily):
            return self.family.lm_head_key
        return self.family.mlm_head[0][1]

    @property
    def has_lm_head(self) -> bool:
        """Whether the pre-training head is there: an encoder's MLM head; a decoder's
        ``lm_head.weight``, or its word embeddings when the config ties them."""
        if not isinstance(self.family, DecoderFamily):
            return self.has_mlm_head
        keys = {k.removeprefix(f"{self.family.prefix}.") for k in self.keys}
        embedding = self.family.embedding_key.removeprefix(f"{self.family.prefix}.")
        return self.lm_head_key in keys or (self.config.tied and embedding in keys)


def _weight_files(path: str, field: str) -> tuple[str, list[str]]:
    """('safetensors'|'torch', files) of the directory's weights."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(os.path.join(path, SAFETENSORS)):
        return "safetensors", [os.path.join(path, SAFETENSORS)]
    if os.path.isfile(index):
        return "safetensors", _shard_files(index, field)
    if os.path.isfile(os.path.join(path, TORCH_BIN)):
        return "torch", [os.path.join(path, TORCH_BIN)]
    raise HFConversionError(
        f"{field}: {path} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}; point it "
        "at a Hugging Face model directory (save_pretrained's output)."
    )


def _shard_files(index: str, field: str) -> list[str]:
    """The shard files that a ``model.safetensors.index.json`` names, sorted."""
    raw = readers.read_json(index, field, expect=dict, fix=_FILE_FIX, error=HFConversionError)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFConversionError(
            f"{field}: {index} has no 'weight_map' from weight names to shard files; {_FILE_FIX}."
        )
    return [os.path.join(os.path.dirname(index), s) for s in sorted(set(weight_map.values()))]


def _load_torch(file: str, field: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise HFConversionError(
            f"{field}: {file} is a PyTorch checkpoint and torch is not installed; install "
            "the CPU build (pip install torch==2.13.0) or convert it to model.safetensors."
        ) from None

    def load(name: str) -> dict[str, np.ndarray]:
        state = torch.load(name, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}

    return readers.load_with(
        file, field, load, kind="a PyTorch state dict", fix=_FILE_FIX, error=HFConversionError
    )


def _load_safetensors(file: str) -> dict[str, np.ndarray]:
    """A safetensors file's arrays; bfloat16 ones (most decoder checkpoints), which
    safetensors' NumPy reader refuses, as ``ml_dtypes.bfloat16`` arrays."""
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except TypeError:  # "data type 'bfloat16' not understood"
        pass
    import ml_dtypes

    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            array = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
            out[name] = array.reshape(info["shape"])
    return out


def read_weights(path: str, field: str = "hf") -> dict[str, np.ndarray]:
    """Every weight of the directory as float32 NumPy arrays; a weight file that cannot
    be read (missing, truncated, foreign) is an ``HFConversionError`` naming it."""
    kind, files = _weight_files(path, field)
    weights: dict[str, np.ndarray] = {}
    for file in files:
        if kind == "torch":
            weights.update(_load_torch(file, field))
        else:
            weights.update(
                readers.load_with(
                    file,
                    field,
                    _load_safetensors,
                    kind="a safetensors file",
                    fix=_FILE_FIX,
                    error=HFConversionError,
                )
            )
    return {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in weights.items()}


def _safetensors_names(file: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:
        return list(f.keys())


def _weight_names(path: str, field: str) -> tuple[str, ...]:
    kind, files = _weight_files(path, field)
    if kind == "torch":
        return tuple(read_weights(path, field))
    names: list[str] = []
    for file in files:
        names += readers.load_with(
            file,
            field,
            _safetensors_names,
            kind="a safetensors file",
            fix=_FILE_FIX,
            error=HFConversionError,
        )
    return tuple(names)


_KINDS = {"mlm": "an encoder (masked LM)", "clm": "a decoder (causal LM)"}


def supported_models(objective: str | None = None) -> str:
    """What ``hf:DIR`` may hold (for ``objective`` 'mlm' or 'clm', or both)."""
    encoders = ", ".join(f"{t} ({f.mlm_architecture})" for t, f in FAMILIES.items())
    named = {"mlm": f"encoders {encoders}", "clm": f"decoders {supported_decoders()}"}
    return "; ".join(text for kind, text in named.items() if objective in (None, kind))


def config_of(
    raw: Mapping[str, Any], source: str, objective: str | None = None
) -> tuple[BertConfig | DecoderConfig, Family | DecoderFamily]:
    """(our config, family) of a ``config.json`` dict: an encoder (BERT, RoBERTa) or a
    decoder (GPT-2, Llama, Qwen2, Qwen3, Mistral). ``objective`` ('mlm' or 'clm') asks
    for one kind; another kind or model type is one error listing what is supported."""
    model_type = raw.get("model_type")
    kind = "clm" if model_type in DECODER_FAMILIES else "mlm" if model_type in FAMILIES else None
    if kind is None or (objective is not None and kind != objective):
        what = ", ".join(raw.get("architectures") or ()) or "a model"
        needed = f"{_KINDS[objective]} is needed here" if objective else "it is not supported"
        raise HFConversionError(
            f"{source}: {what} of model_type={model_type!r}: {needed}; dwt_jax reads "
            f"{supported_models(objective)}."
        )
    if kind == "clm":
        return decoder_config_from_hf(raw, source)
    return config_from_hf(raw, source)


def plan(spec: str, field: str, objective: str | None = None) -> HFCheckpoint:
    """Checks an ``hf:DIR`` (or plain directory) setting: config and weight names only.

    ``objective`` ('mlm' or 'clm') refuses a checkpoint of the other kind. A directory
    that is missing or holds no (or a damaged) ``config.json`` or weights, or a model
    dwt_jax cannot compute, is an ``HFConversionError`` naming ``field`` and the path."""
    path = hf_path(spec) if is_hf(spec) else os.path.expanduser(spec)
    path = readers.check_directory(path, field, fix=_DIR_FIX, error=HFConversionError)
    config_file = os.path.join(path, CONFIG)
    if not os.path.lexists(config_file):
        raise HFConversionError(f"{field}: {path} has no {CONFIG}; {_DIR_FIX}.")
    raw = readers.read_json(config_file, field, expect=dict, fix=_FILE_FIX, error=HFConversionError)
    cfg, family = config_of(raw, f"{field}: {config_file}", objective)
    return HFCheckpoint(path, cfg, family, _weight_names(path, field), raw)


def load_params(
    checkpoint: HFCheckpoint,
    template: Mapping[str, Any],
    *,
    head: str | None = None,
    allow_fresh: Iterable[str] = (),
    ignore: Iterable[str] = (),
    field: str = "hf",
) -> tuple[dict[str, Any], ImportReport]:
    """Reads the weights and fills ``template`` (see ``convert.import_params`` and
    ``decoder_convert.import_decoder_params``).

    ``head``: for an encoder, which model ``template`` is ('mlm' when None,
    'classifier', 'encoder'); a decoder has one model, its causal LM (``template`` is
    its whole param tree), so only None, 'clm' or 'mlm' (read as "the pre-training
    head") are accepted."""
    source = f"{field}: {checkpoint.path}"
    if isinstance(checkpoint.config, DecoderConfig):
        if head not in (None, "clm", "mlm"):
            raise ValueError(
                f"head={head!r}: a decoder checkpoint loads as its causal LM (head=None)."
            )
        return import_decoder_params(
            read_weights(checkpoint.path, field),
            checkpoint.config,
            checkpoint.family,
            template,
            allow_fresh=allow_fresh,
            ignore=ignore,
            source=source,
        )
    return import_params(
        read_weights(checkpoint.path, field),
        checkpoint.config,
        checkpoint.family,
        template,
        head=head or "mlm",
        allow_fresh=allow_fresh,
        ignore=ignore,
        source=source,
    )


def load_tokenizer(path: str, field: str = "hf") -> tokenizers.Tokenizer:
    """The fast tokenizer of a Hugging Face directory (through transformers, so that
    ``tokenizer_config.json`` settings such as lower-casing are honoured); errors, one
    line naming ``field`` (and a damaged file), as ``HFConversionError``. See
    ``dwt_jax.data.tokenizer.load_hf_tokenizer``."""
    return tokenizer_lib.load_hf_tokenizer(path, field, error=HFConversionError)


def _bert_tokenizer_files(tokenizer: tokenizers.Tokenizer, out: str, max_length: int) -> None:
    """Writes a tokenizer trained by this stack as Hugging Face tokenizer files: the
    ``tokenizer.json`` with BERT's ``[CLS] A [SEP] B [SEP]`` template, and for WordPiece
    a ``vocab.txt`` and ``tokenizer_class='BertTokenizer'`` (so that transformers also
    returns ``token_type_ids``)."""
    import transformers
    from tokenizers import processors

    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    ids = tokenizer_lib.SpecialIds.from_tokenizer(tok)
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
    """Writes an encoder as a Hugging Face model directory; returns the files written
    (a decoder: ``decoder_files.export_decoder_dir``).

    The directory is built next to ``out`` and renamed into place, so a crash never
    leaves a half-written model under ``out``. Tokenizer files are copied from
    ``tokenizer_dir`` (an imported model's directory) when given, else generated
    from ``tokenizer``.
    """
    if isinstance(cfg, DecoderConfig):
        raise ValueError("write_dir writes encoders; write a decoder with export_decoder_dir.")

    def fill(tmp: str) -> None:
        state = export_params(params, cfg, head)
        write_model_files(tmp, state, config_to_hf(cfg, head, problem_type=problem_type))
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        elif tokenizer is not None:
            _bert_tokenizer_files(tokenizer, tmp, cfg.max_seq_len)

    return write_atomically(out, fill)


def write_model_files(directory: str, state: Mapping[str, np.ndarray], config: dict) -> None:
    """``model.safetensors`` (torch's layout metadata) and ``config.json`` into ``directory``."""
    from safetensors.numpy import save_file

    save_file(dict(state), os.path.join(directory, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def copy_tokenizer_files(source: str, directory: str) -> None:
    """Copies the tokenizer files of the Hugging Face directory ``source``."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), directory)


def write_atomically(out: str, fill: Callable[[str], None]) -> list[str]:
    """Runs ``fill(tmp)`` on a fresh directory next to ``out``, then renames it to
    ``out`` (which must be absent or empty), so a crash never leaves a half-written
    model under ``out``; returns the files written."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise HFConversionError(f"--out={out} exists and is not empty; pick a new directory.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        fill(tmp)
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.listdir(out))
