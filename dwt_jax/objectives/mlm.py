"""Masked-LM pre-training (BERT-style encoders): packed rows with [CLS]/[SEP], 15% of
the tokens masked, the loss at the masked positions only (docs/methods.md#data)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from dwt_jax import losses, sharding
from dwt_jax.data import pipeline
from dwt_jax.errors import ConfigError
from dwt_jax.objectives.base import Objective
from dwt_jax.state import dummy_inputs


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


class MaskedLM(Objective):
    """The masked-LM objective."""

    name: ClassVar[str] = "mlm"
    tokenizer_kind: ClassVar[str] = "wordpiece"
    eval_loss: ClassVar[str] = "mlm_loss"
    eval_accuracy: ClassVar[str] = "mlm_accuracy"
    model_kind: ClassVar[str] = "an encoder (masked LM)"
    summary_columns: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("eval/mlm_loss", "eval MLM loss", ".4f"),
        ("eval/mlm_accuracy", "accuracy", ".4f"),
        ("eval/perplexity", "perplexity", ".1f"),
    )
    # The pooler is not used by the MLM head; *ForMaskedLM checkpoints have none.
    hf_teacher_fresh: ClassVar[tuple[str, ...]] = ("bert/pooler",)

    def check_data(self, config: ml_collections.ConfigDict, model_config: Any) -> None:
        data = config.data
        max_predictions = data.max_predictions
        _require(
            isinstance(max_predictions, int) and max_predictions > 0,
            f"data.max_predictions={max_predictions!r} must be a positive integer; set it "
            "to 1 or more.",
        )
        _require(
            max_predictions <= data.seq_len,
            f"data.max_predictions={max_predictions} exceeds data.seq_len={data.seq_len}; "
            "lower it.",
        )
        _require(
            1e-6 <= data.mask_prob <= 1.0,
            f"data.mask_prob={data.mask_prob!r} must be a number in [1e-06, 1.0].",
        )

    def check_tokenizer(self, tokenizer: Any) -> None:
        del tokenizer  # get_tokenizer checks [CLS], [SEP], [MASK] for a WordPiece one.

    def make_data(self, config, tokenizer, mesh, host):
        train_iter = pipeline.make_pretrain_iterator(
            config.data,
            tokenizer,
            split=config.data.train_split,
            global_batch_size=config.data.batch_size,
            seed=config.seed,
            **host,
        )
        eval_batches = [
            sharding.shard_batch(batch, mesh)
            for batch in pipeline.eval_batches(
                config.data,
                tokenizer,
                global_batch_size=config.data.eval_batch_size,
                num_batches=config.train.eval_batches,
                seed=config.seed,
                **host,
            )
        ]
        return train_iter, eval_batches

    def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return pipeline.batch_spec(config.data, config.data.batch_size)

    def model_inputs(self, model: nn.Module, config: ml_collections.ConfigDict) -> dict:
        return dummy_inputs(model, config.data.seq_len, config.data.max_predictions)

    def eval_sums(self, outputs, batch, tokenizer_data):
        del tokenizer_data
        weights_BxM = batch["masked_weights"]
        ce_BxM = losses.token_cross_entropy(outputs["mlm_logits"], batch["masked_ids"])
        correct_BxM = jnp.argmax(outputs["mlm_logits"], -1) == batch["masked_ids"]
        return {
            "loss_sum": (ce_BxM * weights_BxM).sum(),
            "correct_sum": (correct_BxM * weights_BxM).sum(),
            "weight_sum": weights_BxM.sum(),
        }

    def eval_metrics(self, totals, prefix):
        loss = float(totals["loss_sum"] / max(totals["weight_sum"], 1e-9))
        return {
            f"{prefix}/mlm_loss": loss,
            f"{prefix}/mlm_accuracy": float(
                totals["correct_sum"] / max(totals["weight_sum"], 1e-9)
            ),
            f"{prefix}/perplexity": float(math.exp(min(loss, 80.0))),
        }

    def describe(self, metrics: dict[str, float]) -> str:
        return (
            f"mlm_loss {metrics['eval/mlm_loss']:.4f}  accuracy "
            f"{metrics['eval/mlm_accuracy']:.4f}  perplexity {metrics['eval/perplexity']:.1f}"
        )

    def embedding_params(self, params: Any) -> list[Any]:
        return [params["bert"]["embeddings"]]

    def check_hf_init(self, checkpoint: Any, config: ml_collections.ConfigDict) -> None:
        if not checkpoint.has_mlm_head and not config.init.get("fresh_mlm_head", False):
            raise ConfigError(
                f"init.workdir: {checkpoint.path} has no MLM head; use a *ForMaskedLM or "
                "*ForPreTraining checkpoint, or set init.fresh_mlm_head=True to start "
                "the head from random weights."
            )

    def hf_fresh(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        # The pooler is not used by the MLM head; *ForMaskedLM checkpoints have none.
        fresh = config.get("init", {}).get("fresh_mlm_head", False)
        return ("bert/pooler",) + (("cls",) if fresh else ())


MLM = MaskedLM()
