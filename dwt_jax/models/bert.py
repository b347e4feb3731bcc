"""BERT encoder with masked-LM and classification heads (Flax Linen).

The parameter tree mirrors Hugging Face BERT, so import and export are a name table:
`bert/{embeddings,encoder/layer_{i},pooler}`, `cls/predictions` (decoder tied to the
word embeddings) and `classifier/dense`. Every parameter carries logical axis names
(vocab, embed, heads, kv, mlp, position, type_vocab, classes, norm); the mesh and the
logical-to-mesh rules live outside the model. The building blocks (projections,
dense blocks, LayerNorm) are in `dwt_jax.models.layers`, shared with the ensemble.

Shape letters: B batch, L length, M masked positions, D hidden, H heads, K head dim,
F mlp width, V vocabulary, C classes.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dwt_jax.models.config import BertConfig
from dwt_jax.models.dropout import Dropout
from dwt_jax.models.layers import (
    SQUARE,
    DenseBlock,
    Projection,
    gelu,
    kernel_init,
    layer_norm,
    zeros_init,
)

Array = jax.Array

# The batch fields every BERT model reads (the masked LM also reads masked_positions).
ENCODER_INPUT_NAMES = ("input_ids", "segment_ids", "positions", "token_type_ids")
_BLD = ("batch", "length", "embed")
_BLF = ("batch", "length", "mlp")
_BLHK = ("batch", "length", "heads", "kv")


def attention_mask(segment_ids_BxL: Array) -> Array:
    """[B,1,L,L] bool: query and key share a non-zero segment id (0 is padding)."""
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask_BxLxL = same_BxLxL & (segment_ids_BxL != 0)[:, None, :]
    return mask_BxLxL[:, None, :, :]


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout -> [B,L,D]."""

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config

        def embed(num: int, axis: str) -> nn.Embed:
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                embedding_init=kernel_init(cfg, (axis, "embed")),
            )

        self.word_embeddings = embed(cfg.vocab_size, "vocab")
        self.position_embeddings = embed(cfg.max_len, "position")
        self.token_type_embeddings = embed(cfg.type_vocab_size, "type_vocab")
        self.LayerNorm = layer_norm(cfg)
        self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)

    def __call__(
        self, input_ids: Array, positions: Array, token_type_ids: Array, deterministic: bool
    ) -> Array:
        x_BxLxD = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions + self.config.position_offset)
            + self.token_type_embeddings(token_type_ids)
        )
        x_BxLxD = self.dropout(self.LayerNorm(x_BxLxD), deterministic=deterministic)
        return nn.with_logical_constraint(x_BxLxD, _BLD)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention up to (not including) the output projection."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, mask_Bx1xLxL: Array, deterministic: bool
    ) -> tuple[Array, Array]:
        """Returns the context [B,L,H,K] and the raw scaled scores q·k/sqrt(K) [B,H,L,L]."""
        cfg = self.config
        project = functools.partial(
            Projection,
            cfg,
            features=(cfg.num_heads, cfg.head_dim),
            kernel_axes=("embed", "heads", "kv"),
            bias_axes=("heads", "kv"),
        )
        # Fused QKV: the three projections keep their own (Hugging Face) parameters
        # but run as one [D] -> [3,H,K] matmul.
        kernels, biases = zip(
            *(project(name=name)(x_BxLxD, apply=False) for name in ("query", "key", "value")),
            strict=True,
        )
        dtype = cfg.compute_dtype
        kernel_Dx3xHxK = jnp.stack(kernels, axis=1).astype(dtype)
        qkv_BxLx3xHxK = jnp.tensordot(x_BxLxD.astype(dtype), kernel_Dx3xHxK, axes=1)
        qkv_BxLx3xHxK = qkv_BxLx3xHxK + jnp.stack(biases).astype(dtype)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
            nn.with_logical_constraint(qkv_BxLx3xHxK[:, :, i], _BLHK) for i in range(3)
        )
        scores_BxHxLxL = jnp.einsum(
            "bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK, preferred_element_type=jnp.float32
        ) / jnp.sqrt(jnp.float32(cfg.head_dim))
        # A row with no visible key (padding) becomes uniform instead of NaN.
        big_neg = jnp.finfo(jnp.float32).min
        masked_BxHxLxL = jnp.where(mask_Bx1xLxL, scores_BxHxLxL, big_neg)
        probs_BxHxLxL = jax.nn.softmax(masked_BxHxLxL, axis=-1)
        probs_BxHxLxL = Dropout(cfg.attention_dropout_rate, cfg.dropout_rng)(
            probs_BxHxLxL, deterministic=deterministic
        )
        context_BxLxHxK = jnp.einsum(
            "bhqs,bshk->bqhk", probs_BxHxLxL.astype(cfg.compute_dtype), v_BxLxHxK
        )
        return nn.with_logical_constraint(context_BxLxHxK, _BLHK), scores_BxHxLxL


