"""The name tables between Hugging Face decoder state dicts (GPT-2, Llama, Qwen2, Qwen3,
Mistral) and dwt_jax's causal LMs (``models/gpt2.py``, ``models/llama.py``).

One row per parameter: our path (``/``-separated, from the model root), the Hugging
Face key, and the name of the transform that turns theirs into ours (``TRANSFORMS``
holds both directions). Shape letters: D hidden, H query heads, G key/value heads, K
head width, F mlp width, V vocabulary.

- GPT-2's ``Conv1D`` weights are already [in, out]: ``c_attn`` [D, 3D] is our kernel
  [D, 3, H, K] reshaped (q, k, v blocks, each heads-major), its bias [3D] our [3, H, K];
  ``attn.c_proj`` [D, D] is our [H, K, D]; the MLP's are copied.
- Llama's torch ``Linear`` weights are [out, in]: ``q_proj`` [H*K, D] -> our [D, H, K],
  ``k_proj``/``v_proj`` [G*K, D] -> [D, G, K], ``o_proj`` [D, H*K] -> [H, K, D],
  ``gate_proj``/``up_proj`` [F, D] -> [D, F], ``down_proj`` [D, F] -> [F, D],
  ``lm_head`` [V, D] -> our kernel [D, V].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dwt_jax.models.decoder_config import DecoderConfig

Rule = tuple[str, str, str]  # (our path, their key, transform)
Transform = Callable[[np.ndarray, DecoderConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class DecoderFamily:
    """How one Hugging Face decoder model type is named and what it holds.

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      family: our ``DecoderConfig.family`` ('gpt2' or 'llama').
      architecture: the transformers causal-LM class (what an export declares).
      base_architecture: the bare model class (no LM head; weights without prefix).
      prefix: the bare model's attribute in the causal LM (``transformer``/``model``).
      bare_roots: first key parts of a bare model's weights (prefixed on import).
      embedding_key: the word-embedding weight (what a tied LM head equals).
      buffers: key suffixes of non-parameter buffers some checkpoints carry (ignored).
    """

    model_type: str
    family: str
    architecture: str
    base_architecture: str
    prefix: str
    bare_roots: tuple[str, ...]
    embedding_key: str
    buffers: tuple[str, ...]

    @property
    def lm_head_key(self) -> str:
        """The LM head's weight ([V, D]; absent or equal to the embeddings when tied)."""
        return "lm_head.weight"


def _llama_like(model_type: str, architecture: str, base: str) -> DecoderFamily:
    return DecoderFamily(
        model_type=model_type,
        family="llama",
        architecture=architecture,
        base_architecture=base,
        prefix="model",
        bare_roots=("embed_tokens.", "layers.", "norm."),
        embedding_key="model.embed_tokens.weight",
        buffers=(".rotary_emb.inv_freq",),
    )


DECODER_FAMILIES: dict[str, DecoderFamily] = {
    "gpt2": DecoderFamily(
        model_type="gpt2",
        family="gpt2",
        architecture="GPT2LMHeadModel",
        base_architecture="GPT2Model",
        prefix="transformer",
        bare_roots=("wte.", "wpe.", "h.", "ln_f."),
        embedding_key="transformer.wte.weight",
        # The causal-mask buffers older GPT-2 checkpoints saved (``attn.c_attn.bias``
        # does not end with ``.attn.bias``).
        buffers=(".attn.bias", ".attn.masked_bias"),
    ),
    "llama": _llama_like("llama", "LlamaForCausalLM", "LlamaModel"),
    "qwen2": _llama_like("qwen2", "Qwen2ForCausalLM", "Qwen2Model"),
    "qwen3": _llama_like("qwen3", "Qwen3ForCausalLM", "Qwen3Model"),
    "mistral": _llama_like("mistral", "MistralForCausalLM", "MistralModel"),
}


def _gpt2_rules(cfg: DecoderConfig) -> list[Rule]:
    rules: list[Rule] = [
        ("transformer/wte/embedding", "transformer.wte.weight", "copy"),
        ("transformer/wpe/embedding", "transformer.wpe.weight", "copy"),
    ]
    per_layer = (
        ("ln_1/scale", "ln_1.weight", "copy"),
        ("ln_1/bias", "ln_1.bias", "copy"),
        ("attn/c_attn/kernel", "attn.c_attn.weight", "c_attn"),
        ("attn/c_attn/bias", "attn.c_attn.bias", "c_attn_bias"),
        ("attn/c_proj/kernel", "attn.c_proj.weight", "heads_in"),
        ("attn/c_proj/bias", "attn.c_proj.bias", "copy"),
        ("ln_2/scale", "ln_2.weight", "copy"),
        ("ln_2/bias", "ln_2.bias", "copy"),
        ("mlp/c_fc/kernel", "mlp.c_fc.weight", "copy"),
        ("mlp/c_fc/bias", "mlp.c_fc.bias", "copy"),
        ("mlp/c_proj/kernel", "mlp.c_proj.weight", "copy"),
        ("mlp/c_proj/bias", "mlp.c_proj.bias", "copy"),
    )
    for i in range(cfg.num_layers):
        rules += [
            (f"transformer/h_{i}/{ours}", f"transformer.h.{i}.{theirs}", fn)
            for ours, theirs, fn in per_layer
        ]
    rules += [
        ("transformer/ln_f/scale", "transformer.ln_f.weight", "copy"),
        ("transformer/ln_f/bias", "transformer.ln_f.bias", "copy"),
    ]
    return rules


