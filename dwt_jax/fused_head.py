"""The vocabulary side of the LM losses, with hand-written backward passes.

Two layers: the per-position primitives on materialised [..., V] logits (the
cross-entropy and the KL with their custom VJPs, ``plogp_ratio``, ``log_mixture``,
the temperature and β checks), which ``dwt_jax.losses`` builds its public losses on;
and :func:`fused_mlm_losses` / :func:`fused_lm_losses`, the (tied MLM or causal LM)
decoder fused with the cross-entropy and a divergence (KL, reverse KL or JSD_β) in
vocabulary chunks, so that no [N, V] array is ever built. Imports only jax;
``dwt_jax.losses`` re-exports the public names (this module must not import it back).
Why these are hand-written: docs/methods.md#dwt.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

# --- Per-position primitives ---------------------------------------------------------


def as_temperature(temperature: float | jax.Array) -> jax.Array:
    """τ as a float32 array; a Python number must be positive (a traced τ is not checked)."""
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return jnp.asarray(temperature, jnp.float32)


def as_beta(beta: float) -> float:
    """β of JSD_β as a Python float; it must be a real number strictly inside (0, 1)."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta (the teacher's weight in JSD_β's mixture) must be a number strictly "
            f"between 0 and 1, got {beta!r}"
        )
    return float(beta)


def log_mixture(log_p: jax.Array, log_q: jax.Array, beta: float) -> jax.Array:
    """log(β·p + (1 − β)·q) from log p and log q (β a Python float in (0, 1))."""
    if beta == 0.5:  # The symmetric JSD's long-standing form, bit for bit.
        return jnp.logaddexp(log_q, log_p) - math.log(2.0)
    return jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _logsumexp(z: jax.Array) -> jax.Array:
    """log Σ_last exp(z), stable; a row of -inf gives -inf (not NaN)."""
    m = jnp.max(z, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return m + jnp.log(jnp.sum(jnp.exp(z - m[..., None]), axis=-1))


# The vocabulary-sized losses below have hand-written backward passes: one fused
# elementwise pass per input (softmax minus target) instead of the chain autodiff
# derives through log_softmax, where() and take_along_axis (whose transpose is a
# scatter into [B, M, V]). Same values and gradients, fewer passes over [B, M, V].


@jax.custom_vjp
def token_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """−log softmax(logits)[label] over the last axis; float32 logits, int32 labels."""
    return _token_ce_fwd(logits, labels)[0]


def _token_ce_fwd(logits, labels):
    lse = _logsumexp(logits)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse - label_logit, (logits, labels, lse)


def _token_ce_bwd(residuals, g):
    logits, labels, lse = residuals
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
    one_hot = (vocab == labels[..., None]).astype(logits.dtype)
    return g[..., None] * (jnp.exp(logits - lse[..., None]) - one_hot), None


token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def plogp_ratio(p: jax.Array, log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Σ_last p·(log p − log q), with 0·log 0 = 0 and finite gradients where p = 0."""
    support = p > 0
    return jnp.sum(p * (jnp.where(support, log_p, 0.0) - jnp.where(support, log_q, 0.0)), axis=-1)


@jax.custom_vjp
def kl_per_position(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Σ_last p_t (log p_t − log p_s), p = softmax of the (already tempered) inputs."""
    return _kl_fwd(student, teacher)[0]


def _kl_fwd(student, teacher):
    lse_s, lse_t = _logsumexp(student), _logsumexp(teacher)
    log_ps = student - lse_s[..., None]
    log_pt = teacher - lse_t[..., None]
    kl = plogp_ratio(jnp.exp(log_pt), log_pt, log_ps)
    return kl, (student, teacher, lse_s, lse_t, kl)


def _kl_bwd(residuals, g):
    student, teacher, lse_s, lse_t, kl = residuals
    log_ps = student - lse_s[..., None]
    log_pt = teacher - lse_t[..., None]
    pt = jnp.exp(log_pt)
    # d/dz_s = p_s − p_t; d/dz_t = p_t (log p_t − log p_s − KL), 0 where p_t = 0.
    d_teacher = jnp.where(pt > 0, pt * (log_pt - log_ps - kl[..., None]), 0.0)
    g = g[..., None]
    return g * (jnp.exp(log_ps) - pt), g * d_teacher


kl_per_position.defvjp(_kl_fwd, _kl_bwd)


# --- The vocabulary head fused with its losses ---------------------------------------

DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _over_vocab(step, carry, vocab: int, chunk_size: int):
    """Runs ``step(carry, start, size) -> (carry, out)`` over the vocabulary in slices of
    ``chunk_size`` (0 or ≥ V: one slice): a scan over the full slices, then the
    remainder. Returns the last carry and the slices' outputs joined along axis 0."""
    chunk = vocab if chunk_size <= 0 or chunk_size >= vocab else chunk_size
    full, rest = divmod(vocab, chunk)
    if full == 1 and not rest:
        return step(carry, 0, chunk)
    carry, outs = jax.lax.scan(lambda c, i: step(c, i * chunk, chunk), carry, jnp.arange(full))
    outs = jax.tree.map(lambda x: x.reshape(full * chunk, *x.shape[2:]), outs)
    if rest:
        carry, tail = step(carry, full * chunk, rest)
        outs = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), outs, tail)
    return carry, outs


