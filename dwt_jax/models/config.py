"""`BertConfig`: the architecture of a BERT-style encoder, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

NORMS = ("post", "pre")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots", "minimal")
DROPOUT_RNGS = ("hash", "threefry")  # See models/dropout.py.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_dim",
    "max_len",
    "type_vocab_size",
    "num_labels",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder and its heads.

    Attributes:
      vocab_size: tokens in the vocabulary (V).
      hidden_size: model width (D).
      num_layers: transformer blocks.
      num_heads: attention heads (H); must divide `hidden_size`.
      mlp_dim: width of the feed-forward layer (F).
      max_len: number of position embeddings (longest sequence).
      type_vocab_size: token-type (segment A/B) embeddings.
      dropout_rate: dropout on embeddings, attention output and MLP output.
      attention_dropout_rate: dropout on attention probabilities.
      layer_norm_eps: LayerNorm epsilon.
      norm: 'post' (BERT's post-LN) or 'pre' (pre-LN with a final LayerNorm).
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters are always float32.
      initializer_range: standard deviation of the normal weight initialiser.
      num_labels: classes of the classification head.
      remat: rematerialisation policy per layer: 'none', 'full' (save nothing),
        'dots' (save matmul results), 'minimal' (save only 'attn_out', 'mlp_out').
      position_offset: added to every position id before the position-embedding
        lookup: 0 for BERT; RoBERTa's tables start after its padding index
        (``pad_token_id + 1`` = 2), so the longest sequence is ``max_len - offset``.
      dropout_rng: where dropout's random bits come from: 'hash' (a counter hash
        seeded per call, cheap; ``models/dropout.py``) or 'threefry' (``nn.Dropout``).
      family: 'bert' (``model.family``; the decoder families have `DecoderConfig`).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_len: int
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    norm: str = "post"
    dtype: str = "float32"
    initializer_range: float = 0.02
    num_labels: int = 2
    remat: str = "none"
    position_offset: int = 0
    dropout_rng: str = "hash"
    family: str = "bert"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def objective(self) -> str:
        """'mlm': masked-token prediction."""
        return "mlm"

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `hidden_size // num_heads`."""
        return self.hidden_size // self.num_heads

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the position table covers: ``max_len - position_offset``."""
        return self.max_len - self.position_offset

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype named by `dtype`."""
        return DTYPES[self.dtype]

    def validate(self) -> None:
        """Raises `ValueError` naming the offending `model.<field>` and the fix."""
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}: pick a head count that divides it."
            )
        offset = self.position_offset
        if (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or not 0 <= offset < self.max_len
        ):
            raise ValueError(
                f"model.position_offset={offset!r}: must be an integer in [0, model.max_len)."
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name}={value!r}: must be in [0, 1).")
        for name in ("layer_norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be positive.")
        if self.family != "bert":
            raise ValueError(
                f"model.family={self.family!r}: a BertConfig is the 'bert' family; decoder "
                "families ('gpt2', 'llama') have their own config."
            )
        choices = {
            "norm": NORMS,
            "dtype": tuple(DTYPES),
            "remat": REMAT_POLICIES,
            "dropout_rng": DROPOUT_RNGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is unknown: use one of {allowed}."
                )

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> BertConfig:
        """Builds a config from an `ml_collections.ConfigDict` section (or a mapping).

        Every key must be a field of `BertConfig`; an unknown key is an error, as is a
        missing required one.
        """
        return from_section(cls, model_cfg, "a BertConfig field")


def from_section(cls: type, model_cfg: Mapping[str, Any], what: str) -> Any:
    """``cls(**section)`` for a model config dataclass: an unknown key ('is not
    ``what``') or a missing required one is a ValueError naming ``model.<key>``."""
    values = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"model.{unknown[0]} is not {what}: remove it or use one of {sorted(fields)}."
        )
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and name not in values
    ]
    if missing:
        raise ValueError(f"model.{missing[0]} is required: set it in the model config.")
    return cls(**values)
