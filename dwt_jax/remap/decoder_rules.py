"""The declarative table of decoder parameters (GPT-2 and Llama families): which size
every axis indexes and its role in function-preserving widening.

The roles are `rules`' (`copy`: the tensor produces these units; `split`: it consumes
them and is divided by the copy counts; `split_out`: produced units whose consumer
cannot divide for itself). One producer here needs `split_out`: the final norm of a
*tied* model, whose output feeds the LM head, which is also the input embedding table
and must stay a copy (docs/methods.md#decoder-growth). With an untied head the final
norm copies and the head's kernel splits.

A layer path (`model/layers_3/mlp/up_proj/kernel`, `transformer/h_3/ln_1/scale`) is
looked up with its layer index replaced by `*`.
"""

from __future__ import annotations

import re

from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.remap.rules import (
    COPY,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    MLP,
    POSITION,
    SPLIT,
    SPLIT_OUT,
    VOCAB,
    Axis,
    Path,
)

KV_HEADS, QKV = "kv_heads", "qkv"
UNIT_KINDS = (HIDDEN, HEADS, KV_HEADS, MLP)  # widened with unit maps
FIXED_KINDS = (VOCAB, QKV)  # equal in teacher and student (checked with the configs)

_D_IN, _D_OUT = Axis(HIDDEN, SPLIT), Axis(HIDDEN, COPY)
_GPT2 = "transformer/h_*"
_LLAMA = "model/layers_*"


def _dense(prefix: str, inputs: tuple[Axis, ...], outputs: tuple[Axis, ...], bias: bool) -> dict:
    table = {f"{prefix}/kernel": (*inputs, *outputs)}
    if bias:
        table[f"{prefix}/bias"] = outputs
    return table


def _norm(prefix: str, bias: bool, role: str = COPY) -> dict[str, tuple[Axis, ...]]:
    table = {f"{prefix}/scale": (Axis(HIDDEN, role),)}
    if bias:
        table[f"{prefix}/bias"] = (Axis(HIDDEN, role),)
    return table


_HEADS_OUT = (Axis(HEADS), Axis(HEAD_DIM))
_KV_OUT = (Axis(KV_HEADS), Axis(HEAD_DIM))
_HEADS_IN = (Axis(HEADS, SPLIT), Axis(HEAD_DIM, SPLIT))

AXES: dict[str, tuple[Axis, ...]] = {
    # GPT-2: the tied head reads ln_f's output, so ln_f splits (see the module docstring).
    "transformer/wte/embedding": (Axis(VOCAB), _D_OUT),
    "transformer/wpe/embedding": (Axis(POSITION), _D_OUT),
    **_norm(f"{_GPT2}/ln_1", bias=True),
    **_dense(f"{_GPT2}/attn/c_attn", (_D_IN,), (Axis(QKV), *_HEADS_OUT), bias=True),
    **_dense(f"{_GPT2}/attn/c_proj", _HEADS_IN, (_D_OUT,), bias=True),
    **_norm(f"{_GPT2}/ln_2", bias=True),
    **_dense(f"{_GPT2}/mlp/c_fc", (_D_IN,), (Axis(MLP),), bias=True),
    **_dense(f"{_GPT2}/mlp/c_proj", (Axis(MLP, SPLIT),), (_D_OUT,), bias=True),
    **_norm("transformer/ln_f", bias=True, role=SPLIT_OUT),
    # Llama family (q/k/v biases: Qwen2; q/k norms over the head dim: Qwen3).
    "model/embed_tokens/embedding": (Axis(VOCAB), _D_OUT),
    **_norm(f"{_LLAMA}/input_layernorm", bias=False),
    **_dense(f"{_LLAMA}/self_attn/q_proj", (_D_IN,), _HEADS_OUT, bias=True),
    **_dense(f"{_LLAMA}/self_attn/k_proj", (_D_IN,), _KV_OUT, bias=True),
    **_dense(f"{_LLAMA}/self_attn/v_proj", (_D_IN,), _KV_OUT, bias=True),
    f"{_LLAMA}/self_attn/q_norm/scale": (Axis(HEAD_DIM),),
    f"{_LLAMA}/self_attn/k_norm/scale": (Axis(HEAD_DIM),),
    **_dense(f"{_LLAMA}/self_attn/o_proj", _HEADS_IN, (_D_OUT,), bias=False),
    **_norm(f"{_LLAMA}/post_attention_layernorm", bias=False),
    **_dense(f"{_LLAMA}/mlp/gate_proj", (_D_IN,), (Axis(MLP),), bias=False),
    **_dense(f"{_LLAMA}/mlp/up_proj", (_D_IN,), (Axis(MLP),), bias=False),
    **_dense(f"{_LLAMA}/mlp/down_proj", (Axis(MLP, SPLIT),), (_D_OUT,), bias=False),
    **_norm("model/norm", bias=False, role=SPLIT_OUT),
    "lm_head/kernel": (_D_IN, Axis(VOCAB)),
}

