"""The DWT strategy's loss against NumPy, in both forms, with schedules."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from dwt_jax.distill import make_strategy


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
        {"mlm_logits": student}, [{"mlm_logits": teacher}], batch, np.int32(50), {}
    )
    mlm, kl = _numpy_terms(student, teacher, batch, tau)
    np.testing.assert_allclose(float(metrics["distill/alpha"]), 2.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["distill/kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * mlm + 2.5 * tau**2 * kl, rtol=1e-5)


def test_ki_form_matches_numpy(outputs):
    student, teacher, batch = outputs
    strategy = make_strategy(_config(form="ki", alpha=("ki", 1.0, 0.0, 100)))
    loss, metrics, _ = strategy.loss(
        {"mlm_logits": student}, [{"mlm_logits": teacher}], batch, np.int32(25), {}
    )
    mlm, kl = _numpy_terms(student, teacher, batch, 1.0)
    np.testing.assert_allclose(float(metrics["distill/alpha"]), 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.25 * mlm + 0.75 * kl, rtol=1e-5)
    # Past the KI horizon distillation is off: the loss is plain MLM.
    loss_late, _, _ = strategy.loss(
        {"mlm_logits": student}, [{"mlm_logits": teacher}], batch, np.int32(1000), {}
    )
    np.testing.assert_allclose(float(loss_late), mlm, rtol=1e-5)


def test_teacher_equal_to_student_adds_nothing(outputs):
    student, _, batch = outputs
    strategy = make_strategy(_config())
    loss, metrics, _ = strategy.loss(
        {"mlm_logits": student}, [{"mlm_logits": student}], batch, np.int32(0), {}
    )
    assert abs(float(metrics["distill/kl"])) < 1e-6
    np.testing.assert_allclose(float(loss), 0.7 * float(metrics["train/mlm_loss"]), rtol=1e-5)
