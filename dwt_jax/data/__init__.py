"""Data: text sources, tokenizers, packing/masking and the Grain pre-training pipeline."""

from dwt_jax.data.corpus import DataConfigError, load_text_source
from dwt_jax.data.pipeline import batch_spec, eval_batches, make_pretrain_iterator
from dwt_jax.data.tokenizer import SpecialIds, get_tokenizer

__all__ = [
    "DataConfigError",
    "SpecialIds",
    "batch_spec",
    "eval_batches",
    "get_tokenizer",
    "load_text_source",
    "make_pretrain_iterator",
]
