"""Fine-tuning multi-teacher strategies against independent NumPy computations.

Covers the weighted-KD family (mt_bert with its hidden loss, ca_mkd, avg_teachers,
random_teacher, fixed_weights, best_teacher), dynamic_kd (selection, adoption,
objective adaptation) and rl_kd (loss, actions, warm-up, policy update, baseline),
plus the config errors. Strategies are built with ``make_strategy`` and fed fixed
random outputs; the teachers come from a fake ``run`` that returns precomputed
outputs for the requested rows and records how many rows it was asked for.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dwt_jax.distill import StepContext, Teachers, make_strategy, weighting
from dwt_jax.models.config import BertConfig

TOL = {"rtol": 1e-5, "atol": 1e-6}


# --- Helpers -------------------------------------------------------------------------


def strategy_of(name: str, **section: Any):
    return make_strategy(ml_collections.ConfigDict({"strategy": name, name: section}))


class FakeRun:
    """A teachers' ``run``: precomputed outputs of the requested rows, calls recorded."""

    def __init__(self, outputs: list[dict[str, Any]]) -> None:
        self.outputs = outputs
        self.row_counts: list[int] = []
        self.rows: list[np.ndarray] = []

    def __call__(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        rows = batch["row_index"]
        self.row_counts.append(int(rows.shape[0]))
        if not isinstance(rows, jax.core.Tracer):  # Concrete when the loss runs eagerly.
            self.rows.append(np.asarray(rows))
        return [jax.tree.map(lambda v: jnp.asarray(v)[rows], out) for out in self.outputs]


def teachers_of(outputs, batch, sizes=None) -> tuple[Teachers, FakeRun]:
    run = FakeRun(outputs)
    sizes = sizes if sizes is not None else [100 * (k + 1) for k in range(len(outputs))]
    return Teachers(run, batch, sizes), run


def make_batch(labels, weights=None, seq_len=6, seed=0) -> dict[str, np.ndarray]:
    labels = np.asarray(labels, np.int32)
    size = labels.shape[0]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, seq_len + 1, size=size)
    return {
        "segment_ids": (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32),
        "labels": labels,
        "example_weights": (
            np.ones(size, np.float32) if weights is None else np.asarray(weights, np.float32)
        ),
        "row_index": np.arange(size, dtype=np.int32),
    }


def tiny_config(hidden: int, layers: int, num_labels: int = 3) -> BertConfig:
    return BertConfig(
        vocab_size=32,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=2,
        mlp_dim=2 * hidden,
        max_len=8,
        num_labels=num_labels,
    )


def random_like(tree: Any, seed: int, scale: float = 0.5) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (scale * rng.normal(size=np.shape(x))).astype(np.float32), nn.meta.unbox(tree)
    )


# --- NumPy references ------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_ce(logits, labels):
    return -np.take_along_axis(np_log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]


def np_entropy(logits):
    p = np_softmax(logits)
    return -(p * np.log(p)).sum(-1)


def np_kd(student, teacher, kind, tau):
    """Per-instance KD [B]: τ²·KL, τ²·soft CE, or the mean squared logit difference."""
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    if kind == "mse":
        return ((student - teacher) ** 2).mean(-1)
    log_ps, log_pt = np_log_softmax(student / tau), np_log_softmax(teacher / tau)
    pt = np.exp(log_pt)
    if kind == "kl":
        return tau**2 * (pt * (log_pt - log_ps)).sum(-1)
    return tau**2 * -(pt * log_ps).sum(-1)


def np_wmean(values, weights):
    return float((values * weights).sum() / weights.sum())


def np_weighted_kd_loss(student, teachers, batch, W, kind, tau, kd_weight=1.0):
    """task CE + kd_weight · mean_j Σ_k W_kj·KD_kj over the real instances."""
    m = batch["example_weights"].astype(np.float64)
    task = np_wmean(np_ce(student, batch["labels"]), m)
    kd = np.stack([np_kd(student, t, kind, tau) for t in teachers])
    return task + kd_weight * np_wmean((W * kd).sum(0), m)


# --- Weighted KD family ----------------------------------------------------------------

K, B, C = 3, 8, 4


@pytest.fixture(scope="module")
def weighted_case():
    rng = np.random.default_rng(0)
    student = (rng.normal(size=(B, C)) * 2).astype(np.float32)
    teachers = (rng.normal(size=(K, B, C)) * 2).astype(np.float32)
    # Teacher 2 is right (and confident) on the first half: the weights then differ.
    labels = rng.integers(0, C, size=B).astype(np.int32)
    teachers[2, np.arange(4), labels[:4]] += 6.0
    batch = make_batch(labels, weights=[1, 1, 1, 1, 1, 1, 1, 0])  # The last row is padding.
    return student, teachers, batch


def weighted_loss(strategy, weighted_case, rng=None):
    student, teachers, batch = weighted_case
    t, run = teachers_of([{"logits": x} for x in teachers], batch)
    loss, metrics, new_state = strategy.loss(
        {"logits": student}, t, batch, StepContext(step=jnp.int32(0), state={}, rng=rng)
    )
    assert run.row_counts == [B]  # Every teacher on the whole batch, once.
    assert new_state == {}
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _teacher_ce(weighted_case):
    _, teachers, batch = weighted_case
    return np.stack([np_ce(t, batch["labels"]) for t in teachers])


