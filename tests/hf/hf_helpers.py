"""Helpers of the Hugging Face tests: tiny randomly initialised transformers models,
batches with padding and token types, and both implementations' outputs.

Biases and LayerNorm parameters are perturbed away from their (0, 1) initial values so
that a transform that dropped or swapped one of them could not go unnoticed.
"""

from __future__ import annotations

import flax
import jax
import numpy as np
import torch
import transformers

from dwt_jax.models.bert import make_model
from dwt_jax.state import dummy_model_inputs

VOCAB = 97
BATCH, LENGTH = 3, 12


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _sizes(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        **extra,
    )


def make_hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """'bert_mlm' | 'roberta_mlm' | 'bert_cls' | 'roberta_cls' | 'bert_pretraining'."""
    torch.manual_seed(seed)
    if kind.startswith("roberta"):
        config = transformers.RobertaConfig(
            **_sizes(max_position_embeddings=LENGTH + 4, type_vocab_size=1, num_labels=3)
        )
        cls = {
            "roberta_mlm": transformers.RobertaForMaskedLM,
            "roberta_cls": transformers.RobertaForSequenceClassification,
        }[kind]
    else:
        config = transformers.BertConfig(**_sizes(max_position_embeddings=LENGTH + 4, num_labels=3))
        cls = {
            "bert_mlm": transformers.BertForMaskedLM,
            "bert_cls": transformers.BertForSequenceClassification,
            "bert_pretraining": transformers.BertForPreTraining,
        }[kind]
    return _perturb(cls(config), seed)


def inputs(kind: str) -> dict[str, np.ndarray]:
    """A padded batch with two segments (BERT) : ids, attention mask, token types."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, (BATCH, LENGTH))
    mask = np.ones((BATCH, LENGTH), np.int64)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    pad = 1 if kind.startswith("roberta") else 0
    types = np.zeros((BATCH, LENGTH), np.int64)
    if not kind.startswith("roberta"):
        types[:, 6:] = 1
    return {"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask, "types": types}


def template(config, head: str) -> dict:
    """A fresh float32 NumPy param tree of our model."""
    model = make_model(config, head)
    boxed = model.init(jax.random.PRNGKey(0), **dummy_model_inputs(8, 2), deterministic=True)
    return jax.tree.map(np.asarray, flax.linen.unbox(boxed["params"]))


def our_outputs(config, params, head: str, batch: dict[str, np.ndarray]):
    """(logits, outputs) of our model on a transformers-style batch (all positions)."""
    b, length = batch["input_ids"].shape
    positions = np.broadcast_to(np.arange(length), (b, length))
    return make_model(config, head).apply(
        {"params": params},
        input_ids=batch["input_ids"],
        segment_ids=batch["attention_mask"],
        positions=positions,
        token_type_ids=batch["types"],
        masked_positions=positions,
        deterministic=True,
        output_hidden_states=True,
    )


def their_outputs(model: torch.nn.Module, batch: dict[str, np.ndarray]):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            token_type_ids=torch.tensor(batch["types"]),
            output_hidden_states=True,
        )


def max_diff_on_tokens(a, b, mask: np.ndarray) -> float:
    """max |a - b| over real (non-padding) tokens; padding rows are meaningless in both."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(np.where(mask[..., None] == 1, diff, 0.0).max())
