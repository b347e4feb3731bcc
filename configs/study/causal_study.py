"""The DWT study for decoders: the three factors of ``configs/study/dwt_study.py`` on
Llama-style causal LMs (``configs/causal.py``), each against the student alone.

``python -m dwt_jax.study --family=llama`` trains, in subdirectories of
``<workdir>/llama`` (each resumable, each repeated for every seed of ``study.seeds``):
the teachers of ``study.teachers`` (causal LM alone), the baseline (the student alone),
the student with DWT from every teacher, with every α_s variant, and grown from the
reference teacher (``teacher.remap``: function-preserving depth growth by identity
blocks, as ``configs/causal.py`` has it). The report is as for BERT, on held-out
next-token loss.

Launch (from the repository root)::

    python -m dwt_jax.study --family=llama --workdir=runs/study
    python -m dwt_jax.study --family=llama --workdir=/tmp/study_quick --quick

Variants: (none) the sizes below; ``quick``: configs/causal.py:smoke's tiny models and
6 steps, to exercise the machinery (its numbers mean nothing).
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The decoder study config, or its 'quick' variant."""
    if variant not in (None, "", "default", "quick"):
        raise ValueError(f"Unknown variant {variant!r} of configs/study/causal_study.py; 'quick'.")
    quick = variant == "quick"
    config = load_config_file(os.path.join(_HERE, "..", "causal.py"), "smoke" if quick else None)
    # The factors' settings are the BERT study's (α_s variants, reference choices, seeds).
    bert = load_config_file(os.path.join(_HERE, "dwt_study.py"), "quick" if quick else None)
    if quick:
        config.train.num_steps = 6
        config.train.eval_every = 2
        config.checkpoint.every_steps = 6
        config.log.tensorboard = False
    else:
        # The student: Llama 4 × 128 (4 heads, 2 KV heads), MLP 344; 128-token rows.
        config.model.update(hidden_size=128, num_layers=4, mlp_dim=344, max_len=128)
        config.data.seq_len = 128
        config.data.batch_size = 16  # 2,048 tokens per step.
        config.data.eval_batch_size = 16
        config.optim.warmup_steps = 40
        config.train.num_steps = 400
        config.train.eval_every = 25
        config.train.eval_batches = 8
        config.checkpoint.every_steps = 200
        config.log.every_steps = 10
    config.teacher.num_steps = config.train.num_steps
    config.study = ml_collections.ConfigDict()
    # The teachers, weakest first: overrides of the student's model fields.
    if quick:
        config.study.teachers = (
            {"num_layers": 1, "num_steps": 3},
            {"num_layers": 1, "num_steps": 4},
            {"num_layers": 1},
        )
    else:
        # Truly weaker than the student alone at its budget: shallower and, for two of
        # them, trained half as long (in the first study, 400-step 2- and 3-layer
        # teachers were as good as the 4-layer student alone: no weak teacher at all).
        config.study.teachers = (
            {"num_layers": 1, "num_steps": 200},
            {"num_layers": 2, "num_steps": 200},
            {"num_layers": 1},
        )
    for field in ("reference_teacher", "alpha_variants", "reference_alpha", "inits",
                  "early_fraction", "seeds", "factors", "multi_teachers",
                  "teacher_weightings"):  # fmt: skip
        config.study[field] = bert.study[field]
    config.study.downstream = ml_collections.ConfigDict({"enabled": False})  # Encoders only.
    # Growth of pre-norm decoders: identity blocks (exact) or stacked copies (approximate);
    # HyperCloning for width (exact), should the teachers be narrower.
    config.study.growth = (
        {"name": "exact", "depth": "identity", "width": "hypercloning"},
        {"name": "approx", "depth": "stack", "width": "hypercloning"},
    )
    return config
