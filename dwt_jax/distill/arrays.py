"""Array helpers shared by the weighting, selection and reinforcement formulas.

Argument checks (Python-level: shapes and modes are static), log-probabilities and
entropies, and the per-instance cross-entropy with the gold label. Private to
`dwt_jax.distill`: use the public names through `dwt_jax.distill.weighting`.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax import losses

sg = jax.lax.stop_gradient


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is unknown; use one of {', '.join(choices)}")


def check_ndim(x: jax.Array, ndim: int, name: str) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {jnp.shape(x)}")


def positive_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be a positive int, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive int, got {number}")
    return number


def concrete(x: object) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known now, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def log_probs(logits_BxC: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits_BxC).astype(jnp.float32), axis=-1)


def entropy(logits_BxC: jax.Array) -> jax.Array:
    """H(softmax(z)) over the last axis, natural log; 0·log 0 = 0 (finite gradients)."""
    log_p = log_probs(logits_BxC)
    p = jnp.exp(log_p)
    return -jnp.sum(p * jnp.where(p > 0, log_p, 0.0), axis=-1)


def instance_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """−log softmax(z_j)[y_j] per instance, float32 [B]."""
    check_ndim(logits_BxC, 2, "logits_BxC")
    return losses.token_cross_entropy(jnp.asarray(logits_BxC), jnp.asarray(labels_B))
