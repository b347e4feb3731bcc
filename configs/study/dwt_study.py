"""The DWT paper's three factors at small scale, each against the student trained alone.

``python -m dwt_jax.study`` trains, in subdirectories of ``--workdir`` (each resumable):

* the teachers of ``study.teachers``, pre-trained with MLM alone;
* the baseline: the student alone (MLM), with the student's budget;
* teacher quality: the student with DWT (the reference α_s variant) from every teacher;
* soft-loss weight: the student from the reference teacher with every ``study.alpha_variants``
  (the schedules that end the teacher's role included);
* remapping: the student from the reference teacher, initialised as ``study.inits`` says.

Identical runs are trained once (the reference teacher + reference α_s + 'scratch' run
belongs to all three factors). The report is ``study.md``, ``study.json`` and PNG plots.

Launch (from the repository root)::

    python -m dwt_jax.study --workdir=runs/study
    python -m dwt_jax.study --workdir=/tmp/study_quick --quick
    python -m dwt_jax.study --workdir=runs/study --config=configs/study/dwt_study.py \
        --config.train.num_steps=800
    # Reuse compilations between the runs (identical steps compile once):
    JAX_COMPILATION_CACHE_DIR=~/.cache/dwt_jax/jax python -m dwt_jax.study --workdir=... --quick

Variants: (none) the sizes below, about 14 minutes on 2 CPU cores; ``quick``: tiny models
and 6 steps, to exercise the machinery (used by the tests; its numbers mean nothing).
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file


def _base_config(variant: str | None) -> ml_collections.ConfigDict:
    """configs/base.py's DWT config."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "base.py")
    return load_config_file(path, variant)


