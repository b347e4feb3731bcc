"""Model FLOPs of BERT encoders and causal decoders (GPT-2, Llama), counted from the
architecture (matmuls only, 2 per MAC).

Used to report what a step costs (e.g. the teachers' share, which Dynamic KD's data
selection cuts) and a step's MFU, independently of the machine. Elementwise work
(softmax, norms, GELU/SiLU, RoPE), biases and embedding lookups are left out, as in
the usual MFU accounting. Which count applies is the config's ``objective`` ('mlm'
or 'clm'), never its class (docs/methods.md#decoders).
"""

from __future__ import annotations

from collections.abc import Sequence

from dwt_jax.models.config import BertConfig
from dwt_jax.models.decoder_config import DecoderConfig

ModelConfig = BertConfig | DecoderConfig


def encoder_forward_flops(cfg: BertConfig, batch: int, seq_len: int) -> int:
    """Forward FLOPs of the encoder layers on ``batch`` sequences of ``seq_len`` tokens.

    Per layer and token: Q, K, V and output projections 4·D², the MLP 2·D·F; per layer
    and sequence the attention scores and the weighted sum, 2·L²·D.
    """
    d, f, length = cfg.hidden_size, cfg.mlp_dim, seq_len
    per_token = 4 * d * d + 2 * d * f
    per_layer = 2 * batch * length * per_token + 2 * 2 * batch * length * length * d
    return int(cfg.num_layers * per_layer)


def classifier_forward_flops(cfg: BertConfig, batch: int, seq_len: int) -> int:
    """Encoder, pooler and classifier forward FLOPs of a sequence classifier."""
    head = 2 * batch * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size * cfg.num_labels)
    return encoder_forward_flops(cfg, batch, seq_len) + head


def train_step_flops(cfg: BertConfig, batch: int, seq_len: int) -> int:
    """Forward + backward of a classifier: 3× the forward (backward ≈ 2× forward)."""
    return 3 * classifier_forward_flops(cfg, batch, seq_len)


def mlm_head_forward_flops(cfg: BertConfig, batch: int, max_predictions: int) -> int:
    """Forward FLOPs of the MLM head, which runs only at the masked positions.

    Per masked position: the transform 2·D², the tied decoder 2·D·V (no [B,L,V]
    product exists, see ``models/bert.py``).
    """
    d = cfg.hidden_size
    return int(2 * batch * max_predictions * (d * d + d * cfg.vocab_size))


def mlm_forward_flops(cfg: BertConfig, batch: int, seq_len: int, max_predictions: int) -> int:
    """Encoder and MLM head forward FLOPs of a ``BertMLM``."""
    return encoder_forward_flops(cfg, batch, seq_len) + mlm_head_forward_flops(
        cfg, batch, max_predictions
    )


# --- Causal decoders ---------------------------------------------------------------

# Matmuls of one MLP per token and hidden × mlp unit: GPT-2's c_fc and c_proj; Llama's
# SwiGLU gate_proj, up_proj and down_proj.
MLP_MATMULS = {"gpt2": 2, "llama": 3}


def decoder_layer_flops_per_token(cfg: DecoderConfig, seq_len: int) -> int:
    """Forward FLOPs of one decoder block per token of a ``seq_len``-token sequence.

    Projections: q 2·D·H·K, k and v 2·D·G·K each (grouped-query attention's fewer
    key/value heads), o 2·H·K·D. Attention: the scores q·kᵀ and the weighted sum of
    the values, 2·L·H·K each over all L keys, counted at half since a causal query
    sees on average half the sequence: 2·L·H·K together. MLP: 2·D·F per matmul.
    """
    d, h, g, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    projections = 2 * d * h * k + 2 * (2 * d * g * k) + 2 * h * k * d
    attention = 2 * seq_len * h * k  # = 2 · 2·L·H·K · ½ (causal).
    mlp = MLP_MATMULS[cfg.family] * 2 * d * cfg.mlp_dim
    return projections + attention + mlp


def lm_head_flops_per_token(cfg: DecoderConfig) -> int:
    """The LM head, run at every position (every token predicts the next): 2·D·V."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def causal_lm_flops_per_token(cfg: DecoderConfig, seq_len: int) -> int:
    """Forward FLOPs per token of a causal LM on ``seq_len``-token sequences: the
    blocks and the LM head (embeddings are lookups: free)."""
    layers = cfg.num_layers * decoder_layer_flops_per_token(cfg, seq_len)
    return layers + lm_head_flops_per_token(cfg)


def causal_lm_forward_flops(cfg: DecoderConfig, batch: int, seq_len: int) -> int:
    """Forward FLOPs of a causal LM on ``batch`` sequences of ``seq_len`` tokens."""
    return batch * seq_len * causal_lm_flops_per_token(cfg, seq_len)


# --- Either objective ---------------------------------------------------------------


def lm_forward_flops(
    cfg: ModelConfig, batch: int, seq_len: int, max_predictions: int | None = None
) -> int:
    """Pre-training forward FLOPs of ``cfg``'s model by its objective: an MLM encoder
    (its head at ``max_predictions`` masked positions per sequence) or a causal LM
    (its head at every position; ``max_predictions`` unused)."""
    if cfg.objective == "clm":
        return causal_lm_forward_flops(cfg, batch, seq_len)
    if max_predictions is None:
        raise ValueError(
            "max_predictions (data.max_predictions) is needed to count an MLM model's "
            "head, which runs at the masked positions only."
        )
    return mlm_forward_flops(cfg, batch, seq_len, max_predictions)


def pretrain_step_flops(
    student: ModelConfig,
    teachers: Sequence[ModelConfig],
    batch: int,
    seq_len: int,
    max_predictions: int | None = None,
) -> int:
    """One pre-training step: the student's forward + backward (3× its forward) and
    every teacher's forward (teachers take no gradient). Encoders (MLM) need
    ``max_predictions``; decoders (causal LM) do not."""
    student_flops = 3 * lm_forward_flops(student, batch, seq_len, max_predictions)
    return student_flops + sum(
        lm_forward_flops(t, batch, seq_len, max_predictions) for t in teachers
    )