def _mt_bert_weights(ce):
    return 1.0 / (1.0 + ce)


def _ca_mkd_weights(ce):
    e = np.exp(ce - ce.max(0))
    return (1.0 - e / e.sum(0)) / (ce.shape[0] - 1)


def _avg_weights(ce):
    return np.full_like(ce, 1.0 / ce.shape[0])


def _fixed_weights(ce):
    w = np.array([1.0, 3.0, 0.0]) / 4.0
    return np.broadcast_to(w[:, None], ce.shape)


def _best_weights(ce):
    return (np.arange(ce.shape[0])[:, None] == ce.argmin(0)[None, :]).astype(np.float64)


@pytest.mark.parametrize(
    ("name", "section", "weights_fn", "kind", "tau"),
    [
        ("mt_bert", {"hidden_weight": 0.0}, _mt_bert_weights, "ce", 1.0),
        (
            "mt_bert",
            {"hidden_weight": 0.0, "tau": 2.0, "kd_weight": 0.5},
            _mt_bert_weights,
            "ce",
            2.0,
        ),
        ("ca_mkd", {}, _ca_mkd_weights, "kl", 4.0),
        ("ca_mkd", {"tau": 2.0}, _ca_mkd_weights, "kl", 2.0),
        ("avg_teachers", {}, _avg_weights, "kl", 1.0),
        ("avg_teachers", {"kd": "mse", "kd_weight": 2.0}, _avg_weights, "mse", 1.0),
        ("fixed_weights", {"weights": (1.0, 3.0, 0.0)}, _fixed_weights, "kl", 1.0),
        ("best_teacher", {"tau": 3.0}, _best_weights, "kl", 3.0),
    ],
)
def test_weighted_strategies_match_numpy(weighted_case, name, section, weights_fn, kind, tau):
    student, teachers, batch = weighted_case
    loss, metrics = weighted_loss(strategy_of(name, **section), weighted_case)
    W = weights_fn(_teacher_ce(weighted_case))
    kd_weight = section.get("kd_weight", 1.0)
    expected = np_weighted_kd_loss(student, teachers, batch, W, kind, tau, kd_weight)
    np.testing.assert_allclose(loss, expected, **TOL)
    m = batch["example_weights"]
    np.testing.assert_allclose(
        metrics["train/task_loss"], np_wmean(np_ce(student, batch["labels"]), m), **TOL
    )
    for k in range(K):
        np.testing.assert_allclose(metrics[f"kd/weight_teacher{k}"], np_wmean(W[k], m), **TOL)


def test_weights_favour_the_better_teacher(weighted_case):
    """Teacher 2 is right on half the batch: every CE-based weighting prefers it there."""
    ce = _teacher_ce(weighted_case)
    for fn in (_mt_bert_weights, _ca_mkd_weights, _best_weights):
        W = fn(ce)
        assert np.all(W[2, :4] >= W[0, :4]) and np.all(W[2, :4] >= W[1, :4]), fn.__name__
    # And the strategies report it (mean weights over the batch).
    _, metrics = weighted_loss(strategy_of("best_teacher"), weighted_case)
    assert metrics["kd/weight_teacher2"] >= 4 / 7 - 1e-6


def test_random_teacher_uses_one_teacher_for_the_whole_batch(weighted_case):
    student, teachers, batch = weighted_case
    strategy = strategy_of("random_teacher")
    single = []
    for k in range(K):
        W = np.zeros((K, B))
        W[k] = 1.0
        single.append(np_weighted_kd_loss(student, teachers, batch, W, "kl", 1.0))
    chosen = set()
    for seed in range(12):
        loss, metrics = weighted_loss(strategy, weighted_case, rng=jax.random.PRNGKey(seed))
        weights = np.array([metrics[f"kd/weight_teacher{k}"] for k in range(K)])
        k = int(np.argmax(weights))
        np.testing.assert_allclose(weights, np.eye(K)[k], atol=1e-6)  # One-hot for the batch.
        np.testing.assert_allclose(loss, single[k], **TOL)
        chosen.add(k)
    assert len(chosen) > 1  # The draw changes with the key.
    with pytest.raises(ValueError, match="rng"):
        weighted_loss(strategy, weighted_case, rng=None)


def test_fixed_weights_need_one_per_teacher(weighted_case):
    with pytest.raises(ValueError, match=re.escape("distill.fixed_weights.weights has 2")):
        weighted_loss(strategy_of("fixed_weights", weights=(1.0, 2.0)), weighted_case)


