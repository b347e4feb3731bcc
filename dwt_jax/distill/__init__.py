"""Training objectives ("strategies"), chosen by name in ``config.distill.strategy``."""

from __future__ import annotations

import ml_collections

from dwt_jax.distill.base import MLMStrategy, Strategy
from dwt_jax.distill.dwt import DWTStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    MLMStrategy.name: MLMStrategy,
    DWTStrategy.name: DWTStrategy,
}


def make_strategy(distill_config: ml_collections.ConfigDict) -> Strategy:
    """The strategy named by ``distill_config.strategy``."""
    name = distill_config.strategy
    if name not in STRATEGIES:
        raise ValueError(
            f"distill.strategy={name!r} is unknown; use one of {', '.join(sorted(STRATEGIES))}."
        )
    return STRATEGIES[name].from_config(distill_config)


__all__ = ["STRATEGIES", "DWTStrategy", "MLMStrategy", "Strategy", "make_strategy"]
