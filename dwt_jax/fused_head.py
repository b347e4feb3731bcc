"""The vocabulary side of the MLM losses, with hand-written backward passes.

Two layers: the per-position primitives on materialised [..., V] logits (the
cross-entropy and the KL with their custom VJPs, ``plogp_ratio``, the temperature
check), which ``dwt_jax.losses`` builds its public losses on; and
:func:`fused_mlm_losses`, the tied MLM decoder fused with those losses in vocabulary
chunks, so that no [N, V] array is ever built. Imports only jax; ``dwt_jax.losses``
re-exports :func:`fused_mlm_losses` (this module must not import it back).
Why these are hand-written: docs/methods.md#dwt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# --- Per-position primitives ---------------------------------------------------------


def as_temperature(temperature: float | jax.Array) -> jax.Array:
    """τ as a float32 array; a Python number must be positive (a traced τ is not checked)."""
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return jnp.asarray(temperature, jnp.float32)


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


# --- The MLM head fused with its losses --------------------------------------------


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


def _decode(h_NxD: jax.Array, embedding: jax.Array, bias: jax.Array, start, size: int):
    """Logits [N, size] of vocabulary entries [start, start + size), in float32, from
    hidden states in their compute dtype."""
    e_CxD = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h_NxD.dtype)
    logits = jnp.dot(h_NxD, e_CxD.T, preferred_element_type=jnp.float32)
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


def _lse(m: jax.Array, s: jax.Array) -> jax.Array:
    return _finite_or(m, 0.0) + jnp.log(s)


def _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size):
    """Per-position statistics of the student (and teacher) logits, chunk by chunk."""
    neg_inf = jnp.full((h.shape[0],), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((h.shape[0],), jnp.float32)
    # (max z, Σe^(z−max), label logit, max z/τ, Σ..., teacher max a_t, Σ..., Σe^(a_t−max)(a_t−a_s))
    init = (neg_inf, zeros, zeros, neg_inf, zeros, neg_inf, zeros, zeros)

    def update(carry, start, size):
        m1, s1, label, ms, ss, mt, st, at = carry
        z_s = _decode(h, embedding, bias, start, size)
        m1, s1, _, _ = _online(m1, s1, z_s)
        local = labels - start
        inside = (local >= 0) & (local < size)
        picked = jnp.take_along_axis(z_s, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        label = jnp.where(inside, picked, label)
        if teacher is not None:
            a_s = z_s / tau
            a_t = _decode(*teacher, start, size) / tau
            ms, ss, _, _ = _online(ms, ss, a_s)
            mt, st, e_t_NxC, rescale = _online(mt, st, a_t)
            terms = jnp.where(e_t_NxC > 0, e_t_NxC * (a_t - a_s), 0.0)
            at = at * rescale + terms.sum(-1)
        return (m1, s1, label, ms, ss, mt, st, at), None

    return _over_vocab(update, init, embedding.shape[0], chunk_size)[0]


def _head_outputs(stats, has_teacher):
    m1, s1, label, ms, ss, mt, st, at = stats
    lse1 = _lse(m1, s1)
    out = {"ce": lse1 - label, "correct": (label >= m1).astype(jnp.float32)}
    if has_teacher:
        out["kl"] = jnp.maximum(at / st - _lse(mt, st) + _lse(ms, ss), 0.0)
    return out, (lse1, _lse(ms, ss), _lse(mt, st))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_head(h, embedding, bias, labels, teacher, tau, chunk_size):
    stats = _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size)
    return _head_outputs(stats, teacher is not None)[0]


def _fused_head_fwd(h, embedding, bias, labels, teacher, tau, chunk_size):
    stats = _head_forward(h, embedding, bias, labels, teacher, tau, chunk_size)
    out, lses = _head_outputs(stats, teacher is not None)
    return out, (h, embedding, bias, labels, teacher, tau, lses)


def _fused_head_bwd(chunk_size, residuals, g):
    h, embedding, bias, labels, teacher, tau, (lse1, lse_s, lse_t) = residuals
    g_ce = g["ce"].astype(jnp.float32)[:, None]

    def grads(dh, start, size):
        """dh plus this chunk's contribution; the chunk's embedding-row and bias grads."""
        z_s = _decode(h, embedding, bias, start, size)
        one_hot = jax.lax.broadcasted_iota(labels.dtype, z_s.shape, 1) == (labels - start)[:, None]
        dz = g_ce * (jnp.exp(z_s - lse1[:, None]) - one_hot)
        if teacher is not None:
            a_t = _decode(*teacher, start, size) / tau
            p_s, p_t = jnp.exp(z_s / tau - lse_s[:, None]), jnp.exp(a_t - lse_t[:, None])
            dz = dz + g["kl"].astype(jnp.float32)[:, None] / tau * (p_s - p_t)
        dz = dz.astype(h.dtype)
        e_c = jax.lax.dynamic_slice_in_dim(embedding, start, size).astype(h.dtype)
        dh = dh + jnp.dot(dz, e_c, preferred_element_type=jnp.float32)
        d_e = jnp.dot(dz.T, h, preferred_element_type=jnp.float32)
        return dh, (d_e, dz.astype(jnp.float32).sum(0))

    dh, (d_embedding, d_bias) = _over_vocab(
        grads, jnp.zeros(h.shape, jnp.float32), embedding.shape[0], chunk_size
    )
    no_teacher = None if teacher is None else jax.tree.map(jnp.zeros_like, teacher)
    return (
        dh.astype(h.dtype),
        d_embedding.astype(embedding.dtype),
        d_bias.astype(bias.dtype),
        None,
        no_teacher,
        jnp.zeros_like(tau),
    )


_fused_head.defvjp(_fused_head_fwd, _fused_head_bwd)


def fused_mlm_losses(
    hidden: jax.Array,
    embedding: jax.Array,
    bias: jax.Array,
    labels: jax.Array,
    *,
    teacher: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 0,
) -> dict[str, jax.Array]:
    """The tied MLM decoder and its losses in one pass, without the [.., V] logits.

    ``logits = hidden @ embedding.T + bias`` for the student (and the teacher) are
    computed ``chunk_size`` vocabulary entries at a time (0: all at once) with running
    log-sum-exps, so memory is O(N·chunk) instead of O(N·V), and the backward pass
    recomputes each chunk instead of storing the logits. Per position it returns:

    - ``ce``: −log softmax(z_s)[label], the masked-LM cross-entropy;
    - ``correct``: 1.0 where the label's logit is the largest (ties count as correct);
    - ``kl`` (with a teacher): KL(p_t^τ ‖ p_s^τ), not scaled by τ².

    Equal to ``token_cross_entropy`` and ``kl_divergence`` on the materialised logits
    (to float32 rounding) and differentiable in ``hidden``, ``embedding`` and ``bias``.
    The teacher's arrays and τ are constants: they get no gradient.

    Args:
      hidden: [..., D] the transformed hidden states at the masked positions.
      embedding: [V, D] the (tied) decoder, the word-embedding table.
      bias: [V] the decoder bias.
      labels: [...] int token ids, in [0, V).
      teacher: the teacher's ``(hidden [..., D_t], embedding [V, D_t], bias [V])``.
      temperature: τ > 0 of the KL term.
      chunk_size: vocabulary entries per chunk; 0 or ≥ V for one chunk.
    """
    lead = hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {lead}, got {labels.shape}")
    if embedding.shape[1] != hidden.shape[-1] or bias.shape != embedding.shape[:1]:
        raise ValueError(
            f"embedding [V, {hidden.shape[-1]}] and bias [V] expected, got "
            f"{embedding.shape} and {bias.shape}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    flat_teacher = None
    if teacher is not None:
        h_t, e_t, b_t = (jax.lax.stop_gradient(x) for x in teacher)
        if h_t.shape[:-1] != lead or e_t.shape[0] != embedding.shape[0]:
            raise ValueError(
                f"the teacher's hidden states [{', '.join(map(str, lead))}, D_t] and "
                f"embedding [{embedding.shape[0]}, D_t] must match the student's, got "
                f"{h_t.shape} and {e_t.shape}"
            )
        flat_teacher = (h_t.reshape(-1, h_t.shape[-1]), e_t, b_t)
    tau = jax.lax.stop_gradient(as_temperature(temperature))
    out = _fused_head(
        h, embedding, bias, jnp.asarray(labels, jnp.int32).reshape(-1), flat_teacher, tau,
        int(chunk_size),
    )  # fmt: skip
    return {name: value.reshape(lead) for name, value in out.items()}