def test_mt_bert_hidden_loss_through_adapters_matches_numpy(weighted_case):
    student_logits, teachers, batch = weighted_case
    student_cfg = tiny_config(8, 2)
    teacher_cfgs = [tiny_config(12, 4), tiny_config(6, 1), tiny_config(8, 2)]
    strategy = strategy_of("mt_bert", hidden_weight=0.5)
    assert strategy.student_output_kwargs == {"output_hidden_states": True}
    assert strategy.teacher_output_kwargs == {"output_hidden_states": True}
    boxed = strategy.init_adapters(jax.random.PRNGKey(0), student_cfg, teacher_cfgs)
    # One projection D_s → D_k per matched layer pair (embeddings included) and teacher.
    for k, cfg in enumerate(teacher_cfgs):
        projections = nn.meta.unbox(boxed)["hidden"][f"teacher{k}"]
        assert set(projections) == {f"proj_{j}" for j in range(student_cfg.num_layers + 1)}
        assert projections["proj_0"]["kernel"].shape == (8, cfg.hidden_size)
    adapters = random_like(boxed, seed=5)

    seq_len = batch["segment_ids"].shape[1]

    def hidden(cfg, seed):
        r = np.random.default_rng(seed)
        return tuple(
            r.normal(size=(B, seq_len, cfg.hidden_size)).astype(np.float32)
            for _ in range(cfg.num_layers + 1)
        )

    student_hs = hidden(student_cfg, 10)
    teacher_hs = [hidden(cfg, 20 + k) for k, cfg in enumerate(teacher_cfgs)]
    outputs = [
        {"logits": t, "hidden_states": hs} for t, hs in zip(teachers, teacher_hs, strict=True)
    ]
    t, _ = teachers_of(outputs, batch)
    loss, metrics, _ = strategy.loss(
        {"logits": student_logits, "hidden_states": student_hs},
        t,
        batch,
        StepContext(step=jnp.int32(0), state={}, adapters=adapters),
    )

    mask = batch["segment_ids"].astype(np.float64) * batch["example_weights"][:, None]
    total = 0.0
    for k, cfg in enumerate(teacher_cfgs):
        L_s, L_t = student_cfg.num_layers, cfg.num_layers
        terms = []
        for i in range(L_s + 1):
            j = math.ceil(i * L_t / L_s)  # Student layer i ↔ teacher layer ⌈i·L_t/L_s⌉.
            proj = adapters["hidden"][f"teacher{k}"][f"proj_{i}"]
            projected = student_hs[i].astype(np.float64) @ proj["kernel"] + proj["bias"]
            per_token = ((projected - teacher_hs[k][j]) ** 2).mean(-1)
            terms.append((per_token * mask).sum() / mask.sum())
        np.testing.assert_allclose(metrics[f"kd/hidden_teacher{k}"], np.mean(terms), **TOL)
        total += np.mean(terms)
    np.testing.assert_allclose(metrics["kd/hidden"], total, **TOL)
    W = _mt_bert_weights(_teacher_ce(weighted_case))
    expected = np_weighted_kd_loss(student_logits, teachers, batch, W, "ce", 1.0) + 0.5 * total
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_mt_bert_without_hidden_loss_has_no_adapters():
    strategy = strategy_of("mt_bert", hidden_weight=0.0)
    assert (
        strategy.init_adapters(jax.random.PRNGKey(0), tiny_config(8, 2), [tiny_config(8, 2)]) == {}
    )
    assert dict(strategy.student_output_kwargs) == {}


# --- Dynamic KD ------------------------------------------------------------------------

DB, DC = 16, 3
LARGE, SMALL = 0, 1
SIZES = (1000, 10)  # Teacher 0 is the large one.


@pytest.fixture(scope="module")
def dynamic_case():
    rng = np.random.default_rng(3)
    # Rows of very different confidence, so that every ranking is well separated.
    scales = np.linspace(0.2, 4.0, DB)[rng.permutation(DB)]
    student = (rng.normal(size=(DB, DC)) * scales[:, None]).astype(np.float32)
    # Row 0 is padding and the most uncertain row (uniform logits): never selected.
    student[0] = 0.0
    teachers = (rng.normal(size=(2, DB, DC)) * 2).astype(np.float32)
    labels = rng.integers(0, DC, size=DB).astype(np.int32)
    weights = np.ones(DB, np.float32)
    weights[0] = 0.0
    return student, teachers, make_batch(labels, weights=weights, seed=1)


def np_uncertainty(logits):
    return np.clip(np_entropy(logits) / np.log(logits.shape[-1]), 0.0, 1.0)


def np_soft_instance(u):
    """Two teachers: W_small = u, W_large = 1 − u."""
    W = np.zeros((2, len(u)))
    W[SMALL], W[LARGE] = u, 1.0 - u
    return W


def np_selection_scores(student, labels, criterion, rng):
    p = np_softmax(student)
    if criterion == "entropy":
        return np_entropy(student)
    if criterion == "margin":
        top = np.sort(p, -1)
        return -(top[:, -1] - top[:, -2])
    if criterion == "least_confidence":
        return 1.0 - p.max(-1)
    if criterion == "kl_to_label":
        return np_ce(student, labels)
    return np.asarray(jax.random.uniform(rng, (len(labels),), jnp.float32), np.float64)


