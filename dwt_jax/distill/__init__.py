"""Training objectives ("strategies"), chosen by name in ``config.distill.strategy``.

Pre-training (masked LM): ``mlm``, ``dwt``. Fine-tuning (classification):
``task``, ``cofinetune`` (teachers' joint fine-tuning), ``mt_bert``, ``rl_kd``,
``dynamic_kd``, ``ca_mkd`` and the baselines ``avg_teachers``, ``random_teacher``,
``fixed_weights``, ``best_teacher``.
"""

from __future__ import annotations

import ml_collections

from dwt_jax.distill.base import MLMStrategy, Strategy, Teachers
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

PRETRAIN_STRATEGIES: dict[str, type[Strategy]] = {
    MLMStrategy.name: MLMStrategy,
    DWTStrategy.name: DWTStrategy,
}
FINETUNE_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
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
}
STRATEGIES: dict[str, type[Strategy]] = {**PRETRAIN_STRATEGIES, **FINETUNE_STRATEGIES}


def make_strategy(distill_config: ml_collections.ConfigDict) -> Strategy:
    """The strategy named by ``distill_config.strategy``."""
    name = distill_config.strategy
    if name not in STRATEGIES:
        raise ValueError(
            f"distill.strategy={name!r} is unknown; use one of {', '.join(sorted(STRATEGIES))}."
        )
    return STRATEGIES[name].from_config(distill_config)


__all__ = [
    "FINETUNE_STRATEGIES",
    "PRETRAIN_STRATEGIES",
    "STRATEGIES",
    "DWTStrategy",
    "MLMStrategy",
    "Strategy",
    "Teachers",
    "make_strategy",
]
