"""Model FLOPs of BERT encoders, counted from the architecture (matmuls only, 2 per MAC).

Used to report what a step costs (e.g. the teachers' share, which Dynamic KD's data
selection cuts) independently of the machine. Elementwise work (softmax, LayerNorm,
GELU) and embedding lookups are left out, as in the usual MFU accounting.
"""

from __future__ import annotations

from collections.abc import Sequence

from dwt_jax.models.config import BertConfig


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


def pretrain_step_flops(
    student: BertConfig,
    teachers: Sequence[BertConfig],
    batch: int,
    seq_len: int,
    max_predictions: int,
) -> int:
    """One pre-training step: the student's forward + backward (3× its forward) and
    every teacher's forward (teachers take no gradient)."""
    student_flops = 3 * mlm_forward_flops(student, batch, seq_len, max_predictions)
    return student_flops + sum(
        mlm_forward_flops(t, batch, seq_len, max_predictions) for t in teachers
    )
