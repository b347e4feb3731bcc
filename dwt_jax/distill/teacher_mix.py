"""Several teachers (online or cached) per predicted token in pre-training
(docs/methods.md#several-teachers-in-pre-training).

``soft = mean_w Σ_k W_kn · D(p_k^τ ‖ p_s^τ)`` over the predicted positions n, with the
per-token teacher weights ``W`` [K, N] (columns sum to 1, no gradient) chosen by
``distill.teacher_weighting``:

- ``uniform``: 1/K.
- ``ca_mkd``: by each teacher's cross-entropy on the true token (CA-MKD:
  ``(1 − softmax_k(CE_kn)) / (K − 1)``).
- ``dynamic``: by the student's normalised entropy u_n (Dynamic KD's soft-instance
  adoption over the teachers ordered by size: confident tokens lean on the larger
  teachers, uncertain ones on the smaller).
- ``fixed``: ``distill.teacher_weights``, normalised.

The same path serves one cached teacher (its sparse top-k divergence,
:mod:`dwt_jax.sparse_loss`). Metrics: each teacher's mean weight
(``distill/weight{k}``) and its mean weight among the tokens whose uncertainty falls in
each quarter of [0, 1] (``distill/weight{k}_u{b}``, with ``distill/u{b}_share`` the
share of tokens there), which is what the study plots against the uncertainty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dwt_jax import losses
from dwt_jax.distill import weighting
from dwt_jax.sparse_loss import DenseTeacher, RowTerms, SparseTargets, lm_teacher_terms

WEIGHTINGS = ("uniform", "ca_mkd", "dynamic", "fixed")
UNCERTAINTY_BINS = 4


def token_weights(
    rule: str, terms: RowTerms, sizes: Sequence[int], fixed: Sequence[float] = ()
) -> jax.Array:
    """W [K, N], columns summing to 1, no gradient (module doc)."""
    num_teachers, rows = terms.divergence.shape
    if rule == "uniform":
        return weighting.uniform_weights(num_teachers, rows)
    if rule == "ca_mkd":
        return weighting.ca_mkd_weights(terms.teacher_ce)
    if rule == "dynamic":
        return weighting.adoption_weights(terms.uncertainty, sizes, "soft_instance")
    if rule == "fixed":
        return weighting.fixed_weights(fixed, rows)
    raise ValueError(f"teacher weighting {rule!r} is unknown; use one of {', '.join(WEIGHTINGS)}")


def _flat(x: jax.Array, lead: int) -> jax.Array:
    return x.reshape(-1, *x.shape[lead:])


def teacher_inputs(
    teachers: Sequence[Mapping[str, Any]], hidden_key: str, decoder_key: str
) -> list[SparseTargets | DenseTeacher]:
    """Each teacher's rows for :func:`lm_teacher_terms`: a cache's top-k targets, or an
    online teacher's hidden states and decoder, flattened to [N, ...]."""
    out: list[SparseTargets | DenseTeacher] = []
    for t in teachers:
        if "sparse_targets" in t:
            targets = t["sparse_targets"]
            out.append(
                SparseTargets(*(_flat(x, 2) if x.ndim > 2 else x.reshape(-1) for x in targets))
            )
        else:
            hidden = t[hidden_key]
            out.append(DenseTeacher(_flat(hidden, hidden.ndim - 1), *t[decoder_key]))
    return out


def mixed_lm_loss(
    student: Mapping[str, Any],
    teachers: Sequence[Mapping[str, Any]],
    batch: Mapping[str, jax.Array],
    *,
    hard_weight: float | jax.Array,
    soft_weight: float | jax.Array,
    temperature: float | jax.Array,
    divergence: str,
    beta: float,
    block_rows: int,
    rule: str,
    sizes: Sequence[int],
    fixed: Sequence[float] = (),
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss, hard, soft, metrics) as ``terms.lm_loss`` returns them, with the soft term
    the per-token weighted mix of every teacher's divergence (module doc)."""
    causal = "targets" in batch
    hidden_key, decoder_key = (
        ("lm_hidden", "lm_decoder") if causal else ("masked_hidden", "mlm_decoder")
    )
    labels = batch["targets"] if causal else batch["masked_ids"]
    weights = (batch["target_weights"] if causal else batch["masked_weights"]).reshape(-1)
    hidden = student[hidden_key]
    terms = lm_teacher_terms(
        _flat(hidden, hidden.ndim - 1),
        *student[decoder_key],
        labels.reshape(-1),
        teacher_inputs(teachers, hidden_key, decoder_key),
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        block_rows=block_rows or 256,
    )
    w_KxN = token_weights(rule, terms, sizes, fixed)
    hard = losses.weighted_mean(terms.ce, weights)
    soft = losses.weighted_mean(jnp.sum(w_KxN * terms.divergence, axis=0), weights)
    prefix = "train/lm" if causal else "train/mlm"
    metrics = {
        f"{prefix}_loss": hard,
        f"{prefix}_accuracy": losses.weighted_mean(terms.correct, weights),
        "distill/uncertainty": losses.weighted_mean(terms.uncertainty, weights),
    }
    bins = jnp.minimum(
        (terms.uncertainty * UNCERTAINTY_BINS).astype(jnp.int32), UNCERTAINTY_BINS - 1
    )
    total = jnp.maximum(weights.sum(), 1e-9)
    for b in range(UNCERTAINTY_BINS):
        in_bin = weights * (bins == b)
        metrics[f"distill/u{b}_share"] = in_bin.sum() / total
        for k in range(w_KxN.shape[0]):
            metrics[f"distill/weight{k}_u{b}"] = losses.weighted_mean(w_KxN[k], in_bin)
    for k in range(w_KxN.shape[0]):
        metrics[f"distill/weight{k}"] = losses.weighted_mean(w_KxN[k], weights)
    return hard_weight * hard + soft_weight * soft, hard, soft, metrics
