"""The strict last step of remapping: produced arrays + student template -> student tree.

`strict_merge` walks the student template. Every template path must have been
produced once, with exactly the template's shape and dtype — except under the
top-level heads named in `template_heads` (heads the teacher lacks), whose values
come from the template. A produced path the template lacks is an error too. Every
error is one line naming the path and what would fix it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from dwt_jax.remap.rules import Path


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """`{path tuple: leaf}` of a nested dict, in insertion order."""
    flat: dict[Path, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise ValueError(f"{'/'.join((*prefix, repr(key)))}: parameter keys must be strings.")
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """The nested dict of a `{path tuple: leaf}` mapping."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _template_value(name: str, leaf: Any) -> np.ndarray:
    """The value of a template leaf (an array; a ShapeDtypeStruct has none)."""
    if not hasattr(leaf, "__array__"):
        raise ValueError(
            f"{name}: the teacher has no value for this student parameter and the template "
            "holds only its shape: pass student_template= a freshly initialised student tree."
        )
    return np.asarray(leaf)


def strict_merge(
    produced: Mapping[Path, np.ndarray],
    template: Mapping[Path, Any],
    *,
    template_heads: Collection[str] = (),
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The student tree: `produced` checked against `template`, template heads filled in.

    Args:
      produced: `{path: array}` made by the remapping.
      template: `{path: leaf}` of the student (arrays, or `jax.ShapeDtypeStruct`s when
        no value is ever needed); defines the structure, shapes and dtypes.
      template_heads: top-level keys (e.g. 'classifier') the teacher lacks, whose
        leaves are taken from the template instead of `produced`.

    Returns:
      `(student tree, paths taken from the template)`, the tree in template order.

    Raises:
      ValueError: naming the first path that is missing, unexpected, or of the wrong
        shape or dtype.
    """
    merged: dict[Path, np.ndarray] = {}
    from_template: list[str] = []
    for path, leaf in template.items():
        name = "/".join(path)
        shape, dtype = _shape_dtype(leaf)
        if path[0] in template_heads:
            if path in produced:
                raise ValueError(
                    f"{name}: produced by the remap but its head {path[0]!r} is marked as "
                    "template-only; this is a remapping bug."
                )
            merged[path] = _template_value(name, leaf)
            from_template.append(name)
            continue
        if path not in produced:
            raise ValueError(
                f"{name}: the student has this parameter but the remap produced nothing for "
                "it: the teacher tree lacks it (check the teacher checkpoint and teacher_cfg; "
                "teacher and student must share model.norm)."
            )
        value = produced[path]
        got_shape, got_dtype = _shape_dtype(value)
        if (got_shape, got_dtype) != (shape, dtype):
            raise ValueError(
                f"{name}: remapped to {got_shape} {got_dtype} but the student expects {shape} "
                f"{dtype}: the student template does not match student_cfg."
            )
        merged[path] = value
    leftover = [path for path in produced if path not in template]
    if leftover:
        raise ValueError(
            f"{'/'.join(leftover[0])}: produced from the teacher but the student has no such "
            f"parameter ({len(leftover)} such paths): teacher and student must share model.norm "
            "and heads (or pass drop_teacher_heads=True to leave out a teacher-only head)."
        )
    return unflatten(merged), tuple(from_template)
