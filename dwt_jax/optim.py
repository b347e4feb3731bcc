"""The optimiser: AdamW with warm-up and decay, global-norm clipping, weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameters that take no weight decay (as in BERT): biases, LayerNorm, embeddings.
_NO_DECAY_NAMES = ("bias", "scale", "embedding")


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up to ``optim.learning_rate`` then linear/cosine decay (or constant)."""
    peak = float(optim.learning_rate)
    end = peak * float(optim.end_lr_factor)
    warmup = int(optim.warmup_steps)
    decay_steps = max(num_steps - warmup, 1)
    warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if optim.decay == "linear":
        decay_fn = optax.linear_schedule(peak, end, decay_steps)
    elif optim.decay == "cosine":
        decay_fn = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
    else:
        decay_fn = optax.constant_schedule(peak)
    if warmup == 0:
        return decay_fn
    return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for every parameter that takes weight decay."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        # The last dict key is the parameter's name (boxed trees end in `.value`).
        names = [entry.key for entry in path if hasattr(entry, "key")]
        return not names or names[-1] not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax optimiser and its learning-rate schedule (for logging)."""
    schedule = learning_rate_schedule(optim, num_steps)
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim.b1),
            b2=float(optim.b2),
            eps=float(optim.eps),
            weight_decay=float(optim.weight_decay),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
