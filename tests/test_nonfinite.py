"""The non-finite guard: a step with a NaN loss or NaN gradients changes nothing but the
step count and is counted; a streak of ``train.max_nonfinite_streak`` of them ends
the run naming the steps and the last checkpoint before them."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from kill_helpers import restore_state, saved_steps

from dwt_jax import loop as loop_lib
from dwt_jax import sharding, train
from dwt_jax.metrics import read_metrics


def _poison(monkeypatch, bad_batches) -> None:
    """The train batches numbered in ``bad_batches`` (1-based, not counting the eval
    batches) get NaN masked-token weights: their loss and gradients are NaN."""
    calls = {"n": 0, "train": False}
    original = sharding.shard_batch

    def shard_batch(batch, mesh):
        if "masked_weights" in batch and calls["train"]:
            calls["n"] += 1
            if bad_batches(calls["n"]):
                batch = {**batch, "masked_weights": np.full_like(batch["masked_weights"], np.nan)}
        return original(batch, mesh)

    monkeypatch.setattr(sharding, "shard_batch", shard_batch)
    original_loop = loop_lib.train_loop

    def loop(*args, **kwargs):
        calls["train"] = True
        return original_loop(*args, **kwargs)

    monkeypatch.setattr(loop_lib, "train_loop", loop)


def test_nonfinite_steps_are_skipped_counted_and_a_streak_stops_the_run(
    smoke_config, tmp_path, monkeypatch
):
    """Batches 3-4 bad: skipped, counted, training goes on. Batches 8 on bad: with
    train.max_nonfinite_streak=3 the run stops after step 10, naming steps 8 to 10
    and step 6, the last checkpoint before them."""
    _poison(monkeypatch, lambda n: n in (3, 4) or n >= 8)
    smoke_config.train.num_steps = 20
    smoke_config.checkpoint.every_steps = 2
    smoke_config.checkpoint.max_to_keep = 10
    smoke_config.train.max_nonfinite_streak = 3
    workdir = str(tmp_path / "run")
    with pytest.raises(train.NonFiniteError) as error:
        train.run(smoke_config, workdir)
    message = str(error.value)
    assert "\n" not in message
    assert "3 consecutive steps (8 to 10" in message, message
    assert "step 6 in" in message and "train.max_nonfinite_streak" in message, message
    assert max(saved_steps(os.path.join(workdir, "checkpoints"))) == 10

    lines = {line["step"]: line for line in read_metrics(workdir) if "train/loss" in line}
    assert max(lines) == 10
    skipped = [0, 0, 1, 2, 2, 2, 2, 3, 4, 5]
    assert [lines[s]["train/nonfinite_skipped"] for s in range(1, 11)] == skipped
    assert [lines[s]["train/nonfinite_streak"] for s in range(1, 11)] == [
        0,
        0,
        1,
        2,
        0,
        0,
        0,
        1,
        2,
        3,
    ]
    assert np.isnan(lines[3]["train/loss"]) and np.isfinite(lines[5]["train/loss"])
    # Skipped steps changed nothing but the step count (and the data position).
    at = {step: restore_state(workdir, step) for step in (2, 4, 6, 8, 10)}
    for part in ("params", "opt_state", "strategy_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, at[2][part], at[4][part])
        jax.tree.map(np.testing.assert_array_equal, at[8][part], at[10][part])
    assert (int(at[4]["step"]), int(at[4]["nonfinite_skipped"])) == (4, 2)
    assert int(at[10]["nonfinite_streak"]) == 3
    before, after = jax.tree.leaves(at[4]["params"]), jax.tree.leaves(at[6]["params"])
    assert all(np.isfinite(x).all() for x in after)
    assert any((x != y).any() for x, y in zip(before, after, strict=True))  # Steps 5-6 trained.
