"""GPT-2 (Flax Linen): learned positions, pre-LN LayerNorm, GELU (tanh), fused QKV,
the LM head tied to the word embeddings, a final LayerNorm.

The parameter tree mirrors Hugging Face's ``GPT2LMHeadModel``:
``transformer/{wte,wpe,h_{i}/{ln_1,attn/{c_attn,c_proj},ln_2,mlp/{c_fc,c_proj}},ln_f}``.
Hugging Face's Conv1D weights are [in, out]: ``c_attn`` [D, 3D] is our kernel
[D, 3, H, K] reshaped, ``attn/c_proj`` [D, D] our [H, K, D].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from dwt_jax.models.decoder import (
    BLD,
    BLF,
    BLHK,
    CausalLM,
    attend,
    embed_table,
    finish,
    lm_logits,
    run_blocks,
)
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.dropout import Dropout
from dwt_jax.models.layers import Projection, layer_norm

Array = jax.Array


def gelu_tanh(x: Array) -> Array:
    """GPT-2's GELU (the tanh approximation, Hugging Face's 'gelu_new')."""
    return nn.gelu(x, approximate=True)


class GPT2Attention(nn.Module):
    """``attn``: the fused ``c_attn`` [D,3,H,K] and the output ``c_proj`` [H,K,D]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, segment_ids_BxL: Array, decode: bool) -> Array:
        cfg = self.config
        qkv_BxLx3xHxK = Projection(
            cfg,
            features=(3, cfg.num_heads, cfg.head_dim),
            kernel_axes=("embed", "qkv", "heads", "kv"),
            bias_axes=("qkv", "heads", "kv"),
            name="c_attn",
        )(x_BxLxD)
        q, k, v = (nn.with_logical_constraint(qkv_BxLx3xHxK[:, :, i], BLHK) for i in range(3))
        context_BxLxHxK = attend(self, q, k, v, segment_ids_BxL, decode)
        context_BxLxHxK = nn.with_logical_constraint(context_BxLxHxK, BLHK)
        out = Projection(
            cfg,
            features=(cfg.hidden_size,),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            name="c_proj",
        )(context_BxLxHxK)
        return checkpoint_name(out, "attn_out")


class GPT2MLP(nn.Module):
    """``mlp``: ``c_fc`` [D,F], GELU (tanh), ``c_proj`` [F,D]."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.config
        h = Projection(cfg, (cfg.mlp_dim,), ("embed", "mlp"), ("mlp",), name="c_fc")(x_BxLxD)
        h = nn.with_logical_constraint(gelu_tanh(h), BLF)
        out = Projection(cfg, (cfg.hidden_size,), ("mlp", "embed"), ("embed",), name="c_proj")(h)
        return checkpoint_name(out, "mlp_out")


class GPT2Block(nn.Module):
    """``h_{i}``: x + attn(ln_1(x)), then + mlp(ln_2(.)), dropout on each branch."""

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
        del positions_BxL  # Positions enter through the embeddings.
        cfg = self.config
        dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)
        h = GPT2Attention(cfg, name="attn")(
            layer_norm(cfg, "ln_1")(x_BxLxD), segment_ids_BxL, decode
        )
        x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
        h = GPT2MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x_BxLxD))
        x_BxLxD = x_BxLxD + dropout(h, deterministic=deterministic)
        return nn.with_logical_constraint(x_BxLxD, BLD)


class GPT2Model(nn.Module):
    """``transformer``: token + position embeddings, blocks ``h_{i}``, ``ln_f``."""

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
        wte = embed_table(cfg, cfg.vocab_size, "vocab", "wte")
        wpe = embed_table(cfg, cfg.max_len, "position", "wpe")
        x_BxLxD = wte(input_ids) + wpe(positions)
        x_BxLxD = Dropout(cfg.dropout_rate, cfg.dropout_rng)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BLD)
        x_BxLxD, hidden_states = run_blocks(
            cfg, GPT2Block, "h_", x_BxLxD, segment_ids, positions, deterministic, decode
        )
        return layer_norm(cfg, "ln_f")(x_BxLxD), hidden_states, wte.embedding


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its tied LM head (see `CausalLM` for the call and its outputs)."""

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
        transformer = GPT2Model(self.config, name="transformer")
        h_BxLxD, hidden_states, embedding_VxD = transformer(
            input_ids, segment_ids, positions, deterministic, decode
        )
        logits = lm_logits(h_BxLxD, embedding_VxD)
        return logits, finish(h_BxLxD, hidden_states, output_hidden_states)

    @staticmethod
    def head_weights(params: Any) -> tuple[Array, Array | None]:
        return params["transformer"]["wte"]["embedding"], None
