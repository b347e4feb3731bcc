"""Width growth of a teacher tree: unit maps, FPI, AKI and copy-with-noise.

A *unit map* `g` sends each new index of a widened size to an old index: the
identity on the first `old` units, then old units drawn at random (`seed`) or, with
`new_units='cyclic'`, `j mod old`. One map `g_D` serves every hidden-size axis of the
whole tree (embeddings, LayerNorms, every kernel's D axis, pooler, MLM transform;
the tied decoder is the word-embedding table); heads, head dim and MLP width have one
map per teacher layer. How each axis uses its map (copy, split, split_out) is
`rules.AXES`.

Methods:
- `fpi` (Net2Net / bert2BERT function-preserving init): every tensor is gathered by
  its maps; `split` axes are divided by the copy count of the old unit. Attention is
  head-wise: a new head copies an old head's Q/K/V entirely and the output-projection
  rows of a copied head are divided by its copy count.
- `aki` (bert2BERT advanced knowledge init): as `fpi`, except that in the dense
  kernels and biases of encoder layer l (query, key, value, attention output,
  intermediate, output — `rules.AKI_SUFFIXES`) every entry that belongs to a *new*
  unit on a produced axis (`copy` or `split_out`) is taken from the same tensor of
  teacher layer l+1, widened with layer l's maps; the last layer uses itself.
  LayerNorms, embeddings, pooler and heads follow `fpi`.
- `noise` (FNA's width rule): the teacher tensor fills the top-left corner of the
  student tensor; every other entry is N(0, noise_std) (zero when noise_std = 0).
Equal sizes are a plain copy under every method. Position tables may grow in rows;
new rows are always filled, never copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dwt_jax.models.config import BertConfig
from dwt_jax.remap import rules
from dwt_jax.remap.rules import Axis, Path

WIDTH_METHODS = ("fpi", "aki", "noise")
NEW_UNITS = ("random", "cyclic")
_STREAMS = {rules.HIDDEN: 0, rules.HEADS: 1, rules.HEAD_DIM: 2, rules.MLP: 3}
_FIXES = {
    rules.VOCAB: "use the teacher's tokenizer and model.vocab_size",
    rules.TYPE_VOCAB: "set the student's model.type_vocab_size to the teacher's",
    rules.CLASSES: "set the student's model.num_labels to the teacher's",
}

FillFn = Callable[[Path, tuple[int, ...]], np.ndarray]


def unit_map(old: int, new: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """g: new index -> old index, int64 [new].

    The first `old` entries are the identity; the `new - old` others are old units
    drawn uniformly with `rng`, or `j mod old` when `rng` is None.
    """
    if not 0 < old <= new:
        raise ValueError(f"unit_map(old={old}, new={new}): need 0 < old <= new.")
    extra = rng.integers(0, old, new - old) if rng is not None else np.arange(old, new) % old
    return np.concatenate([np.arange(old), extra]).astype(np.int64)


def copy_counts(g: np.ndarray, old: int) -> np.ndarray:
    """How many new units copy each old unit, float32 [old]."""
    return np.bincount(g, minlength=old).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class UnitMaps:
    """The unit maps of one remapping: one hidden map, per-teacher-layer others."""

    hidden: np.ndarray
    heads: tuple[np.ndarray, ...]
    head_dim: tuple[np.ndarray, ...]
    mlp: tuple[np.ndarray, ...]

    def get(self, kind: str, layer: int | None) -> np.ndarray:
        """The map of `kind` (a `rules.UNIT_KINDS` entry) in teacher layer `layer`."""
        if kind == rules.HIDDEN:
            return self.hidden
        return getattr(self, kind)[layer]


def make_unit_maps(
    teacher_cfg: BertConfig, student_cfg: BertConfig, *, seed: int = 0, new_units: str = "random"
) -> UnitMaps:
    """Unit maps from the teacher's to the student's sizes; each (kind, layer) has its
    own random stream derived from `seed`, so maps do not depend on each other."""
    if new_units not in NEW_UNITS:
        raise ValueError(f"new_units={new_units!r} is unknown: use one of {NEW_UNITS}.")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be a non-negative integer.")
    old, new = rules.sizes(teacher_cfg), rules.sizes(student_cfg)

    def make(kind: str, layer: int) -> np.ndarray:
        rng = None
        if new_units == "random":
            rng = np.random.default_rng([seed, _STREAMS[kind], layer])
        return unit_map(old[kind], new[kind], rng)

    layers = range(teacher_cfg.num_layers)
    return UnitMaps(
        hidden=make(rules.HIDDEN, 0),
        heads=tuple(make(rules.HEADS, i) for i in layers),
        head_dim=tuple(make(rules.HEAD_DIM, i) for i in layers),
        mlp=tuple(make(rules.MLP, i) for i in layers),
    )


def widen_tensor(
    x: np.ndarray,
    axes: Sequence[Axis],
    maps: Sequence[np.ndarray | None],
    target_shape: tuple[int, ...],
    *,
    fill: np.ndarray | None = None,
    head_dim_scale: float = 1.0,
) -> np.ndarray:
    """Widens `x` to `target_shape`.

    Each axis with a map is gathered by it (and divided by copy counts when its role
    is `split`/`split_out`; a `split_out` head-dim axis is also multiplied by
    `head_dim_scale`). Axes without a map keep their entries in the leading corner;
    everything outside that corner comes from `fill` (of `target_shape`).
    """
    y = np.asarray(x, dtype=np.float32)
    for axis, (spec, g) in enumerate(zip(axes, maps, strict=True)):
        if g is None:
            continue
        y = np.take(y, g, axis=axis)
        if spec.role in (rules.SPLIT, rules.SPLIT_OUT):
            shape = [1] * y.ndim
            shape[axis] = -1
            y = y / copy_counts(g, x.shape[axis])[g].reshape(shape)
        if spec.role == rules.SPLIT_OUT and spec.kind == rules.HEAD_DIM:
            y = y * np.float32(head_dim_scale)
    if y.shape != tuple(target_shape):
        if fill is None or fill.shape != tuple(target_shape):
            raise ValueError(f"widen_tensor: growing {y.shape} to {target_shape} needs a fill.")
        out = np.array(fill, dtype=np.float32, copy=True)
        out[tuple(slice(0, n) for n in y.shape)] = y
        y = out
    return y.astype(np.asarray(x).dtype)


def new_unit_mask(
    axes: Sequence[Axis], old_shape: tuple[int, ...], new_shape: tuple[int, ...]
) -> np.ndarray:
    """bool [new_shape]: entries that belong to a new unit on a produced axis (AKI)."""
    mask = np.zeros(new_shape, dtype=bool)
    for axis, spec in enumerate(axes):
        if spec.role in rules.PRODUCED_ROLES and new_shape[axis] > old_shape[axis]:
            shape = [1] * len(new_shape)
            shape[axis] = -1
            mask |= (np.arange(new_shape[axis]) >= old_shape[axis]).reshape(shape)
    return mask


def _target_shape(
    path: Path, x: np.ndarray, axes: Sequence[Axis], old: Mapping[str, int], new: Mapping[str, int]
) -> tuple[int, ...]:
    """The student shape of `path`, after checking `x` against the teacher's sizes."""
    name = "/".join(path)
    expected = tuple(old[a.kind] for a in axes)
    if x.shape != expected:
        raise ValueError(
            f"{name}: teacher shape {x.shape} does not match teacher_cfg (expects {expected}): "
            "pass the config the teacher was trained with."
        )
    target = tuple(new[a.kind] for a in axes)
    for a in axes:
        if a.kind in rules.FIXED_KINDS and old[a.kind] != new[a.kind]:
            raise ValueError(
                f"{name}: teacher shape {x.shape} vs student shape {target}: the {a.kind} "
                f"axis cannot be remapped; {_FIXES[a.kind]} ({old[a.kind]})."
            )
        if new[a.kind] < old[a.kind]:
            raise ValueError(
                f"{name}: teacher shape {x.shape} vs student shape {target}: the student is "
                f"smaller on the {a.kind} axis; remapping only grows a model."
            )
    return target