def _llama_rules(cfg: DecoderConfig) -> list[Rule]:
    per_layer: list[tuple[str, str, str]] = [
        ("input_layernorm/scale", "input_layernorm.weight", "copy"),
        ("self_attn/q_proj/kernel", "self_attn.q_proj.weight", "q"),
        ("self_attn/k_proj/kernel", "self_attn.k_proj.weight", "kv"),
        ("self_attn/v_proj/kernel", "self_attn.v_proj.weight", "kv"),
    ]
    if cfg.qkv_bias:
        per_layer += [
            ("self_attn/q_proj/bias", "self_attn.q_proj.bias", "q_bias"),
            ("self_attn/k_proj/bias", "self_attn.k_proj.bias", "kv_bias"),
            ("self_attn/v_proj/bias", "self_attn.v_proj.bias", "kv_bias"),
        ]
    if cfg.qk_norm:
        per_layer += [
            ("self_attn/q_norm/scale", "self_attn.q_norm.weight", "copy"),
            ("self_attn/k_norm/scale", "self_attn.k_norm.weight", "copy"),
        ]
    per_layer += [
        ("self_attn/o_proj/kernel", "self_attn.o_proj.weight", "o"),
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", "copy"),
        ("mlp/gate_proj/kernel", "mlp.gate_proj.weight", "linear"),
        ("mlp/up_proj/kernel", "mlp.up_proj.weight", "linear"),
        ("mlp/down_proj/kernel", "mlp.down_proj.weight", "linear"),
    ]
    rules: list[Rule] = [("model/embed_tokens/embedding", "model.embed_tokens.weight", "copy")]
    for i in range(cfg.num_layers):
        rules += [
            (f"model/layers_{i}/{ours}", f"model.layers.{i}.{theirs}", fn)
            for ours, theirs, fn in per_layer
        ]
    rules.append(("model/norm/scale", "model.norm.weight", "copy"))
    if not cfg.tie_embeddings:
        rules.append(("lm_head/kernel", "lm_head.weight", "linear"))
    return rules


def decoder_rules(cfg: DecoderConfig) -> list[Rule]:
    """Every (our path, their key, transform) of the causal LM of ``cfg`` (a tied LM
    head has no row: it is the embedding table)."""
    return _gpt2_rules(cfg) if cfg.family == "gpt2" else _llama_rules(cfg)


def _to_2d(x: np.ndarray, num_in: int) -> np.ndarray:
    """[*in, *out] -> [prod(in), prod(out)]."""
    return x.reshape(int(np.prod(x.shape[:num_in])), -1)


# name -> (theirs -> ours, ours -> theirs).
TRANSFORMS: dict[str, tuple[Transform, Transform]] = {
    "copy": (lambda x, c: x, lambda x, c: x),
    "linear": (lambda w, c: w.T, lambda k, c: k.T),
    "c_attn": (
        lambda w, c: w.reshape(c.hidden_size, 3, c.num_heads, c.head_dim),
        lambda k, c: _to_2d(k, 1),
    ),
    "c_attn_bias": (
        lambda b, c: b.reshape(3, c.num_heads, c.head_dim),
        lambda b, c: b.reshape(-1),
    ),
    "heads_in": (
        lambda w, c: w.reshape(c.num_heads, c.head_dim, -1),
        lambda k, c: _to_2d(k, 2),
    ),
    "q": (
        lambda w, c: w.T.reshape(-1, c.num_heads, c.head_dim),
        lambda k, c: _to_2d(k, 1).T,
    ),
    "kv": (
        lambda w, c: w.T.reshape(-1, c.num_kv_heads, c.head_dim),
        lambda k, c: _to_2d(k, 1).T,
    ),
    "q_bias": (lambda b, c: b.reshape(c.num_heads, c.head_dim), lambda b, c: b.reshape(-1)),
    "kv_bias": (lambda b, c: b.reshape(c.num_kv_heads, c.head_dim), lambda b, c: b.reshape(-1)),
    "o": (
        lambda w, c: w.T.reshape(c.num_heads, c.head_dim, -1),
        lambda k, c: _to_2d(k, 2).T,
    ),
}


def decoder_to_ours(fn: str, x: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
    """Their array -> ours, through the transform named ``fn``."""
    return TRANSFORMS[fn][0](x, cfg)


def decoder_to_theirs(fn: str, x: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
    """Our array -> theirs (the inverse of ``decoder_to_ours``)."""
    return TRANSFORMS[fn][1](x, cfg)
