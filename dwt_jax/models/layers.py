"""Building blocks shared by the BERT models and the teacher ensemble (Flax Linen).

Every parameter carries logical axis names; the mesh and the logical-to-mesh rules
live outside the model. Module and parameter names mirror Hugging Face BERT
(``dense``, ``LayerNorm``, ``kernel``, ``bias``), so a block's subtree imports and
exports through the name table unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwt_jax.models.config import BertConfig

Array = jax.Array

# Square [D,D] kernels (pooler, MLM transform) need two distinct logical names.
SQUARE = ("embed", "mlp")


def kernel_init(cfg: BertConfig, names: tuple[str, ...]) -> nn.initializers.Initializer:
    """N(0, initializer_range²), as BERT initialises its kernels and embeddings."""
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def zeros_init(names: tuple[str, ...]) -> nn.initializers.Initializer:
    """Zeros (biases) carrying the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def dense(cfg: BertConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
    """A Dense whose kernel [in, out] carries `names` and whose bias carries `names[1]`."""
    return nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init(cfg, names),
        bias_init=zeros_init(names[1:]),
        name=name,
    )


def layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    """A LayerNorm in the compute dtype with float32 `scale`/`bias` on the 'norm' axis."""
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=zeros_init(("norm",)),
        name=name,
    )


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, Hugging Face BERT's 'gelu'."""
    return nn.gelu(x, approximate=False)


class Projection(nn.Module):
    """A dense layer over the trailing input dims: kernel [*in, *features], bias [*features].

    The kernel is created in its final shape. (flax's DenseGeneral initialises a
    flattened kernel and reshapes it, and its logical-axis metadata then fails under
    a device mesh, where the names are applied to the flattened array.)
    """

    config: BertConfig
    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]

    @nn.compact
    def __call__(self, x: Array, apply: bool = True) -> Array | tuple[Array, Array]:
        """``x @ kernel + bias``; with ``apply=False`` the (kernel, bias) for a caller
        that fuses several projections into one matmul (``x`` then gives only shapes)."""
        cfg = self.config
        num_in = len(self.kernel_axes) - len(self.features)
        kernel = self.param(
            "kernel",
            kernel_init(cfg, self.kernel_axes),
            (*x.shape[x.ndim - num_in :], *self.features),
            jnp.float32,
        )
        bias = self.param("bias", zeros_init(self.bias_axes), self.features, jnp.float32)
        if not apply:
            return kernel, bias
        dtype = cfg.compute_dtype
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=num_in)
        return y + bias.astype(dtype)


class DenseBlock(nn.Module):
    """A scope holding `dense` (kernel names `names`), then `activation` [and `LayerNorm`].

    Serves as `intermediate` (GELU), `pooler` (tanh), `classifier` and the MLM
    `transform` (GELU + LayerNorm).
    """

    config: BertConfig
    features: int
    names: tuple[str, str]
    activation: Callable[[Array], Array] | None = None
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = dense(self.config, self.features, self.names, "dense")(x)
        if self.activation is not None:
            y = self.activation(y)
        return layer_norm(self.config)(y) if self.layer_norm else y
