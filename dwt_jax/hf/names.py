"""The name table between Hugging Face BERT/RoBERTa state dicts and dwt_jax parameters.

One row per parameter: our path (``/``-separated, under the model's param tree), the
Hugging Face key (``.``-separated, without the ``bert.``/``roberta.`` prefix of the
encoder), and the name of the value transform that turns theirs into ours (its
inverse turns ours into theirs). ``{i}`` stands for the layer index. Our tree mirrors
BERT's module names, so BERT's keys follow from our paths (``their_name``); RoBERTa's
LM head and classification head are spelled out.

Transforms (``W`` a torch ``Linear`` weight, [out, in]):

- ``copy``: the same array (embeddings, LayerNorm, plain biases).
- ``linear``: ``W.T`` -> our ``[in, out]`` Dense kernel.
- ``qkv``: ``W.T.reshape(D, H, K)``; ``qkv_bias``: ``b.reshape(H, K)``.
- ``attn_out``: ``W.T.reshape(H, K, D)`` (the output projection reads the heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dwt_jax.models.config import BertConfig

Rule = tuple[str, str, str]  # (our path, their key, transform)


def their_name(path: str) -> str:
    """BERT's key for one of our paths: ``/`` -> ``.``, ``layer_i`` -> ``layer.i``, and
    ``kernel`` / ``scale`` / ``embedding`` -> ``weight`` (torch's name for all three)."""
    parts = path.replace("layer_", "layer/").split("/")
    renamed = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    return ".".join(renamed.get(p, p) for p in parts)


def _derived(paths: tuple[tuple[str, str], ...], prefix: str = "") -> tuple[Rule, ...]:
    """Rules whose keys follow BERT's naming (``their_name``), from (path, transform)."""
    return tuple((path, prefix + their_name(path), fn) for path, fn in paths)


_EMBEDDINGS = _derived(
    tuple(
        (f"embeddings/{name}", "copy")
        for name in (
            "word_embeddings/embedding",
            "position_embeddings/embedding",
            "token_type_embeddings/embedding",
            "LayerNorm/scale",
            "LayerNorm/bias",
        )
    )
)
_LAYER = _derived(
    (
        *(
            (f"encoder/layer_{{i}}/attention/self/{name}/{param}", fn)
            for name in ("query", "key", "value")
            for param, fn in (("kernel", "qkv"), ("bias", "qkv_bias"))
        ),
        ("encoder/layer_{i}/attention/output/dense/kernel", "attn_out"),
        ("encoder/layer_{i}/attention/output/dense/bias", "copy"),
        ("encoder/layer_{i}/attention/output/LayerNorm/scale", "copy"),
        ("encoder/layer_{i}/attention/output/LayerNorm/bias", "copy"),
        ("encoder/layer_{i}/intermediate/dense/kernel", "linear"),
        ("encoder/layer_{i}/intermediate/dense/bias", "copy"),
        ("encoder/layer_{i}/output/dense/kernel", "linear"),
        ("encoder/layer_{i}/output/dense/bias", "copy"),
        ("encoder/layer_{i}/output/LayerNorm/scale", "copy"),
        ("encoder/layer_{i}/output/LayerNorm/bias", "copy"),
    )
)
_POOLER = _derived((("pooler/dense/kernel", "linear"), ("pooler/dense/bias", "copy")))
_MLM_TRANSFORM = (
    ("predictions/transform/dense/kernel", "linear"),
    ("predictions/transform/dense/bias", "copy"),
    ("predictions/transform/LayerNorm/scale", "copy"),
    ("predictions/transform/LayerNorm/bias", "copy"),
    ("predictions/bias", "copy"),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face model family names its parts.

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      prefix: the encoder's attribute in the task models (``bert``/``roberta``).
      mlm_head: rules of the MLM head, our paths under ``cls/``.
      tied: keys that must equal another key's value (tied decoder weight and
        bias), mapped to that key; dropped on import, not written on export.
      classifier: rules of the sequence-classification head (our paths from the
        model root: ``classifier/...``, or ``bert/pooler/...`` where the family's
        head holds the pooler-like dense layer).
      classifier_pooler: the family's classification head brings its own dense+tanh
        layer (RoBERTa) instead of the encoder's pooler.
      mlm_architecture / classifier_architecture: the transformers class names.
      ignorable: key prefixes of heads this stack has no use for (next-sentence
        prediction); dropped with a note rather than refused.
    """

    model_type: str
    prefix: str
    mlm_head: tuple[Rule, ...]
    tied: dict[str, str]
    classifier: tuple[Rule, ...]
    classifier_pooler: bool
    mlm_architecture: str
    classifier_architecture: str
    ignorable: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    "bert": Family(
        model_type="bert",
        prefix="bert",
        mlm_head=_derived(_MLM_TRANSFORM, "cls."),
        tied={
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
        classifier=(
            ("classifier/dense/kernel", "classifier.weight", "linear"),
            ("classifier/dense/bias", "classifier.bias", "copy"),
        ),
        classifier_pooler=False,
        mlm_architecture="BertForMaskedLM",
        classifier_architecture="BertForSequenceClassification",
        ignorable=("cls.seq_relationship.",),
    ),
    "roberta": Family(
        model_type="roberta",
        prefix="roberta",
        mlm_head=(
            ("predictions/transform/dense/kernel", "lm_head.dense.weight", "linear"),
            ("predictions/transform/dense/bias", "lm_head.dense.bias", "copy"),
            ("predictions/transform/LayerNorm/scale", "lm_head.layer_norm.weight", "copy"),
            ("predictions/transform/LayerNorm/bias", "lm_head.layer_norm.bias", "copy"),
            ("predictions/bias", "lm_head.bias", "copy"),
        ),
        tied={
            "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias",
        },
        # RobertaClassificationHead: dense + tanh on <s>, then out_proj: the same
        # function as our pooler + classifier (its extra dropout acts in training only).
        classifier=(
            ("bert/pooler/dense/kernel", "classifier.dense.weight", "linear"),
            ("bert/pooler/dense/bias", "classifier.dense.bias", "copy"),
            ("classifier/dense/kernel", "classifier.out_proj.weight", "linear"),
            ("classifier/dense/bias", "classifier.out_proj.bias", "copy"),
        ),
        classifier_pooler=True,
        mlm_architecture="RobertaForMaskedLM",
        classifier_architecture="RobertaForSequenceClassification",
        ignorable=(),
    ),
}


def encoder_rules(cfg: BertConfig, pooler: bool) -> list[Rule]:
    """Rules of the encoder (our paths under ``bert/``, their keys without prefix)."""
    layers = [
        (ours.replace("{i}", str(i)), theirs.replace("{i}", str(i)), fn)
        for i in range(cfg.num_layers)
        for ours, theirs, fn in _LAYER
    ]
    return [*_EMBEDDINGS, *layers, *(_POOLER if pooler else ())]


def _qkv(cfg: BertConfig) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim)


def _qkv_bias(cfg: BertConfig) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: b.reshape(cfg.num_heads, cfg.head_dim)


def _attn_out(cfg: BertConfig) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def to_ours(fn: str, cfg: BertConfig) -> Callable[[np.ndarray], np.ndarray]:
    """The transform named ``fn``: their array -> ours."""
    return {
        "copy": lambda x: x,
        "linear": lambda w: w.T,
        "qkv": _qkv(cfg),
        "qkv_bias": _qkv_bias(cfg),
        "attn_out": _attn_out(cfg),
    }[fn]


def to_theirs(fn: str, cfg: BertConfig) -> Callable[[np.ndarray], np.ndarray]:
    """The inverse of ``to_ours(fn)``: our array -> theirs."""
    d = cfg.hidden_size
    return {
        "copy": lambda x: x,
        "linear": lambda k: k.T,
        "qkv": lambda k: k.reshape(d, d).T,
        "qkv_bias": lambda b: b.reshape(d),
        "attn_out": lambda k: k.reshape(d, d).T,
    }[fn]