class BertOutput(nn.Module):
    """Output projection -> dropout -> residual, with the block's LayerNorm.

    Post-LN: `LN(residual + dropout(dense(h)))`. Pre-LN: `residual + dropout(dense(h))`,
    and the same LayerNorm is applied to the block's input through `pre_norm`.
    """

    config: BertConfig
    kernel_axes: tuple[str, ...]
    remat_name: str

    def setup(self) -> None:
        cfg = self.config
        self.dense = Projection(
            cfg,
            features=(cfg.hidden_size,),
            kernel_axes=self.kernel_axes,
            bias_axes=("embed",),
        )
        self.LayerNorm = layer_norm(cfg)
        self.dropout = Dropout(cfg.dropout_rate, cfg.dropout_rng)

    def pre_norm(self, x_BxLxD: Array) -> Array:
        """The LayerNorm in front of the block (pre-LN only)."""
        return self.LayerNorm(x_BxLxD)

    def __call__(self, h: Array, residual_BxLxD: Array, deterministic: bool) -> Array:
        y_BxLxD = checkpoint_name(self.dense(h), self.remat_name)
        y_BxLxD = residual_BxLxD + self.dropout(y_BxLxD, deterministic=deterministic)
        if self.config.norm == "post":
            y_BxLxD = self.LayerNorm(y_BxLxD)
        return nn.with_logical_constraint(y_BxLxD, _BLD)


class BertAttention(nn.Module):
    """Self-attention block: `attention/self/*` and `attention/output/*`."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: Array, mask_Bx1xLxL: Array, deterministic: bool
    ) -> tuple[Array, Array]:
        """Returns the block output [B,L,D] and the raw attention scores [B,H,L,L]."""
        output = BertOutput(self.config, ("heads", "kv", "embed"), "attn_out", name="output")
        h_BxLxD = output.pre_norm(x_BxLxD) if self.config.norm == "pre" else x_BxLxD
        context_BxLxHxK, scores_BxHxLxL = BertSelfAttention(self.config, name="self")(
            h_BxLxD, mask_Bx1xLxL, deterministic
        )
        return output(context_BxLxHxK, x_BxLxD, deterministic), scores_BxHxLxL


class BertLayer(nn.Module):
    """One transformer block: attention block then GELU MLP block."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        mask_Bx1xLxL: Array,
        deterministic: bool,
        output_attentions: bool,
    ) -> tuple[Array, Array | None]:
        """Returns the layer output [B,L,D] and the scores [B,H,L,L] when asked, else None."""
        cfg = self.config
        x_BxLxD, scores_BxHxLxL = BertAttention(cfg, name="attention")(
            x_BxLxD, mask_Bx1xLxL, deterministic
        )
        output = BertOutput(cfg, ("mlp", "embed"), "mlp_out", name="output")
        h_BxLxD = output.pre_norm(x_BxLxD) if cfg.norm == "pre" else x_BxLxD
        h_BxLxF = DenseBlock(cfg, cfg.mlp_dim, ("embed", "mlp"), gelu, name="intermediate")(h_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, _BLF)
        x_BxLxD = output(h_BxLxF, x_BxLxD, deterministic)
        return x_BxLxD, (scores_BxHxLxL if output_attentions else None)


_REMAT_POLICIES: dict[str, Any] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


