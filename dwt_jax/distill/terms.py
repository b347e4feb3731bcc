"""The language-model terms every pre-training strategy reads: the hard loss, the
student's accuracy and the teacher's soft term, over the masked positions (a masked
LM) or every predicted position (a causal LM), fused with the LM head in vocabulary
slices (``losses.fused_mlm_losses`` / ``losses.fused_lm_losses``: no [.., V] logits)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from dwt_jax import losses
from dwt_jax.errors import ConfigError
from dwt_jax.fused_loss import SparseRows

ModelOutputs = Mapping[str, Any]
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def mlm_terms(
    student: ModelOutputs,
    batch: Batch,
    *,
    teacher: ModelOutputs | None = None,
    temperature: float | jax.Array = 1.0,
    fused: bool = True,
    chunk_size: int = 0,
    divergence: str = "kl",
    beta: float = 0.5,
) -> dict[str, jax.Array]:
    """Batch means over the masked positions: 'mlm_loss', 'accuracy' and, with a
    teacher, 'kl' = D(p_t^τ ‖ p_s^τ) (not scaled by τ²; D the KL unless
    ``divergence`` says 'reverse_kl' or 'jsd').

    ``fused`` (and outputs that carry 'masked_hidden' and 'mlm_decoder', as the
    step's ``forward`` gives them): the decoder and the losses run together in
    ``chunk_size`` vocabulary slices (``losses.fused_mlm_losses``) and the [B,M,V]
    logits are never built. Otherwise they are computed from 'mlm_logits'. Accuracy
    counts ties for the largest logit as correct in the fused form (argmax, the
    first index, otherwise); ties of float32 logits do not occur in practice.
    """
    weights = batch["masked_weights"]
    models = [student] if teacher is None else [student, teacher]
    if fused and all("mlm_decoder" in m and "masked_hidden" in m for m in models):
        loss, accuracy, soft = _fused_means(
            student, teacher, ("masked_hidden", "mlm_decoder"), batch["masked_ids"], weights,
            temperature=temperature, divergence=divergence, beta=beta, chunk_size=chunk_size,
        )  # fmt: skip
        terms = {"mlm_loss": loss, "accuracy": accuracy}
        if soft is not None:
            terms["kl"] = soft
        return terms
    logits = student["mlm_logits"]
    terms = {
        "mlm_loss": losses.mlm_cross_entropy(logits, batch["masked_ids"], weights)[1],
        "accuracy": losses.mlm_accuracy(logits, batch["masked_ids"], weights)[1],
    }
    if teacher is not None:
        extra = {"beta": beta} if divergence == "jsd" else {}
        terms["kl"] = _MATERIALISED[divergence](
            logits,
            teacher["mlm_logits"],
            weights,
            temperature=temperature,
            scale_by_temperature_squared=False,
            **extra,
        )[1]
    return terms


# The soft terms on materialised logits (``distill.fused_mlm_head=False``).
_MATERIALISED = {
    "kl": losses.kl_divergence,
    "reverse_kl": losses.reverse_kl,
    "jsd": losses.jensen_shannon,
}


def _fused_means(
    student: ModelOutputs,
    teacher: ModelOutputs | None,
    keys: tuple[str, str],
    labels: jax.Array,
    weights: jax.Array,
    **head: Any,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(CE, accuracy, divergence or None) as weighted means, from the fused head over
    the outputs' ``keys`` = (hidden states, (decoder, bias)) of student and teacher."""
    hidden, decoder = keys
    per_position = losses.fused_lm_losses(
        student[hidden],
        *student[decoder],
        labels,
        teacher=None if teacher is None else (teacher[hidden], *teacher[decoder]),
        **head,
    )
    soft = None
    if teacher is not None:
        soft = losses.weighted_mean(per_position["divergence"], weights)
    return (
        losses.weighted_mean(per_position["ce"], weights),
        losses.weighted_mean(per_position["correct"], weights),
        soft,
    )


def causal_terms(
    student: ModelOutputs,
    batch: Batch,
    *,
    teacher: ModelOutputs | None = None,
    temperature: float | jax.Array = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """Batch means over every predicted position of a causal batch (``target_weights``):
    'lm_loss' (next-token cross-entropy), 'accuracy' and, with a teacher, 'divergence'
    = D(p_t^τ ‖ p_s^τ) (not scaled by τ²; docs/methods.md#decoders). The LM heads and
    the losses run fused in vocabulary slices: no [B,L,V] logits exist."""
    weights = batch["target_weights"]
    loss, accuracy, soft = _fused_means(
        student, teacher, ("lm_hidden", "lm_decoder"), batch["targets"], weights,
        temperature=temperature, divergence=divergence, beta=beta, chunk_size=chunk_size,
    )  # fmt: skip
    terms = {"lm_loss": loss, "accuracy": accuracy}
    if soft is not None:
        terms["divergence"] = soft
    return terms


def lm_terms(
    student: ModelOutputs,
    batch: Batch,
    *,
    teacher: ModelOutputs | None = None,
    temperature: float | jax.Array = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    fused: bool = True,
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array | None, Metrics]:
    """(the hard loss, the teacher divergence or None, the student's metrics) of a
    language-model batch: a causal batch (it carries ``targets``) or a masked one. The
    metrics are 'train/lm_loss' and 'train/lm_accuracy' (causal) or 'train/mlm_loss'
    and 'train/mlm_accuracy' (masked)."""
    if "targets" in batch:
        terms = causal_terms(
            student,
            batch,
            teacher=teacher,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            chunk_size=chunk_size,
        )
        metrics = {"train/lm_loss": terms["lm_loss"], "train/lm_accuracy": terms["accuracy"]}
        return terms["lm_loss"], terms.get("divergence"), metrics
    if divergence != "kl" and teacher is not None:
        raise ValueError(f"divergence={divergence!r}: the masked-LM soft term is the KL; use 'kl'.")
    terms = mlm_terms(
        student,
        batch,
        teacher=teacher,
        temperature=temperature,
        fused=fused,
        chunk_size=chunk_size,
    )
    metrics = {"train/mlm_loss": terms["mlm_loss"], "train/mlm_accuracy": terms["accuracy"]}
    return terms["mlm_loss"], terms.get("kl"), metrics


def lm_loss(
    student: ModelOutputs,
    batch: Batch,
    *,
    teacher: ModelOutputs | None = None,
    hard_weight: float | jax.Array = 1.0,
    soft_weight: float | jax.Array = 0.0,
    temperature: float | jax.Array = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    fused: bool = True,
    chunk_size: int = 0,
    block_rows: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array | None, Metrics]:
    """(loss, hard, soft, metrics) of a language-model batch (masked or causal, by the
    batch): ``loss = hard_weight · hard + soft_weight · soft`` with ``hard`` the
    cross-entropy and ``soft`` the teacher divergence (None without a teacher), both
    batch means, and the student's metrics as :func:`lm_terms` names them.

    With ``block_rows`` > 0 and fused outputs (``lm_hidden``/``lm_decoder`` or
    ``masked_hidden``/``mlm_decoder``), the heads and losses run in row blocks with the
    gradients taken in the forward pass (``losses.fused_lm_loss``): only ``loss`` is
    differentiable then, ``hard`` and ``soft`` are its parts as metrics. Otherwise the
    terms of :func:`lm_terms` are combined (the vocabulary-sliced head)."""
    causal = "targets" in batch
    keys = ("lm_hidden", "lm_decoder") if causal else ("masked_hidden", "mlm_decoder")
    sparse = teacher is not None and "sparse_targets" in teacher  # A cached teacher.
    models = [student] if teacher is None or sparse else [student, teacher]
    if sparse and not (block_rows > 0 and divergence == "kl"):
        raise ValueError("a cached teacher here needs block_rows > 0 and divergence 'kl'")
    if block_rows > 0 and (fused or causal) and all(k in m for m in models for k in keys):
        if not causal and divergence != "kl" and teacher is not None:
            raise ValueError(
                f"divergence={divergence!r}: the masked-LM soft term is the KL; use 'kl'."
            )
        hidden, decoder = keys
        labels, weights = (
            (batch["targets"], batch["target_weights"])
            if causal
            else (batch["masked_ids"], batch["masked_weights"])
        )
        loss, means = losses.fused_lm_loss(
            student[hidden], *student[decoder], labels, weights,
            hard_weight=hard_weight, soft_weight=soft_weight,
            teacher=_teacher_rows(teacher, hidden, decoder),
            temperature=temperature, divergence=divergence, beta=beta, block_rows=block_rows,
        )  # fmt: skip
        prefix = "train/lm" if causal else "train/mlm"
        metrics = {f"{prefix}_loss": means["ce"], f"{prefix}_accuracy": means["accuracy"]}
        return loss, means["ce"], means.get("divergence"), metrics
    hard, soft, metrics = lm_terms(
        student, batch, teacher=teacher, temperature=temperature, divergence=divergence,
        beta=beta, fused=fused, chunk_size=chunk_size,
    )  # fmt: skip
    loss = hard_weight * hard if soft is None else hard_weight * hard + soft_weight * soft
    return loss, hard, soft, metrics


def _teacher_rows(teacher: ModelOutputs | None, hidden: str, decoder: str) -> Any:
    """The teacher as ``losses.fused_lm_loss`` takes it: a cached teacher's top-k rows,
    or an online one's hidden states and decoder."""
    if teacher is None:
        return None
    if "sparse_targets" in teacher:
        cached = teacher["sparse_targets"]
        return SparseRows(cached.logp, cached.ids, cached.tail)
    return (teacher[hidden], *teacher[decoder])


def mlm_metrics(
    student: ModelOutputs,
    batch: Batch,
    *,
    fused: bool = True,
    chunk_size: int = 0,
    block_rows: int = 0,
) -> tuple[jax.Array, Metrics]:
    """The student's language-model loss and accuracy (masked or causal, by the batch):
    every pre-training strategy reports these."""
    loss, _, _, metrics = lm_loss(
        student, batch, fused=fused, chunk_size=chunk_size, block_rows=block_rows
    )
    return loss, metrics


# Rows per block of the training loss's LM head (``losses.fused_lm_loss``) when a
# config does not say: the fastest of 128/256/512/1024 on our CPU benchmark but one
# (512 was 3% faster there and doubles the block's memory); see BUILD_NOTES.md.
DEFAULT_HEAD_BLOCK_ROWS = 256


def head_settings(distill_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``fused_mlm_head``, ``vocab_chunk_size`` and ``head_block_rows`` of the
    ``distill`` section, checked."""
    fused = distill_config.get("fused_mlm_head", True)
    chunk = distill_config.get("vocab_chunk_size", 0)
    rows = distill_config.get("head_block_rows", DEFAULT_HEAD_BLOCK_ROWS)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ConfigError(
            f"distill.head_block_rows={rows!r}: must be an integer >= 0 (rows of the LM "
            "head's training loss per block; 0 = the vocabulary-sliced head, whose "
            "backward pass recomputes the logits)."
        )
    if not isinstance(fused, bool):
        raise ConfigError(f"distill.fused_mlm_head={fused!r}: must be True or False.")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ConfigError(
            f"distill.vocab_chunk_size={chunk!r}: must be an integer >= 0 "
            "(0 = the whole vocabulary in one slice)."
        )
    return {"fused": fused, "chunk_size": chunk, "block_rows": rows}
