"""Pure conversions between Hugging Face BERT/RoBERTa checkpoints and dwt_jax.

``config_from_hf`` / ``config_to_hf`` translate ``config.json`` and ``BertConfig``;
``import_params`` fills a parameter tree of our model from a Hugging Face state dict
through the name table (``names.py``) and finishes with a strict check that names
every unused, missing or misshapen weight; ``export_params`` is its inverse. No file
I/O here (see ``files.py``): these are functions of dicts of NumPy arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dwt_jax.errors import ConfigError
from dwt_jax.hf.names import FAMILIES, Family, Rule, encoder_rules, to_ours, to_theirs
from dwt_jax.models.config import BertConfig

# Non-parameter buffers some checkpoints carry.
_BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
HEADS = ("mlm", "classifier", "encoder")


class HFConversionError(ConfigError):
    """A Hugging Face checkpoint or config that cannot be converted; says what to fix.

    A ``ConfigError`` (so a ``ValueError``): the command lines report it as one line."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What an import used, left fresh and dropped.

    Attributes:
      loaded: our parameter paths filled from the checkpoint.
      fresh: our parameter paths kept from the template (allowed fresh parts).
      dropped: checkpoint keys deliberately not used (tied copies, buffers, heads this
        stack has no use for, keys the caller chose to ignore).
    """

    loaded: tuple[str, ...]
    fresh: tuple[str, ...]
    dropped: tuple[str, ...]


def _get(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> tuple[BertConfig, Family]:
    """Our ``BertConfig`` and the model family of a Hugging Face ``config.json`` dict.

    Raises ``HFConversionError`` for what our encoder does not compute: another model
    type, an activation other than exact GELU, relative position embeddings, decoders.
    """
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HFConversionError(
            f"{source}: model_type={model_type!r} is not supported; dwt_jax imports "
            f"{' and '.join(sorted(FAMILIES))} encoders."
        )
    checks = {
        "hidden_act": ("gelu", "exact GELU is what dwt_jax's encoder computes"),
        "position_embedding_type": ("absolute", "only absolute position embeddings exist here"),
        "is_decoder": (False, "only encoders are supported"),
        "add_cross_attention": (False, "only encoders are supported"),
    }
    for key, (wanted, why) in checks.items():
        if key in hf and hf[key] not in (wanted, None):
            raise HFConversionError(f"{source}: {key}={hf[key]!r} is not supported ({why}).")
    family = FAMILIES[model_type]
    offset = int(_get(hf, "pad_token_id", 1)) + 1 if model_type == "roberta" else 0
    labels = hf.get("id2label") or {}
    try:
        cfg = BertConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            mlp_dim=int(hf["intermediate_size"]),
            max_len=int(hf["max_position_embeddings"]),
            type_vocab_size=int(_get(hf, "type_vocab_size", 2)),
            dropout_rate=float(_get(hf, "hidden_dropout_prob", 0.1)),
            attention_dropout_rate=float(_get(hf, "attention_probs_dropout_prob", 0.1)),
            layer_norm_eps=float(_get(hf, "layer_norm_eps", 1e-12)),
            initializer_range=float(_get(hf, "initializer_range", 0.02)),
            num_labels=max(len(labels), 1) if labels else int(_get(hf, "num_labels", 2)),
            position_offset=offset,
        )
    except KeyError as e:
        raise HFConversionError(f"{source}: required field {e.args[0]!r} is missing.") from None
    except ValueError as e:
        raise HFConversionError(f"{source}: {e}") from None
    return cfg, family


def family_of(cfg: BertConfig) -> Family:
    """The family a model of this config exports to: RoBERTa if positions are offset."""
    return FAMILIES["roberta" if cfg.position_offset > 0 else "bert"]


def config_to_hf(
    cfg: BertConfig,
    head: str,
    *,
    num_labels: int | None = None,
    problem_type: str | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` as a transformers model of ``head``."""
    family = family_of(cfg)
    architecture = family.classifier_architecture if head == "classifier" else None
    hf: dict[str, Any] = {
        "model_type": family.model_type,
        "architectures": [architecture or family.mlm_architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "pad_token_id": cfg.position_offset - 1 if cfg.position_offset else 0,
    }
    if family.model_type == "roberta":
        hf.update(bos_token_id=0, eos_token_id=2)
    if head == "classifier":
        n = int(num_labels or cfg.num_labels)
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        if problem_type:
            hf["problem_type"] = problem_type
    return hf


def normalise_keys(
    state: Mapping[str, Any],
    prefix: str,
    bare_roots: tuple[str, ...],
    buffers: tuple[str, ...],
    rename: Any = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """A checkpoint's keys as the name tables expect them: a bare model's keys (those
    starting with ``bare_roots``) under ``prefix``, then ``rename(name)`` if given;
    keys ending in ``buffers`` dropped (and returned). Two keys naming one weight are
    an error."""
    out: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.endswith(buffers):
            dropped.append(key)
            continue
        name = f"{prefix}.{key}" if key.startswith(bare_roots) else key
        name = rename(name) if rename is not None else name
        if name in out:
            raise HFConversionError(f"checkpoint has both {key} and another name for it.")
        out[name] = np.asarray(value)
    return out, dropped


def _old_layer_norm_names(name: str) -> str:
    """Old BERT checkpoints' LayerNorm ``gamma``/``beta`` as ``weight``/``bias``."""
    if ".LayerNorm." in name or ".layer_norm." in name:
        return name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def _rules(cfg: BertConfig, family: Family, head: str, pooler: bool) -> list[Rule]:
    """Every (our path from the model root, their full key, transform) of ``head``."""
    rules = [
        (f"bert/{ours}", f"{family.prefix}.{theirs}", fn)
        for ours, theirs, fn in encoder_rules(cfg, pooler and not family.classifier_pooler)
    ]
    if head == "mlm":
        rules += [(f"cls/{ours}", theirs, fn) for ours, theirs, fn in family.mlm_head]
        if family.classifier_pooler and pooler:
            rules += [
                (f"bert/{ours}", f"{family.prefix}.{theirs}", fn)
                for ours, theirs, fn in encoder_rules(cfg, True)[-2:]
            ]
    elif head == "classifier":
        rules += list(family.classifier)
    return rules


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested param tree as ``{"a/b/kernel": leaf}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


_flatten = flatten  # The name tests/hf/test_parity.py reads.


def name_list(items: Iterable[str], limit: int = 12) -> str:
    """Sorted names, comma-separated, the first ``limit`` of them and a count of the rest."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def import_params(
    state: Mapping[str, Any],
    cfg: BertConfig,
    family: Family,
    template: Mapping[str, Any],
    *,
    head: str = "mlm",
    allow_fresh: Iterable[str] = (),
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> tuple[dict[str, Any], ImportReport]:
    """Fills ``template`` (our model's param tree, e.g. a fresh init) from ``state``.

    Args:
      state: Hugging Face state dict, key -> array (torch tensors converted to NumPy).
      cfg: the model config (from ``config_from_hf``).
      family: the checkpoint's family.
      template: a param tree of the target model (``{'bert': ..., 'cls': ...}`` for
        head 'mlm', ``{'bert': ..., 'classifier': ...}`` for 'classifier', or the
        ``bert`` subtree itself for 'encoder'); leaves only need ``shape``.
      head: which model the template is.
      allow_fresh: prefixes of our paths (e.g. ``'bert/pooler'``, ``'cls'``) that may
        stay as in the template when the checkpoint lacks them.
      ignore: key prefixes of the checkpoint to drop on purpose (unknown heads).
      source: the checkpoint's name for messages.

    Returns:
      ``(params, report)``: a tree with exactly the template's structure, float32.

    Raises:
      HFConversionError naming every checkpoint key nothing used, every parameter the
      checkpoint lacks (not allowed fresh), and any shape that does not match.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r} is unknown: use one of {HEADS}.")
    weights, dropped = normalise_keys(
        state,
        family.prefix,
        ("embeddings.", "encoder.", "pooler."),  # A bare encoder (BertModel) checkpoint.
        _BUFFER_SUFFIXES,
        _old_layer_norm_names,
    )
    flat_template = flatten(template if head != "encoder" else {"bert": template})
    wants_pooler = any(p.startswith("bert/pooler/") for p in flat_template)
    rules = _rules(cfg, family, "mlm" if head == "encoder" else head, wants_pooler)
    if head == "encoder":
        rules = [r for r in rules if r[0].startswith("bert/")]
    rules = [r for r in rules if r[0] in flat_template]
    fresh_prefixes = tuple(allow_fresh)

    out: dict[str, Any] = {}
    used: set[str] = set()
    missing, misshapen, fresh = [], [], []
    for ours, theirs, fn in rules:
        if theirs not in weights:
            if ours.startswith(fresh_prefixes):
                fresh.append(ours)
                out[ours] = flat_template[ours]
            else:
                missing.append(theirs)
            continue
        used.add(theirs)
        expected = tuple(flat_template[ours].shape)
        want_theirs = to_theirs(fn, cfg)(np.zeros(expected, np.float32)).shape
        if tuple(weights[theirs].shape) != tuple(want_theirs):
            misshapen.append(f"{theirs} is {tuple(weights[theirs].shape)}, expected {want_theirs}")
            continue
        out[ours] = np.asarray(to_ours(fn, cfg)(weights[theirs].astype(np.float32)))
    not_covered = sorted(set(flat_template) - {r[0] for r in rules})
    for ours in not_covered:
        if ours.startswith(fresh_prefixes):
            fresh.append(ours)
            out[ours] = flat_template[ours]
        else:
            missing.append(f"(no rule for our {ours})")
    if misshapen:
        raise HFConversionError(
            f"{source}: {len(misshapen)} weight(s) have the wrong shape for the config: "
            f"{name_list(misshapen, 6)}; the weights do not belong to this config.json."
        )
    if missing:
        raise HFConversionError(
            f"{source}: missing {len(missing)} weight(s) the model needs: {name_list(missing)}."
            + _fresh_hint(missing, family)
        )
    for key, target in family.tied.items():
        if key in weights:
            used.add(key)
            dropped.append(key)
            if target in weights and not np.array_equal(weights[key], weights[target]):
                raise HFConversionError(
                    f"{source}: {key} differs from {target}; dwt_jax ties the MLM decoder "
                    "to the word embeddings, so an untied decoder cannot be imported."
                )
    skip = tuple(ignore) + family.ignorable
    unused = []
    for key in sorted(set(weights) - used):
        if key.startswith(skip) or _is_other_head(key, family, head):
            dropped.append(key)
        else:
            unused.append(key)
    if unused:
        raise HFConversionError(
            f"{source}: {len(unused)} weight(s) are not used by the {head} model: "
            f"{name_list(unused)}; the checkpoint is not a plain {family.model_type} "
            "encoder (pass their prefixes in `ignore` to drop them knowingly)."
        )
    tree = unflatten(out)
    loaded = tuple(sorted(set(out) - set(fresh)))
    report = ImportReport(loaded, tuple(sorted(fresh)), tuple(sorted(dropped)))
    return (tree["bert"] if head == "encoder" else tree), report


def _is_other_head(key: str, family: Family, head: str) -> bool:
    """A key of the family's MLM or classification head when importing another head
    (an MLM checkpoint as a classifier's encoder: its MLM head is simply not needed)."""
    heads = {
        "mlm": {theirs for _, theirs, _ in family.mlm_head} | set(family.tied),
        "classifier": {theirs for _, theirs, _ in family.classifier},
    }
    if key.startswith(f"{family.prefix}.pooler."):
        return head == "encoder"
    return any(key in keys for name, keys in heads.items() if name != head)


def _fresh_hint(missing: list[str], family: Family) -> str:
    head_keys = {theirs for _, theirs, _ in family.mlm_head}
    if any(k in head_keys for k in missing):
        return (
            " The checkpoint has no MLM head: use one with its MLM head (a *ForMaskedLM "
            "or *ForPreTraining checkpoint), or ask for a fresh head (fresh_mlm_head=True)."
        )
    return " Check that config.json and the weights belong together."


def export_params(params: Mapping[str, Any], cfg: BertConfig, head: str) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of our params (``{'bert', 'cls'}`` or
    ``{'bert', 'classifier'}``), float32, tied weights omitted as transformers saves them.

    An MLM model's pooler is left out: ``*ForMaskedLM`` has none (and the MLM loss never
    trains it); the classifiers get it.
    """
    if head not in ("mlm", "classifier"):
        raise ValueError(f"head={head!r}: export 'mlm' or 'classifier' models.")
    family = family_of(cfg)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    if head == "mlm":
        flat = {k: v for k, v in flat.items() if not k.startswith("bert/pooler/")}
    rules = _rules(cfg, family, head, head == "classifier")
    missing = [ours for ours, _, _ in rules if ours not in flat]
    if missing:
        raise HFConversionError(
            f"the {head} params lack {name_list(missing)}; export the model the run trained."
        )
    extra = sorted(set(flat) - {ours for ours, _, _ in rules})
    if extra:
        raise HFConversionError(f"no Hugging Face name for our parameters {name_list(extra)}.")
    return {
        theirs: np.ascontiguousarray(to_theirs(fn, cfg)(flat[ours])) for ours, theirs, fn in rules
    }
