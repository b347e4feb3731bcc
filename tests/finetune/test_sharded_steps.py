"""One fine-tuning train step on a device mesh equals the same step on one device.

Every fine-tuning strategy (and the Dynamic KD variants that select rows, rank
instances or use hidden states) runs one jitted ``train_step`` with a tiny
`BertClassifier` student and a two-member `TeacherEnsemble` teacher, on one device
and on meshes of the 8 fake CPU devices; loss, metrics, updated parameters (and
RL-KD's policy state) must agree. Batch statistics (ranks, selections, baselines)
computed per shard instead of over the global batch would break this.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from dwt_jax import sharding, steps
from dwt_jax.distill import FINETUNE_STRATEGIES, make_strategy
from dwt_jax.models.bert import BertClassifier
from dwt_jax.models.config import BertConfig
from dwt_jax.models.ensemble import TeacherEnsemble
from dwt_jax.state import create_train_state, dummy_model_inputs

B, L, V, C = 16, 16, 64, 3
LR = 0.1
SINGLE, DATA8, MIXED = (1, 1, 1), (8, 1, 1), (2, 2, 2)
# XLA:CPU compiles about 5x faster with these (compiling dominates this file's run
# time); every mesh uses the same options.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def _config(hidden: int, layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        mlp_dim=2 * hidden,
        max_len=L,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        initializer_range=0.3,
        num_labels=C,
    )


STUDENT = _config(16, 1)
MEMBERS = (_config(32, 1), _config(16, 1))  # Different widths: member 1 has a projection.

# name → (strategy, its sub-config).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "task": ("task", {}),
    "mt_bert": ("mt_bert", {"tau": 2.0}),
    "rl_kd": ("rl_kd", {"policy_learning_rate": 0.05}),
    "dynamic_kd": ("dynamic_kd", {}),
    "dynamic_kd-entropy": ("dynamic_kd", {"selection": "entropy", "ratio": 0.25}),
    "dynamic_kd-hard": ("dynamic_kd", {"adoption": "hard"}),
    "dynamic_kd-adaptive": ("dynamic_kd", {"objective": "adaptive"}),
    "ca_mkd": ("ca_mkd", {}),
    "avg_teachers": ("avg_teachers", {}),
    "random_teacher": ("random_teacher", {}),
    "fixed_weights": ("fixed_weights", {"weights": (0.3, 0.7)}),
    "best_teacher": ("best_teacher", {}),
}
MIXED_CASES = ("mt_bert", "rl_kd", "dynamic_kd-entropy")
RL_BASELINE = -0.5


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    config = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)))
    return sharding.make_mesh(config, jax.devices()[: int(np.prod(shape))])


def _random_like(shapes: Any, seed: int) -> Any:
    """NumPy values for a tree of shapes (no compiled initialiser: compiles are slow here)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=x.shape)).astype(x.dtype)
        return (0.3 * rng.normal(size=x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, L + 1, size=B)
    real = np.arange(L)[None, :] < lengths[:, None]
    return {
        "input_ids": np.where(real, rng.integers(1, V, (B, L)), 0).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, np.arange(L), 0).astype(np.int32),
        "token_type_ids": (real & (np.arange(L) >= 4)).astype(np.int32),
        "labels": rng.integers(0, C, size=B).astype(np.int32),
        "example_weights": np.ones(B, np.float32),
    }


def _boxed_params(model: nn.Module) -> Any:
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), **dummy_model_inputs(L, 1), deterministic=True)[
            "params"
        ]
    )


@functools.cache
def _teacher() -> tuple[TeacherEnsemble, Any]:
    """The teacher ensemble and its (NumPy) parameters, shared by every test."""
    model = TeacherEnsemble(MEMBERS, C)
    return model, _random_like(nn.meta.unbox(_boxed_params(model)), seed=1)


def _strategy(case: str):
    name, section = CASES.get(case, (case, {}))
    return make_strategy(ml_collections.ConfigDict({"strategy": name, name: section}))


def _host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


@functools.cache
def _initial_state(case: str, student_kind: str) -> Any:
    """The step's input state as NumPy, the same for every mesh.

    Built from the abstract state (no compiled initialiser: compiles are slow on
    these CPUs): random parameters of a useful scale (the student's predictions
    spread enough for ranks and selections to be well separated), a random RL
    policy, and zeros elsewhere (SGD has no state; Adam's moments and the
    baseline start at zero). RL-KD starts past its first update (baseline −0.5), so
    the advantage is not zero and its policy really moves in this one step.
    """
    model, strategy, teacher_configs = _models(case, student_kind)
    _, abstract, _ = create_train_state(
        seed=0,
        model=model,
        optimizer=optax.sgd(LR),
        strategy=strategy,
        model_inputs=dummy_model_inputs(L, 1),
        mesh=_mesh(SINGLE),
        teacher_configs=teacher_configs,
    )
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    strategy_state = dict(state.strategy_state)
    if "policy" in strategy_state:
        strategy_state["policy"] = _random_like(strategy_state["policy"], seed=3)
        strategy_state["baseline"] = np.float32(RL_BASELINE)
        strategy_state["baseline_count"] = np.int32(1)
    return state.replace(
        params=_random_like(state.params, seed=2),
        rng=np.asarray(jax.random.PRNGKey(0)),
        strategy_state=strategy_state,
    )


def _models(case: str, student_kind: str):
    strategy = _strategy(case)
    if student_kind == "ensemble":
        return TeacherEnsemble(MEMBERS, C), strategy, ()
    return BertClassifier(STUDENT), strategy, MEMBERS


