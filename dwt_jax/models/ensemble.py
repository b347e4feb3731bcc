"""Co-finetuned teachers: K encoders, one shared pooler and classifier (docs/methods.md#mt-bert).

MT-BERT fine-tunes its teachers *jointly*, with one pooler and classifier on top of
every teacher's encoder, so that their output spaces align:
``L = Σ_k CE(y, f_shared(pool(H_k)))``. The teachers here may differ in size;
**Decision:** a teacher narrower or wider than the widest one gets a learned linear
map of its [CLS] state to that width before the shared pooler (with equal widths
there is none, and this is exactly the paper's model).

Parameter tree: ``teacher_{k}/{embeddings,encoder}`` (a `BertEncoder` without its own
pooler; loads from any BERT of this stack), ``projection_{k}`` (a dense map, only where the
width differs), and the shared ``pooler/dense`` and ``classifier/dense``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwt_jax.models.bert import ENCODER_INPUT_NAMES, BertEncoder
from dwt_jax.models.config import BertConfig
from dwt_jax.models.dropout import Dropout
from dwt_jax.models.layers import SQUARE, DenseBlock, dense


def member_name(index: int) -> str:
    """The param subtree of teacher ``index``'s encoder."""
    return f"teacher_{index}"


class TeacherEnsemble(nn.Module):
    """K BERT encoders, each [CLS] → shared pooler → shared classifier.

    ``configs`` are the members' architectures (same vocabulary and tokens);
    ``num_labels`` the classes (1 for regression).
    """

    configs: tuple[BertConfig, ...]
    num_labels: int
    input_names: ClassVar[tuple[str, ...]] = ENCODER_INPUT_NAMES

    def step_outputs(self, params: Any, logits: jax.Array, out: dict[str, Any]) -> dict[str, Any]:
        """'logits' [K,B,C] and 'members'."""
        del params
        return {"logits": logits, **out}

    @property
    def shared_width(self) -> int:
        return max(c.hidden_size for c in self.configs)

    def head_config(self) -> BertConfig:
        """Initialiser range, dropout and dtype of the shared head: the widest member's."""
        widest = max(self.configs, key=lambda c: c.hidden_size)
        return dataclasses.replace(widest, num_labels=self.num_labels)

    @nn.compact
    def __call__(
        self,
        *,
        input_ids: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        token_type_ids: jax.Array,
        deterministic: bool,
        masked_positions: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Every member's class logits.

        Returns:
          ``(logits [K,B,C] float32, {'members': [out_k]})`` where ``out_k`` has
          teacher k's ``pooled`` [B,D_shared] (after the shared pooler) and the
          optional hidden states / attentions of its encoder.
        """
        del masked_positions
        if not self.configs:
            raise ValueError("TeacherEnsemble needs at least one member config.")
        head = self.head_config()
        width = self.shared_width
        pooler = DenseBlock(head, width, SQUARE, jnp.tanh, name="pooler")
        classifier = DenseBlock(head, self.num_labels, ("embed", "classes"), name="classifier")
        dropout = Dropout(head.dropout_rate, head.dropout_rng)
        logits, members = [], []
        for k, cfg in enumerate(self.configs):
            x_BxLxD, out = BertEncoder(cfg, add_pooler=False, name=member_name(k))(
                input_ids,
                segment_ids,
                positions,
                token_type_ids,
                deterministic,
                output_hidden_states,
                output_attentions,
            )
            cls_BxD = x_BxLxD[:, 0]
            if cfg.hidden_size != width:
                cls_BxD = dense(cfg, width, ("embed", "mlp"), f"projection_{k}")(cls_BxD)
            pooled_BxD = pooler(cls_BxD)
            logits.append(classifier(dropout(pooled_BxD, deterministic=deterministic)))
            members.append({**out, "pooled": pooled_BxD})
        return jnp.stack(logits).astype(jnp.float32), {"members": members}


def member_param_counts(params: Any, num_members: int) -> tuple[int, ...]:
    """Parameters of each member's encoder (its size, e.g. to order teachers)."""
    return tuple(
        sum(int(x.size) for x in jax.tree.leaves(params[member_name(k)]))
        for k in range(num_members)
    )
