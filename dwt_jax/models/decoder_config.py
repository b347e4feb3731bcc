"""`DecoderConfig`: the architecture of a causal decoder LM (GPT-2 or Llama family).

One dataclass serves both families (``family``): the fields a family does not use
keep their defaults and are refused when set to something the family cannot honour
(a GPT-2 with RoPE, a Llama with learned positions). Qwen2 is a Llama with
``qkv_bias``, Qwen3 one with ``qk_norm``, Mistral one with ``sliding_window`` (only
windows at least as long as the trained sequences are accepted: docs/methods.md#decoders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dwt_jax.models.config import DROPOUT_RNGS, DTYPES, REMAT_POLICIES, from_section

DECODER_FAMILIES = ("gpt2", "llama")
ROPE_SCALINGS = ("none", "llama3")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "max_len")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only causal LM.

    Attributes:
      family: 'gpt2' (learned positions, LayerNorm, GELU-tanh MLP, fused QKV with
        biases, tied head) or 'llama' (RoPE, RMSNorm, SwiGLU, grouped-query attention).
      vocab_size: tokens in the vocabulary (V).
      hidden_size: model width (D).
      num_layers: transformer blocks.
      num_heads: query heads (H).
      mlp_dim: width of the feed-forward layer (F).
      max_len: the longest sequence (GPT-2's position table; Llama's context).
      num_kv_heads: key/value heads (grouped-query attention); 0 means ``num_heads``.
        Must divide ``num_heads``. GPT-2 has no GQA: 0 or ``num_heads``.
      head_dim: width of one head; 0 means ``hidden_size // num_heads`` (Qwen3 sets
        its own).
      norm_eps: epsilon of every LayerNorm / RMSNorm.
      rope_theta: RoPE base (Llama family).
      rope_scaling: 'none' or 'llama3' (Llama 3.1's frequency-dependent scaling).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor,
      rope_original_max_len: the 'llama3' scaling's parameters.
      tie_embeddings: the LM head is the word-embedding table (GPT-2 always).
      qkv_bias: biases on the q/k/v projections (GPT-2 always; Qwen2).
      qk_norm: RMSNorm of every query and key head before RoPE (Qwen3).
      sliding_window: Mistral's attention window; 0 for none. A window shorter than
        the trained sequences is refused (the model here attends to every earlier
        token of its document).
      dropout_rate: dropout on embeddings and on each block's residual branches.
      dtype: compute dtype, 'float32' or 'bfloat16'; parameters are always float32.
      initializer_range: standard deviation of the normal weight initialiser.
      remat: rematerialisation policy per block ('none', 'full', 'dots', 'minimal').
      dropout_rng: 'hash' or 'threefry' (see ``models/dropout.py``).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_len: int
    num_kv_heads: int = 0
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0
    dropout_rate: float = 0.0
    dtype: str = "float32"
    initializer_range: float = 0.02
    remat: str = "none"
    dropout_rng: str = "hash"

    def __post_init__(self) -> None:
        # 0 means "the usual value": resolved once, so every reader sees the number.
        if isinstance(self.num_kv_heads, int) and self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if (
            isinstance(self.head_dim, int)
            and self.head_dim == 0
            and isinstance(self.num_heads, int)
            and self.num_heads > 0
        ):
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self.validate()

    # Attributes every model config offers (the BERT config has them too).
    @property
    def objective(self) -> str:
        """'clm': next-token prediction."""
        return "clm"

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model takes."""
        return self.max_len

    @property
    def position_offset(self) -> int:
        return 0

    @property
    def layer_norm_eps(self) -> float:
        """``norm_eps`` (the name the shared LayerNorm block reads)."""
        return self.norm_eps

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype named by `dtype`."""
        return DTYPES[self.dtype]

    @property
    def tied(self) -> bool:
        """Whether the LM head is the embedding table."""
        return self.family == "gpt2" or self.tie_embeddings

    def validate(self) -> None:
        """Raises `ValueError` naming the offending `model.<field>` and the fix."""
        if self.family not in DECODER_FAMILIES:
            raise ValueError(
                f"model.family={self.family!r} is not a decoder family: use one of "
                f"{DECODER_FAMILIES}."
            )
        for name in (*_POSITIVE_INTS, "num_kv_heads", "head_dim", "rope_original_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide "
                f"model.num_heads={self.num_heads}: each key/value head serves a whole "
                "group of query heads; pick a divisor of num_heads."
            )
        if self.head_dim % 2 and self.family == "llama":
            raise ValueError(
                f"model.head_dim={self.head_dim}: RoPE rotates pairs of dimensions; use an "
                "even head width."
            )
        if self.family == "gpt2":
            self._validate_gpt2()
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ValueError(
                f"model.sliding_window={self.sliding_window!r}: must be an integer >= 0 "
                "(0: no window)."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model.dropout_rate={self.dropout_rate!r}: must be in [0, 1).")
        for name in ("norm_eps", "initializer_range", "rope_theta", "rope_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be positive.")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor!r} must exceed "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor!r}."
            )
        choices = {
            "dtype": tuple(DTYPES),
            "remat": REMAT_POLICIES,
            "dropout_rng": DROPOUT_RNGS,
            "rope_scaling": ROPE_SCALINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is unknown: use one of {allowed}."
                )
        for name in ("tie_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r}: must be True or False.")

    def _validate_gpt2(self) -> None:
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads}: GPT-2 has no grouped-query "
                "attention; leave num_kv_heads at 0 or use model.family='llama'."
            )
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"model.head_dim={self.head_dim}: GPT-2's heads split hidden_size="
                f"{self.hidden_size} evenly; leave head_dim at 0."
            )
        for name in ("qk_norm",):
            if getattr(self, name):
                raise ValueError(
                    f"model.{name}=True is a Llama-family option; GPT-2 does not have it."
                )
        if not self.tie_embeddings:
            raise ValueError(
                "model.tie_embeddings=False: GPT-2's LM head is always its word "
                "embeddings; use model.family='llama' for an untied head."
            )
        if self.rope_scaling != "none":
            raise ValueError("model.rope_scaling: GPT-2 has learned positions, not RoPE.")

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> DecoderConfig:
        """Builds a config from a model section; an unknown or missing key is an error."""
        family = dict(model_cfg).get("family")
        return from_section(cls, model_cfg, f"a field of a {family!r} decoder")
