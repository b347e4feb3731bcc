"""The DWT strategy's loss against NumPy, in both forms, with schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dwt_jax.distill import StepContext, make_strategy


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _config(form="dwt", alpha=("constant", 1.0, 1.0, 0), tau=("constant", 1.0, 1.0, 0)):
    def schedule(spec):
        name, value, end_value, steps = spec
        return {"name": name, "value": value, "end_value": end_value, "steps": steps}

    return ml_collections.ConfigDict(
        {
            "strategy": "dwt",
            "form": form,
            "alpha_h": 0.7,
            "alpha_s": schedule(alpha),
            "tau": schedule(tau),
        }
    )


@pytest.fixture
def outputs():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 13)).astype(np.float32) * 2
    teacher = rng.normal(size=(2, 3, 13)).astype(np.float32) * 2
    batch = {
        "masked_ids": rng.integers(0, 13, size=(2, 3)).astype(np.int32),
        "masked_weights": np.array([[1, 1, 0], [1, 1, 1]], np.float32),
    }
    return student, teacher, batch


def _numpy_terms(student, teacher, batch, tau):
    w = batch["masked_weights"]
    log_ps = _log_softmax(student.astype(np.float64))
    ce = -np.take_along_axis(log_ps, batch["masked_ids"][..., None], -1)[..., 0]
    log_pt_tau = _log_softmax(teacher / tau)
    log_ps_tau = _log_softmax(student / tau)
    kl = (np.exp(log_pt_tau) * (log_pt_tau - log_ps_tau)).sum(-1)
    return (ce * w).sum() / w.sum(), (kl * w).sum() / w.sum()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_dwt_form_matches_numpy(outputs, tau):
    student, teacher, batch = outputs
    config = _config(alpha=("linear", 4.0, 1.0, 100), tau=("constant", tau, tau, 0))
    strategy = make_strategy(config)
    loss, metrics, _ = strategy.loss(
        {"mlm_logits": student},
        [{"mlm_logits": teacher}],
        batch,
        StepContext(step=np.int32(50), state={}),
    )
    mlm, kl = _numpy_terms(student, teacher, batch, tau)
    np.testing.assert_allclose(float(metrics["distill/alpha"]), 2.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["distill/kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * mlm + 2.5 * tau**2 * kl, rtol=1e-5)


def test_ki_form_matches_numpy(outputs):
    student, teacher, batch = outputs
    strategy = make_strategy(_config(form="ki", alpha=("ki", 1.0, 0.0, 100)))
    loss, metrics, _ = strategy.loss(
        {"mlm_logits": student},
        [{"mlm_logits": teacher}],
        batch,
        StepContext(step=np.int32(25), state={}),
    )
    mlm, kl = _numpy_terms(student, teacher, batch, 1.0)
    np.testing.assert_allclose(float(metrics["distill/alpha"]), 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.25 * mlm + 0.75 * kl, rtol=1e-5)
    # Past the KI horizon distillation is off: the loss is plain MLM.
    loss_late, _, _ = strategy.loss(
        {"mlm_logits": student},
        [{"mlm_logits": teacher}],
        batch,
        StepContext(step=np.int32(1000), state={}),
    )
    np.testing.assert_allclose(float(loss_late), mlm, rtol=1e-5)


def test_teacher_equal_to_student_adds_nothing(outputs):
    student, _, batch = outputs
    strategy = make_strategy(_config())
    loss, metrics, _ = strategy.loss(
        {"mlm_logits": student},
        [{"mlm_logits": student}],
        batch,
        StepContext(step=np.int32(0), state={}),
    )
    assert abs(float(metrics["distill/kl"])) < 1e-6
    np.testing.assert_allclose(float(loss), 0.7 * float(metrics["train/mlm_loss"]), rtol=1e-5)


def test_hidden_term_is_zero_for_matching_states_and_trains_the_projection():
    import jax
    import jax.numpy as jnp

    from dwt_jax.models.config import BertConfig

    config = _config()
    config.hidden_weight = 2.0
    config.hidden_loss = "mse"
    config.hidden_layer_map = "uniform"
    strategy = make_strategy(config)
    assert strategy.student_output_kwargs == {"output_hidden_states": True}
    student_cfg = BertConfig(
        vocab_size=13, hidden_size=8, num_layers=4, num_heads=2, mlp_dim=16, max_len=8
    )
    teacher_cfg = BertConfig(
        vocab_size=13, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16, max_len=8
    )
    from flax import linen as nn

    adapters = nn.meta.unbox(
        strategy.init_adapters(jax.random.PRNGKey(0), student_cfg, [teacher_cfg])
    )
    assert len(adapters["hidden"]) == 5  # Embeddings + 4 student layers.
    identity = {name: {"kernel": jnp.eye(8), "bias": jnp.zeros(8)} for name in adapters["hidden"]}
    rng = np.random.default_rng(1)
    teacher_hs = [rng.normal(size=(2, 4, 8)).astype(np.float32) for _ in range(3)]
    # Student layer i matches teacher layer ceil(i * 2 / 4): 0→0, 1→1, 2→1, 3→2, 4→2.
    student_hs = [teacher_hs[t] for t in (0, 1, 1, 2, 2)]
    logits = rng.normal(size=(2, 3, 13)).astype(np.float32)
    batch = {
        "masked_ids": np.zeros((2, 3), np.int32),
        "masked_weights": np.ones((2, 3), np.float32),
        "segment_ids": np.array([[1, 1, 1, 0], [1, 1, 2, 2]], np.int32),
    }
    student = {"mlm_logits": logits, "hidden_states": student_hs}
    teacher = {"mlm_logits": logits, "hidden_states": teacher_hs}
    _, metrics, _ = strategy.loss(
        student, [teacher], batch, StepContext(step=0, state={}, adapters={"hidden": identity})
    )
    assert abs(float(metrics["distill/hidden"])) < 1e-10

    def loss_of(adapters):
        return strategy.loss(
            student, [teacher], batch, StepContext(step=0, state={}, adapters=adapters)
        )[0]

    grads = jax.grad(loss_of)({"hidden": adapters["hidden"]})
    assert all(float(jnp.abs(g["kernel"]).max()) > 0 for g in grads["hidden"].values())


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_fused_head_gives_the_logits_path_loss_and_gradients(chunk_size):
    """The strategy on outputs with 'mlm_decoder' and 'masked_hidden' (fused) agrees
    with the same strategy reading the materialised 'mlm_logits'."""
    rng = np.random.default_rng(1)
    h_s, h_t = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 4))
    e_s, e_t = rng.normal(size=(13, 8)), rng.normal(size=(13, 4))
    b_s, b_t = rng.normal(size=13), rng.normal(size=13)
    h_s, h_t, e_s, e_t, b_s, b_t = (
        jnp.asarray(x, jnp.float32) for x in (h_s, h_t, e_s, e_t, b_s, b_t)
    )
    batch = {
        "masked_ids": jnp.asarray(rng.integers(0, 13, size=(2, 3)), jnp.int32),
        "masked_weights": jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32),
    }
    teacher = {"mlm_logits": h_t @ e_t.T + b_t, "masked_hidden": h_t, "mlm_decoder": (e_t, b_t)}
    config = _config(tau=("linear", 2.0, 1.0, 10))

    def loss(params, fused):
        h, e, b = params
        student = {"mlm_logits": h @ e.T + b, "masked_hidden": h, "mlm_decoder": (e, b)}
        config.fused_mlm_head, config.vocab_chunk_size = fused, chunk_size
        value, metrics, _ = make_strategy(config).loss(
            student, [teacher], batch, StepContext(step=3, state={})
        )
        return value, metrics

    (fused, fused_metrics), fused_grads = jax.value_and_grad(loss, has_aux=True)(
        (h_s, e_s, b_s), True
    )
    (plain, plain_metrics), plain_grads = jax.value_and_grad(loss, has_aux=True)(
        (h_s, e_s, b_s), False
    )
    np.testing.assert_allclose(fused, plain, rtol=1e-5)
    for name in ("train/mlm_loss", "train/mlm_accuracy", "distill/kl"):
        np.testing.assert_allclose(fused_metrics[name], plain_metrics[name], rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_head_settings_are_checked():
    config = _config()
    config.vocab_chunk_size = -1
    with pytest.raises(ValueError, match=r"distill\.vocab_chunk_size"):
        make_strategy(config)
    config.vocab_chunk_size, config.fused_mlm_head = 0, "yes"
    with pytest.raises(ValueError, match=r"distill\.fused_mlm_head"):
        make_strategy(config)
