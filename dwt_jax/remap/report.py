"""`RemapReport`: what a remap did beyond copying teacher tensors (every family)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RemapReport:
    """What a remap did, beyond copying teacher tensors.

    Attributes:
      layer_map: teacher layer of each student layer.
      identity_layers: student layers zeroed to exact identities.
      from_template: student paths whose values came from the template (heads the
        teacher lacks).
      dropped: teacher paths left out (heads the student lacks; `drop_teacher_heads`).
      filled: paths with entries no teacher entry maps to (filled with noise, or with
        template rows for new positions).
    """

    layer_map: tuple[int, ...]
    identity_layers: tuple[int, ...]
    from_template: tuple[str, ...]
    dropped: tuple[str, ...]
    filled: tuple[str, ...]
