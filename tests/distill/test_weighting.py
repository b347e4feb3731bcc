"""dwt_jax.distill.weighting against independent NumPy float64 references, plus the
properties that define each function (direction rules, tie-breaking, no gradient
through weights, global batch statistics, jit)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwt_jax.distill import weighting

TOL = {"rtol": 1e-5, "atol": 1e-5}


@functools.cache
def _jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static))


def run(fn, *args, **kwargs):
    """``fn`` under ``jax.jit``: string/int keyword arguments are static, the rest traced.

    Every value below is computed this way, so each public function is checked under
    jit (and fast: eager dispatch compiles every small op separately). The wrapper is
    cached, so a function compiles once per static configuration and input shapes.
    """
    static = {k: v for k, v in kwargs.items() if isinstance(v, (str, int)) and k != "tau"}
    traced = {k: v for k, v in kwargs.items() if k not in static}
    return _jitted(fn, **static)(*args, **traced)


def jit_grad(fn, argnums=0):
    return jax.jit(jax.grad(fn, argnums=argnums))


# --- NumPy references ------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_entropy(x):
    p = np_softmax(x)
    return -(p * np.log(np.maximum(p, 1e-300))).sum(-1)


def np_ce(logits, labels):
    return -np.take_along_axis(np_log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_adoption_soft(u, sizes, per_instance):
    """Interpolation with np.interp on the normalised size axis, target t = 1 − u."""
    sizes = np.asarray(sizes, np.float64)
    u = np.asarray(u, np.float64)
    if not per_instance:
        u = np.full_like(u, u.mean())
    K, B = len(sizes), len(u)
    if sizes.max() == sizes.min():
        return np.full((K, B), 1.0 / K)
    pos = (sizes - sizes.min()) / (sizes.max() - sizes.min())
    uniq = np.unique(pos)
    out = np.zeros((K, B))
    for i, v in enumerate(uniq):
        basis = np.zeros(len(uniq))
        basis[i] = 1.0
        w = np.interp(1.0 - u, uniq, basis)
        members = np.flatnonzero(pos == v)
        for k in members:
            out[k] = w / len(members)
    return out


def np_adoption_hard(u, sizes):
    sizes = np.asarray(sizes, np.float64)
    K, B = len(sizes), len(u)
    order = sorted(range(B), key=lambda j: (-u[j], j))  # most uncertain first
    by_size = sorted(range(K), key=lambda k: (sizes[k], k))
    out = np.zeros((K, B))
    for rank, j in enumerate(order):
        group = rank * K // B
        members = [k for k in range(K) if sizes[k] == sizes[by_size[group]]]
        for k in members:
            out[k, j] = 1.0 / len(members)
    return out


def np_adoption(u, sizes, mode):
    if mode == "hard":
        return np_adoption_hard(u, sizes)
    return np_adoption_soft(u, sizes, per_instance=mode == "soft_instance")


@pytest.fixture
def cls_batch():
    rng = np.random.default_rng(0)
    K, B, C = 3, 6, 5
    student = (rng.normal(size=(B, C)) * 2).astype(np.float32)
    teachers = (rng.normal(size=(K, B, C)) * 2).astype(np.float32)
    labels = rng.integers(0, C, size=B).astype(np.int32)
    return student, teachers, labels


# --- Uncertainty, cross-entropy, per-instance KD --------------------------------------


def test_normalized_uncertainty_matches_numpy_and_bounds(cls_batch):
    student, _, _ = cls_batch
    u = np.asarray(run(weighting.normalized_uncertainty, student))
    np.testing.assert_allclose(u, np_entropy(student) / np.log(5), **TOL)
    assert np.all((u >= 0) & (u <= 1))
    extremes = np.array([[0.0] * 5, [100.0, 0, 0, 0, 0]] * 3, np.float32)
    np.testing.assert_allclose(
        run(weighting.normalized_uncertainty, extremes), [1.0, 0.0] * 3, atol=1e-6
    )
    with pytest.raises(ValueError, match="C >= 2"):
        weighting.normalized_uncertainty(np.zeros((3, 1), np.float32))


def test_cross_entropies_match_numpy(cls_batch):
    student, teachers, labels = cls_batch
    np.testing.assert_allclose(
        run(weighting.instance_cross_entropy, student, labels), np_ce(student, labels), **TOL
    )
    ce_KxB = run(weighting.teacher_cross_entropy, teachers, labels)
    assert ce_KxB.shape == (3, 6)
    np.testing.assert_allclose(ce_KxB, np.stack([np_ce(t, labels) for t in teachers]), **TOL)


def np_kd(student, teacher, kind, tau):
    if kind == "mse":
        return ((np.asarray(student, np.float64) - teacher) ** 2).mean(-1)
    log_ps, log_pt = np_log_softmax(student / tau), np_log_softmax(teacher / tau)
    pt = np.exp(log_pt)
    if kind == "kl":
        return tau**2 * (pt * (log_pt - log_ps)).sum(-1)
    return -(tau**2) * (pt * log_ps).sum(-1)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_kd_per_instance_matches_numpy(cls_batch, kind):
    student, teachers, _ = cls_batch
    for tau in (1.0, 2.5):  # τ is traced (a schedule's value): one compile for both
        kd = run(weighting.kd_per_instance, student, teachers[0], kind=kind, tau=tau)
        assert kd.shape == (6,) and kd.dtype == jnp.float32
        np.testing.assert_allclose(kd, np_kd(student, teachers[0], kind, tau), **TOL)
        np.testing.assert_allclose(
            run(weighting.kd_per_teacher, student, teachers, kind=kind, tau=tau),
            np.stack([np_kd(student, t, kind, tau) for t in teachers]),
            **TOL,
        )


def test_kd_regression_and_errors():
    student = np.array([[0.5], [2.0]], np.float32)
    teacher = np.array([[1.5], [-1.0]], np.float32)
    np.testing.assert_allclose(
        run(weighting.kd_per_instance, student, teacher, kind="mse"), [1.0, 9.0], **TOL
    )
    for kind in ("kl", "ce"):
        with pytest.raises(ValueError, match="regression"):
            weighting.kd_per_instance(student, teacher, kind)
    with pytest.raises(ValueError, match="kl, ce, mse"):
        weighting.kd_per_instance(student, teacher, "l1")


# --- Multi-teacher weights --------------------------------------------------------------


def teacher_ce(cls_batch):
    _, teachers, labels = cls_batch
    return np.stack([np_ce(t, labels) for t in teachers])


def test_mt_bert_and_ca_mkd_weights_match_numpy(cls_batch):
    ce = teacher_ce(cls_batch)
    ce32 = ce.astype(np.float32)
    np.testing.assert_allclose(run(weighting.mt_bert_weights, ce32), 1 / (1 + ce), **TOL)
    soft = np.exp(ce - ce.max(0)) / np.exp(ce - ce.max(0)).sum(0)  # softmax over K
    ca = np.asarray(run(weighting.ca_mkd_weights, ce32))
    np.testing.assert_allclose(ca, (1 - soft) / 2, **TOL)
    np.testing.assert_allclose(ca.sum(0), 1.0, **TOL)
    assert np.all(np.argmax(ca, 0) == np.argmin(ce, 0))  # lower CE → higher weight
    np.testing.assert_array_equal(weighting.ca_mkd_weights(ce32[:1]), np.ones((1, 6)))


@pytest.mark.parametrize(
    "fn",
    [weighting.mt_bert_weights, weighting.ca_mkd_weights, weighting.best_teacher_weights],
    ids=["mt_bert", "ca_mkd", "best"],
)
def test_no_gradient_through_ce_weights(cls_batch, fn):
    ce = teacher_ce(cls_batch).astype(np.float32)
    grad = jit_grad(lambda c: jnp.sum(fn(c) * jnp.arange(1.0, 7.0)))(ce)
    assert np.all(np.asarray(grad) == 0.0)


def test_uniform_fixed_random_best_weights():
    np.testing.assert_allclose(
        run(weighting.uniform_weights, num_teachers=4, batch=3), np.full((4, 3), 0.25)
    )
    np.testing.assert_allclose(
        run(weighting.fixed_weights, np.array([1.0, 3.0, 0.0]), batch=2),
        [[0.25] * 2, [0.75] * 2, [0] * 2],
    )
    for bad in ([1.0, -1.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="non-negative and not all zero"):
            weighting.fixed_weights(bad, 2)
    with pytest.raises(ValueError, match="num_teachers"):
        weighting.uniform_weights(0, 3)
    chosen = set()
    for seed in range(12):
        w = np.asarray(
            run(weighting.random_teacher_weights, jax.random.key(seed), num_teachers=3, batch=5)
        )
        assert w.shape == (3, 5) and set(np.unique(w)) <= {0.0, 1.0}
        np.testing.assert_array_equal(w.sum(0), 1.0)
        assert np.all(w == w[:, :1])  # one teacher for the whole batch
        chosen.add(int(np.argmax(w[:, 0])))
    assert chosen == {0, 1, 2}
    ce = np.array([[1.0, 0.5, 2.0, 0.3], [0.2, 0.5, 2.0, 0.9], [0.2, 0.9, 1.0, 0.3]], np.float32)
    expected = np.zeros((3, 4))
    expected[[1, 0, 2, 0], [0, 1, 2, 3]] = 1.0  # ties → lowest index
    np.testing.assert_array_equal(run(weighting.best_teacher_weights, ce), expected)


def test_weighted_teacher_loss():
    rng = np.random.default_rng(3)
    w, kd = rng.random((3, 4)), rng.random((3, 4))
    np.testing.assert_allclose(
        run(weighting.weighted_teacher_loss, w.astype(np.float32), kd.astype(np.float32)),
        (w * kd).sum(0).mean(),
        **TOL,
    )


# --- Teacher adoption -------------------------------------------------------------------

MODES = ["hard", "soft", "soft_instance"]
SIZE_SETS = {
    "K2": [110.0, 14.0],  # large first
    "K3_out_of_order": [66.0, 14.0, 110.0],
    "K4_ties": [30.0, 10.0, 30.0, 50.0],
}


def adopt(u, sizes, mode):
    return np.asarray(run(weighting.adoption_weights, u, np.asarray(sizes, np.float32), mode=mode))


@pytest.mark.parametrize("mode", MODES)
def test_adoption_matches_numpy_and_sums_to_one(mode):
    rng = np.random.default_rng(4)
    u = rng.random(8).astype(np.float32)
    u[[2, 7]] = u[5]  # ties in u
    for sizes in SIZE_SETS.values():
        weights = adopt(u, sizes, mode)
        np.testing.assert_allclose(weights, np_adoption(u, sizes, mode), err_msg=str(sizes), **TOL)
        np.testing.assert_allclose(weights.sum(0), 1.0, **TOL)
        assert np.all(weights >= 0)


def test_adoption_two_teachers_is_exactly_u():
    u = np.array([0.0, 0.1, 0.5, 0.93, 1.0, 0.25, 0.75, 0.33], np.float32)
    weights = adopt(u, [340.0, 110.0], "soft_instance")  # large, small
    np.testing.assert_allclose(weights[1], u, atol=1e-7)
    np.testing.assert_allclose(weights[0], 1 - u, atol=1e-7)
    soft = adopt(u, [340.0, 110.0], "soft")
    np.testing.assert_allclose(soft[1], np.full(8, u.mean()), atol=1e-6)


@pytest.mark.parametrize("batch", [8, 7])
def test_hard_adoption_sends_the_more_uncertain_half_to_the_small_teacher(batch):
    u = np.random.default_rng(5).random(batch).astype(np.float32)
    weights = adopt(u, [10.0, 2.0], "hard")  # large, small
    to_small = set(np.flatnonzero(weights[1] == 1.0).tolist())
    assert to_small == set(np.argsort(-u)[: math.ceil(batch / 2)].tolist())
    np.testing.assert_array_equal(weights[0], 1.0 - weights[1])


@pytest.mark.parametrize("mode", MODES)
def test_more_uncertainty_moves_weight_toward_smaller_teachers(mode):
    """E_j = Σ_k W_kj·size_k never grows when u_j grows, and strictly drops somewhere."""
    rng = np.random.default_rng(6)
    for name, sizes in SIZE_SETS.items():
        sizes_np = np.asarray(sizes)
        strictly = False
        for _ in range(4):
            u = rng.random(8).astype(np.float32)
            before = sizes_np @ adopt(u, sizes, mode)
            for j in range(8):
                raised = u.copy()
                raised[j] = min(1.0, u[j] + 0.4)
                after = sizes_np @ adopt(raised, sizes, mode)
                assert after[j] <= before[j] + 1e-4, (name, u, j)
                strictly |= after[j] < before[j] - 1e-4
        assert strictly, name
        # Certain → only the largest teacher(s); fully uncertain → only the smallest.
        if mode != "hard":
            largest, smallest = sizes_np == sizes_np.max(), sizes_np == sizes_np.min()
            for u_value, side in ((0.0, largest), (1.0, smallest)):
                w = adopt(np.full(8, u_value, np.float32), sizes, mode)
                np.testing.assert_allclose(w[~side], 0.0, atol=1e-6)
                np.testing.assert_allclose(w[side], 1.0 / side.sum(), atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_adoption_equal_sizes_uniform_and_no_gradient(mode):
    u = np.array([0.1, 0.9, 0.4, 0.6, 0.2, 0.3, 0.5, 0.8], np.float32)
    np.testing.assert_allclose(adopt(u, [5.0, 5.0, 5.0], mode), np.full((3, 8), 1 / 3))
    np.testing.assert_allclose(adopt(u, [7.0], mode), np.ones((1, 8)))
    sizes = jnp.asarray([3.0, 1.0, 2.0])
    grad = jit_grad(lambda x: jnp.sum(weighting.adoption_weights(x, sizes, mode) * 1.7))(u)
    assert np.all(np.asarray(grad) == 0.0)
    with pytest.raises(ValueError, match="hard, soft, soft_instance"):
        weighting.adoption_weights(u, [1.0, 2.0], "linear")


# --- Global batch statistics under sharding --------------------------------------------


def test_batch_statistics_are_global_under_a_sharded_batch():
    devices = np.array(jax.devices()[:8])
    if len(devices) < 2:
        pytest.skip("needs several (fake) devices")
    mesh = Mesh(devices, ("data",))
    batch = 2 * len(devices)
    u = np.random.default_rng(7).random(batch).astype(np.float32)
    sharded = jax.device_put(u, NamedSharding(mesh, PartitionSpec("data")))
    for mode in ("soft", "hard"):
        got = run(weighting.adoption_weights, sharded, np.array([1.0, 2.0], np.float32), mode=mode)
        np.testing.assert_allclose(got, np_adoption(u, [1.0, 2.0], mode), **TOL)
    _, mask = run(weighting.select_top, sharded, k=3)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(np.argsort(-u)[:3]))
    baseline, _ = run(weighting.update_baseline, 0.0, 0, sharded, 0.9)
    np.testing.assert_allclose(baseline, u.mean(), **TOL)


# --- Data selection ---------------------------------------------------------------------


def hand_made_selection_batch():
    probs = np.array(
        [
            [0.40, 0.30, 0.20, 0.10],  # 0: highest entropy
            [0.50, 0.49, 0.005, 0.005],  # 1: smallest margin
            [0.36, 0.32, 0.32, 1e-5],  # 2: least confident (lowest max p)
            [0.97, 0.01, 0.01, 0.01],  # 3: confident, but the label is wrong
        ]
    )
    probs /= probs.sum(-1, keepdims=True)
    labels = np.array([0, 0, 0, 1], np.int32)
    return np.log(probs).astype(np.float32), labels


@pytest.mark.parametrize(
    ("criterion", "winner"),
    [("entropy", 0), ("margin", 1), ("least_confidence", 2), ("kl_to_label", 3)],
)
def test_selection_picks_the_right_instance(criterion, winner):
    logits, labels = hand_made_selection_batch()
    scores = run(weighting.selection_scores, logits, labels, criterion=criterion)
    indices, mask = run(weighting.select_top, scores, k=1)
    assert int(indices[0]) == winner
    np.testing.assert_array_equal(mask, np.eye(4)[winner])


def test_selection_scores_match_numpy(cls_batch):
    student, _, labels = cls_batch
    p = np_softmax(student)
    top2 = np.sort(p, -1)[:, ::-1][:, :2]
    expected = {
        "entropy": np_entropy(student),
        "margin": -(top2[:, 0] - top2[:, 1]),
        "least_confidence": 1 - p.max(-1),
        "kl_to_label": -np.log(p[np.arange(len(labels)), labels]),
    }
    for criterion, value in expected.items():
        np.testing.assert_allclose(
            run(weighting.selection_scores, student, labels, criterion=criterion),
            value,
            err_msg=criterion,
            **TOL,
        )
    key = jax.random.key(1)
    random = np.asarray(run(weighting.selection_scores, student, None, criterion="random", rng=key))
    assert random.shape == (6,) and np.all((random >= 0) & (random < 1))
    again = run(weighting.selection_scores, student, None, criterion="random", rng=key)
    np.testing.assert_array_equal(random, again)
    with pytest.raises(ValueError, match="needs an rng"):
        weighting.selection_scores(student, labels, "random")
    names = "entropy, margin, least_confidence, kl_to_label, random"
    with pytest.raises(ValueError, match=names):
        weighting.selection_scores(student, labels, "loss")


def test_num_selected():
    cases = {(10, 0.1): 1, (10, 0.05): 1, (100, 0.29): 29, (8, 1.0): 8, (7, 0.5): 3, (1, 0.3): 1}
    for (batch, ratio), expected in cases.items():
        result = weighting.num_selected(batch, ratio)
        assert result == expected and type(result) is int, (batch, ratio)
    assert weighting.num_selected(10, 1) == 10
    for ratio in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match="ratio"):
            weighting.num_selected(10, ratio)
    with pytest.raises(ValueError, match="batch"):
        weighting.num_selected(0, 0.5)


def test_select_top_ties_and_errors():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0], np.float32)
    indices, mask = run(weighting.select_top, scores, k=2)
    assert indices.dtype == jnp.int32 and mask.dtype == jnp.float32
    np.testing.assert_array_equal(indices, [1, 2])
    np.testing.assert_array_equal(mask, [0, 1, 1, 0, 0])
    indices, _ = run(weighting.select_top, scores, k=4)
    np.testing.assert_array_equal(indices, [1, 2, 4, 3])
    for k in (0, 6, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            weighting.select_top(scores, k)


# --- Objective adaptation ---------------------------------------------------------------


def test_rep_per_instance_matches_pkd_convention():
    rng = np.random.default_rng(8)
    students = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3)]
    teachers = [rng.normal(size=(4, 6)).astype(np.float32) * 5 for _ in range(3)]

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    # Mean over D (losses.pkd's convention), then mean over the layer pairs.
    pairs = zip(students, teachers, strict=True)
    expected = np.mean([((unit(s) - unit(t)) ** 2).mean(-1) for s, t in pairs], 0)
    np.testing.assert_allclose(run(weighting.rep_per_instance, students, teachers), expected, **TOL)
    with pytest.raises(ValueError, match="per layer pair"):
        weighting.rep_per_instance(students, teachers[:2])
    with pytest.raises(ValueError, match="per layer pair"):
        weighting.rep_per_instance([], [])


def test_objective_adaptation_value_direction_and_gradients():
    rng = np.random.default_rng(9)
    u, kd, rep = (rng.random(5).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(
        run(weighting.objective_adaptation, u, kd, rep),
        ((1 - u) * kd).mean() + (u * rep).mean(),
        **TOL,
    )
    grads = jit_grad(weighting.objective_adaptation, argnums=(0, 1, 2))
    du, dkd, drep = grads(u, kd, rep)
    assert np.all(np.asarray(du) == 0.0)  # u is stop-gradiented
    np.testing.assert_allclose(dkd, (1 - u) / 5, **TOL)
    np.testing.assert_allclose(drep, u / 5, **TOL)
    raised = u.copy()
    raised[2] += 0.3
    _, dkd2, drep2 = grads(raised, kd, rep)
    assert dkd2[2] < dkd[2] and drep2[2] > drep[2]  # weight moves from KD to REP


# --- Reinforced teacher selection -------------------------------------------------------


def rl_inputs(seed=10, K=3, B=5, D=4, C=3):
    rng = np.random.default_rng(seed)
    instance = rng.normal(size=(B, D)).astype(np.float32)
    probs = np_softmax(rng.normal(size=(K, B, C))).astype(np.float32)
    ce = rng.random((K, B)).astype(np.float32) * 2
    return instance, probs, ce


def test_policy_features_and_logits():
    instance, probs, ce = rl_inputs()
    s = np.asarray(run(weighting.policy_features, instance, probs, ce))
    assert s.shape == (3, 5, 4 + 3 + 1)
    for k in range(3):
        np.testing.assert_array_equal(
            s[k], np.concatenate([instance, probs[k], ce[k][:, None]], -1)
        )
    grads = jit_grad(lambda *a: jnp.sum(weighting.policy_features(*a) ** 2), argnums=(0, 1, 2))(
        instance, probs, ce
    )
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)
    params = run(weighting.init_policy_params, jax.random.key(0), feature_dim=8)
    assert params["kernel"].shape == (8,) and params["bias"].shape == ()
    logits = np.asarray(run(weighting.policy_logits, params, s))
    kernel, bias = np.asarray(params["kernel"], np.float64), float(params["bias"])
    np.testing.assert_allclose(logits, s @ kernel + bias, **TOL)
    assert np.all(np.abs(np_sigmoid(logits) - 0.5) < 0.05)  # σ ≈ 0.5 at start
    with pytest.raises(ValueError, match="does not fit"):
        weighting.policy_logits({"kernel": jnp.zeros(7), "bias": jnp.zeros(())}, s)


def test_bernoulli_log_prob_entropy_and_sampling():
    logits = np.array([[-3.0, 0.0, 2.0], [100.0, -100.0, 0.5]], np.float32)
    actions = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)
    sigma = np_sigmoid(logits)
    with np.errstate(divide="ignore"):
        expected = np.where(actions == 1, np.log(sigma), np.log1p(-sigma))
    expected[1, 0] = expected[1, 1] = -100.0  # the exact limits (float64 underflows to -inf)
    log_prob = np.asarray(run(weighting.bernoulli_log_prob, actions, logits))
    assert np.all(np.isfinite(log_prob))
    np.testing.assert_allclose(log_prob, expected, **TOL)
    entropy = np.asarray(run(weighting.bernoulli_entropy, logits))
    p = sigma[0]
    np.testing.assert_allclose(entropy[0], -(p * np.log(p) + (1 - p) * np.log(1 - p)), **TOL)
    assert np.all(np.isfinite(entropy)) and entropy[1, 0] < 1e-6
    np.testing.assert_allclose(entropy[0, 1], np.log(2), **TOL)  # maximal at σ = 0.5
    many = np.broadcast_to(np.array([[0.0], [2.0]], np.float32), (2, 20000))
    samples = np.asarray(run(weighting.sample_actions, jax.random.key(3), many))
    assert samples.dtype == np.float32 and set(np.unique(samples)) == {0.0, 1.0}
    np.testing.assert_allclose(samples.mean(1), np_sigmoid([0.0, 2.0]), atol=0.02)


def test_rl_reward_variants():
    ce_after = np.array([0.5, 1.0, 2.0], np.float32)
    teacher_ce = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], np.float32)
    actions = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        run(weighting.rl_reward, ce_after, None, None, variant="batch_ce"),
        np.full(3, -ce_after.mean()),
        **TOL,
    )
    np.testing.assert_allclose(
        run(weighting.rl_reward, ce_after, None, None, variant="instance_ce"), -ce_after, **TOL
    )
    chosen = (actions * teacher_ce).sum(0) / np.maximum(1.0, actions.sum(0))  # [0.75, 0, 3]
    np.testing.assert_allclose(
        run(weighting.rl_reward, ce_after, teacher_ce, actions, variant="instance_ce_teacher"),
        -ce_after - chosen,
        **TOL,
    )
    with pytest.raises(ValueError, match="needs teacher_ce_KxB"):
        weighting.rl_reward(ce_after, None, None, "instance_ce_teacher")
    with pytest.raises(ValueError, match="batch_ce, instance_ce, instance_ce_teacher"):
        weighting.rl_reward(ce_after, None, None, "accuracy")


def test_update_baseline_first_update_and_moving_average():
    rewards = np.array([-2.0, -4.0], np.float32)
    baseline, count = run(weighting.update_baseline, 0.0, 0, rewards, 0.9)
    assert float(baseline) == -3.0 and int(count) == 1  # no bias toward 0
    baseline, count = run(
        weighting.update_baseline, baseline, count, np.full(2, -1.0, np.float32), 0.9
    )
    np.testing.assert_allclose(baseline, 0.9 * -3.0 + 0.1 * -1.0, **TOL)
    assert int(count) == 2
    baseline, count = run(weighting.update_baseline, 5.0, 0, rewards, 0.5)  # any initial value
    assert float(baseline) == -3.0 and int(count) == 1
    with pytest.raises(ValueError, match="decay"):
        weighting.update_baseline(0.0, 0, rewards, 1.5)


def test_reinforce_gradient_equals_the_hand_derived_estimator():
    instance, probs, ce = rl_inputs()
    s = np.asarray(weighting.policy_features(instance, probs, ce), np.float64)
    kernel = np.random.default_rng(11).normal(size=8) * 0.5
    params = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.float32(0.3)}
    actions = np.asarray(
        run(weighting.sample_actions, jax.random.key(4), run(weighting.policy_logits, params, s))
    )
    assert 0 < actions.mean() < 1
    reward = np.array([-1.0, -0.2, -0.7, -1.5, -0.1], np.float32)
    baseline = -0.6

    def loss(p, r):
        log_prob = weighting.bernoulli_log_prob(actions, weighting.policy_logits(p, s))
        return weighting.reinforce_loss(log_prob, r, baseline)

    value, (grads, reward_grad) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, reward)
    sigma = np_sigmoid(s @ kernel + 0.3)  # [K, B]
    advantage = reward.astype(np.float64) - baseline  # [B]
    log_pi = np.where(actions == 1, np.log(sigma), np.log(1 - sigma))
    np.testing.assert_allclose(value, -(advantage * log_pi.sum(0)).mean(), **TOL)
    # ∂/∂w log π(a|s) = (a − σ)·s and ∂/∂b = a − σ for a linear-sigmoid Bernoulli policy.
    expected_kernel = -np.einsum("b,kb,kbf->f", advantage, actions - sigma, s) / 5
    expected_bias = -np.einsum("b,kb->", advantage, actions - sigma) / 5
    np.testing.assert_allclose(grads["kernel"], expected_kernel, **TOL)
    np.testing.assert_allclose(grads["bias"], expected_bias, **TOL)
    assert np.all(np.asarray(reward_grad) == 0.0)  # the advantage is a constant
    np.testing.assert_allclose(
        run(weighting.reinforce_loss, log_pi.astype(np.float32), reward, baseline),
        -(advantage * log_pi.sum(0)).mean(),
        **TOL,
    )


def test_rl_student_kd():
    rng = np.random.default_rng(12)
    kd = rng.random((3, 4)).astype(np.float32)
    actions = (rng.random((3, 4)) > 0.5).astype(np.float32)
    np.testing.assert_allclose(
        run(weighting.rl_student_kd, kd, actions), (actions * kd).mean(), **TOL
    )
    dkd, dact = jit_grad(weighting.rl_student_kd, argnums=(0, 1))(kd, actions)
    np.testing.assert_allclose(dkd, actions / 12, **TOL)
    assert np.all(np.asarray(dact) == 0.0)
