"""Sharding: a DWT step on data / FSDP / tensor meshes computes what one device does;
the layout of every parameter is pinned by a golden file; teachers' own layouts.

Regenerate the golden file after a deliberate change of the rules or the model with
``DWT_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding.py``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from dwt_step_helpers import build_dwt_step, fewer_xla_passes, run_steps
from flax import traverse_util
from testutil import REPO_ROOT, load_config

from dwt_jax import sharding
from dwt_jax import teachers as teachers_lib
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig

GOLDEN = os.path.join(REPO_ROOT, "tests", "golden", "partition_specs_base.json")


@pytest.fixture(scope="module", autouse=True)
def _fast_compilation():
    with fewer_xla_passes():
        yield


@pytest.fixture(scope="module")
def single_device():
    return run_steps(build_dwt_step(jax.devices()[:1], (1, 1, 1)))


def _assert_same(result, reference):
    params, history = result
    ref_params, ref_history = reference
    for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
        for name in ("train/loss", "distill/kl", "distill/hidden", "grads/global_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=f"{name}@{step}")
    flat, ref_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(ref_params)
    assert flat.keys() == ref_flat.keys()
    for path, value in flat.items():
        np.testing.assert_allclose(value, ref_flat[path], rtol=1e-4, atol=2e-6, err_msg=str(path))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_dwt_step_matches_single_device(single_device, mesh_shape):
    """Two DWT updates (dropout on, hidden-state term through adapters, a teacher of
    another width) give the single-device loss, metrics and parameters."""
    built = build_dwt_step(jax.devices(), mesh_shape)
    _assert_same(run_steps(built), single_device)
    assert built.step.jitted._cache_size() == 1  # No recompile on the second step.


@pytest.mark.parametrize("teacher_sharding", ["replicated", "no_fsdp"])
def test_teacher_layouts_compute_the_same_step(single_device, teacher_sharding):
    built = build_dwt_step(jax.devices(), (2, 2, 2), teacher_sharding=teacher_sharding)
    (teacher,) = built.teacher_params
    old_embedding = built.state.params["student"]["bert"]["embeddings"]["word_embeddings"]
    layer = teacher["bert"]["encoder"]["layer_0"]
    query_spec = tuple(layer["attention"]["self"]["query"]["kernel"].sharding.spec)
    if teacher_sharding == "replicated":
        assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(teacher)), (
            "a replicated teacher keeps every weight whole on every device"
        )
    else:
        assert "fsdp" not in query_spec and "tensor" in query_spec
    _assert_same(run_steps(built), single_device)
    # The old state was donated to the step: its buffers were reused, not copied.
    assert old_embedding["embedding"].is_deleted()


def _base_layouts() -> dict[str, str]:
    """Parameter path → mesh PartitionSpec of configs/base.py's student and teacher,
    under the student's rules and each teacher layout."""
    config = load_config(None, name="base")
    layouts: dict[str, str] = {}
    models = {"student": config.model, "teacher": config.teacher.model}
    for role, model_config in models.items():
        boxed = teachers_lib.boxed_params(make_model(BertConfig.from_config(model_config)))
        rule_sets = {"student": sharding.LOGICAL_AXIS_RULES}
        if role == "teacher":
            rule_sets = {f"teacher.sharding={k}": v for k, v in sharding.TEACHER_RULES.items()}
        for rules_name, rules in rule_sets.items():
            specs = traverse_util.flatten_dict(sharding.partition_specs(boxed, rules), sep="/")
            for path, spec in sorted(specs.items()):
                layouts[f"{rules_name} {path}"] = str(tuple(spec))
    return layouts


def test_partition_specs_match_the_golden_file():
    layouts = _base_layouts()
    if os.environ.get("DWT_JAX_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(layouts, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    changed = {k: (golden.get(k), v) for k, v in layouts.items() if golden.get(k) != v}
    missing = sorted(set(golden) - set(layouts))
    assert not changed and not missing, (
        f"layouts changed (golden, now): {changed}; gone: {missing}. If deliberate, rerun "
        "with DWT_JAX_UPDATE_GOLDEN=1."
    )
    # Spot checks that keep the golden file honest.
    query = "student bert/encoder/layer_0/attention/self/query/kernel"
    assert layouts[query] == "('fsdp', 'tensor', None)"
    word = "student bert/embeddings/word_embeddings/embedding"
    assert layouts[word] == "('tensor', 'fsdp')"
    replicated = [v for k, v in layouts.items() if k.startswith("teacher.sharding=replicated")]
    assert replicated and all(set(eval(v)) <= {None} for v in replicated)


def test_to_host_and_put_on_mesh_round_trip():
    mesh = sharding.make_mesh(load_config("smoke").mesh)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None)
    shardings = {"a": jax.sharding.NamedSharding(mesh, spec), "b": sharding.replicated(mesh)}
    tree = {"a": np.arange(32.0).reshape(8, 4), "b": np.ones(3, np.int32)}
    placed = sharding.put_on_mesh(tree, shardings)
    assert placed["a"].sharding == shardings["a"]
    back = sharding.to_host(placed)
    np.testing.assert_array_equal(back["a"], tree["a"])
    np.testing.assert_array_equal(back["b"], tree["b"])


def test_unknown_teacher_layout_is_named():
    with pytest.raises(ValueError, match=r"teacher\.sharding=.zero3. is unknown"):
        sharding.teacher_rules("zero3")


@pytest.mark.parametrize(
    ("mesh_shape", "ok"),
    [((2, 1, 4), True), ((1, 2, 4), True), ((4, 2, 1), True), ((1, 1, 8), False)],
)
def test_batch_layout_across_two_hosts(mesh_shape, ok):
    """8 devices as 2 pretend hosts of 4 (ids 0-3, 4-7): each host reads half the
    batch, so the batch axes must span the hosts; tensor parallelism across hosts
    would give each host every row."""
    config = load_config("smoke").mesh
    config.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config)
    host_of = lambda device: device.id // 4
    counts = sharding.batch_rows_per_process(mesh, 16, host_of)
    assert sum(counts.values()) == (16 if ok else 32)
    if ok:
        sharding.check_batch_layout(mesh, 16, host_of)
    else:
        with pytest.raises(ValueError, match=r"keep mesh\.tensor within one host"):
            sharding.check_batch_layout(mesh, 16, host_of)
