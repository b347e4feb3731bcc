"""The interface of a pre-training objective (see ``dwt_jax.objectives``)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from dwt_jax import sharding
from dwt_jax.steps import forward


class Objective(abc.ABC):
    """What differs between masked-LM and causal-LM pre-training."""

    name: ClassVar[str]
    """The model configs' ``objective``: 'mlm' or 'clm'."""
    tokenizer_kind: ClassVar[str]
    """What is trained on the corpus when no tokenizer is given: 'wordpiece' or
    'byte_bpe' (``dwt_jax.data.tokenizer.get_tokenizer``)."""
    model_kind: ClassVar[str]
    """How messages name the model: 'an encoder (masked LM)' or 'a decoder (causal LM)'."""
    summary_columns: ClassVar[tuple[tuple[str, str, str], ...]]
    """(metric, column title, format) of the stage summary table."""
    eval_loss: ClassVar[str]
    """The held-out loss's metric name under the 'eval/' and 'teacher/' prefixes:
    what the self-ending schedules compare (docs/methods.md#self-ending-schedules)."""
    eval_accuracy: ClassVar[str]
    """The held-out accuracy's metric name under the 'eval/' prefix."""
    hf_teacher_fresh: ClassVar[tuple[str, ...]] = ()
    """Parameter subtrees a Hugging Face teacher checkpoint may lack (the teacher's
    forward never reads them)."""

    @abc.abstractmethod
    def check_data(self, config: ml_collections.ConfigDict, model_config: Any) -> None:
        """Range checks of the data fields only this objective reads."""

    @abc.abstractmethod
    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuses a tokenizer this objective cannot use (missing special tokens)."""

    @abc.abstractmethod
    def make_data(
        self,
        config: ml_collections.ConfigDict,
        tokenizer: Any,
        mesh: jax.sharding.Mesh,
        host: dict[str, int],
    ) -> tuple[Any, list]:
        """(the train iterator of host-local batches, the eval batches on the mesh)."""

    @abc.abstractmethod
    def batch_spec(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Shapes and dtypes of a global train batch."""

    @abc.abstractmethod
    def model_inputs(self, model: nn.Module, config: ml_collections.ConfigDict) -> dict:
        """Dummy inputs that trace the model's parameters by shape."""

    @abc.abstractmethod
    def eval_sums(
        self, outputs: dict[str, Any], batch: dict[str, jax.Array], tokenizer_data: Any
    ) -> dict[str, jax.Array]:
        """Sums over one eval batch's predicted positions (added up over the eval set)."""

    @abc.abstractmethod
    def eval_metrics(self, totals: dict[str, float], prefix: str) -> dict[str, float]:
        """The held-out metrics ``<prefix>/...`` from the summed totals."""

    @abc.abstractmethod
    def describe(self, metrics: dict[str, float]) -> str:
        """The progress line of an evaluation."""

    def eval_constants(self, tokenizer: Any) -> Any:
        """Arrays the eval sums need from the tokenizer (e.g. bytes per token)."""
        del tokenizer
        return None

    @abc.abstractmethod
    def embedding_params(self, params: Any) -> list[Any]:
        """The embedding (and LM-head) subtrees of the model's params, for counting
        non-embedding parameters."""

    def check_hf_init(self, checkpoint: Any, config: ml_collections.ConfigDict) -> None:
        """Refuses a Hugging Face checkpoint that cannot give the student's initial
        weights (``init.workdir``); by default every one of the right family can."""
        del checkpoint, config

    def hf_fresh(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """Parameter subtrees a Hugging Face checkpoint may lack when it gives the
        student's initial weights (they start from random values)."""
        del config
        return ()


def make_evaluator(
    objective: Objective,
    *,
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    params_shardings: Any,
    batch_shardings: Any,
    constants: Any,
    rules: sharding.Rules = sharding.LOGICAL_AXIS_RULES,
) -> Callable[[Any, Sequence[dict[str, jax.Array]], str], dict[str, float]]:
    """``evaluate(params, eval_batches, prefix)``: the objective's held-out metrics of
    one model, from one jitted step summed over the batches."""

    def sums(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        outputs = forward(model, params, batch, deterministic=True)
        return objective.eval_sums(outputs, batch, constants)

    jitted = jax.jit(
        sums,
        in_shardings=(params_shardings, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )

    def evaluate(params: Any, batches: Sequence[dict[str, jax.Array]], prefix: str):
        totals = None
        with sharding.activate(mesh), nn.logical_axis_rules(rules):
            for batch in batches:
                out = jitted(params, batch)
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        return objective.eval_metrics(jax.device_get(totals), prefix)

    return evaluate
