"""benchmarks/torch_reference.py: the PyTorch reference steps compute the DWT loss and
update on tiny shapes (eager only: torch.compile is too slow for a unit test; its speed
is measured by the benchmark, not by tests)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import numpy as np
import pytest
from testutil import REPO_ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TINY = dict(
    student=(2, 32, 2, 64), teacher=(1, 16, 2, 32), vocab=100, batch=4, seq_len=16,
    predictions=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def ref():
    path = os.path.join(REPO_ROOT, "benchmarks", "torch_reference.py")
    spec = importlib.util.spec_from_file_location("dwt_jax_benchmark_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # The dataclass resolves its annotations there.
    spec.loader.exec_module(module)
    return module


def _shapes(ref, dropout: float):
    return ref.Shapes(**TINY, dropout=dropout)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_gathering_before_the_head_does_not_change_the_math(ref):
    shapes = _shapes(ref, dropout=0.0)
    a = ref.make_reference_step("a", shapes, seed=3, compile=False)
    b = ref.make_reference_step("b", shapes, seed=3, compile=False)
    start = dict(b.student.named_parameters())
    for name, param in a.student.named_parameters():  # Same models before the step.
        assert torch.equal(param, start[name]), name
    loss_a, loss_b = a(), b()
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    after = dict(b.student.named_parameters())
    for name, param in a.student.named_parameters():
        torch.testing.assert_close(param, after[name], rtol=1e-5, atol=1e-6, msg=name)


def test_first_loss_is_cross_entropy_plus_kl_on_the_masked_positions(ref):
    shapes = _shapes(ref, dropout=0.0)
    step = ref.make_reference_step("b", shapes, seed=1, compile=False)
    batch = step.batch
    with torch.no_grad():  # A separate full-sequence forward of both models.
        student = step.student(input_ids=batch["input_ids"]).logits.numpy().astype(np.float64)
        teacher = step.teacher(input_ids=batch["input_ids"]).logits.numpy().astype(np.float64)
    rows = np.arange(shapes.batch)[:, None]
    positions = batch["masked_positions"].numpy()
    log_s = _log_softmax(student[rows, positions])  # [B, M, V]
    log_t = _log_softmax(teacher[rows, positions])
    targets = batch["masked_ids"].numpy()
    ce = -np.take_along_axis(log_s, targets[..., None], -1).mean()
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
    assert kl > 0
    loss = step()
    assert np.isfinite(loss)
    assert loss == pytest.approx(ce + kl, rel=1e-5)
    # The batch: distinct sorted masked positions, labels only there.
    assert (np.diff(positions, axis=1) > 0).all()
    assert ((batch["labels"] != -100).sum(1) == shapes.predictions).all()


@pytest.mark.parametrize("kind", ["a", "b"])
def test_a_few_steps_reduce_the_loss_and_are_seeded(ref, kind):
    shapes = _shapes(ref, dropout=0.1)
    step = ref.make_reference_step(kind, shapes, seed=0, compile=False)
    losses = [step() for _ in range(4)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    again = ref.make_reference_step(kind, shapes, seed=0, compile=False)
    assert again() == losses[0]  # Same seed, same models, batch and dropout masks.


def test_defaults_and_unknown_kind(ref):
    shapes = ref.Shapes()
    assert (shapes.student, shapes.teacher) == ((4, 256, 4, 1024), (2, 128, 2, 512))
    assert (shapes.vocab, shapes.batch, shapes.seq_len, shapes.predictions) == (30522, 32, 128, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        shapes.batch = 1
    with pytest.raises(ValueError, match="unknown reference kind 'c'"):
        ref.make_reference_step("c", _shapes(ref, 0.0))
