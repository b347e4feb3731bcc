"""What the decoder families share: the document-aware causal attention (with an
optional KV cache for generation), RoPE, RMSNorm, the block stack, and the causal-LM
model interface the train step reads.

Attention runs through ``jax.nn.dot_product_attention`` with a boolean mask, so XLA
(or cuDNN on GPU) may pick a fused kernel. Packed rows hold several documents
(``segment_ids`` 1, 2, ...; 0 is padding): a token attends to the tokens at or
before it in its own document only (docs/methods.md#decoders).

Shape letters: B batch, L length (queries), S keys, D hidden, H query heads, G
key/value heads, K head dim, F mlp width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.layers import zeros_init

Array = jax.Array

BLD = ("batch", "length", "embed")
BLF = ("batch", "length", "mlp")
BLHK = ("batch", "length", "heads", "kv")
BLGK = ("batch", "length", "kv_heads", "kv")
CAUSAL_INPUT_NAMES = ("input_ids", "segment_ids", "positions")

REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


def causal_mask(segment_ids_BxL: Array) -> Array:
    """[B,1,L,L] bool: key at or before the query, in the query's (non-padding) document."""
    length = segment_ids_BxL.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), jnp.bool_))
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask_BxLxL = same_BxLxL & (segment_ids_BxL != 0)[:, None, :] & causal_LxL[None]
    return mask_BxLxL[:, None]


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · scale``, computed in float32 (as Llama does)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


def rope_inverse_frequencies(cfg: DecoderConfig) -> Array:
    """[K/2] float32 inverse frequencies, with Llama 3's scaling when configured."""
    k = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    if cfg.rope_scaling != "llama3":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxNxK: Array, positions_BxL: Array, inv_freq: Array) -> Array:
    """Rotates halves (Hugging Face's ``rotate_half`` layout) by position · frequency."""
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # [B,L,K/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x = x_BxLxNxK.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).astype(x_BxLxNxK.dtype)


def attend(
    module: nn.Module,
    q_BxLxHxK: Array,
    k_BxLxGxK: Array,
    v_BxLxGxK: Array,
    segment_ids_BxL: Array,
    decode: bool,
) -> Array:
    """Scaled dot-product attention [B,L,H,K]; grouped-query when G < H.

    ``decode``: keys and values go into ``module``'s 'cache' collection (created by
    the first call, sized by its length) at the cache index, and the queries attend
    to every cached position up to their own (generation: one document per row).
    """
    if decode:
        k_BxLxGxK, v_BxLxGxK, mask = _cached(module, k_BxLxGxK, v_BxLxGxK)
    else:
        mask = causal_mask(segment_ids_BxL)
    dtype = q_BxLxHxK.dtype
    return jax.nn.dot_product_attention(
        q_BxLxHxK,
        k_BxLxGxK.astype(dtype),
        v_BxLxGxK.astype(dtype),
        mask=mask,
        scale=1.0 / math.sqrt(q_BxLxHxK.shape[-1]),
    )


def _cached(module: nn.Module, k_BxLxGxK: Array, v_BxLxGxK: Array):
    """Writes this call's keys/values into the cache; returns all of them and the mask."""
    initialised = module.has_variable("cache", "key")
    shape, dtype = k_BxLxGxK.shape, k_BxLxGxK.dtype
    key = module.variable("cache", "key", jnp.zeros, shape, dtype)
    value = module.variable("cache", "value", jnp.zeros, shape, dtype)
    index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    length = k_BxLxGxK.shape[1]
    if not initialised:  # The creating call (init): attend within the call only.
        start = jnp.zeros((), jnp.int32)
    else:
        start = index.value
        key.value = jax.lax.dynamic_update_slice(key.value, k_BxLxGxK, (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(value.value, v_BxLxGxK, (0, start, 0, 0))
        index.value = start + length
        k_BxLxGxK, v_BxLxGxK = key.value, value.value
    query_at_L = start + jnp.arange(length)
    key_at_S = jnp.arange(k_BxLxGxK.shape[1])
    mask = (key_at_S[None, :] <= query_at_L[:, None])[None, None]  # [1,1,L,S]
    return k_BxLxGxK, v_BxLxGxK, mask


def embed_table(cfg: DecoderConfig, num: int, axis: str, name: str) -> nn.Embed:
    """An embedding table [num, D] with logical axes (axis, 'embed')."""
    return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), (axis, "embed")
        ),
        name=name,
    )


