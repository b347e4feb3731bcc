"""The Llama family (Flax Linen): RoPE, RMSNorm, SwiGLU, grouped-query attention;
a tied or untied LM head; optional q/k/v biases (Qwen2) and per-head q/k RMSNorm
(Qwen3). Mistral is a Llama (its sliding window is refused when it would matter).

The parameter tree mirrors Hugging Face's ``LlamaForCausalLM``:
``model/{embed_tokens,layers_{i}/{input_layernorm,self_attn/{q,k,v,o}_proj,
post_attention_layernorm,mlp/{gate,up,down}_proj},norm}`` and ``lm_head`` (untied).
Projections keep their heads as axes: ``q_proj`` [D,H,K], ``k_proj``/``v_proj``
[D,G,K] (key/value heads on the 'kv_heads' axis), ``o_proj`` [H,K,D].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dwt_jax.models.decoder import (
    BLD,
    BLF,
    BLGK,
    BLHK,
    CausalLM,
    RMSNorm,
    apply_rope,
    attend,
    bias_param,
    embed_table,
    finish,
    lm_logits,
    rope_inverse_frequencies,
    run_blocks,
)
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.dropout import Dropout
from dwt_jax.models.layers import kernel_init

Array = jax.Array


class Linear(nn.Module):
    """``x @ kernel [+ bias]`` over the last input axis (or ``in_axes`` trailing axes),
    kernel [*in, *features] with logical ``axes``, float32 parameters."""

    config: DecoderConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False
    in_axes: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        shape = (*x.shape[x.ndim - self.in_axes :], *self.features)
        kernel = self.param("kernel", kernel_init(cfg, self.axes), shape, jnp.float32)
        dtype = cfg.compute_dtype
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.in_axes)
        if self.use_bias:
            bias = bias_param(self, "bias", self.features, self.axes[self.in_axes :])
            y = y + bias.astype(dtype)
        return y


class LlamaAttention(nn.Module):
    """``self_attn``: q/k/v projections, optional q/k norm, RoPE, attention, ``o_proj``."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, segment_ids_BxL: Array, positions_BxL: Array, decode: bool
    ) -> Array:
        cfg = self.config
        H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Linear(cfg, (H, K), ("embed", "heads", "kv"), cfg.qkv_bias, name="q_proj")(x_BxLxD)
        k = Linear(cfg, (G, K), ("embed", "kv_heads", "kv"), cfg.qkv_bias, name="k_proj")(x_BxLxD)
        v = Linear(cfg, (G, K), ("embed", "kv_heads", "kv"), cfg.qkv_bias, name="v_proj")(x_BxLxD)
        if cfg.qk_norm:
            q = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="k_norm")(k)
        inv_freq = rope_inverse_frequencies(cfg)
        q = nn.with_logical_constraint(apply_rope(q, positions_BxL, inv_freq), BLHK)
        k = nn.with_logical_constraint(apply_rope(k, positions_BxL, inv_freq), BLGK)
        v = nn.with_logical_constraint(v, BLGK)
        context_BxLxHxK = nn.with_logical_constraint(
            attend(self, q, k, v, segment_ids_BxL, decode), BLHK
        )
        out = Linear(cfg, (cfg.hidden_size,), ("heads", "kv", "embed"), in_axes=2, name="o_proj")(
            context_BxLxHxK
        )
        return checkpoint_name(out, "attn_out")


class LlamaMLP(nn.Module):
    """``mlp``: ``down_proj(silu(gate_proj(x)) · up_proj(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.config
        gate = Linear(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="gate_proj")(x_BxLxD)
        up = Linear(cfg, (cfg.mlp_dim,), ("embed", "mlp"), name="up_proj")(x_BxLxD)
        h = nn.with_logical_constraint(nn.silu(gate) * up, BLF)
        out = Linear(cfg, (cfg.hidden_size,), ("mlp", "embed"), name="down_proj")(h)
        return checkpoint_name(out, "mlp_out")


class LlamaDecoderLayer(nn.Module):
    """``layers_{i}``: x + attn(norm(x)), then + mlp(norm(.)), dropout on each branch."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        segment_ids_BxL: Array,
        positions_BxL: Array,
        deterministic: bool,
        decode: bool,
    ) -> Array:
        cfg = self.config
        dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)
        norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="input_layernorm")
        h = LlamaAttention(cfg, name="self_attn")(
            norm(x_BxLxD), segment_ids_BxL, positions_BxL, decode
        )
        x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
        norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="post_attention_layernorm")
        h = LlamaMLP(cfg, name="mlp")(norm(x_BxLxD))
        x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
        return nn.with_logical_constraint(x_BxLxD, BLD)


class LlamaModel(nn.Module):
    """``model``: ``embed_tokens``, ``layers_{i}``, the final ``norm``."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        deterministic: bool,
        decode: bool,
    ) -> tuple[Array, list[Array], Array]:
        """(final hidden states [B,L,D], hidden states, the word embeddings [V,D])."""
        cfg = self.config
        embed = embed_table(cfg, cfg.vocab_size, "vocab", "embed_tokens")
        x_BxLxD = embed(input_ids)
        x_BxLxD = Dropout(cfg.dropout_rate, cfg.dropout_rng)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BLD)
        x_BxLxD, hidden_states = run_blocks(
            cfg, LlamaDecoderLayer, "layers_", x_BxLxD, segment_ids, positions, deterministic,
            decode,
        )  # fmt: skip
        h_BxLxD = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="norm")(x_BxLxD)
        return h_BxLxD, hidden_states, embed.embedding


class LlamaForCausalLM(CausalLM):
    """A Llama-family decoder with its LM head (see `CausalLM` for the call)."""

    @nn.compact
    def __call__(
        self,
        *,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        deterministic: bool,
        output_hidden_states: bool = False,
        decode: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        cfg = self.config
        h_BxLxD, hidden_states, embedding_VxD = LlamaModel(cfg, name="model")(
            input_ids, segment_ids, positions, deterministic, decode
        )
        # Tied: the word embeddings; untied: `lm_head/kernel` [D,V].
        decoder_VxD = embedding_VxD if cfg.tie_embeddings else LMHead(cfg, name="lm_head")().T
        logits = lm_logits(h_BxLxD, decoder_VxD)
        return logits, finish(h_BxLxD, hidden_states, output_hidden_states)

    @staticmethod
    def head_weights(params: Any) -> tuple[Array, Array | None]:
        if "lm_head" in params:
            return params["lm_head"]["kernel"].T, None
        return params["model"]["embed_tokens"]["embedding"], None


class LMHead(nn.Module):
    """``lm_head``: the untied decoder, kernel [D,V]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self) -> Array:
        cfg = self.config
        return self.param(
            "kernel",
            kernel_init(cfg, ("embed", "vocab")),
            (cfg.hidden_size, cfg.vocab_size),
            jnp.float32,
        )