# The final norms: `split_out` under a tied head, `copy` under an untied one.
FINAL_NORMS = ("transformer/ln_f/scale", "transformer/ln_f/bias", "model/norm/scale")

# Zeroing these makes a pre-norm block the identity: x + 0 + 0.
IDENTITY_ZEROED_SUFFIXES = (
    "attn/c_proj/kernel",
    "attn/c_proj/bias",
    "mlp/c_proj/kernel",
    "mlp/c_proj/bias",
    "self_attn/o_proj/kernel",
    "mlp/down_proj/kernel",
)

# Norms inside a block: AKI leaves them to FPI (as for BERT).
BLOCK_NORMS = ("ln_1", "ln_2", "input_layernorm", "post_attention_layernorm", "q_norm", "k_norm")

POSITIONS: Path = ("transformer", "wpe", "embedding")
EMBEDDINGS: dict[str, Path] = {
    "gpt2": ("transformer", "wte", "embedding"),
    "llama": ("model", "embed_tokens", "embedding"),
}
LM_HEAD: Path = ("lm_head", "kernel")

_LAYER_RE = re.compile(r"^(h|layers)_(\d+)$")
_STACKS = {"transformer": "h", "model": "layers"}


def layer_index(path: Path) -> int | None:
    """The block a path belongs to (`transformer/h_{i}/...`, `model/layers_{i}/...`)."""
    if len(path) > 2 and path[0] in _STACKS:
        match = _LAYER_RE.match(path[1])
        if match and match.group(1) == _STACKS[path[0]]:
            return int(match.group(2))
    return None


def with_layer(path: Path, index: int) -> Path:
    """`path` (a block path) moved to block `index`."""
    return (path[0], f"{_STACKS[path[0]]}_{index}", *path[2:])


def layer_suffix(path: Path) -> str:
    """The part of a block path below the block, '/'-joined."""
    return "/".join(path[2:])


def axes_of(path: Path, tied: bool) -> tuple[Axis, ...]:
    """The axes of the decoder parameter at `path` in a model whose head is `tied` (or
    not); ValueError for a path with no rule."""
    key = "/".join(path)
    if layer_index(path) is not None:
        key = "/".join((path[0], f"{_STACKS[path[0]]}_*", *path[2:]))
    if key not in AXES:
        raise ValueError(
            f"{'/'.join(path)}: no remapping rule for this decoder parameter; remapping reads "
            "dwt_jax GPT-2 / Llama trees (dwt_jax.models.families.make_lm) — convert the "
            "checkpoint first."
        )
    axes = AXES[key]
    if key in FINAL_NORMS and not tied:
        axes = tuple(Axis(a.kind, COPY) for a in axes)
    return axes


def sizes(cfg: DecoderConfig) -> dict[str, int]:
    """The size of every axis kind under `cfg`."""
    return {
        HIDDEN: cfg.hidden_size,
        HEADS: cfg.num_heads,
        KV_HEADS: cfg.num_kv_heads,
        HEAD_DIM: cfg.head_dim,
        MLP: cfg.mlp_dim,
        VOCAB: cfg.vocab_size,
        POSITION: cfg.max_len,
        QKV: 3,
    }
