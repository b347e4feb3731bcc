"""Fine-tuning objectives without a teacher, and what every classification strategy shares.

``task``        the student alone: cross-entropy on the labels (squared error for a
                regression task such as STS-B).
``cofinetune``  MT-BERT's teacher co-finetuning (docs/methods.md#mt-bert): the model is a
                `TeacherEnsemble`, and the loss is Σ_k of each member's task loss
                through the shared pooler and classifier.

Classification batches carry ``labels`` [B] and ``example_weights`` [B] (0 on
padding rows); the student's outputs carry ``logits`` [B,C] (C = 1: regression).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from dwt_jax.distill.base import Batch, Metrics, ModelOutputs, StepContext, Strategy
from dwt_jax.errors import ConfigError


def example_weights(batch: Batch) -> jax.Array:
    """[B] float32: 1 for real examples, 0 for padding rows."""
    if "example_weights" in batch:
        return batch["example_weights"].astype(jnp.float32)
    return jnp.ones(batch["labels"].shape[:1], jnp.float32)


def weighted_mean(values_B: jax.Array, weights_B: jax.Array) -> jax.Array:
    """Σ w·x / Σ w over the (global) batch; 0 when every weight is 0."""
    return jnp.sum(values_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1e-9)


def task_loss_per_instance(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Cross-entropy with the gold class, or (C = 1) the squared error of the score."""
    logits_BxC = logits_BxC.astype(jnp.float32)
    if logits_BxC.shape[-1] == 1:
        return jnp.square(logits_BxC[..., 0] - labels_B.astype(jnp.float32))
    log_probs_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
    labels_B = labels_B.astype(jnp.int32)
    return -jnp.take_along_axis(log_probs_BxC, labels_B[..., None], axis=-1)[..., 0]


def task_metrics(
    logits_BxC: jax.Array, batch: Batch, prefix: str = "train"
) -> tuple[jax.Array, Metrics]:
    """The mean task loss over real examples, and (classification) the accuracy."""
    weights_B = example_weights(batch)
    loss = weighted_mean(task_loss_per_instance(logits_BxC, batch["labels"]), weights_B)
    metrics = {f"{prefix}/task_loss": loss}
    if logits_BxC.shape[-1] > 1:
        correct_B = (jnp.argmax(logits_BxC, -1) == batch["labels"]).astype(jnp.float32)
        metrics[f"{prefix}/accuracy"] = weighted_mean(correct_B, weights_B)
    return loss, metrics


def sub_config(distill_config: ml_collections.ConfigDict, name: str) -> Mapping[str, Any]:
    """``distill.<name>`` as a plain dict (empty if the config has no such section)."""
    section = distill_config.get(name, None)
    if section is None:
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def check_keys(section: Mapping[str, Any], allowed: Sequence[str], field: str) -> None:
    """Unknown keys in a strategy's sub-config are typos: refuse them by name."""
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]} is not a setting of this strategy; use one of "
            f"{', '.join(sorted(allowed))}."
        )


class TaskStrategy(Strategy):
    """Fine-tuning alone: the task loss on the labels, no teacher."""

    name: ClassVar[str] = "task"
    mode: ClassVar[str] = "finetune"

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        loss, metrics = task_metrics(student["logits"], batch)
        return loss, metrics, dict(ctx.state)


class CoFinetuneStrategy(Strategy):
    """Σ_k task loss of every ensemble member through the shared head (docs/methods.md#mt-bert)."""

    name: ClassVar[str] = "cofinetune"
    mode: ClassVar[str] = "finetune"
    trains_ensemble: ClassVar[bool] = True

    def loss(
        self,
        student: ModelOutputs,
        teachers: Sequence[ModelOutputs],
        batch: Batch,
        ctx: StepContext,
    ) -> tuple[jax.Array, Metrics, dict[str, Any]]:
        logits_KxBxC = student["logits"]
        if logits_KxBxC.ndim != 3:
            raise ValueError(
                "distill.strategy='cofinetune' trains a teacher ensemble ([K,B,C] logits); "
                "use it for the teachers stage only."
            )
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for k in range(logits_KxBxC.shape[0]):
            loss_k, metrics_k = task_metrics(logits_KxBxC[k], batch, prefix=f"train/teacher{k}")
            total = total + loss_k
            metrics.update(metrics_k)
        metrics["train/task_loss"] = total / logits_KxBxC.shape[0]
        return total, metrics, dict(ctx.state)
