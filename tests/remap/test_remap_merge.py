"""Tests for dwt_jax.remap.merge and remap_params' structure and error handling."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from remap_helpers import STUDENT, TEACHER, init_params, packed_batch, trained_like

from dwt_jax import remap
from dwt_jax.models import make_model


def shapes(tree: dict) -> dict:
    return {
        jax.tree_util.keystr(path): (np.shape(x), np.asarray(x).dtype)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("width", remap.WIDTH_METHODS)
@pytest.mark.parametrize("depth", remap.DEPTH_METHODS)
def test_every_student_path_is_produced_with_its_shape(depth: str, width: str):
    template = init_params(STUDENT, seed=7)
    student = remap.remap_params(
        trained_like(TEACHER), TEACHER, STUDENT, depth=depth, width=width, student_template=template
    )
    assert shapes(student) == shapes(template)
    # Without a template the structure comes from an abstract init of student_cfg.
    assert shapes(remap.remap_params(trained_like(TEACHER), TEACHER, STUDENT)) == shapes(template)


def test_wrong_vocab_names_word_embeddings_and_both_shapes():
    student = dataclasses.replace(STUDENT, vocab_size=60)
    with pytest.raises(ValueError, match=r"word_embeddings.*\(50, 16\).*\(60, 32\)"):
        remap.remap_params(trained_like(TEACHER), TEACHER, student)


@pytest.mark.parametrize(
    "change",
    [{"hidden_size": 8, "num_heads": 1}, {"mlp_dim": 16}, {"num_layers": 1}, {"num_heads": 4}],
    ids=["hidden", "mlp", "layers", "head_dim"],
)
def test_teacher_larger_than_student_raises(change: dict):
    student = dataclasses.replace(TEACHER, **change)
    with pytest.raises(ValueError, match=r"smaller than the teacher's.*only grows"):
        remap.remap_params(trained_like(TEACHER), TEACHER, student)


def test_teacher_that_does_not_match_its_config_names_the_path():
    wrong_cfg = dataclasses.replace(TEACHER, mlp_dim=48)
    with pytest.raises(ValueError, match=r"layer_0/intermediate/dense/bias: teacher shape \(32,\)"):
        remap.remap_params(trained_like(TEACHER), wrong_cfg, STUDENT)


def test_norm_mismatch_and_variables_dict_and_unknown_path_raise():
    params = trained_like(TEACHER)
    with pytest.raises(ValueError, match=r"model.norm='pre' but student model.norm='post'"):
        remap.remap_params(params, TEACHER, dataclasses.replace(STUDENT, norm="post"))
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        remap.remap_params({"params": params}, TEACHER, STUDENT)
    extra = {**params, "bert": {**params["bert"], "adapter": {"kernel": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"bert/adapter/kernel: no remapping rule"):
        remap.remap_params(extra, TEACHER, STUDENT)


def test_boxed_teacher_params_are_accepted():
    boxed = make_model(TEACHER).init(jax.random.key(0), **packed_batch(), deterministic=True)
    student = remap.remap_params(boxed["params"], TEACHER, STUDENT)
    assert shapes(student) == shapes(init_params(STUDENT))


def test_teacher_head_missing_from_student_is_an_error_unless_dropped():
    template = init_params(STUDENT, seed=7, head="classifier")
    teacher = trained_like(TEACHER)
    with pytest.raises(ValueError, match=r"^cls/predictions/.*drop_teacher_heads=True"):
        remap.remap_params(teacher, TEACHER, STUDENT, student_template=template)
    student, report = remap.remap_params_with_report(
        teacher, TEACHER, STUDENT, student_template=template, drop_teacher_heads=True
    )
    assert shapes(student) == shapes(template)
    np.testing.assert_equal(student["classifier"], template["classifier"])
    assert set(report.from_template) == {"classifier/dense/kernel", "classifier/dense/bias"}
    assert "cls/predictions/bias" in report.dropped
    assert report.layer_map == (0, 1, 1, 1)


def test_classifier_teacher_grows_its_head():
    teacher = trained_like(TEACHER, head="classifier")
    student = remap.remap_params(teacher, TEACHER, STUDENT)
    assert shapes(student) == shapes(init_params(STUDENT, head="classifier"))
    g_D = remap.make_unit_maps(TEACHER, STUDENT).hidden
    # The classifier reads the pooled hidden units: its kernel rows split, summing back.
    summed = np.zeros((16, 2), np.float32)
    np.add.at(summed, g_D, student["classifier"]["dense"]["kernel"])
    np.testing.assert_allclose(summed, teacher["classifier"]["dense"]["kernel"], atol=1e-6)


def test_longer_positions_come_from_the_template_or_noise():
    student_cfg = dataclasses.replace(STUDENT, max_len=32)
    template = init_params(student_cfg, seed=7)
    teacher = trained_like(TEACHER)
    g_D = remap.make_unit_maps(TEACHER, student_cfg).hidden
    student, report = remap.remap_params_with_report(
        teacher, TEACHER, student_cfg, student_template=template
    )
    table = student["bert"]["embeddings"]["position_embeddings"]["embedding"]
    teacher_table = teacher["bert"]["embeddings"]["position_embeddings"]["embedding"]
    np.testing.assert_array_equal(table[:16], teacher_table[:, g_D])
    np.testing.assert_array_equal(
        table[16:], template["bert"]["embeddings"]["position_embeddings"]["embedding"][16:]
    )
    assert report.filled == ("bert/embeddings/position_embeddings/embedding",)
    no_template = remap.remap_params(teacher, TEACHER, student_cfg, noise_std=0.0)
    assert not np.any(no_template["bert"]["embeddings"]["position_embeddings"]["embedding"][16:])


def test_strict_merge_names_missing_extra_and_misshapen_paths():
    template = {("a", "w"): np.zeros((2, 3), np.float32), ("b", "w"): np.zeros(4, np.float32)}
    produced = {("a", "w"): np.ones((2, 3), np.float32), ("b", "w"): np.ones(4, np.float32)}
    tree, from_template = remap.strict_merge(produced, template)
    assert set(tree) == {"a", "b"} and from_template == ()
    np.testing.assert_array_equal(tree["a"]["w"], np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^b/w: the student has this parameter"):
        remap.strict_merge({("a", "w"): produced["a", "w"]}, template)
    with pytest.raises(ValueError, match=r"^c/w: produced from the teacher"):
        remap.strict_merge({**produced, ("c", "w"): np.ones(1, np.float32)}, template)
    with pytest.raises(ValueError, match=r"^b/w: remapped to \(5,\) float32.*expects \(4,\)"):
        remap.strict_merge({**produced, ("b", "w"): np.ones(5, np.float32)}, template)
    with pytest.raises(ValueError, match=r"^b/w: remapped to \(4,\) float64"):
        remap.strict_merge({**produced, ("b", "w"): np.ones(4)}, template)
    shape_only = {**template, ("b", "w"): jax.ShapeDtypeStruct((4,), np.float32)}
    with pytest.raises(ValueError, match=r"^b/w: .*pass student_template="):
        remap.strict_merge({("a", "w"): produced["a", "w"]}, shape_only, template_heads={"b"})
    tree, from_template = remap.strict_merge(
        {("a", "w"): produced["a", "w"]}, template, template_heads={"b"}
    )
    assert from_template == ("b/w",)


def test_flatten_and_unflatten_round_trip():
    params = jax.tree.map(np.asarray, init_params(TEACHER))
    flat = remap.flatten(params)
    assert ("bert", "encoder", "layer_1", "output", "dense", "kernel") in flat
    np.testing.assert_equal(remap.unflatten(flat), params)