def widen_params(
    flat_teacher: Mapping[Path, np.ndarray],
    teacher_cfg: BertConfig,
    student_cfg: BertConfig,
    *,
    method: str,
    maps: UnitMaps | None,
    fill_fn: FillFn,
) -> dict[Path, np.ndarray]:
    """Every teacher parameter widened to the student's sizes (the teacher's depth).

    Args:
      flat_teacher: `{path: array}` of the teacher tree (see `merge.flatten`).
      teacher_cfg, student_cfg: the two architectures.
      method: one of `WIDTH_METHODS`.
      maps: the unit maps (`make_unit_maps`); unused for 'noise'.
      fill_fn: `(path, shape) -> array` for entries no teacher entry maps to
        (new position rows; everything new under 'noise').
    """
    if method not in WIDTH_METHODS:
        raise ValueError(f"width={method!r} is unknown: use one of {WIDTH_METHODS}.")
    if method != "noise" and maps is None:
        raise ValueError(f"width={method!r} needs unit maps (make_unit_maps).")
    old, new = rules.sizes(teacher_cfg), rules.sizes(student_cfg)
    last = teacher_cfg.num_layers - 1
    head_dim_scale = math.sqrt(student_cfg.head_dim / teacher_cfg.head_dim)
    out: dict[Path, np.ndarray] = {}
    for path, x in flat_teacher.items():
        axes = rules.axes_of(path)
        layer = rules.layer_index(path)
        if layer is not None and layer > last:
            raise ValueError(
                f"{'/'.join(path)}: teacher layer {layer} but teacher_cfg.num_layers="
                f"{teacher_cfg.num_layers}: pass the config the teacher was trained with."
            )
        x = np.asarray(x)
        target = _target_shape(path, x, axes, old, new)
        tensor_maps = [
            maps.get(a.kind, layer)
            if maps is not None and method != "noise" and a.kind in rules.UNIT_KINDS
            else None
            for a in axes
        ]
        grows_in_corner = any(
            g is None and t > s for g, t, s in zip(tensor_maps, target, x.shape, strict=True)
        )
        fill = fill_fn(path, target) if grows_in_corner else None
        widen = functools.partial(
            widen_tensor,
            axes=axes,
            maps=tensor_maps,
            target_shape=target,
            fill=fill,
            head_dim_scale=head_dim_scale,
        )
        y = widen(x)
        if method == "aki" and layer is not None and rules.layer_suffix(path) in rules.AKI_SUFFIXES:
            next_path = rules.with_layer(path, min(layer + 1, last))
            if next_path not in flat_teacher:
                raise ValueError(
                    f"{'/'.join(next_path)}: AKI widens layer {layer} from this parameter, "
                    "which the teacher tree lacks."
                )
            y_next = widen(np.asarray(flat_teacher[next_path]))
            y = np.where(new_unit_mask(axes, x.shape, target), y_next, y)
        out[path] = y
    return out
