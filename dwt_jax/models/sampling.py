"""Sampling from a causal LM through its KV cache, compiled once per shape.

`generate_tokens` prefills the prompt in one call (the cache sized for the prompt and
every new token), then runs one token per step through the cache inside a
``jax.lax.scan``. Greedy decoding (``temperature=0``) takes the argmax; otherwise the
logits are divided by the temperature, filtered to the top k and then to the nucleus
(top p), and sampled. The sampling settings are traced values, not static ones, so
changing them (or the seed, or the end-of-sequence ids) reuses the compiled program:
only the model, the batch, the prompt length and the number of new tokens make a new
one (docs/methods.md#generation).

Shape letters: B batch, P prompt length, N new tokens, T = P + N, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

MAX_EOS_IDS = 8  # Llama 3's instruct models end on any of three.


def top_k_filter(logits_BxV: Array, k: Array | int) -> Array:
    """``logits`` with every token below the k-th largest set to -inf (ties with the
    k-th are kept, as Hugging Face's top-k does); ``k <= 0`` keeps every token."""
    vocab = logits_BxV.shape[-1]
    k = jnp.asarray(k, jnp.int32)
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    index = jnp.clip(k - 1, 0, vocab - 1)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, index, 1, axis=-1)
    keep = (logits_BxV >= kth_Bx1) | (k <= 0)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def top_p_mask(probs_BxV: Array, p: Array | float) -> Array:
    """bool [B,V]: the nucleus, the smallest set of most probable tokens whose mass is
    at least ``p`` (tokens tied with its least probable member are kept too, so the
    set does not depend on the order of equal probabilities); ``p >= 1`` keeps all."""
    sorted_BxV = -jnp.sort(-probs_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
    # The most probable token is always in (mass before it is 0 < p).
    in_nucleus_BxV = mass_before_BxV < p
    smallest_Bx1 = jnp.min(jnp.where(in_nucleus_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return (probs_BxV >= smallest_Bx1) | (jnp.asarray(p) >= 1.0)


def top_p_filter(logits_BxV: Array, p: Array | float) -> Array:
    """``logits`` with every token outside the nucleus of ``softmax(logits)`` at -inf."""
    keep = top_p_mask(jax.nn.softmax(logits_BxV, axis=-1), p)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def next_token(
    logits_BxV: Array,
    key: Array,
    temperature: Array | float,
    top_k: Array | int,
    top_p: Array | float,
) -> Array:
    """int32 [B]: argmax if ``temperature == 0``, else a sample of
    ``softmax(top_p(top_k(logits / temperature)))`` (Hugging Face's order of the
    filters), one independent draw per row."""
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.where(temperature > 0, temperature, 1.0)
    filtered_BxV = top_p_filter(top_k_filter(scaled_BxV, top_k), top_p)
    sampled_B = jax.random.categorical(key, filtered_BxV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
    """An empty KV cache (zeros, index 0) of ``model`` for ``batch`` rows of up to
    ``length`` tokens: the 'cache' collection the model's first decode call creates,
    built by shape only (no parameters are initialised)."""
    ids = jnp.zeros((batch, length), jnp.int32)

    def init() -> Any:
        variables = model.init(
            jax.random.PRNGKey(0),
            input_ids=ids,
            segment_ids=jnp.ones_like(ids),
            positions=jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), ids.shape),
            deterministic=True,
            decode=True,
        )
        return variables["cache"]

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def _forward(model: nn.Module, params: Any, cache: Any, ids_BxL: Array, start: Array):
    """(logits [B,L,V], the updated cache) of ``ids`` at positions ``start, ...``."""
    positions_BxL = start + jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
    (logits_BxLxV, _), variables = model.apply(
        {"params": params, "cache": cache},
        input_ids=ids_BxL,
        segment_ids=jnp.ones_like(ids_BxL),
        positions=positions_BxL.astype(jnp.int32),
        deterministic=True,
        decode=True,
        mutable=["cache"],
    )
    return logits_BxLxV, variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "return_logits"))