def run_blocks(
    cfg: DecoderConfig,
    block: Callable[..., nn.Module],
    prefix: str,
    x_BxLxD: Array,
    segment_ids_BxL: Array,
    positions_BxL: Array,
    deterministic: bool,
    decode: bool,
) -> tuple[Array, list[Array]]:
    """Runs ``num_layers`` blocks named ``{prefix}{i}`` (explicit, not scanned) in the
    calling module's scope, with ``model.remat``; returns the output and the hidden
    states (the embeddings' output, then each block's)."""
    block_cls: Any = block
    if cfg.remat != "none":
        # static_argnums count `self` as 0: (deterministic, decode).
        block_cls = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(4, 5))
    hidden_states = [x_BxLxD]
    for i in range(cfg.num_layers):
        x_BxLxD = block_cls(cfg, name=f"{prefix}{i}")(
            x_BxLxD, segment_ids_BxL, positions_BxL, deterministic, decode
        )
        hidden_states.append(x_BxLxD)
    return x_BxLxD, hidden_states


def lm_logits(h_BxLxD: Array, decoder_VxD: Array) -> Array:
    """float32 logits ``h @ decoder^T`` [B,L,V], with the vocabulary on its logical axis."""
    logits = jnp.einsum(
        "bld,vd->blv",
        h_BxLxD,
        decoder_VxD.astype(h_BxLxD.dtype),
        preferred_element_type=jnp.float32,
    )
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class CausalLM(nn.Module):
    """The interface of a decoder family's top-level model (GPT-2, Llama).

    ``__call__(input_ids, segment_ids, positions, deterministic, output_hidden_states,
    decode)`` returns ``(logits [B,L,V] float32, out)`` with ``out['hidden']`` the final
    normalised hidden states [B,L,D] and, when asked, ``out['hidden_states']``
    (num_layers + 1 arrays, the last one after the final norm). The step reads the
    batch fields ``input_names`` and turns the result into outputs by
    ``step_outputs``, which reads the LM head through the family's static
    ``head_weights(params) -> (decoder [V,D], bias [V] or None)`` (every family
    defines it: it knows where its head lives, tied or not).
    """

    config: DecoderConfig
    input_names: ClassVar[tuple[str, ...]] = CAUSAL_INPUT_NAMES

    def step_outputs(self, params: Any, logits: Array, out: dict[str, Any]) -> dict[str, Any]:
        """'lm_logits' [B,L,V], 'lm_hidden' [B,L,D], 'lm_decoder' (decoder [V,D], bias
        [V] or None: no decoder family has one) and the model's other outputs. Logits
        nobody reads are dropped by XLA."""
        decoder_VxD, bias_V = self.head_weights(params)
        extra = {k: v for k, v in out.items() if k != "hidden"}
        return {
            "lm_logits": logits,
            "lm_hidden": out["hidden"],
            "lm_decoder": (decoder_VxD, bias_V),
            **extra,
        }


def finish(
    h_BxLxD: Array, hidden_states: list[Array], output_hidden_states: bool
) -> dict[str, Any]:
    """The ``out`` dict of a causal LM: 'hidden' and, if asked, 'hidden_states'."""
    out: dict[str, Any] = {"hidden": nn.with_logical_constraint(h_BxLxD, BLD)}
    if output_hidden_states:
        out["hidden_states"] = (*hidden_states[:-1], h_BxLxD)
    return out


def bias_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]):
    """A zero-initialised float32 bias with logical ``axes``."""
    return module.param(name, zeros_init(axes), shape, jnp.float32)
