"""Causal-LM pre-training (decoders): documents packed into rows, each token predicting
the next one of its document (docs/methods.md#decoders).

Held-out metrics: ``eval/loss`` (mean next-token cross-entropy in nats),
``eval/perplexity``, ``eval/accuracy`` and ``eval/bits_per_byte`` — the summed NLL
over ln 2 times the UTF-8 bytes of the predicted tokens, comparable across
tokenizers. The vocabulary side runs fused in chunks (``losses.fused_lm_losses``),
so no [B, L, V] logits exist in evaluation either.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from dwt_jax import losses, sharding
from dwt_jax.data import pipeline
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.errors import ConfigError
from dwt_jax.objectives.base import Objective
from dwt_jax.state import dummy_inputs

# Leaves of these subtrees are embeddings or the LM head (not counted as "non-embedding").
_EMBEDDING_NAMES = ("wte", "wpe", "embed_tokens", "lm_head")


class CausalLM(Objective):
    """The causal-LM (next-token) objective."""

    name: ClassVar[str] = "clm"
    tokenizer_kind: ClassVar[str] = "byte_bpe"
    eval_loss: ClassVar[str] = "loss"
    eval_accuracy: ClassVar[str] = "accuracy"
    model_kind: ClassVar[str] = "a decoder (causal LM)"
    summary_columns: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("eval/loss", "eval loss", ".4f"),
        ("eval/perplexity", "perplexity", ".2f"),
        ("eval/bits_per_byte", "bits/byte", ".4f"),
        ("eval/accuracy", "accuracy", ".4f"),
    )

    def check_data(self, config: ml_collections.ConfigDict, model_config: Any) -> None:
        del config, model_config  # Rows, targets and weights need only data.seq_len.

    def check_tokenizer(self, tokenizer: Any) -> None:
        tokenizer_lib.causal_special_ids(tokenizer)

    def make_data(self, config, tokenizer, mesh, host):
        special = tokenizer_lib.causal_special_ids(tokenizer)
        train_iter = pipeline.make_causal_iterator(
            config.data,
            tokenizer,
            special=special,
            split=config.data.train_split,
            global_batch_size=config.data.batch_size,
            seed=config.seed,
            **host,
        )
        eval_batches = [
            sharding.shard_batch(batch, mesh)
            for batch in pipeline.causal_eval_batches(
                config.data,
                tokenizer,
                special=special,
                global_batch_size=config.data.eval_batch_size,
                num_batches=config.train.eval_batches,
                seed=config.seed,
                **host,
            )
        ]
        return train_iter, eval_batches

    def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return pipeline.causal_batch_spec(config.data, config.data.batch_size)

    def model_inputs(self, model: nn.Module, config: ml_collections.ConfigDict) -> dict:
        return dummy_inputs(model, config.data.seq_len)

    def eval_constants(self, tokenizer: Any) -> Any:
        return jnp.asarray(tokenizer_lib.token_byte_lengths(tokenizer), jnp.float32)

    def eval_sums(self, outputs, batch, tokenizer_data):
        weights_BxL = batch["target_weights"]
        per_position = losses.fused_lm_losses(
            outputs["lm_hidden"], *outputs["lm_decoder"], batch["targets"]
        )
        bytes_per_token = tokenizer_data
        # A target id the byte table does not cover (a model vocabulary padded past the
        # tokenizer's) counts no bytes; real text never produces one.
        byte_sum = (
            jnp.take(bytes_per_token, batch["targets"], mode="fill", fill_value=0.0) * weights_BxL
        ).sum()
        return {
            "loss_sum": (per_position["ce"] * weights_BxL).sum(),
            "correct_sum": (per_position["correct"] * weights_BxL).sum(),
            "weight_sum": weights_BxL.sum(),
            "byte_sum": byte_sum,
        }

    def eval_metrics(self, totals, prefix):
        weight = max(float(totals["weight_sum"]), 1e-9)
        loss = float(totals["loss_sum"]) / weight
        return {
            f"{prefix}/loss": loss,
            f"{prefix}/perplexity": float(math.exp(min(loss, 80.0))),
            f"{prefix}/accuracy": float(totals["correct_sum"]) / weight,
            f"{prefix}/bits_per_byte": float(totals["loss_sum"])
            / (math.log(2.0) * max(float(totals["byte_sum"]), 1e-9)),
        }

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval/loss']:.4f}  perplexity {metrics['eval/perplexity']:.2f}  "
            f"bits/byte {metrics['eval/bits_per_byte']:.4f}"
        )

    def check_hf_init(self, checkpoint: Any, config: ml_collections.ConfigDict) -> None:
        del config
        if not checkpoint.has_lm_head:
            raise ConfigError(
                f"init.workdir: {checkpoint.path} has no language-model head (no "
                f"{checkpoint.lm_head_key}, and its embeddings are not tied); start from a "
                "*ForCausalLM checkpoint."
            )

    def embedding_params(self, params: Any) -> list[Any]:
        found = []

        def walk(tree: Any) -> None:
            for name, sub in tree.items():
                if name in _EMBEDDING_NAMES:
                    found.append(sub)
                elif isinstance(sub, dict):
                    walk(sub)

        walk(params)
        return found


CLM = CausalLM()
__all__ = ["CLM", "CausalLM"]
