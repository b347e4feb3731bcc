"""Evaluation of fine-tuned models: the task's metrics over the whole eval split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from dwt_jax import sharding, steps
from dwt_jax.data import tasks


def eval_fn(
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    params_shardings: Any,
    batch_shardings: Any,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
):
    """Logits, labels and example weights of a global batch, replicated (for metrics)."""

    def predict(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = steps.forward(model, params, batch, deterministic=True)["logits"]
        return {"logits": logits, "labels": batch["labels"], "weights": batch["example_weights"]}

    jitted = jax.jit(
        predict,
        in_shardings=(params_shardings, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )

    def run(params: Any, batch: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        with sharding.activate(mesh), nn.logical_axis_rules(rules):
            return jax.device_get(jitted(params, batch))

    return run


def evaluate(
    predict, params: Any, eval_batches: Sequence[Any], task: tasks.TaskSpec, prefix: str
) -> dict[str, float]:
    """The task's metrics and mean task loss of one model (or ensemble) on the eval set.

    An ensemble ([K,N,C] logits) reports each member as ``<prefix>/teacher{k}/...`` and
    the average of their probabilities (scores, for regression) as ``<prefix>/...``.
    """
    outs = [predict(params, batch) for batch in eval_batches]
    logits = np.concatenate([o["logits"] for o in outs], axis=-2)
    labels = np.concatenate([o["labels"] for o in outs])
    weights = np.concatenate([o["weights"] for o in outs])

    def scored(logits_NxC: np.ndarray, name: str) -> dict[str, float]:
        values = tasks.compute_metrics(task, logits_NxC, labels, weights)
        if task.is_regression:
            loss = np.square(logits_NxC[:, 0] - labels)
        else:
            shifted = logits_NxC - logits_NxC.max(-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            loss = -np.take_along_axis(log_probs, labels.astype(int)[:, None], -1)[:, 0]
        values["task_loss"] = float((loss * weights).sum() / max(weights.sum(), 1e-9))
        return {f"{name}/{k}": float(v) for k, v in values.items()}

    if logits.ndim == 2:
        return scored(logits, prefix)
    metrics: dict[str, float] = {}
    for k in range(logits.shape[0]):
        metrics.update(scored(logits[k], f"{prefix}/teacher{k}"))
    if task.is_regression:
        mean = logits.mean(0)
    else:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        mean = np.log(probs.mean(0) + 1e-12)
    metrics.update(scored(mean, prefix))
    return metrics


def describe(task: tasks.TaskSpec):
    """The progress line of an evaluation: every task metric and the loss."""

    def text(metrics: dict[str, float]) -> str:
        shown = [f"{m} {metrics[f'eval/{m}']:.4f}" for m in task.metrics if f"eval/{m}" in metrics]
        return "  ".join([*shown, f"task_loss {metrics.get('eval/task_loss', float('nan')):.4f}"])

    return text
