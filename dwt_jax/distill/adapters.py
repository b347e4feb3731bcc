"""Student-side adapters: learned projections trained with the student, never exported.

Decision (docs/methods.md#feature-losses): when student and teacher widths differ,
project the *student* side. One linear map per matched layer pair, student hidden
D_s → teacher hidden D_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class HiddenProjections(nn.Module):
    """``count`` dense maps D_s → ``features``; ``proj_j`` applies to the j-th input."""

    count: int
    features: int
    initializer_range: float = 0.02

    @nn.compact
    def __call__(self, hidden_list: Sequence[jax.Array]) -> list[jax.Array]:
        if len(hidden_list) != self.count:
            raise ValueError(f"expected {self.count} hidden states, got {len(hidden_list)}.")
        kernel_init = nn.with_logical_partitioning(
            nn.initializers.normal(self.initializer_range), ("embed", "mlp")
        )
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",))
        return [
            nn.Dense(self.features, kernel_init=kernel_init, bias_init=bias_init, name=f"proj_{j}")(
                h.astype(jnp.float32)
            )
            for j, h in enumerate(hidden_list)
        ]