class BertLayerStack(nn.Module):
    """`encoder`: `layer_{i}` blocks (explicit, not scanned) [+ `final_LayerNorm`]."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        mask_Bx1xLxL: Array,
        deterministic: bool,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> tuple[Array, dict[str, tuple[Array, ...]]]:
        cfg = self.config
        layer_cls: Any = BertLayer
        if cfg.remat != "none":
            # static_argnums count `self` as 0: (deterministic, output_attentions).
            layer_cls = nn.remat(
                BertLayer, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(3, 4)
            )
        hidden_states, attentions = [x_BxLxD], []
        for i in range(cfg.num_layers):
            x_BxLxD, scores_BxHxLxL = layer_cls(cfg, name=f"layer_{i}")(
                x_BxLxD, mask_Bx1xLxL, deterministic, output_attentions
            )
            hidden_states.append(x_BxLxD)
            attentions.append(scores_BxHxLxL)
        if cfg.norm == "pre":
            x_BxLxD = layer_norm(cfg, name="final_LayerNorm")(x_BxLxD)
            hidden_states[-1] = x_BxLxD
        out: dict[str, tuple[Array, ...]] = {}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return x_BxLxD, out


class BertEncoder(nn.Module):
    """The `bert` subtree: embeddings, `encoder` layer stack and (`add_pooler`) pooler."""

    config: BertConfig
    # False for encoders whose [CLS] goes to a pooler shared with other models
    # (co-finetuned teachers, docs/methods.md#mt-bert): no `pooler` parameters, no `pooled` output.
    add_pooler: bool = True

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertLayerStack(self.config)
        if self.add_pooler:
            self.pooler = DenseBlock(self.config, self.config.hidden_size, SQUARE, jnp.tanh)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        token_type_ids: Array,
        deterministic: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        """Encodes packed sequences.

        Args:
          input_ids: [B,L] int32 token ids.
          segment_ids: [B,L] int32 packing ids; 0 is padding, tokens attend only to
            tokens with the same non-zero id.
          positions: [B,L] int32 position ids (restart in each packed segment).
          token_type_ids: [B,L] int32 BERT sentence A/B ids.
          deterministic: disables dropout when True.
          output_hidden_states: adds `hidden_states`, num_layers+1 arrays [B,L,D]
            (embeddings output, then each layer's; for pre-LN the last one is after
            the final LayerNorm).
          output_attentions: adds `attentions`, one [B,H,L,L] float32 array of raw
            scaled scores q·k/sqrt(K) per layer, before masking.

        Returns:
          `(sequence_output [B,L,D], out)` with `out['pooled']` [B,D] (with a pooler)
          and the optional entries above.
        """
        x_BxLxD = self.embeddings(input_ids, positions, token_type_ids, deterministic)
        x_BxLxD, out = self.encoder(
            x_BxLxD,
            attention_mask(segment_ids),
            deterministic,
            output_hidden_states,
            output_attentions,
        )
        if not self.add_pooler:
            return x_BxLxD, out
        # The pooler reads position 0: the [CLS] of the first packed segment.
        return x_BxLxD, {"pooled": self.pooler(x_BxLxD[:, 0]), **out}

    def word_embeddings(self) -> Array:
        """The [V,D] word-embedding table (the tied MLM decoder)."""
        return self.embeddings.word_embeddings.embedding


class _MLMPredictions(nn.Module):
    """`predictions`: transform, then the tied decoder `h @ E^T + bias`."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxMxD: Array, embedding_VxD: Array) -> tuple[Array, Array]:
        cfg = self.config
        h_BxMxD = nn.with_logical_constraint(
            DenseBlock(cfg, cfg.hidden_size, SQUARE, gelu, True, name="transform")(x_BxMxD),
            ("batch", "masked", "embed"),
        )
        bias_V = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), jnp.float32)
        logits_BxMxV = jnp.einsum(
            "bmd,vd->bmv",
            h_BxMxD,
            embedding_VxD.astype(cfg.compute_dtype),
            preferred_element_type=jnp.float32,
        )
        logits_BxMxV = nn.with_logical_constraint(
            logits_BxMxV + bias_V, ("batch", "masked", "vocab")
        )
        return logits_BxMxV, h_BxMxD


