"""Depth growth: which teacher layer each student layer copies.

A *layer map* is a tuple whose entry j is the teacher layer that student layer j
copies (L_s >= L_t):

- `fna` (the DWT paper's scheme, after FNA, Fang et al. 2020): layers 0..L_t-1 are
  copied in place, every further student layer repeats the last teacher layer:
  `j -> min(j, L_t - 1)`.
- `stack` (bert2BERT): the whole stack repeated: `j -> j mod L_t`.
- `interleave`: each teacher layer repeated in place, in order:
  `j -> floor(j * L_t / L_s)`. Non-decreasing and covering every teacher layer; each
  is used floor(L_s/L_t) or ceil(L_s/L_t) times (exactly L_s/L_t when it divides).
- `identity` (Net2DeeperNet): the map of `fna`, and the new layers L_t..L_s-1 (after
  the copied ones) get zero attention-output and MLP-output projections (kernels
  and biases). In a pre-LN block `x + attn(LN(x)) + mlp(LN(.))` that block is then
  exactly the identity; a post-LN block still applies its LayerNorms, so
  `identity` needs `norm='pre'`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from dwt_jax.remap import rules
from dwt_jax.remap.rules import Path

DEPTH_METHODS = ("fna", "stack", "interleave", "identity")


def layer_map(method: str, num_teacher: int, num_student: int) -> tuple[int, ...]:
    """Student layer j <- teacher layer `layer_map(...)[j]` (see the module docstring)."""
    if method not in DEPTH_METHODS:
        raise ValueError(f"depth={method!r} is unknown: use one of {DEPTH_METHODS}.")
    if not 0 < num_teacher <= num_student:
        raise ValueError(
            f"the student has {num_student} layers and the teacher {num_teacher}: remapping "
            "needs 0 < teacher model.num_layers <= student model.num_layers."
        )
    students = range(num_student)
    if method == "stack":
        return tuple(j % num_teacher for j in students)
    if method == "interleave":
        return tuple(j * num_teacher // num_student for j in students)
    return tuple(min(j, num_teacher - 1) for j in students)


def identity_layers(method: str, num_teacher: int, num_student: int) -> tuple[int, ...]:
    """The student layers made exact identities: L_t..L_s-1 for 'identity', else none."""
    layer_map(method, num_teacher, num_student)  # validates the arguments
    return tuple(range(num_teacher, num_student)) if method == "identity" else ()


class DepthPlan(NamedTuple):
    """Where each student layer comes from, and which ones are zeroed to identities."""

    sources: tuple[int, ...]
    identity: tuple[int, ...]


def depth_plan(method: str, num_teacher: int, num_student: int, norm: str) -> DepthPlan:
    """The layer map and identity layers of `method`; checks `identity` needs pre-LN."""
    if method == "identity" and norm != "pre":
        raise ValueError(
            f"depth='identity' on a model.norm={norm!r} student: identity blocks need "
            "model.norm='pre' (a post-LN block re-normalises its output); use depth='fna'."
        )
    return DepthPlan(
        layer_map(method, num_teacher, num_student),
        identity_layers(method, num_teacher, num_student),
    )


def deepen(
    flat: Mapping[Path, np.ndarray],
    plan: DepthPlan,
    layout: Any = rules,
    unit: str = "bert/encoder/layer_{}",
) -> dict[Path, np.ndarray]:
    """The layers of `flat` rebuilt by `plan`; other paths pass through.

    Each student layer gets its own copy of its source layer's arrays; an identity
    layer has its output projections (``layout.IDENTITY_ZEROED_SUFFIXES``) zeroed.
    ``layout`` says where a path's layer index is (``layer_index``, ``layer_suffix``,
    ``with_layer``): the encoder's (`rules`) by default, a decoder's
    (`decoder_rules`) for decoders; ``unit`` names a layer in messages.
    """
    out: dict[Path, np.ndarray] = {}
    by_layer: dict[int, list[Path]] = {}
    for path, value in flat.items():
        index = layout.layer_index(path)
        if index is None:
            out[path] = value
        else:
            by_layer.setdefault(index, []).append(path)
    identity = set(plan.identity)
    for j, source in enumerate(plan.sources):
        if source not in by_layer:
            raise ValueError(
                f"{unit.format(source)}: student layer {j} copies this teacher layer, "
                "which the teacher tree lacks: check teacher_cfg.num_layers."
            )
        for path in by_layer[source]:
            value = np.asarray(flat[path])
            if j in identity and layout.layer_suffix(path) in layout.IDENTITY_ZEROED_SUFFIXES:
                value = np.zeros_like(value)
            out[layout.with_layer(path, j)] = np.array(value, copy=True)
    return out
