"""Tests for dwt_jax.remap.depth: layer maps, identity blocks, FNA copies, closeness."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from remap_helpers import TEACHER, forward, mlm_kl, trained_like

from dwt_jax import remap

DEEP = dataclasses.replace(TEACHER, num_layers=4)

EXPECTED_MAPS = {
    ("fna", 2, 4): (0, 1, 1, 1),
    ("fna", 2, 5): (0, 1, 1, 1, 1),
    ("fna", 3, 6): (0, 1, 2, 2, 2, 2),
    ("stack", 2, 4): (0, 1, 0, 1),
    ("stack", 2, 5): (0, 1, 0, 1, 0),
    ("stack", 3, 6): (0, 1, 2, 0, 1, 2),
    ("interleave", 2, 4): (0, 0, 1, 1),
    ("interleave", 2, 5): (0, 0, 0, 1, 1),
    ("interleave", 3, 6): (0, 0, 1, 1, 2, 2),
    ("identity", 2, 4): (0, 1, 1, 1),
    ("identity", 2, 5): (0, 1, 1, 1, 1),
    ("identity", 3, 6): (0, 1, 2, 2, 2, 2),
}


@pytest.mark.parametrize(("method", "num_teacher", "num_student"), sorted(EXPECTED_MAPS))
def test_layer_map_matches_expected_tuple(method: str, num_teacher: int, num_student: int):
    got = remap.layer_map(method, num_teacher, num_student)
    assert got == EXPECTED_MAPS[method, num_teacher, num_student]
    expected_identity = tuple(range(num_teacher, num_student)) if method == "identity" else ()
    assert remap.identity_layers(method, num_teacher, num_student) == expected_identity


def test_layer_maps_cover_the_teacher_and_interleave_is_monotone():
    for num_teacher in range(1, 6):
        for num_student in range(num_teacher, 13):
            for method in remap.DEPTH_METHODS:
                sources = remap.layer_map(method, num_teacher, num_student)
                assert len(sources) == num_student
                assert set(sources) == set(range(num_teacher)), (method, sources)
            sources = remap.layer_map("interleave", num_teacher, num_student)
            assert list(sources) == sorted(sources)
            uses = np.bincount(sources)
            assert uses.max() <= math.ceil(num_student / num_teacher)
            assert uses.min() >= num_student // num_teacher


def test_layer_map_rejects_shallower_student_and_unknown_method():
    with pytest.raises(ValueError, match=r"teacher model.num_layers <= student"):
        remap.layer_map("fna", 4, 2)
    with pytest.raises(ValueError, match=r"depth='deep' is unknown"):
        remap.layer_map("deep", 2, 4)


def test_identity_on_post_ln_raises():
    teacher = dataclasses.replace(TEACHER, norm="post")
    student = dataclasses.replace(DEEP, norm="post")
    with pytest.raises(ValueError, match=r"identity blocks need model.norm='pre'"):
        remap.remap_params(trained_like(teacher), teacher, student, depth="identity")


def test_identity_depth_is_exact_for_pre_ln():
    teacher_params = trained_like(TEACHER)
    student_params = remap.remap_params(teacher_params, TEACHER, DEEP, depth="identity")
    teacher_logits, teacher_hidden = forward(TEACHER, teacher_params)
    student_logits, student_hidden = forward(DEEP, student_params)
    np.testing.assert_allclose(student_logits, teacher_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(student_hidden, teacher_hidden, rtol=0, atol=1e-5)
    for j in (2, 3):
        layer = student_params["bert"]["encoder"][f"layer_{j}"]
        for block in (layer["attention"]["output"]["dense"], layer["output"]["dense"]):
            assert not np.any(block["kernel"]) and not np.any(block["bias"])
        # Everything else in a new block is the last teacher layer, so it can train.
        np.testing.assert_array_equal(
            layer["intermediate"]["dense"]["kernel"],
            teacher_params["bert"]["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"],
        )


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fna_on_equal_width_repeats_the_last_teacher_layer(norm: str):
    teacher = dataclasses.replace(TEACHER, norm=norm)
    teacher_params = trained_like(teacher)
    student_params = remap.remap_params(
        teacher_params, teacher, dataclasses.replace(DEEP, norm=norm), depth="fna"
    )
    teacher_layers = teacher_params["bert"]["encoder"]
    student_layers = student_params["bert"]["encoder"]
    for j, source in enumerate((0, 1, 1, 1)):
        np.testing.assert_equal(student_layers[f"layer_{j}"], teacher_layers[f"layer_{source}"])
    for name in ("embeddings", "pooler"):
        np.testing.assert_equal(student_params["bert"][name], teacher_params["bert"][name])
    np.testing.assert_equal(student_params["cls"], teacher_params["cls"])
    # Each student layer owns its arrays.
    query_2 = student_layers["layer_2"]["attention"]["self"]["query"]["kernel"]
    query_3 = student_layers["layer_3"]["attention"]["self"]["query"]["kernel"]
    assert query_2 is not query_3


# Measured KL(teacher || remapped) / KL(teacher || random student): pre-LN <= 0.04,
# post-LN <= 0.15 (tests/remap seeds); the bounds leave a margin.
@pytest.mark.parametrize(("norm", "bound"), [("pre", 0.1), ("post", 0.3)])
@pytest.mark.parametrize("method", ["fna", "stack", "interleave"])
def test_depth_remap_is_much_closer_to_the_teacher_than_a_random_student(
    method: str, norm: str, bound: float
):
    teacher = dataclasses.replace(TEACHER, norm=norm)
    student = dataclasses.replace(DEEP, norm=norm)
    teacher_logits, _ = forward(teacher, trained_like(teacher))
    remapped = remap.remap_params(trained_like(teacher), teacher, student, depth=method)
    kl_remapped = mlm_kl(teacher_logits, forward(student, remapped)[0])
    kl_random = mlm_kl(teacher_logits, forward(student, trained_like(student, seed=5))[0])
    assert kl_remapped < bound * kl_random, (kl_remapped, kl_random)