class _PreTrainingHeads(nn.Module):
    """`cls`: holds the MLM `predictions` head."""

    config: BertConfig

    @nn.compact
    def __call__(self, x_BxMxD: Array, embedding_VxD: Array) -> tuple[Array, Array]:
        return _MLMPredictions(self.config, name="predictions")(x_BxMxD, embedding_VxD)


class BertMLM(nn.Module):
    """BERT with the masked-LM head applied at the masked positions only."""

    config: BertConfig
    input_names: ClassVar[tuple[str, ...]] = (*ENCODER_INPUT_NAMES, "masked_positions")

    def step_outputs(self, params: Any, logits: Array, out: dict[str, Any]) -> dict[str, Any]:
        """'mlm_logits' [B,M,V], 'mlm_decoder' (the tied decoder: embedding [V,D], bias
        [V], for losses that apply it themselves) and ``out``; logits nobody reads are
        dropped by XLA."""
        decoder = (
            params["bert"]["embeddings"]["word_embeddings"]["embedding"],
            params["cls"]["predictions"]["bias"],
        )
        return {"mlm_logits": logits, "mlm_decoder": decoder, **out}

    def setup(self) -> None:
        self.bert = BertEncoder(self.config)
        self.cls = _PreTrainingHeads(self.config)

    def __call__(
        self,
        *,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        token_type_ids: Array,
        masked_positions: Array,
        deterministic: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        """MLM logits at `masked_positions` [B,M] int32 (indices into L).

        The other arguments are those of `BertEncoder.__call__`.

        Returns:
          `(logits [B,M,V] float32, out)`; `out` holds `masked_hidden` [B,M,D] (the
          transformed hidden state fed to the decoder), `pooled` [B,D], and
          `hidden_states` / `attentions` when asked.
        """
        x_BxLxD, out = self.bert(
            input_ids,
            segment_ids,
            positions,
            token_type_ids,
            deterministic,
            output_hidden_states,
            output_attentions,
        )
        x_BxMxD = jnp.take_along_axis(x_BxLxD, masked_positions[:, :, None], axis=1)
        x_BxMxD = nn.with_logical_constraint(x_BxMxD, ("batch", "masked", "embed"))
        logits_BxMxV, h_BxMxD = self.cls(x_BxMxD, self.bert.word_embeddings())
        return logits_BxMxV, {**out, "masked_hidden": h_BxMxD}


class BertClassifier(nn.Module):
    """BERT + pooler + dropout + `classifier/dense` for sequence classification."""

    config: BertConfig
    input_names: ClassVar[tuple[str, ...]] = ENCODER_INPUT_NAMES

    def step_outputs(self, params: Any, logits: Array, out: dict[str, Any]) -> dict[str, Any]:
        """'logits' [B,C] and ``out``."""
        del params
        return {"logits": logits, **out}

    @nn.compact
    def __call__(
        self,
        *,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        token_type_ids: Array,
        deterministic: bool,
        masked_positions: Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        """Class logits from the pooled [CLS] of the first segment.

        Arguments are those of `BertEncoder.__call__`; `masked_positions` is accepted
        and ignored so both models take the same batch.

        Returns:
          `(logits [B,C] float32, out)` with `pooled` [B,D] and the optional entries.
        """
        del masked_positions
        cfg = self.config
        _, out = BertEncoder(cfg, name="bert")(
            input_ids,
            segment_ids,
            positions,
            token_type_ids,
            deterministic,
            output_hidden_states,
            output_attentions,
        )
        pooled_BxD = Dropout(cfg.dropout_rate, cfg.dropout_rng)(
            out["pooled"], deterministic=deterministic
        )
        logits_BxC = DenseBlock(cfg, cfg.num_labels, ("embed", "classes"), name="classifier")(
            pooled_BxD
        )
        return logits_BxC.astype(jnp.float32), out


def make_model(cfg: BertConfig, head: str = "mlm") -> nn.Module:
    """Builds `BertMLM` (head='mlm') or `BertClassifier` (head='classifier')."""
    models = {"mlm": BertMLM, "classifier": BertClassifier}
    if head not in models:
        raise ValueError(f"head={head!r} is unknown: use one of {sorted(models)}.")
    cfg.validate()
    return models[head](cfg)
