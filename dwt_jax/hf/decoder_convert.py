"""Pure conversions between Hugging Face decoder checkpoints (GPT-2, Llama, Qwen2, Qwen3,
Mistral) and dwt_jax's causal LMs.

``decoder_config_from_hf`` / ``decoder_config_to_hf`` translate ``config.json`` and
``DecoderConfig`` (refusing, in one line naming the setting, what our models do not
compute); ``import_decoder_params`` fills a parameter tree of our model from a state
dict through the name table (``decoder_names``) and ends with one strict check that
lists every missing, misshapen and unused weight together; ``export_decoder_params``
is its inverse. No file I/O here (see ``files.py`` and ``decoder_files.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax.hf.convert import (
    HFConversionError,
    ImportReport,
    flatten,
    name_list,
    normalise_keys,
    unflatten,
)
from dwt_jax.hf.decoder_names import (
    DECODER_FAMILIES,
    DecoderFamily,
    decoder_rules,
    decoder_to_ours,
    decoder_to_theirs,
)
from dwt_jax.models.decoder_config import DecoderConfig

ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = {
    "rope_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_len": "original_max_position_embeddings",
}
# GPT-2's GELU is the tanh approximation; transformers spells it both ways.
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _get(hf: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` that ``hf`` sets to something other than None."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _refuse(source: str, setting: str, why: str) -> HFConversionError:
    return HFConversionError(f"{source}: {setting} is not supported ({why}).")


def _rope(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our RoPE fields from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` (either may be absent; as in transformers, a
    ``rope_scaling`` dict wins)."""
    parameters, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    parameters = parameters if isinstance(parameters, Mapping) else {}
    merged = dict(scaling if isinstance(scaling, Mapping) else parameters)
    if any(isinstance(v, Mapping) for v in merged.values()):
        raise _refuse(source, "RoPE parameters per layer type", "one RoPE serves every layer")
    rope_type = _get(merged, "rope_type", "type", default="default")
    if rope_type not in ROPE_TYPES:
        raise _refuse(
            source,
            f"rope type {rope_type!r}",
            f"dwt_jax computes the RoPE types {ROPE_TYPES}",
        )
    if float(_get(merged, "partial_rotary_factor", default=1.0)) != 1.0:
        raise _refuse(
            source,
            f"partial_rotary_factor={merged['partial_rotary_factor']!r}",
            "RoPE rotates whole heads here",
        )
    theta = _get(merged, "rope_theta", default=_get(hf, "rope_theta", default=None))
    theta = _get(parameters, "rope_theta", default=10000.0) if theta is None else theta
    rope: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "none"}
    if rope_type == "llama3":
        absent = [theirs for theirs in _LLAMA3_KEYS.values() if merged.get(theirs) is None]
        if absent:
            raise HFConversionError(f"{source}: the llama3 rope scaling lacks {absent}.")
        rope["rope_scaling"] = "llama3"
        for ours, theirs in _LLAMA3_KEYS.items():
            value = merged[theirs]
            rope[ours] = int(value) if ours == "rope_original_max_len" else float(value)
    return rope


def _gpt2_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    activation = _get(hf, "activation_function", default="gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        raise _refuse(
            source, f"activation_function={activation!r}", "GPT-2 here uses gelu_new (tanh GELU)"
        )
    wanted = {
        "scale_attn_weights": (True, "attention scores are scaled by 1/sqrt(head width)"),
        "scale_attn_by_inverse_layer_idx": (False, "no per-layer attention scaling here"),
        "add_cross_attention": (False, "a decoder-only model has no cross-attention"),
        "tie_word_embeddings": (True, "GPT-2's LM head is its word embeddings"),
    }
    for key, (value, why) in wanted.items():
        if hf.get(key) is not None and hf[key] != value:
            raise _refuse(source, f"{key}={hf[key]!r}", why)
    hidden = int(_get(hf, "n_embd", "hidden_size"))
    return {
        "family": "gpt2",
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": hidden,
        "num_layers": int(_get(hf, "n_layer", "num_hidden_layers")),
        "num_heads": int(_get(hf, "n_head", "num_attention_heads")),
        "mlp_dim": int(_get(hf, "n_inner", default=4 * hidden)),
        "max_len": int(_get(hf, "n_positions", "max_position_embeddings")),
        "norm_eps": float(_get(hf, "layer_norm_epsilon", default=1e-5)),
        "dropout_rate": float(_get(hf, "resid_pdrop", default=0.0)),
        "tie_embeddings": True,
    }