def _alpha_variants() -> tuple[dict, ...]:
    """The soft-loss weight factor (docs/methods.md#dwt): Normal, Strong, 4→1 decay and KI decay."""
    # Each: a run-name suffix; distill.form; the distill.alpha_s schedule's name, value and
    # end_value; run_fraction: the schedule's length as a fraction of train.num_steps.
    return (
        {"name": "normal", "form": "dwt", "schedule": "constant", "value": 1.0},
        {"name": "strong", "form": "dwt", "schedule": "constant", "value": 4.0},
        {
            "name": "strong_to_normal",
            "form": "dwt",
            "schedule": "strong_to_normal",
            "value": 4.0,
            "end_value": 1.0,
            "run_fraction": 1.0,
        },
        {"name": "ki", "form": "ki", "schedule": "ki", "value": 1.0, "run_fraction": 0.5},
        # The schedules that end the teacher's role (docs/methods.md#self-ending-schedules):
        # the Pre-training Distillation study's warmup–stable–decay weight, SALT's early
        # phase (the first half), and the adaptive gap (the configs' default).
        {
            "name": "wsd",
            "schedule": "wsd",
            "value": 1.0,
            "end_value": 0.0,
            "warmup_fraction": 0.1,
            "start_fraction": 0.7,
            "run_fraction": 0.3,
        },
        {
            "name": "phase",
            "schedule": "phase",
            "value": 1.0,
            "start_fraction": 0.5,
            "run_fraction": 0.1,
        },
        {
            "name": "gap",
            "schedule": "gap",
            "value": 1.0,
            "margin": 0.0,
            "patience": 2,
            "run_fraction": 0.1,
        },
    )


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The study config, or its 'quick' variant."""
    if variant not in (None, "", "default", "quick"):
        raise ValueError(f"Unknown variant {variant!r} of configs/study/dwt_study.py; 'quick'.")
    quick = variant == "quick"
    config = _base_config("smoke" if quick else None)

    if quick:  # configs/pretrain.py:smoke's student: 2 layers × 32, vocabulary 1024.
        config.train.num_steps = 6
        config.train.eval_every = 2  # Evaluations at steps 2, 4, 6.
        config.checkpoint.every_steps = 6  # Only the final checkpoint.
        config.log.tensorboard = False  # Eleven runs' event files are not needed here.
    else:
        # The student: 4 layers × 128 (2 heads of 64), MLP 512; positions for 64 tokens.
        config.model.update(hidden_size=128, num_layers=4, num_heads=2, mlp_dim=512, max_len=64)
        config.data.seq_len = 64  # Packed sequence length.
        config.data.max_predictions = 10  # ≈ 15% of 64 tokens.
        config.data.batch_size = 32  # 2,048 tokens per step.
        config.data.eval_batch_size = 32
        config.optim.warmup_steps = 40  # 10% of the run.
        # The budget of every run (teachers' too unless overridden). At 300 steps every
        # model still sat near the unigram plateau (held-out loss ≈ 6.0); 400 gets past it.
        config.train.num_steps = 400
        config.train.eval_every = 25  # Held-out evaluation points on the curves.
        config.train.eval_batches = 8  # The same 8 held-out batches in every run.
        config.checkpoint.every_steps = 200
        config.log.every_steps = 10  # Train metrics (and α_s, τ) every 10 steps.
    # Remapping (student_init='remap') grows the student from the teacher: FNA depth
    # (copy the teacher's layers, repeat its last one) and FPI width, as in the DWT paper.
    config.teacher.remap.depth = "fna"
    config.teacher.remap.width = "fpi"

    config.study = ml_collections.ConfigDict()
    # The teachers, weakest first: overrides of the student's model fields (num_layers,
    # hidden_size, num_heads, mlp_dim, ...) and optionally num_steps (default: the
    # student's train.num_steps). Each is named after its shape, e.g. 'L2H128'.
    if quick:
        # One shape, three training lengths: their DWT students share one compiled step.
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
    config.study.reference_teacher = 1  # Index of the teacher of the α_s and remap factors.
    config.study.alpha_variants = _alpha_variants()
    config.study.reference_alpha = "normal"  # The variant of the teacher and remap factors.
    config.study.inits = ("scratch", "remap")  # The remapping factor's student_init values.
    # Every run is repeated with each seed (config.seed of the run): the table gives the
    # mean and spread, the plots a band. --seeds=N on the command line overrides.
    config.study.seeds = (0,) if quick else (0, 1, 2)
    # The growth factor, compute-matched (docs/methods.md#the-study): the student grown
    # from the reference teacher by each method, alone and with DWT, with the teacher's
    # training FLOPs taken out of its steps. BERT's post-LN blocks allow no exact depth
    # growth (a new block re-normalises its input; 'identity' needs model.norm='pre'), so
    # both are approximate: FNA (the DWT paper's) and stacking (G_stack's).
    config.study.growth = (
        {"name": "fna", "depth": "fna", "width": "fpi"},
        {"name": "stack", "depth": "stack", "width": "fpi"},
    )
    # Several teachers at once (indices into study.teachers), mixed per token by each rule.
    config.study.multi_teachers = (0, 1)
    config.study.teacher_weightings = ("uniform", "ca_mkd", "dynamic")
    # The factors to run (--factors overrides): teacher_quality, alpha, remap, growth,
    # multi_teacher.
    config.study.factors = ("teacher_quality", "alpha", "remap", "growth", "multi_teacher")
    # The "early" point of the curves in the report: the first evaluation at or after
    # this fraction of a run (the paper: Strong converges faster early).
    config.study.early_fraction = 0.25
    # The DWT paper's own measure: every student (and the baseline) fine-tuned alone on
    # the embedded classification task; its accuracy is a column of the table.
    config.study.downstream = ml_collections.ConfigDict()
    config.study.downstream.enabled = True
    config.study.downstream.task = "source"
    config.study.downstream.steps = 2 if quick else 300
    config.study.downstream.variant = "smoke" if quick else ""
    # Only these rows' runs (their first-seed names); empty: every one.
    config.study.downstream.only = ("baseline", "dwt_L1H32S4_normal_scratch") if quick else ()
    return config
