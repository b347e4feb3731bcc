"""Pure loss functions on arrays. Imports only jax: usable from any JAX code.

Shapes: B instances, M masked (predicted) positions per instance, V vocabulary.
Every loss takes ``weights_BxM`` (1.0 for a real prediction, 0.0 for padding) and
returns ``(per_instance_B, scalar)``: the per-instance value is the weighted mean
over that instance's positions, the scalar the weighted mean over all positions
of the batch (so each real token counts once, however the batch is padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weighted_means(values_BxM: jax.Array, weights_BxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights_BxM = weights_BxM.astype(jnp.float32)
    weighted_BxM = values_BxM * weights_BxM
    per_instance_B = weighted_BxM.sum(-1) / jnp.maximum(weights_BxM.sum(-1), 1e-9)
    scalar = weighted_BxM.sum() / jnp.maximum(weights_BxM.sum(), 1e-9)
    return per_instance_B, scalar


def token_cross_entropy(logits_BxMxV: jax.Array, labels_BxM: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] at every position, float32, shape [B, M]."""
    logits_BxMxV = logits_BxMxV.astype(jnp.float32)
    log_z_BxM = jax.nn.logsumexp(logits_BxMxV, axis=-1)
    label_logit_BxM = jnp.take_along_axis(logits_BxMxV, labels_BxM[..., None], axis=-1)[..., 0]
    return log_z_BxM - label_logit_BxM


def mlm_cross_entropy(
    logits_BxMxV: jax.Array, labels_BxM: jax.Array, weights_BxM: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masked-LM cross-entropy H(q, p_θ) over the masked positions.

    Args:
      logits_BxMxV: the model's logits at the masked positions.
      labels_BxM: the original token ids at those positions.
      weights_BxM: 1.0 where a position is a real prediction, 0.0 for padding.
    Returns:
      (per-instance mean cross-entropy [B], weighted mean over the batch []).
    """
    return _weighted_means(token_cross_entropy(logits_BxMxV, labels_BxM), weights_BxM)


def mlm_accuracy(
    logits_BxMxV: jax.Array, labels_BxM: jax.Array, weights_BxM: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Fraction of masked positions whose arg-max prediction is the label."""
    correct_BxM = (jnp.argmax(logits_BxMxV, axis=-1) == labels_BxM).astype(jnp.float32)
    return _weighted_means(correct_BxM, weights_BxM)
