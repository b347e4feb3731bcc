"""The declarative table: which size every axis of every BERT parameter is indexed by.

A parameter path (`bert/encoder/layer_3/attention/self/query/kernel`) is looked up
with its layer index replaced by `*`. Each axis names its *kind* (the size it
indexes) and its *role* in function-preserving widening:

- `copy`: the tensor produces these units; a new unit copies its old unit.
- `split`: the tensor consumes these units; after copying, each entry is divided by
  the copy count of its old unit, so a sum over the widened axis equals the old sum.
- `split_out`: produced units whose consumer cannot divide for itself, so the
  producer divides: the MLM transform LayerNorm feeds the tied decoder (the word
  embeddings are also the input table and must stay copies), and the query feeds
  `q·k` (the key stays a copy). On the head-dim axis the query is also multiplied by
  `sqrt(K_s / K_t)`, undoing the change of the `1/sqrt(K)` score scale.

Kinds `vocab`, `type_vocab` and `classes` cannot change; `position` may grow
(new rows are filled, never copied).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from dwt_jax.models.config import BertConfig

Path = tuple[str, ...]

# Sizes an axis can index.
HIDDEN, HEADS, HEAD_DIM, MLP = "hidden", "heads", "head_dim", "mlp"
VOCAB, POSITION, TYPE_VOCAB, CLASSES = "vocab", "position", "type_vocab", "classes"
UNIT_KINDS = (HIDDEN, HEADS, HEAD_DIM, MLP)  # widened with unit maps
FIXED_KINDS = (VOCAB, TYPE_VOCAB, CLASSES)  # must be equal in teacher and student

COPY, SPLIT, SPLIT_OUT = "copy", "split", "split_out"
PRODUCED_ROLES = (COPY, SPLIT_OUT)  # axes whose new units AKI takes from layer l+1


class Axis(NamedTuple):
    """One axis of a parameter: the size it indexes and its widening role."""

    kind: str
    role: str = COPY


def _ln(prefix: str, role: str = COPY) -> dict[str, tuple[Axis, ...]]:
    return {
        f"{prefix}/LayerNorm/scale": (Axis(HIDDEN, role),),
        f"{prefix}/LayerNorm/bias": (Axis(HIDDEN, role),),
    }


def _dense(prefix: str, inputs: tuple[Axis, ...], outputs: tuple[Axis, ...]) -> dict:
    return {f"{prefix}/kernel": (*inputs, *outputs), f"{prefix}/bias": outputs}


_D_IN, _D_OUT = (Axis(HIDDEN, SPLIT),), (Axis(HIDDEN, COPY),)
_LAYER = "bert/encoder/layer_*"

AXES: dict[str, tuple[Axis, ...]] = {
    "bert/embeddings/word_embeddings/embedding": (Axis(VOCAB), Axis(HIDDEN)),
    "bert/embeddings/position_embeddings/embedding": (Axis(POSITION), Axis(HIDDEN)),
    "bert/embeddings/token_type_embeddings/embedding": (Axis(TYPE_VOCAB), Axis(HIDDEN)),
    **_ln("bert/embeddings"),
    **_dense(f"{_LAYER}/attention/self/query", _D_IN, (Axis(HEADS), Axis(HEAD_DIM, SPLIT_OUT))),
    **_dense(f"{_LAYER}/attention/self/key", _D_IN, (Axis(HEADS), Axis(HEAD_DIM))),
    **_dense(f"{_LAYER}/attention/self/value", _D_IN, (Axis(HEADS), Axis(HEAD_DIM))),
    **_dense(
        f"{_LAYER}/attention/output/dense", (Axis(HEADS, SPLIT), Axis(HEAD_DIM, SPLIT)), _D_OUT
    ),
    **_ln(f"{_LAYER}/attention/output"),
    **_dense(f"{_LAYER}/intermediate/dense", _D_IN, (Axis(MLP),)),
    **_dense(f"{_LAYER}/output/dense", (Axis(MLP, SPLIT),), _D_OUT),
    **_ln(f"{_LAYER}/output"),
    "bert/encoder/final_LayerNorm/scale": _D_OUT,
    "bert/encoder/final_LayerNorm/bias": _D_OUT,
    **_dense("bert/pooler/dense", _D_IN, _D_OUT),
    **_dense("cls/predictions/transform/dense", _D_IN, _D_OUT),
    **_ln("cls/predictions/transform", SPLIT_OUT),
    "cls/predictions/bias": (Axis(VOCAB),),
    **_dense("classifier/dense", _D_IN, (Axis(CLASSES),)),
}

# Encoder-layer dense parameters: the tensors AKI widens from two teacher layers.
AKI_SUFFIXES = tuple(
    f"{name}/{leaf}"
    for name in (
        "attention/self/query",
        "attention/self/key",
        "attention/self/value",
        "attention/output/dense",
        "intermediate/dense",
        "output/dense",
    )
    for leaf in ("kernel", "bias")
)

# Zeroing these makes a pre-LN block the identity: x + 0 + 0.
IDENTITY_ZEROED_SUFFIXES = (
    "attention/output/dense/kernel",
    "attention/output/dense/bias",
    "output/dense/kernel",
    "output/dense/bias",
)

_LAYER_RE = re.compile(r"^layer_(\d+)$")


def layer_index(path: Path) -> int | None:
    """The encoder layer a path belongs to (`bert/encoder/layer_{i}/...`), else None."""
    if len(path) > 2 and path[:2] == ("bert", "encoder"):
        match = _LAYER_RE.match(path[2])
        if match:
            return int(match.group(1))
    return None


def with_layer(path: Path, index: int) -> Path:
    """`path` (an encoder-layer path) moved to `layer_{index}`."""
    return (*path[:2], f"layer_{index}", *path[3:])


def layer_suffix(path: Path) -> str:
    """The part of an encoder-layer path below `layer_{i}`, '/'-joined."""
    return "/".join(path[3:])


def axes_of(path: Path) -> tuple[Axis, ...]:
    """The axes of the parameter at `path`; ValueError for a path with no rule."""
    if layer_index(path) is not None:
        path = (*path[:2], "layer_*", *path[3:])
    key = "/".join(path)
    if key not in AXES:
        raise ValueError(
            f"{'/'.join(path)}: no remapping rule for this parameter; remapping reads "
            "dwt_jax BERT trees (dwt_jax.models.make_model) — convert the checkpoint first."
        )
    return AXES[key]


def sizes(cfg: BertConfig) -> dict[str, int]:
    """The size of every axis kind under `cfg`."""
    return {
        HIDDEN: cfg.hidden_size,
        HEADS: cfg.num_heads,
        HEAD_DIM: cfg.head_dim,
        MLP: cfg.mlp_dim,
        VOCAB: cfg.vocab_size,
        POSITION: cfg.max_len,
        TYPE_VOCAB: cfg.type_vocab_size,
        CLASSES: cfg.num_labels,
    }