def _window(hf: Mapping[str, Any], model_type: str, source: str) -> int:
    """Our ``sliding_window`` (0: none): Mistral's applies to every layer; Qwen's only
    when ``use_sliding_window``, to the layers its ``layer_types`` mark (all or none
    can be held here)."""
    window = int(_get(hf, "sliding_window", default=0))
    if model_type == "mistral":
        return window
    if not window or not hf.get("use_sliding_window"):
        return 0
    layers = int(hf["num_hidden_layers"])
    first = int(_get(hf, "max_window_layers", default=0))
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(layers)
    ]
    sliding = sum(t == "sliding_attention" for t in types)
    if 0 < sliding < len(types):
        raise _refuse(
            source,
            f"a sliding window on {sliding} of {len(types)} layers (max_window_layers / "
            "layer_types)",
            "one attention span serves every layer here",
        )
    return window if sliding else 0


def _llama_fields(hf: Mapping[str, Any], model_type: str, source: str) -> dict[str, Any]:
    activation = _get(hf, "hidden_act", default="silu")
    if activation != "silu":
        raise _refuse(source, f"hidden_act={activation!r}", "the Llama family's MLP is SwiGLU")
    # The keys transformers reads for this model type (Qwen2's q/k/v biases are fixed).
    biases = {
        "attention_bias": ("llama", "qwen3"),
        "mlp_bias": ("llama",),
    }
    why = {
        "attention_bias": "it puts a bias on o_proj too, which our attention does not hold",
        "mlp_bias": "the MLP projections here have no biases",
    }
    for key, model_types in biases.items():
        if model_type in model_types and hf.get(key):
            raise _refuse(source, f"{key}=True", why[key])
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    return {
        "family": "llama",
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": hidden,
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(_get(hf, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(hf, "head_dim", default=hidden // heads)),
        "mlp_dim": int(hf["intermediate_size"]),
        "max_len": int(hf["max_position_embeddings"]),
        "norm_eps": float(_get(hf, "rms_norm_eps", default=1e-6)),
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", default=False)),
        "qkv_bias": model_type == "qwen2",
        "qk_norm": model_type == "qwen3",
        "sliding_window": _window(hf, model_type, source),
        **_rope(hf, source),
    }


def decoder_config_from_hf(
    hf: Mapping[str, Any], source: str = "config.json"
) -> tuple[DecoderConfig, DecoderFamily]:
    """Our ``DecoderConfig`` and the Hugging Face family of a decoder's ``config.json``.

    Raises ``HFConversionError`` (naming ``source`` and the setting) for another model
    type or architecture, and for settings our models do not compute: another
    activation, RoPE type or partial rotation, an output-projection or MLP bias, a
    sliding window on only some layers.
    """
    model_type = hf.get("model_type")
    if model_type not in DECODER_FAMILIES:
        raise HFConversionError(
            f"{source}: model_type={model_type!r} is not a supported decoder; dwt_jax reads "
            f"{supported_decoders()}."
        )
    family = DECODER_FAMILIES[model_type]
    allowed = (family.architecture, family.base_architecture)
    other = [a for a in hf.get("architectures") or () if a not in allowed]
    if other:
        raise HFConversionError(
            f"{source}: architectures={other} is not supported; dwt_jax reads causal LMs "
            f"({supported_decoders()}) and their bare {family.base_architecture}."
        )
    try:
        fields = (
            _gpt2_fields(hf, source)
            if family.family == "gpt2"
            else _llama_fields(hf, model_type, source)
        )
        fields["initializer_range"] = float(_get(hf, "initializer_range", default=0.02))
        return DecoderConfig(**fields), family
    except KeyError as e:
        raise HFConversionError(f"{source}: required field {e.args[0]!r} is missing.") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, HFConversionError):
            raise
        raise HFConversionError(f"{source}: no model dwt_jax builds fits it: {e}") from None


def supported_decoders() -> str:
    """'gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), ...' for messages."""
    return ", ".join(f"{t} ({f.architecture})" for t, f in DECODER_FAMILIES.items())


def export_family(cfg: DecoderConfig) -> DecoderFamily:
    """The transformers model type a decoder exports as: GPT-2; for the Llama family
    Qwen3 (q/k norm), Qwen2 (q/k/v biases), Mistral (a sliding window) or Llama."""
    if cfg.family == "gpt2":
        return DECODER_FAMILIES["gpt2"]
    if cfg.qk_norm and cfg.qkv_bias:
        raise HFConversionError(
            "model.qk_norm=True with model.qkv_bias=True has no transformers model (Qwen3's "
            "attention_bias also biases o_proj); export a model with one of the two."
        )
    if cfg.qk_norm:
        return DECODER_FAMILIES["qwen3"]
    if cfg.qkv_bias:
        return DECODER_FAMILIES["qwen2"]
    return DECODER_FAMILIES["mistral" if cfg.sliding_window else "llama"]


def _rope_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    """RoPE in both spellings: ``rope_parameters`` (transformers 5) and ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3"}
        scaling.update({theirs: getattr(cfg, ours) for ours, theirs in _LLAMA3_KEYS.items()})
    rope_type = "default" if scaling is None else "llama3"
    parameters = {"rope_type": rope_type, "rope_theta": cfg.rope_theta, **(scaling or {})}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": parameters}


def decoder_config_to_hf(
    cfg: DecoderConfig, token_ids: Mapping[str, int | None] | None = None
) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as a transformers causal LM (``export_family``).

    ``token_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (None where the
    tokenizer has no such token; all None when not given)."""
    family = export_family(cfg)
    ids = {name: None for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids.update(token_ids or {})
    common = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tied,
        "use_cache": True,
        "dtype": "float32",
        **ids,
    }
    if family.family == "gpt2":
        return {
            **common,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout_rate,
            "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": 0.0,  # Our attention has no dropout.
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    hf = {
        **common,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "attention_dropout": 0.0,
        **_rope_to_hf(cfg),
    }
    if family.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if family.model_type == "llama":
        hf["mlp_bias"] = False
    if family.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if family.model_type in ("qwen2", "qwen3"):
        window = cfg.sliding_window or None
        kind = "sliding_attention" if window else "full_attention"
        hf.update(
            use_sliding_window=bool(window),
            sliding_window=window,
            max_window_layers=0 if window else cfg.num_layers,
            layer_types=[kind] * cfg.num_layers,
        )
    return hf


def _their_shape(fn: str, shape: tuple[int, ...], cfg: DecoderConfig) -> tuple[int, ...]:
    """The Hugging Face shape of our ``shape`` under ``fn`` (traced: nothing allocated)."""
    abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tuple(jax.eval_shape(lambda x: decoder_to_theirs(fn, x, cfg), abstract).shape)


def import_decoder_params(
    state: Mapping[str, Any],
    cfg: DecoderConfig,
    family: DecoderFamily,
    template: Mapping[str, Any],
    *,
    allow_fresh: Iterable[str] = (),
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> tuple[dict[str, Any], ImportReport]:
    """Fills ``template`` (our causal LM's param tree; leaves only need ``shape``) from
    the Hugging Face state dict ``state``.

    A tied checkpoint may carry ``lm_head.weight``: it is dropped if it equals the word
    embeddings. ``allow_fresh`` prefixes of our paths (e.g. ``'lm_head'`` for a bare
    ``LlamaModel``) stay as in the template when the checkpoint lacks them; ``ignore``
    prefixes of checkpoint keys are dropped on purpose.

    Returns ``(params, report)``. Raises one ``HFConversionError`` listing every missing,
    misshapen and unused weight (and a tied head that differs from the embeddings).
    """
    # A bare model's keys get ``transformer.``/``model.``; buffers are dropped.
    weights, dropped = normalise_keys(state, family.prefix, family.bare_roots, family.buffers)
    flat_template = flatten(template)
    fresh_prefixes = tuple(allow_fresh)
    out: dict[str, Any] = {}
    used: set[str] = set()
    missing: list[str] = []
    misshapen: list[str] = []
    fresh: list[str] = []
    ruled: set[str] = set()
    for ours, theirs, fn in decoder_rules(cfg):
        if ours not in flat_template:
            continue  # Its key, if the checkpoint has it, is reported as unused.
        ruled.add(ours)
        if theirs not in weights:
            if ours.startswith(fresh_prefixes):
                fresh.append(ours)
                out[ours] = flat_template[ours]
            else:
                missing.append(theirs)
            continue
        used.add(theirs)
        expected = _their_shape(fn, tuple(flat_template[ours].shape), cfg)
        if tuple(weights[theirs].shape) != expected:
            misshapen.append(f"{theirs} is {tuple(weights[theirs].shape)}, expected {expected}")
            continue
        out[ours] = np.asarray(decoder_to_ours(fn, weights[theirs].astype(np.float32), cfg))
    for ours in sorted(set(flat_template) - ruled):
        if ours.startswith(fresh_prefixes):
            fresh.append(ours)
            out[ours] = flat_template[ours]
        else:
            missing.append(f"(no rule for our {ours})")
    problems = []
    head, embedding = family.lm_head_key, family.embedding_key
    if cfg.tied and head in weights:
        used.add(head)
        dropped.append(head)
        if embedding in weights and not np.array_equal(weights[head], weights[embedding]):
            problems.append(
                f"{head} differs from {embedding} although config.json ties them "
                "(tie_word_embeddings); set tie_word_embeddings=false if the head is its own"
            )
    skip = tuple(ignore)
    unused = []
    for key in sorted(set(weights) - used):
        (dropped if skip and key.startswith(skip) else unused).append(key)
    if missing:
        problems.insert(0, f"missing {len(missing)} weight(s): {name_list(missing)}")
    if misshapen:
        problems.append(
            f"{len(misshapen)} weight(s) have the wrong shape: {name_list(misshapen, 6)}"
        )
    if unused:
        problems.append(
            f"{len(unused)} weight(s) are not used: {name_list(unused)} (pass their prefixes "
            "in `ignore` to drop them knowingly)"
        )
    if problems:
        hint = ""
        if head in missing:
            hint = (
                f" A bare {family.base_architecture} has no LM head: use the "
                f"{family.architecture} checkpoint, or allow a fresh head "
                "(allow_fresh=('lm_head',))."
            )
        raise HFConversionError(
            f"{source}: the weights do not fit the {family.model_type} model its config.json "
            f"describes: {'; '.join(problems)}. Check that config.json and the weights "
            f"belong together.{hint}"
        )
    loaded = tuple(sorted(set(out) - set(fresh)))
    report = ImportReport(loaded, tuple(sorted(fresh)), tuple(sorted(dropped)))
    return unflatten(out), report


def export_decoder_params(params: Mapping[str, Any], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of our causal LM's params, float32; a tied head is
    not written (transformers ties it to the embeddings on load)."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    rules = decoder_rules(cfg)
    missing = [ours for ours, _, _ in rules if ours not in flat]
    if missing:
        raise HFConversionError(
            f"the {cfg.family} params lack {name_list(missing)}; export the model the run trained."
        )
    extra = sorted(set(flat) - {ours for ours, _, _ in rules})
    if extra:
        raise HFConversionError(f"no Hugging Face name for our parameters {name_list(extra)}.")
    return {
        theirs: np.ascontiguousarray(decoder_to_theirs(fn, flat[ours], cfg))
        for ours, theirs, fn in rules
    }
