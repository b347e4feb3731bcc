"""DWT on the embedded corpus: a weak teacher, then a larger student taught by it.

The main job. With no teacher configured (``teacher.workdirs`` empty) it runs three
stages, each resumable in its own directory:

1. ``<workdir>/teacher``  pre-train the weak teacher (``teacher.model``, smaller);
2. ``<workdir>/student``  pre-train the larger student with DWT from that teacher;
3. ``<workdir>/baseline`` the same student trained alone with the same budget
   (``baseline.enabled``), so the effect of the teacher is measured, not assumed;

then prints held-out MLM loss and accuracy of all three side by side.

Launch (from the repository root)::

    python -m dwt_jax.main --config=configs/base.py --workdir=runs/base
    python -m dwt_jax.main --config=configs/base.py:smoke --workdir=/tmp/smoke
    # Your own teacher (the workdir of an earlier run of this stack):
    python -m dwt_jax.main --config=configs/base.py --workdir=runs/dwt \
        --config.teacher.workdirs="('runs/my_teacher',)"

Variants: (none) the default sizes below; ``smoke``: tiny, seconds (used by tests).
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file
from dwt_jax.distill.schedules import schedule_section


def _pretrain_config(variant: str | None) -> ml_collections.ConfigDict:
    """configs/pretrain.py's config."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    return load_config_file(path, variant)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The DWT pipeline config, or one of its variants."""
    if variant not in (None, "", "default", "smoke"):
        raise ValueError(f"Unknown variant {variant!r} of configs/base.py; known: 'smoke'.")
    smoke = variant == "smoke"
    config = _pretrain_config("smoke" if smoke else None)

    # The student: larger than the teacher. (Sizes for the 2-core CPU default.)
    if not smoke:
        config.model.update(hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512)
        config.train.num_steps = 500
        config.train.eval_every = 100
        config.checkpoint.every_steps = 100

    # The weak teacher, trained first into <workdir>/teacher unless teacher.workdirs is set.
    config.teacher.model = ml_collections.ConfigDict(config.model.to_dict())
    if smoke:
        config.teacher.model.update(num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64)
    else:
        config.teacher.model.update(num_layers=2, hidden_size=128, num_heads=4, mlp_dim=512)
    config.teacher.num_steps = config.train.num_steps  # Teacher pre-training steps.
    # Several weak teachers the pipeline pre-trains first (teacher0, teacher1, ...), each a
    # model section like teacher.model; empty: teacher.model alone. Their soft labels are
    # mixed per token by distill.teacher_weighting.
    config.teacher.models = ()
    # Student initialisation from the teacher's weights (teacher.student_init='remap').
    config.teacher.remap = ml_collections.ConfigDict()
    config.teacher.remap.depth = "fna"  # 'fna' | 'stack' | 'interleave' | 'identity'.
    config.teacher.remap.width = "fpi"  # 'fpi' | 'aki' | 'noise'.
    config.teacher.remap.noise_std = 0.0  # Noise for 'noise' width (and new rows).

    # The DWT objective: α_h·MLM + α_s(t)·τ(t)²·KL(p_teacher^τ ‖ p_student^τ).
    config.distill.strategy = "dwt"
    config.distill.form = "dwt"  # 'dwt' (above) | 'ki': (1-α_t)·MLM + α_t·τ²·KL.
    config.distill.alpha_h = 1.0  # Weight of the hard (MLM) loss in the 'dwt' form.
    # α_s schedule (docs/methods.md#dwt-schedules): name 'constant' | 'linear' | 'ki' |
    # 'cosine' | 'cutoff' | 'strong_to_normal', or one that ends the teacher's role:
    # 'wsd' | 'phase' | 'gap'; value at step 0, end_value, steps (the step it gets
    # there, or the final decay's length), warmup and start ('wsd', 'phase'), margin
    # and patience ('gap'); fields a schedule does not read stay unset (None).
    # The default ends the teacher's role once the student has caught up with it: α_s = 1
    # until the student's held-out loss is at or below the teacher's (margin 0) at two
    # evaluations in a row, then linearly to 0 over a tenth of the run, after which the
    # run trains without the teacher's forward pass (docs/methods.md#self-ending-schedules).
    config.distill.alpha_s = schedule_section("gap", 1.0, margin=0.0, patience=2)
    config.distill.alpha_s.steps = (config.train.get_ref("num_steps") + 9) // 10  # ⌈10%⌉.
    config.distill.tau = schedule_section("constant", 1.0)  # Temperature, same fields.
    # D of the soft term: 'kl' (above); decoders also take 'reverse_kl' and 'jsd'
    # (generalised JSD with β = jsd_beta): docs/methods.md#decoders.
    config.distill.divergence = "kl"
    config.distill.jsd_beta = 0.5
    # The training loss's LM head runs in blocks of this many rows (positions, across the
    # batch's shards) against the whole vocabulary, its gradients taken in the forward
    # pass; 0 = vocabulary slices of vocab_chunk_size with a recomputing backward pass
    # (docs/methods.md#fused-head).
    config.distill.head_block_rows = 256
    # Optional hidden-state term (0 = off): hidden_weight · loss(P·h_student, h_teacher),
    # P a learned student-side projection per matched layer pair.
    # Several teachers (teacher.workdirs: runs, hf:DIR or cache:DIR) are mixed per token:
    # 'uniform' | 'ca_mkd' (by each teacher's CE on the true token) | 'dynamic' (by the
    # student's uncertainty: confident tokens lean on larger teachers) | 'fixed'
    # (teacher_weights, one per teacher): docs/methods.md#several-teachers-in-pre-training.
    config.distill.teacher_weighting = "uniform"
    config.distill.teacher_weights = (0.5, 0.5)  # Read only by 'fixed'.
    config.distill.hidden_weight = 0.0
    config.distill.hidden_loss = "mse"  # 'mse' | 'pkd' | 'cosine'.
    config.distill.hidden_layer_map = "uniform"  # 'uniform' (i ↔ ⌈i·L_t/L_s⌉) | 'last'.

    # The student trained alone with the same budget, into <workdir>/baseline.
    config.baseline = ml_collections.ConfigDict()
    config.baseline.enabled = True
    return config
