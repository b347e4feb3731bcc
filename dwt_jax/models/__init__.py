"""BERT-style encoders with masked-LM and classification heads."""

from dwt_jax.models.bert import (
    BertClassifier,
    BertEncoder,
    BertMLM,
    attention_mask,
    make_model,
)
from dwt_jax.models.config import BertConfig

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "BertMLM",
    "attention_mask",
    "make_model",
]