def _decode(h_NxD: jax.Array, embedding: jax.Array, bias: jax.Array | None, start, size: int):
    """Logits [N, size] of vocabulary entries [start, start + size), in float32, from
    hidden states in their compute dtype; ``bias`` None adds nothing."""
    e_CxD = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h_NxD.dtype)
    logits = jnp.dot(h_NxD, e_CxD.T, preferred_element_type=jnp.float32)
    if bias is None:
        return logits
    return logits + jax.lax.dynamic_slice_in_dim(bias, start, size).astype(jnp.float32)


def _finite_or(x: jax.Array, value: float) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, value)


def _online(m: jax.Array, s: jax.Array, x_NxC: jax.Array):
    """Running (max, Σ exp(x − max)) after one more chunk, with exp(x − new max) and
    the factor exp(old max − new max) that rescales other sums kept against the max."""
    new_m = jnp.maximum(m, jnp.max(x_NxC, axis=-1))
    safe_m = _finite_or(new_m, 0.0)
    e_NxC = jnp.exp(x_NxC - safe_m[:, None])
    rescale = jnp.exp(_finite_or(m, -jnp.inf) - safe_m)
    return new_m, s * rescale + e_NxC.sum(-1), e_NxC, rescale


def _normaliser(m: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log Σ exp as the pair (shift, log Σ exp(x − shift)), kept apart because
    (x − shift) − log_sum, as in log_softmax, is exact where x is the largest logit,
    whereas x − (shift + log_sum) rounds at the logits' magnitude."""
    return _finite_or(m, 0.0), jnp.log(s)


def _log_probs(x_NxC: jax.Array, normaliser: tuple[jax.Array, jax.Array]) -> jax.Array:
    shift, log_sum = normaliser
    return (x_NxC - shift[:, None]) - log_sum[:, None]


def _head_forward(h, embedding, bias, labels, teacher, tau, divergence, chunk_size):
    """Per-position statistics of the student (and teacher) logits, chunk by chunk.

    With a teacher, ``acc`` holds the one-pass part of the divergence against the
    running max it is kept with: Σe^(a_t−max_t)(a_t−a_s) for the KL,
    Σe^(a_s−max_s)(a_s−a_t) for the reverse KL; JSD_β needs both log-sum-exps first
    (:func:`_jsd_pass`), so it accumulates nothing here."""
    neg_inf = jnp.full((h.shape[0],), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((h.shape[0],), jnp.float32)
    # (max z, Σe^(z−max), label logit, max z/τ, Σ..., teacher max a_t, Σ..., acc)
    init = (neg_inf, zeros, zeros, neg_inf, zeros, neg_inf, zeros, zeros)

    def update(carry, start, size):
        m1, s1, label, ms, ss, mt, st, acc = carry
        z_s = _decode(h, embedding, bias, start, size)
        m1, s1, _, _ = _online(m1, s1, z_s)
        local = labels - start
        inside = (local >= 0) & (local < size)
        picked = jnp.take_along_axis(z_s, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        label = jnp.where(inside, picked, label)
        if teacher is not None:
            a_s = z_s / tau
            a_t = _decode(*teacher, start, size) / tau
            ms, ss, e_s_NxC, rescale_s = _online(ms, ss, a_s)
            mt, st, e_t_NxC, rescale_t = _online(mt, st, a_t)
            if divergence == "kl":
                terms = jnp.where(e_t_NxC > 0, e_t_NxC * (a_t - a_s), 0.0)
                acc = acc * rescale_t + terms.sum(-1)
            elif divergence == "reverse_kl":
                terms = jnp.where(e_s_NxC > 0, e_s_NxC * (a_s - a_t), 0.0)
                acc = acc * rescale_s + terms.sum(-1)
        return (m1, s1, label, ms, ss, mt, st, acc), None

    return _over_vocab(update, init, embedding.shape[0], chunk_size)[0]


def _jsd_pass(h, embedding, bias, teacher, tau, norm_s, norm_t, beta, chunk_size):
    """(KL(p_t ‖ m), KL(p_s ‖ m)) per position, m = β·p_t + (1 − β)·p_s: a second pass
    over the vocabulary, once both log-sum-exps are known."""
    zeros = jnp.zeros((h.shape[0],), jnp.float32)

    def update(carry, start, size):
        kl_pm, kl_qm = carry
        log_q = _log_probs(_decode(h, embedding, bias, start, size) / tau, norm_s)
        log_p = _log_probs(_decode(*teacher, start, size) / tau, norm_t)
        log_m = log_mixture(log_p, log_q, beta)
        kl_pm = kl_pm + plogp_ratio(jnp.exp(log_p), log_p, log_m)
        return (kl_pm, kl_qm + plogp_ratio(jnp.exp(log_q), log_q, log_m)), None

    return _over_vocab(update, (zeros, zeros), embedding.shape[0], chunk_size)[0]


def _head_outputs(stats, residual_inputs, divergence, beta, chunk_size):
    """The per-position outputs and what the backward pass needs: the three normalisers
    and ``aux`` (the reverse KL, or KL(p_s ‖ m) for JSD_β; unused for the KL)."""
    m1, s1, label, ms, ss, mt, st, acc = stats
    norms = (norm1, norm_s, norm_t) = _normaliser(m1, s1), _normaliser(ms, ss), _normaliser(mt, st)
    out = {"ce": (norm1[0] - label) + norm1[1], "correct": (label >= m1).astype(jnp.float32)}
    # lse_s − lse_t, each normaliser's two parts taken apart.
    lse_gap = (norm_s[0] - norm_t[0]) + (norm_s[1] - norm_t[1])
    h, embedding, bias, _, teacher, tau = residual_inputs
    aux = None
    if teacher is not None:
        if divergence == "kl":
            value = acc / st + lse_gap
        elif divergence == "reverse_kl":
            value = aux = acc / ss - lse_gap
        else:
            kl_pm, aux = _jsd_pass(
                h, embedding, bias, teacher, tau, norm_s, norm_t, beta, chunk_size
            )
            value = beta * kl_pm + (1.0 - beta) * aux
        # Rounding can leave a divergence of (near-)equal distributions a hair below 0.
        out["divergence"] = jnp.maximum(value, 0.0)
    return out, (norms, aux)


def _divergence_grad(a_s, a_t, norm_s, norm_t, aux, divergence, beta):
    """∂D/∂a_s for one chunk of tempered logits (docs/methods.md#causal-dwt)."""
    log_q, log_p = _log_probs(a_s, norm_s), _log_probs(a_t, norm_t)
    q = jnp.exp(log_q)
    if divergence == "kl":  # p_s − p_t
        return q - jnp.exp(log_p)
    if divergence == "reverse_kl":  # q ⊙ (log q − log p − RKL)
        return jnp.where(q > 0, q * (log_q - log_p - aux[:, None]), 0.0)
    # JSD_β: q ⊙ (g − Σ q g) with g = (1 − β)·log(q / m), and Σ q g = (1 − β)·KL(q ‖ m).
    log_m = log_mixture(log_p, log_q, beta)
    return (1.0 - beta) * jnp.where(q > 0, q * (log_q - log_m - aux[:, None]), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _fused_head(h, embedding, bias, labels, teacher, tau, chunk_size, divergence, beta):
    out, _ = _fused_head_fwd(h, embedding, bias, labels, teacher, tau, chunk_size, divergence, beta)
    return out


def _fused_head_fwd(h, embedding, bias, labels, teacher, tau, chunk_size, divergence, beta):
    stats = _head_forward(h, embedding, bias, labels, teacher, tau, divergence, chunk_size)
    inputs = (h, embedding, bias, labels, teacher, tau)
    out, (norms, aux) = _head_outputs(stats, inputs, divergence, beta, chunk_size)
    return out, (*inputs, norms, aux)


def _fused_head_bwd(chunk_size, divergence, beta, residuals, g):
    h, embedding, bias, labels, teacher, tau, (norm1, norm_s, norm_t), aux = residuals
    g_ce = g["ce"].astype(jnp.float32)[:, None]

    def grads(dh, start, size):
        """dh plus this chunk's contribution; the chunk's embedding-row and bias grads."""
        z_s = _decode(h, embedding, bias, start, size)
        one_hot = jax.lax.broadcasted_iota(labels.dtype, z_s.shape, 1) == (labels - start)[:, None]
        dz = g_ce * (jnp.exp(_log_probs(z_s, norm1)) - one_hot)
        if teacher is not None:
            a_t = _decode(*teacher, start, size) / tau
            d_a = _divergence_grad(z_s / tau, a_t, norm_s, norm_t, aux, divergence, beta)
            dz = dz + g["divergence"].astype(jnp.float32)[:, None] / tau * d_a
        dz = dz.astype(h.dtype)
        e_c = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h.dtype)
        dh = dh + jnp.dot(dz, e_c, preferred_element_type=jnp.float32)
        d_e = jnp.dot(dz.T, h, preferred_element_type=jnp.float32)
        return dh, (d_e, None if bias is None else dz.astype(jnp.float32).sum(0))

    dh, (d_embedding, d_bias) = _over_vocab(
        grads, jnp.zeros(h.shape, jnp.float32), embedding.shape[0], chunk_size
    )
    no_teacher = None if teacher is None else jax.tree.map(jnp.zeros_like, teacher)
    return (
        dh.astype(h.dtype),
        d_embedding.astype(embedding.dtype),
        None if bias is None else d_bias.astype(bias.dtype),
        None,
        no_teacher,
        jnp.zeros_like(tau),
    )


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def check_divergence(divergence: str) -> str:
    """The divergence's name if it is one of :data:`DIVERGENCES`, else a ValueError."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}"
        )
    return divergence


def fused_mlm_losses(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    *,
    teacher: tuple[jax.Array, jax.Array, jax.Array | None] | None = None,
    temperature: float | jax.Array = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """The tied MLM decoder and its losses in one pass, without the [.., V] logits.

    ``logits = hidden @ embedding.T + bias`` for the student (and the teacher) are
    computed ``chunk_size`` vocabulary entries at a time (0: all at once) with running
    log-sum-exps, so memory is O(N·chunk) instead of O(N·V), and the backward pass
    recomputes each chunk instead of storing the logits. Per position it returns:

    - ``ce``: −log softmax(z_s)[label], the cross-entropy against the labels;
    - ``correct``: 1.0 where the label's logit is the largest (ties count as correct);
    - ``divergence`` (with a teacher): D(p_t^τ ‖ p_s^τ), not scaled by τ², with D
      ``'kl'``: KL(p_t ‖ p_s); ``'reverse_kl'``: KL(p_s ‖ p_t); ``'jsd'``: JSD_β =
      β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m), m = β·p_t + (1 − β)·p_s;
    - ``kl``: only for ``divergence='kl'``, the same array as ``divergence`` (the
      name callers used before the other divergences existed).

    The KL and reverse KL take one pass over the vocabulary, JSD_β two (it needs both
    log-sum-exps before log m). Equal to ``token_cross_entropy``, ``kl_divergence``,
    ``reverse_kl`` and ``jensen_shannon`` on the materialised logits (to float32
    rounding) and differentiable in ``hidden``, ``embedding`` and ``bias``. The
    teacher's arrays and τ are constants: they get no gradient.

    Args:
      hidden: [..., D] the hidden states at the predicted positions.
      embedding: [V, D] the decoder (the word-embedding table when tied).
      bias: [V] the decoder bias, or None for none (no gradient is computed for it).
      labels: [...] int token ids, in [0, V).
      teacher: the teacher's ``(hidden [..., D_t], embedding [V, D_t], bias [V] | None)``.
      temperature: τ > 0 of the divergence.
      divergence: ``'kl'``, ``'reverse_kl'`` or ``'jsd'`` (static).
      beta: β ∈ (0, 1) of JSD_β, a Python number (static); checked for every
        divergence, used only by ``'jsd'``.
      chunk_size: vocabulary entries per chunk; 0 or ≥ V for one chunk.
    Raises:
      ValueError: for mismatched shapes, an unknown divergence or β outside (0, 1).
    """
    divergence, beta = check_divergence(divergence), as_beta(beta)
    lead = hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {lead}, got {labels.shape}")
    if embedding.shape[1] != hidden.shape[-1] or (
        bias is not None and bias.shape != embedding.shape[:1]
    ):
        raise ValueError(
            f"embedding [V, {hidden.shape[-1]}] and bias [V] (or None) expected, got "
            f"{embedding.shape} and {None if bias is None else bias.shape}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_teacher = None
    if teacher is not None:
        h_t, e_t, b_t = (None if x is None else jax.lax.stop_gradient(x) for x in teacher)
        if (
            h_t.shape[:-1] != lead
            or e_t.shape[0] != embedding.shape[0]
            or (b_t is not None and b_t.shape != e_t.shape[:1])
        ):
            raise ValueError(
                f"the teacher's hidden states [{', '.join(map(str, lead))}, D_t], "
                f"embedding [{embedding.shape[0]}, D_t] and bias [V] (or None) must match "
                f"the student's, got {h_t.shape}, {e_t.shape} and "
                f"{None if b_t is None else b_t.shape}"
            )
        flat_teacher = (h_t.reshape(-1, h_t.shape[-1]), e_t, b_t)
    tau = jax.lax.stop_gradient(as_temperature(temperature))
    out = _fused_head(
        h, embedding, bias, jnp.asarray(labels, jnp.int32).reshape(-1), flat_teacher, tau,
        int(chunk_size), divergence, beta,
    )  # fmt: skip
    if "divergence" in out and divergence == "kl":
        out["kl"] = out["divergence"]
    return {name: value.reshape(lead) for name, value in out.items()}


# The same computation named for decoders: ``hidden`` [..., D] are the final-normed hidden
# states, ``labels`` the next tokens, the biases usually None; weighting (the last token
# of a document, padding) is the caller's: every position gets a value.
fused_lm_losses = fused_mlm_losses