def dynamic_loss(strategy, case, rng=None, sizes=SIZES):
    student, teachers, batch = case
    t, run = teachers_of([{"logits": x} for x in teachers], batch, sizes)
    loss, metrics, _ = strategy.loss(
        {"logits": student}, t, batch, StepContext(step=jnp.int32(0), state={}, rng=rng)
    )
    return float(loss), {k: float(v) for k, v in metrics.items()}, run


def _task(case):
    student, _, batch = case
    return np_wmean(np_ce(student, batch["labels"]), batch["example_weights"].astype(np.float64))


def test_dynamic_kd_defaults_soft_instance_mse_on_the_whole_batch(dynamic_case):
    student, teachers, batch = dynamic_case
    strategy = strategy_of("dynamic_kd")
    assert strategy.teacher_forward == "full"
    loss, metrics, run = dynamic_loss(strategy, dynamic_case)
    assert run.row_counts == [DB]
    u = np_uncertainty(student)
    W = np_soft_instance(u)
    kd = (W * np.stack([np_kd(student, t, "mse", 1.0) for t in teachers])).sum(0)
    np.testing.assert_allclose(
        loss, _task(dynamic_case) + np_wmean(kd, batch["example_weights"]), **TOL
    )
    np.testing.assert_allclose(metrics["kd/distilled_fraction"], 1.0)


def test_dynamic_kd_kl_option_uses_tau_5(dynamic_case):
    student, teachers, batch = dynamic_case
    loss, _, _ = dynamic_loss(strategy_of("dynamic_kd", kd="kl", kd_weight=0.3), dynamic_case)
    W = np_soft_instance(np_uncertainty(student))
    kd = (W * np.stack([np_kd(student, t, "kl", 5.0) for t in teachers])).sum(0)
    np.testing.assert_allclose(
        loss, _task(dynamic_case) + 0.3 * np_wmean(kd, batch["example_weights"]), **TOL
    )


@pytest.mark.parametrize(
    "criterion", ["entropy", "margin", "least_confidence", "kl_to_label", "random"]
)
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_dynamic_kd_selection_runs_teachers_once_on_the_selected_rows(
    dynamic_case, criterion, kind
):
    student, teachers, batch = dynamic_case
    strategy = strategy_of("dynamic_kd", selection=criterion, ratio=0.3, kd=kind)
    assert strategy.teacher_forward == "lazy"
    rng = jax.random.PRNGKey(7)
    loss, metrics, run = dynamic_loss(strategy, dynamic_case, rng=rng)
    count = math.floor(DB * 0.3)  # ⌊B·r⌋ = 4
    # The teachers ran exactly once, on ⌊B·r⌋ rows only (never on the whole batch).
    assert run.row_counts == [count]
    scores = np_selection_scores(student, batch["labels"], criterion, rng)
    scores[batch["example_weights"] == 0] = -np.inf  # Padding is never selected.
    expected_rows = np.argsort(-scores, kind="stable")[:count]
    assert sorted(run.rows[0].tolist()) == sorted(expected_rows.tolist())
    assert 0 not in run.rows[0]
    # CE on the whole batch + the mean over the selected rows of Σ_k W·KD.
    rows = run.rows[0]
    u = np_uncertainty(student)[rows]
    tau = 5.0 if kind == "kl" else 1.0
    kd = np.stack([np_kd(student[rows], t[rows], kind, tau) for t in teachers])
    expected = _task(dynamic_case) + (np_soft_instance(u) * kd).sum(0).mean()
    np.testing.assert_allclose(loss, expected, **TOL)
    np.testing.assert_allclose(metrics["kd/distilled_fraction"], count / DB)


