"""Data: text sources, tokenizers, packing/masking, the Grain pre-training pipeline and
fine-tuning (classification/regression) tasks."""

from dwt_jax.data.classification import (
    classification_batch_spec,
    classification_eval_batches,
    load_task_source,
    make_classification_iterator,
    task_from_config,
)
from dwt_jax.data.corpus import load_text_source
from dwt_jax.data.pipeline import batch_spec, eval_batches, make_pretrain_iterator
from dwt_jax.data.tasks import TASKS, TaskSpec, compute_metrics, get_task
from dwt_jax.data.tokenizer import SpecialIds, get_tokenizer
from dwt_jax.errors import DataConfigError

__all__ = [
    "TASKS",
    "DataConfigError",
    "SpecialIds",
    "TaskSpec",
    "batch_spec",
    "classification_batch_spec",
    "classification_eval_batches",
    "compute_metrics",
    "eval_batches",
    "get_task",
    "get_tokenizer",
    "load_task_source",
    "load_text_source",
    "make_classification_iterator",
    "make_pretrain_iterator",
    "task_from_config",
]
