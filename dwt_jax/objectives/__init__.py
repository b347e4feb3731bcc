"""Pre-training objectives: what a run's model predicts, and the data, evaluation and
checks that go with it. ``mlm`` (masked LM, BERT-style encoders) and ``clm`` (causal
LM, decoders). The pre-training run kind asks the objective of its student's model
family (``objective_for``); a new objective is a new module and a row here.
"""

from __future__ import annotations

from dwt_jax.objectives.base import Objective
from dwt_jax.objectives.clm import CLM
from dwt_jax.objectives.mlm import MLM

OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (MLM, CLM)}


def objective_for(model_config) -> Objective:
    """The objective of a model config (``config.objective``: 'mlm' or 'clm')."""
    return OBJECTIVES[model_config.objective]


__all__ = ["CLM", "MLM", "OBJECTIVES", "Objective", "objective_for"]
