"""Training objectives ("strategies"), chosen by name in ``config.distill.strategy``.

Pre-training: ``mlm`` (masked LM alone), ``clm`` (causal LM alone), ``dwt`` (either,
with a teacher). Fine-tuning (classification):
``task``, ``cofinetune`` (teachers' joint fine-tuning), ``mt_bert``, ``rl_kd``,
``dynamic_kd``, ``ca_mkd`` and the baselines ``avg_teachers``, ``random_teacher``,
``fixed_weights``, ``best_teacher``.
"""

from __future__ import annotations

import ml_collections

from dwt_jax.distill.base import (
    MODES,
    CLMStrategy,
    MLMStrategy,
    StepContext,
    Strategy,
    StrategySetup,
    Teachers,
)
from dwt_jax.distill.dwt import DWTStrategy
from dwt_jax.distill.dynamic_kd import DynamicKD
from dwt_jax.distill.multi_teacher import (
    CAMKD,
    AverageTeachers,
    BestTeacher,
    FixedWeights,
    MTBert,
    RandomTeacher,
)
from dwt_jax.distill.rl_kd import RLKD
from dwt_jax.distill.task import CoFinetuneStrategy, TaskStrategy
from dwt_jax.errors import ConfigError

_ALL: tuple[type[Strategy], ...] = (
    MLMStrategy,
    CLMStrategy,
    DWTStrategy,
    TaskStrategy,
    CoFinetuneStrategy,
    MTBert,
    RLKD,
    DynamicKD,
    CAMKD,
    AverageTeachers,
    RandomTeacher,
    FixedWeights,
    BestTeacher,
)
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in _ALL}
PRETRAIN_STRATEGIES: dict[str, type[Strategy]] = {
    name: cls for name, cls in STRATEGIES.items() if cls.mode == "pretrain"
}
FINETUNE_STRATEGIES: dict[str, type[Strategy]] = {
    name: cls for name, cls in STRATEGIES.items() if cls.mode == "finetune"
}


def make_strategy(distill_config: ml_collections.ConfigDict) -> Strategy:
    """The strategy named by ``distill_config.strategy``, with every setting of its own
    checked (`ConfigError` naming the field)."""
    name = distill_config.strategy
    if name not in STRATEGIES:
        raise ConfigError(
            f"distill.strategy={name!r} is unknown; use one of {', '.join(sorted(STRATEGIES))}."
        )
    return STRATEGIES[name].from_config(distill_config)


__all__ = [
    "FINETUNE_STRATEGIES",
    "MODES",
    "PRETRAIN_STRATEGIES",
    "STRATEGIES",
    "CLMStrategy",
    "DWTStrategy",
    "MLMStrategy",
    "StepContext",
    "Strategy",
    "StrategySetup",
    "Teachers",
    "make_strategy",
]