def test_dynamic_kd_selection_in_jit_keeps_a_static_subset(dynamic_case):
    student, teachers, batch = dynamic_case
    strategy = strategy_of("dynamic_kd", selection="entropy", ratio=0.25)
    run = FakeRun([{"logits": t} for t in teachers])

    @jax.jit
    def loss_fn(student, batch):
        return strategy.loss(
            {"logits": student},
            Teachers(run, batch, SIZES),
            batch,
            StepContext(step=jnp.int32(0), state={}),
        )[0]

    eager, _, _ = dynamic_loss(strategy, dynamic_case)
    np.testing.assert_allclose(float(loss_fn(student, batch)), eager, **TOL)
    assert run.row_counts == [DB // 4]  # Traced once, with a static subset of 4 rows.


def test_dynamic_kd_adoption_sends_uncertain_instances_to_the_smaller_teacher(dynamic_case):
    _, teachers, batch = dynamic_case
    uncertain = np.zeros((DB, DC), np.float32) + np.linspace(0, 0.1, DC, dtype=np.float32)
    confident = np.zeros((DB, DC), np.float32)
    confident[np.arange(DB), batch["labels"]] = 12.0
    for mode in ("soft_instance", "soft"):
        strategy = strategy_of("dynamic_kd", adoption=mode)
        # The sizes decide which teacher is the small one (here given in either order).
        for sizes, small in ((SIZES, SMALL), (SIZES[::-1], LARGE)):
            big = 1 - small
            _, m_unc, _ = dynamic_loss(strategy, (uncertain, teachers, batch), sizes=sizes)
            _, m_conf, _ = dynamic_loss(strategy, (confident, teachers, batch), sizes=sizes)
            assert m_unc[f"kd/weight_teacher{small}"] > 0.9, (mode, sizes)
            assert m_conf[f"kd/weight_teacher{big}"] > 0.9, (mode, sizes)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_dynamic_kd_hard_and_soft_adoption_match_numpy(dynamic_case, mode):
    student, teachers, batch = dynamic_case
    loss, _, _ = dynamic_loss(strategy_of("dynamic_kd", adoption=mode), dynamic_case)
    u = np_uncertainty(student)
    W = np.zeros((2, DB))
    if mode == "hard":
        # The more uncertain half (⌈B/2⌉) learns from the small teacher.
        order = np.argsort(-u, kind="stable")
        W[SMALL, order[: (DB + 1) // 2]] = 1.0
        W[LARGE, order[(DB + 1) // 2 :]] = 1.0
    else:
        W[SMALL], W[LARGE] = u.mean(), 1.0 - u.mean()
    kd = (W * np.stack([np_kd(student, t, "mse", 1.0) for t in teachers])).sum(0)
    np.testing.assert_allclose(
        loss, _task(dynamic_case) + np_wmean(kd, batch["example_weights"]), **TOL
    )


@pytest.mark.parametrize("selection", ["none", "entropy"])
def test_dynamic_kd_adaptive_objective_matches_numpy(dynamic_case, selection):
    student, teachers, batch = dynamic_case
    batch = dict(batch, example_weights=np.ones(DB, np.float32))  # No padding here.
    case = (student, teachers, batch)
    student_cfg = tiny_config(8, 2, DC)
    teacher_cfgs = [tiny_config(12, 3, DC), tiny_config(6, 1, DC)]
    strategy = strategy_of("dynamic_kd", objective="adaptive", selection=selection, ratio=0.5)
    assert strategy.student_output_kwargs == {"output_hidden_states": True}
    assert strategy.teacher_output_kwargs == {"output_hidden_states": True}
    boxed = strategy.init_adapters(jax.random.PRNGKey(0), student_cfg, teacher_cfgs)
    adapters = random_like(boxed, seed=6)
    for k, cfg in enumerate(teacher_cfgs):
        kernel = adapters["rep"][f"teacher{k}"]["proj_0"]["kernel"]
        assert kernel.shape == (student_cfg.hidden_size, cfg.hidden_size)

    def hidden(cfg, seed):
        r = np.random.default_rng(seed)
        return tuple(
            r.normal(size=(DB, 5, cfg.hidden_size)).astype(np.float32)
            for _ in range(cfg.num_layers + 1)
        )

    student_hs = hidden(student_cfg, 30)
    teacher_hs = [hidden(cfg, 40 + k) for k, cfg in enumerate(teacher_cfgs)]
    t, run = teachers_of(
        [{"logits": x, "hidden_states": hs} for x, hs in zip(teachers, teacher_hs, strict=True)],
        batch,
        SIZES,
    )
    loss, metrics, _ = strategy.loss(
        {"logits": student, "hidden_states": student_hs},
        t,
        batch,
        StepContext(step=jnp.int32(0), state={}, adapters=adapters, rng=jax.random.PRNGKey(0)),
    )
    rows = run.rows[0]
    assert len(rows) == (DB if selection == "none" else DB // 2)

    def normalise(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    u = np_uncertainty(student)[rows]
    W = np_soft_instance(u)
    kd = (W * np.stack([np_kd(student[rows], t[rows], "mse", 1.0) for t in teachers])).sum(0)
    rep = np.zeros((2, len(rows)))
    for k, cfg in enumerate(teacher_cfgs):
        L_s, L_t = student_cfg.num_layers, cfg.num_layers
        per_pair = []
        for i in range(L_s + 1):
            j = math.ceil(i * L_t / L_s)
            proj = adapters["rep"][f"teacher{k}"][f"proj_{i}"]
            s_cls = student_hs[i][rows, 0].astype(np.float64) @ proj["kernel"] + proj["bias"]
            t_cls = teacher_hs[k][j][rows, 0].astype(np.float64)
            per_pair.append(((normalise(s_cls) - normalise(t_cls)) ** 2).mean(-1))
        rep[k] = np.mean(per_pair, axis=0)
    rep = (W * rep).sum(0)
    expected = _task(case) + np.mean((1 - u) * kd) + np.mean(u * rep)
    np.testing.assert_allclose(float(loss), expected, **TOL)
    np.testing.assert_allclose(float(metrics["kd/rep"]), rep.mean(), **TOL)


# --- RL-KD -----------------------------------------------------------------------------

RB, RC, RD = 12, 3, 6


@pytest.fixture(scope="module")
def rl_case():
    rng = np.random.default_rng(11)
    student = (rng.normal(size=(RB, RC)) * 2).astype(np.float32)
    student_after = (student + rng.normal(size=(RB, RC))).astype(np.float32)
    pooled = np.tanh(rng.normal(size=(RB, RD))).astype(np.float32)
    teachers = (rng.normal(size=(2, RB, RC)) * 2).astype(np.float32)
    labels = rng.integers(0, RC, size=RB).astype(np.int32)
    return student, student_after, pooled, teachers, make_batch(labels, seed=2)


def rl_strategy(**section):
    return strategy_of("rl_kd", **section)


def rl_state(strategy, kernel=None, bias=0.0, baseline=0.0, count=0):
    state = strategy.init_state(jax.random.PRNGKey(0), tiny_config(RD, 1, RC), [])
    policy = dict(state["policy"])
    assert policy["kernel"].shape == (RD + RC + 1,)  # [pooled, teacher probs, teacher CE]
    if kernel is not None:
        policy["kernel"] = jnp.asarray(kernel, jnp.float32)
    policy["bias"] = jnp.asarray(bias, jnp.float32)
    return {
        **state,
        "policy": policy,
        "policy_opt": strategy.policy_optimizer.init(policy),
        "baseline": jnp.asarray(baseline, jnp.float32),
        "baseline_count": jnp.asarray(count, jnp.int32),
    }


def rl_loss(strategy, state, case, step=0, rng=0):
    student, _, pooled, teachers, batch = case
    t, run = teachers_of([{"logits": x} for x in teachers], batch)
    loss, metrics, new_state = strategy.loss(
        {"logits": student, "pooled": pooled},
        t,
        batch,
        StepContext(step=jnp.int32(step), state=state, rng=jax.random.PRNGKey(rng)),
    )
    assert run.row_counts == [RB]
    return float(loss), {k: float(v) for k, v in metrics.items()}, new_state


def np_rl_loss(case, actions, alpha=0.5, kind="kl", tau=1.0):
    student, _, _, teachers, batch = case
    kd = np.stack([np_kd(student, t, kind, tau) for t in teachers])
    task = np_ce(student, batch["labels"]).mean()
    return alpha * (actions * kd).mean() + (1 - alpha) * task


def _split(values):
    """(gain, threshold): gain·(v − threshold) is at least 30 away from 0 for every v,
    so sigmoid of it is 0 or 1 in float32 and the policy acts deterministically."""
    v = np.sort(np.ravel(values))
    middle = len(v) // 2
    threshold = 0.5 * (v[middle - 1] + v[middle])
    gap = np.min(np.abs(v - threshold))
    assert gap > 1e-4
    return 30.0 / gap, threshold


def _selector(name, case):
    """A policy that acts deterministically on one part of the state, and its actions."""
    _, _, pooled, teachers, batch = case
    kernel = np.zeros(RD + RC + 1, np.float32)
    if name == "teacher_ce":  # Use teachers whose CE is below the median: state[-1].
        values = np.stack([np_ce(t, batch["labels"]) for t in teachers])
        gain, threshold = _split(values)
        kernel[-1] = -gain
        return kernel, gain * threshold, (values < threshold).astype(np.float64)
    if name == "teacher_prob":  # Teachers confident in class 1: state[D + 1].
        values = np_softmax(teachers)[..., 1]
        gain, threshold = _split(values)
        kernel[RD + 1] = gain
        return kernel, -gain * threshold, (values > threshold).astype(np.float64)
    # "pooled": every teacher on instances whose feature 2 is large: state[2].
    gain, threshold = _split(pooled[:, 2])
    kernel[2] = gain
    actions = (pooled[:, 2] > threshold).astype(np.float64)
    return kernel, -gain * threshold, np.broadcast_to(actions, (2, RB))


@pytest.mark.parametrize("selector", ["teacher_ce", "teacher_prob", "pooled"])
def test_rl_kd_loss_uses_the_policys_actions(rl_case, selector):
    strategy = rl_strategy(alpha=0.3)
    kernel, bias, actions = _selector(selector, rl_case)
    assert 0 < actions.mean() < 1  # A real selection.
    loss, metrics, _ = rl_loss(strategy, rl_state(strategy, kernel, bias), rl_case)
    np.testing.assert_allclose(loss, np_rl_loss(rl_case, actions, alpha=0.3), **TOL)
    for k in range(2):
        np.testing.assert_allclose(metrics[f"kd/weight_teacher{k}"], actions[k].mean(), **TOL)


def test_rl_kd_all_or_nothing_and_warmup(rl_case):
    strategy = rl_strategy(warmup_steps=5, kd="mse")
    ones, zeros = np.ones((2, RB)), np.zeros((2, RB))
    never = rl_state(strategy, bias=-200.0)
    always = rl_state(strategy, bias=200.0)
    # During warm-up every teacher is used, whatever the policy says.
    for step in (0, 4):
        loss, _, _ = rl_loss(strategy, never, rl_case, step=step)
        np.testing.assert_allclose(loss, np_rl_loss(rl_case, ones, kind="mse"), **TOL)
    loss, _, _ = rl_loss(strategy, never, rl_case, step=5)
    np.testing.assert_allclose(loss, np_rl_loss(rl_case, zeros, kind="mse"), **TOL)
    loss, _, _ = rl_loss(strategy, always, rl_case, step=5)
    np.testing.assert_allclose(loss, np_rl_loss(rl_case, ones, kind="mse"), **TOL)


def test_rl_kd_sampled_actions(rl_case):
    """With a random policy the actions are Bernoulli(σ) draws of the step's key."""
    strategy = rl_strategy()
    rng = np.random.default_rng(0)
    state = rl_state(strategy, kernel=rng.normal(size=RD + RC + 1), bias=0.1)
    _, _, pooled, teachers, batch = rl_case
    features = np.concatenate(
        [
            np.broadcast_to(pooled[None], (2, RB, RD)),
            np_softmax(teachers),
            np.stack([np_ce(t, batch["labels"]) for t in teachers])[..., None],
        ],
        -1,
    )
    logits = (features @ np.asarray(state["policy"]["kernel"], np.float64)) + 0.1
    actions = np.asarray(
        jax.random.bernoulli(
            jax.random.PRNGKey(3), jnp.asarray(1 / (1 + np.exp(-logits)), jnp.float32)
        ),
        np.float64,
    )
    loss, metrics, _ = rl_loss(strategy, state, rl_case, step=0, rng=3)
    np.testing.assert_allclose(loss, np_rl_loss(rl_case, actions), **TOL)
    probs = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(metrics["rl/select_prob_teacher1"], probs[1].mean(), **TOL)


def rl_after(strategy, state, case, step=0, rng=0):
    student, student_after, pooled, teachers, batch = case
    t, _ = teachers_of([{"logits": x} for x in teachers], batch)
    new_state, metrics = strategy.after_update(
        student={"logits": student, "pooled": pooled},
        student_after={"logits": student_after},
        teachers=t,
        batch=batch,
        ctx=StepContext(step=jnp.int32(step), state=state, rng=jax.random.PRNGKey(rng)),
    )
    return new_state, {k: float(v) for k, v in metrics.items()}


def _log_prob_of_actions(policy, case, rng):
    """Σ_jk log π(a_jk|s_jk) of the actions drawn with ``rng`` (what the update saw)."""
    _, _, pooled, teachers, batch = case
    features = weighting.policy_features(
        jnp.asarray(pooled),
        jax.nn.softmax(jnp.asarray(teachers), -1),
        weighting.teacher_cross_entropy(jnp.asarray(teachers), jnp.asarray(batch["labels"])),
    )
    return lambda p: float(
        jnp.sum(
            weighting.bernoulli_log_prob(
                weighting.sample_actions(
                    jax.random.PRNGKey(rng), weighting.policy_logits(policy, features)
                ),
                weighting.policy_logits(p, features),
            )
        )
    )


def _reward(case):
    _, student_after, _, _, batch = case
    return -np_ce(student_after, batch["labels"]).mean()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rl_kd_policy_moves_toward_actions_with_positive_advantage(rl_case, sign):
    strategy = rl_strategy(policy_learning_rate=1e-3)
    kernel = 0.3 * np.random.default_rng(1).normal(size=RD + RC + 1)
    reward = _reward(rl_case)
    # Advantage R − b = sign.
    state = rl_state(strategy, kernel=kernel, bias=0.2, baseline=reward - sign, count=3)
    new_state, metrics = rl_after(strategy, state, rl_case, step=0, rng=4)
    np.testing.assert_allclose(metrics["rl/reward"], reward, **TOL)
    np.testing.assert_allclose(metrics["rl/advantage"], sign, rtol=1e-5)
    log_prob = _log_prob_of_actions(state["policy"], rl_case, rng=4)
    change = log_prob(new_state["policy"]) - log_prob(state["policy"])
    assert np.sign(change) == sign, change
    # Moving-average baseline: b ← 0.9·b + 0.1·R (decay 0.9 by default).
    np.testing.assert_allclose(
        float(new_state["baseline"]), 0.9 * (reward - sign) + 0.1 * reward, rtol=1e-5
    )
    assert int(new_state["baseline_count"]) == 4


def test_rl_kd_first_update_sets_the_baseline_to_the_reward(rl_case):
    strategy = rl_strategy(baseline_decay=0.5)
    kernel = 0.3 * np.random.default_rng(2).normal(size=RD + RC + 1)
    state = rl_state(strategy, kernel=kernel, baseline=123.0, count=0)
    new_state, metrics = rl_after(strategy, state, rl_case)
    reward = _reward(rl_case)
    np.testing.assert_allclose(float(new_state["baseline"]), reward, rtol=1e-5)
    assert int(new_state["baseline_count"]) == 1
    np.testing.assert_allclose(metrics["rl/advantage"], 0.0, atol=1e-6)
    # Then the moving average with the configured decay.
    newer, _ = rl_after(strategy, new_state, rl_case)
    np.testing.assert_allclose(float(newer["baseline"]), reward, rtol=1e-5)
    shifted = {**new_state, "baseline": jnp.float32(reward + 2.0)}
    newer, _ = rl_after(strategy, shifted, rl_case)
    np.testing.assert_allclose(
        float(newer["baseline"]), 0.5 * (reward + 2.0) + 0.5 * reward, rtol=1e-5
    )


def test_rl_kd_first_update_leaves_the_policy_unchanged(rl_case):
    strategy = rl_strategy()
    kernel = 0.3 * np.random.default_rng(2).normal(size=RD + RC + 1)
    state = rl_state(strategy, kernel=kernel, count=0)
    new_state, _ = rl_after(strategy, state, rl_case)
    # No advantage, no policy gradient: the policy is unchanged.
    np.testing.assert_allclose(
        new_state["policy"]["kernel"], state["policy"]["kernel"], rtol=1e-6, atol=1e-7
    )


def test_rl_kd_policy_is_frozen_during_warmup(rl_case):
    strategy = rl_strategy(warmup_steps=3)
    kernel = 0.3 * np.random.default_rng(3).normal(size=RD + RC + 1)
    state = rl_state(strategy, kernel=kernel, baseline=_reward(rl_case) - 1.0, count=2)
    frozen, _ = rl_after(strategy, state, rl_case, step=2)
    jax.tree.map(np.testing.assert_array_equal, frozen, state)
    moved, _ = rl_after(strategy, state, rl_case, step=3)
    assert np.max(np.abs(moved["policy"]["kernel"] - state["policy"]["kernel"])) > 0
    assert int(moved["baseline_count"]) == 3


def test_rl_kd_instance_reward(rl_case):
    strategy = rl_strategy(reward="instance_ce")
    state = rl_state(strategy, count=0)
    _, metrics = rl_after(strategy, state, rl_case)
    np.testing.assert_allclose(metrics["rl/reward"], _reward(rl_case), **TOL)


def test_rl_kd_declares_after_update():
    strategy = rl_strategy()
    assert strategy.has_after_update
    assert strategy.teacher_forward == "full"
    with pytest.raises(ValueError, match="rng"):
        strategy.loss(
            {"logits": np.zeros((2, 3))}, [], {}, StepContext(step=jnp.int32(0), state={}, rng=None)
        )


# --- Config errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "section", "field"),
    [
        ("mt_bert", {"kdd": "ce"}, "kdd"),
        ("mt_bert", {"kd": "bogus"}, "kd"),
        ("mt_bert", {"hidden_weight": -1.0}, "hidden_weight"),
        ("mt_bert", {"kd_weight": -0.5}, "kd_weight"),
        ("ca_mkd", {"tau": 0.0}, "tau"),
        ("ca_mkd", {"hidden_weight": 1.0}, "hidden_weight"),
        ("avg_teachers", {"weights": (1.0, 2.0)}, "weights"),
        ("random_teacher", {"seed": 3}, "seed"),
        ("best_teacher", {"kd": "cosine"}, "kd"),
        ("fixed_weights", {}, "weights"),
        ("fixed_weights", {"weights": ()}, "weights"),
        ("fixed_weights", {"weights": (1.0,), "alpha": 1.0}, "alpha"),
        ("dynamic_kd", {"adoption": "largest"}, "adoption"),
        ("dynamic_kd", {"selection": "loss"}, "selection"),
        ("dynamic_kd", {"objective": "both"}, "objective"),
        ("dynamic_kd", {"kd": "ce"}, "kd"),
        ("dynamic_kd", {"ratio": 0.0}, "ratio"),
        ("dynamic_kd", {"ratio": 1.5}, "ratio"),
        ("dynamic_kd", {"tau": -1.0}, "tau"),
        ("dynamic_kd", {"kd_weight": -1.0}, "kd_weight"),
        ("dynamic_kd", {"rate": 0.1}, "rate"),
        ("rl_kd", {"alpha": 1.5}, "alpha"),
        ("rl_kd", {"kd": "bogus"}, "kd"),
        ("rl_kd", {"tau": 0.0}, "tau"),
        ("rl_kd", {"reward": "accuracy"}, "reward"),
        ("rl_kd", {"baseline_decay": 1.0}, "baseline_decay"),
        ("rl_kd", {"policy_learning_rate": 0.0}, "policy_learning_rate"),
        ("rl_kd", {"warmup_steps": -1}, "warmup_steps"),
        ("rl_kd", {"gamma": 0.99}, "gamma"),
    ],
)
def test_bad_sub_config_names_the_field(name, section, field):
    with pytest.raises(ValueError, match=re.escape(f"distill.{name}.{field}")):
        strategy_of(name, **section)


@pytest.mark.parametrize("weights", [(-1.0, 2.0), (0.0, 0.0)])
def test_bad_fixed_weights_name_the_field(weights):
    with pytest.raises(ValueError, match=re.escape("distill.fixed_weights.weights")):
        strategy_of("fixed_weights", weights=weights)


@pytest.mark.parametrize("weights", [(-1.0, 2.0), (0.0, 0.0)])
def test_bad_fixed_weights_are_refused(weights):
    with pytest.raises(ValueError):
        strategy_of("fixed_weights", weights=weights)


def test_unknown_strategy_names_the_field():
    with pytest.raises(ValueError, match=re.escape("distill.strategy='bogus'")):
        make_strategy(ml_collections.ConfigDict({"strategy": "bogus"}))