def _generate(
    model: nn.Module,
    params: Any,
    prompt_ids_BxP: Array,
    settings: dict[str, Array],
    max_new_tokens: int,
    return_logits: bool,
) -> tuple[Array, Array | None]:
    """(tokens [B,T], the logits each new token was picked from [B,N,V] or None)."""
    batch, prompt_len = prompt_ids_BxP.shape
    cache = init_cache(model, batch, prompt_len + max_new_tokens)
    logits_BxPxV, cache = _forward(model, params, cache, prompt_ids_BxP, jnp.int32(0))
    key = jax.random.PRNGKey(settings["seed"])
    eos_E = settings["eos_ids"]

    def pick(logits_BxV: Array, step: Array, done_B: Array) -> tuple[Array, Array]:
        token_B = next_token(
            logits_BxV,
            jax.random.fold_in(key, step),
            settings["temperature"],
            settings["top_k"],
            settings["top_p"],
        )
        # A finished row keeps emitting its (first) end-of-sequence id.
        token_B = jnp.where(done_B, eos_E[0], token_B)
        return token_B, done_B | jnp.isin(token_B, eos_E)

    first_B, done_B = pick(logits_BxPxV[:, -1], jnp.int32(0), jnp.zeros((batch,), jnp.bool_))

    def step(carry: tuple[Any, Array, Array], i: Array):
        cache, token_B, done_B = carry
        # The token picked at step i - 1 sits at position prompt_len + i - 1.
        logits_Bx1xV, cache = _forward(model, params, cache, token_B[:, None], prompt_len + i - 1)
        token_B, done_B = pick(logits_Bx1xV[:, 0], i, done_B)
        return (cache, token_B, done_B), (token_B, logits_Bx1xV[:, 0] if return_logits else None)

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    _, (rest_NxB, logits_NxBxV) = jax.lax.scan(step, (cache, first_B, done_B), steps)
    tokens_BxT = jnp.concatenate([prompt_ids_BxP, first_B[:, None], rest_NxB.T], axis=1)
    if not return_logits:  # Not an output: XLA keeps no [N,B,V] buffer.
        return tokens_BxT, None
    logits_BxNxV = jnp.concatenate([logits_BxPxV[:, -1:], jnp.swapaxes(logits_NxBxV, 0, 1)], axis=1)
    return tokens_BxT, logits_BxNxV


def generate_tokens(
    model: nn.Module,
    params: Any,
    prompt_ids_BxP: Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    return_logits: bool = False,
) -> Array | tuple[Array, Array]:
    """The prompt followed by ``max_new_tokens`` tokens, int32 [B, P + max_new_tokens].

    ``model`` is a `CausalLM` (its config's ``max_len`` bounds P + max_new_tokens)
    and ``params`` its (unboxed) parameters; every row's prompt is a whole document of
    P tokens (no padding). ``temperature=0`` decodes greedily; otherwise tokens are
    sampled at ``temperature`` from the ``top_k`` most probable tokens (0: all) and
    their nucleus of mass ``top_p`` (1: all), the same tokens for the same ``seed``.
    After a row emits ``eos_id`` (or one of several), it emits ``eos_id`` (the first)
    to the end. ``return_logits`` also returns the float32 logits each new token was
    picked from, [B, max_new_tokens, V] (before temperature and filtering).
    """
    prompt_ids_BxP = jnp.asarray(prompt_ids_BxP, jnp.int32)
    if prompt_ids_BxP.ndim != 2 or prompt_ids_BxP.shape[1] < 1:
        raise ValueError(
            f"prompt_ids: expected int [batch, length >= 1], got {prompt_ids_BxP.shape}."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1.")
    total, max_len = prompt_ids_BxP.shape[1] + max_new_tokens, model.config.max_len
    if total > max_len:
        raise ValueError(
            f"the prompt ({prompt_ids_BxP.shape[1]} tokens) and max_new_tokens="
            f"{max_new_tokens} make {total} tokens, more than the model's max_len={max_len}."
        )
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if len(eos) > MAX_EOS_IDS or any(i < 0 for i in eos):
        raise ValueError(f"eos_id={eos_id}: at most {MAX_EOS_IDS} token ids, each >= 0.")
    # Padded with -1 (no token): with or without eos ids, one compiled program.
    eos = eos + [-1] * (MAX_EOS_IDS - len(eos))
    settings = {
        "temperature": jnp.float32(temperature),
        "top_k": jnp.int32(top_k),
        "top_p": jnp.float32(top_p),
        "seed": jnp.uint32(seed % 2**32),
        "eos_ids": jnp.asarray(eos, jnp.int32).reshape(-1),
    }
    tokens_BxT, logits_BxNxV = _generate(
        model, params, prompt_ids_BxP, settings, max_new_tokens, return_logits
    )
    return (tokens_BxT, logits_BxNxV) if return_logits else tokens_BxT