@functools.cache
def _run_step(
    case: str,
    mesh_shape: tuple[int, int, int],
    student_kind: str,
    teacher_sharding: str = "student",
):
    """(state before, state after, metrics), as NumPy, of one jitted step on the mesh
    (the teacher laid out by ``teacher_sharding``)."""
    model, strategy, teacher_configs = _models(case, student_kind)
    mesh = _mesh(mesh_shape)
    optimizer = optax.sgd(LR)
    _, _, state_shardings = create_train_state(
        seed=0,
        model=model,
        optimizer=optimizer,
        strategy=strategy,
        model_inputs=dummy_model_inputs(L, 1),
        mesh=mesh,
        teacher_configs=teacher_configs,
    )
    initial = _initial_state(case, student_kind)
    state = jax.device_put(initial, state_shardings)
    batch = sharding.shard_batch(_batch(), mesh)
    teacher_models, teacher_params, teacher_shardings = [], [], []
    if student_kind == "classifier" and strategy.num_teachers[0] > 0:
        t_model, t_params = _teacher()
        rules = sharding.teacher_rules(teacher_sharding)
        _, t_shardings = sharding.abstract_on_mesh(_boxed_params(t_model), mesh, rules)
        teacher_models, teacher_shardings = [t_model], [t_shardings]
        teacher_params = [jax.device_put(t_params, t_shardings)]
    step = steps.make_train_step(
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        schedule=optax.constant_schedule(LR),
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=sharding.batch_shardings(batch, mesh),
        teacher_models=teacher_models,
        teacher_shardings=teacher_shardings,
        teacher_rules=[sharding.teacher_rules(teacher_sharding)] * len(teacher_models),
    )
    with sharding.activate(mesh):
        # The step exactly as `make_train_step` compiles it (shardings, donation), but
        # with cheaper XLA options.
        compiled = step.jitted.lower(state, batch, tuple(teacher_params)).compile(FAST_COMPILE)
        new_state, metrics = compiled(state, batch, tuple(teacher_params))
    return initial, _host(new_state), _host(metrics)


def _assert_same_step(
    case: str, mesh_shape, student_kind: str = "classifier", teacher_sharding: str = "student"
) -> None:
    before, single, single_metrics = _run_step(case, SINGLE, student_kind)
    _, sharded, sharded_metrics = _run_step(case, mesh_shape, student_kind, teacher_sharding)
    assert set(sharded_metrics) == set(single_metrics)
    for name, value in single_metrics.items():
        np.testing.assert_allclose(sharded_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(sharded.step) == int(single.step) == 1

    # The update itself (new − old) must agree, not only the (much larger) parameters.
    # Gradients that are zero in exact arithmetic (e.g. the attention key bias) are
    # rounding noise in both runs: the tolerance is relative to the largest update.
    updates = jax.tree.map(np.subtract, single.params, before.params)
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(updates))
    assert scale > 0  # The step did something: the student moved.

    def same_update(path, old, update, new_single, new_sharded):
        np.testing.assert_allclose(
            new_sharded - old, update, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path)
        )
        np.testing.assert_allclose(new_sharded, new_single, rtol=1e-5, atol=1e-7)

    jax.tree_util.tree_map_with_path(
        same_update, before.params, updates, single.params, sharded.params
    )
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            b, a, rtol=1e-5, atol=1e-7, err_msg=str(path)
        ),
        single.strategy_state,
        sharded.strategy_state,
    )


def test_every_finetune_strategy_is_covered() -> None:
    covered = {name for name, _ in CASES.values()}
    assert covered == set(FINETUNE_STRATEGIES) - {"cofinetune"}


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_step_matches_single_device(case: str) -> None:
    _assert_same_step(case, DATA8)


@pytest.mark.parametrize("case", MIXED_CASES)
def test_data_fsdp_tensor_step_matches_single_device(case: str) -> None:
    _assert_same_step(case, MIXED)


def test_replicated_teacher_step_matches_single_device() -> None:
    """The co-finetuned teachers whole on every device (teacher.sharding='replicated')
    while the student is FSDP + tensor sharded: the same step."""
    _assert_same_step("mt_bert", MIXED, teacher_sharding="replicated")


def test_rl_kd_policy_moves_and_matches() -> None:
    before, single, metrics = _run_step("rl_kd", SINGLE, "classifier")
    _, sharded, _ = _run_step("rl_kd", DATA8, "classifier")
    policy_before = before.strategy_state["policy"]
    assert np.max(np.abs(single.strategy_state["policy"]["kernel"] - policy_before["kernel"])) > 0
    np.testing.assert_allclose(metrics["rl/advantage"], metrics["rl/reward"] - RL_BASELINE)
    # The moving-average baseline: 0.9·b + 0.1·R.
    np.testing.assert_allclose(
        single.strategy_state["baseline"], 0.9 * RL_BASELINE + 0.1 * metrics["rl/reward"], rtol=1e-6
    )
    assert int(single.strategy_state["baseline_count"]) == 2
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            sharded.strategy_state["policy"][name],
            single.strategy_state["policy"][name],
            rtol=1e-5,
            atol=1e-7,
        )


def test_dynamic_kd_selection_distills_a_quarter() -> None:
    _, _, metrics = _run_step("dynamic_kd-entropy", SINGLE, "classifier")
    np.testing.assert_allclose(metrics["kd/distilled_fraction"], 0.25)


@pytest.mark.parametrize("mesh_shape", [DATA8, MIXED])
def test_cofinetune_ensemble_step_matches_single_device(mesh_shape) -> None:
    _assert_same_step("cofinetune", mesh_shape, student_kind="ensemble")
