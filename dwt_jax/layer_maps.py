"""Layer maps: which student layer is matched to which teacher layer.

Maps pair student and teacher ``hidden_states`` indices (0 = the embedding output,
i = the output of layer i) and are plain tuples of ``(student, teacher)``, sorted by
student index. Pure Python: usable from any code, with or without JAX. The rounding
and its reasons are in docs/methods.md#feature-losses.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

LayerMap = tuple[tuple[int, int], ...]


def as_int(value: object, what: str) -> int:
    """``value`` as an int (any ``__index__`` type, not bool), else a ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None


def _num_layers(value: object, what: str) -> int:
    count = as_int(value, what)
    if count < 1:
        raise ValueError(f"{what} must be at least 1, got {count}")
    return count


def uniform_layer_map(
    num_student_layers: int, num_teacher_layers: int, *, include_embeddings: bool = True
) -> LayerMap:
    """Student layer i ↔ teacher layer ⌈i·L_t / L_s⌉, for i = 1..L_s (plus 0 ↔ 0).

    Rounding: the ceiling. It equals i·L_t/L_s whenever that is whole (PKD's
    12 → 6 gives 2i), always pairs the last layers, and never pairs a student
    transformer layer with the teacher's embeddings: with a shallower teacher
    (L_t < L_s, the weak-teacher case) the floor would send student layer 1 to
    teacher index 0; the ceiling lets consecutive student layers share a teacher
    layer instead. Examples (without the 0 ↔ 0 pair): (L_s, L_t) = (6, 4) →
    1↔1, 2↔2, 3↔2, 4↔3, 5↔4, 6↔4; (4, 2) → 1↔1, 2↔1, 3↔2, 4↔2; (4, 4) → i↔i.

    Returns:
      ((student, teacher), ...) hidden_states indices, sorted by student index.
    Raises:
      ValueError: if a layer count is not a positive int.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    pairs = [(i, -(-i * teacher_layers // student_layers)) for i in range(1, student_layers + 1)]
    return ((0, 0), *pairs) if include_embeddings else tuple(pairs)


def last_k_layer_map(num_student_layers: int, num_teacher_layers: int, k: int) -> LayerMap:
    """The last k student layers ↔ the last k teacher layers, in order.

    (L_s − k + j) ↔ (L_t − k + j) for j = 1..k, e.g. (6, 4, k=2) → 5↔3, 6↔4.

    Raises:
      ValueError: unless 1 ≤ k ≤ min(L_s, L_t) and the counts are positive ints.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    k = as_int(k, "k")
    if not 1 <= k <= min(student_layers, teacher_layers):
        raise ValueError(f"k must be in [1, {min(student_layers, teacher_layers)}], got {k}")
    return tuple((student_layers - k + j, teacher_layers - k + j) for j in range(1, k + 1))


def explicit_layer_map(
    pairs: Iterable[tuple[int, int]], num_student_layers: int, num_teacher_layers: int
) -> LayerMap:
    """Validates user (student, teacher) pairs and returns them as int tuples sorted by student.

    Indices are hidden_states indices: 0 ≤ student ≤ L_s, 0 ≤ teacher ≤ L_t. Several
    student layers may share a teacher layer; a student layer may appear only once.

    Raises:
      ValueError: if the list is empty, an entry is not a pair of ints, an index is
        out of range, or a student index repeats.
    """
    student_layers = _num_layers(num_student_layers, "num_student_layers")
    teacher_layers = _num_layers(num_teacher_layers, "num_teacher_layers")
    normalised: dict[int, int] = {}
    for pair in pairs:
        try:
            student, teacher = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"a layer-map entry must be a (student, teacher) pair: {pair!r}"
            ) from None
        student = as_int(student, "a student layer index")
        teacher = as_int(teacher, "a teacher layer index")
        if not 0 <= student <= student_layers:
            raise ValueError(f"student layer {student} is outside [0, {student_layers}]")
        if not 0 <= teacher <= teacher_layers:
            raise ValueError(f"teacher layer {teacher} is outside [0, {teacher_layers}]")
        if student in normalised:
            raise ValueError(f"student layer {student} appears more than once")
        normalised[student] = teacher
    if not normalised:
        raise ValueError("a layer map needs at least one (student, teacher) pair")
    return tuple(sorted(normalised.items()))
