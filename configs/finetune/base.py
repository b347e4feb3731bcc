"""Fine-tuning with several teachers on a classification task (embedded, offline).

The default task, 'source', asks which of eight parts of the Python documentation a
sentence comes from (the language reference or one of seven stdlib packages; 4,481
train / 833 validation sentences). The sentence-pair task 'follows' (does sentence B
directly follow sentence A in one document? MRPC/RTE-shaped) is the other embedded
task: ``--config.data.task=follows --config.data.seq_len=128``; at the sizes of this
default, models barely learn it (see BUILD_NOTES.md). With no runs given, the job
pre-trains every encoder briefly on the embedded corpus, co-finetunes two teachers of
different sizes with one shared pooler and classifier (MT-BERT), fine-tunes the
student with ``distill.strategy``, and the same student alone for comparison.

Launch (from the repository root)::

    python -m dwt_jax.main --config=configs/finetune/base.py --workdir=runs/finetune
    python -m dwt_jax.main --config=configs/finetune/base.py:smoke --workdir=/tmp/ft
    # Another strategy, or a GLUE task prepared with TFDS (array_record):
    python -m dwt_jax.main --config=configs/finetune/base.py --workdir=runs/ft_dkd \
        --config.distill.strategy=dynamic_kd --config.distill.dynamic_kd.selection=entropy \
        --config.distill.dynamic_kd.ratio=0.1
    python -m dwt_jax.main --config=configs/finetune/base.py --workdir=runs/mrpc \
        --config.data.source=tfds --config.data.task=glue/mrpc
    # Every strategy side by side (a table in <workdir>/comparison.md):
    python -m dwt_jax.finetune.compare --config=configs/finetune/base.py --workdir=runs/compare

Variants: (none) the default sizes below; ``smoke``: tiny, seconds (used by tests).
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file

# Every fine-tuning strategy a student can use, as the comparison runner trains them.
COMPARED = (
    "task",
    "avg_teachers",
    "random_teacher",
    "fixed_weights",
    "best_teacher",
    "ca_mkd",
    "mt_bert",
    "rl_kd",
    "dynamic_kd",
    "dynamic_kd_kl",
    "dynamic_kd_selection",
    "dynamic_kd_adaptive",
)


def _pretrain_config(variant: str | None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain.py")
    return load_config_file(path, variant)


def _model(base: ml_collections.ConfigDict, **sizes: int) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(base.to_dict())
    model.update(sizes)
    return model


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The fine-tuning pipeline config, or one of its variants."""
    if variant not in (None, "", "default", "smoke"):
        raise ValueError(
            f"Unknown variant {variant!r} of configs/finetune/base.py; known: 'smoke'."
        )
    smoke = variant == "smoke"
    pretrain = _pretrain_config("smoke" if smoke else None)

    config = ml_collections.ConfigDict()
    config.mode = "finetune"
    config.seed = 0

    # The student (num_labels is set from the task).
    if smoke:
        config.model = _model(pretrain.model, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    else:
        config.model = _model(
            pretrain.model, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=512
        )
    config.model.max_len = 128

    # The student's encoder: a pre-training run's --workdir, or '' to pre-train one here
    # (pretrain.train.num_steps > 0) or start from random weights (= 0).
    config.init = ml_collections.ConfigDict({"workdir": ""})

    # Pre-training of every encoder with no run given (configs/pretrain.py, model replaced).
    config.pretrain = pretrain
    config.pretrain.train.num_steps = 10 if smoke else 300
    config.pretrain.train.eval_every = config.pretrain.train.num_steps
    config.pretrain.checkpoint.every_steps = config.pretrain.train.num_steps

    # Teachers: fine-tuned runs of this stack on the same task (teacher.workdirs), or the
    # architectures below, co-finetuned here with one shared pooler and classifier.
    config.teacher = ml_collections.ConfigDict()
    config.teacher.workdirs = ()
    if smoke:
        config.teacher.models = (
            _model(config.model, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32),
            _model(config.model, hidden_size=48, num_layers=2, num_heads=2, mlp_dim=96),
        )
    else:
        config.teacher.models = (
            _model(config.model, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256),
            _model(config.model, hidden_size=192, num_layers=4, num_heads=4, mlp_dim=768),
        )
    config.teacher.init_workdirs = ("", "")  # Pre-training runs per model ('' = here).
    # Layout of the teachers on the mesh when a student learns from them: 'student'
    # (the student's rules), 'no_fsdp' (tensor-parallel only) or 'replicated'.
    config.teacher.sharding = "student"
    config.teacher.num_steps = 10 if smoke else 600  # Co-finetuning steps.

    # The student's objective and every strategy's settings (docs/methods.md#mt-bert to #ca-mkd).
    config.distill = ml_collections.ConfigDict()
    config.distill.strategy = "mt_bert"
    config.distill.mt_bert = ml_collections.ConfigDict(
        {"kd": "ce", "tau": 1.0, "kd_weight": 1.0, "hidden_weight": 1.0}
    )
    config.distill.rl_kd = ml_collections.ConfigDict(
        {
            "alpha": 0.5,
            "kd": "kl",
            "tau": 1.0,
            "reward": "batch_ce",  # 'batch_ce' | 'instance_ce' | 'instance_ce_teacher'.
            "baseline_decay": 0.9,
            "policy_learning_rate": 1e-2,
            "warmup_steps": 0,  # Steps with averaged teachers before the policy learns.
        }
    )
    config.distill.dynamic_kd = ml_collections.ConfigDict(
        {
            "adoption": "soft_instance",  # 'none' | 'hard' | 'soft' | 'soft_instance'.
            # 'none' | 'entropy' | 'margin' | 'least_confidence' | 'kl_to_label' | 'random'.
            "selection": "none",
            "ratio": 1.0,  # Fraction of each batch distilled when selecting.
            "objective": "prediction",  # 'prediction' | 'adaptive' (KD ↔ representations).
            "kd": "mse",  # 'mse' on logits (the paper's code) | 'kl' (τ²·KL).
            "tau": 5.0,
            "kd_weight": 1.0,
        }
    )
    config.distill.ca_mkd = ml_collections.ConfigDict({"kd": "kl", "tau": 4.0, "kd_weight": 1.0})
    for name in ("avg_teachers", "random_teacher", "best_teacher"):
        config.distill[name] = ml_collections.ConfigDict({"kd": "kl", "tau": 1.0, "kd_weight": 1.0})
    config.distill.fixed_weights = ml_collections.ConfigDict(
        {"kd": "kl", "tau": 1.0, "kd_weight": 1.0, "weights": (0.3, 0.7)}
    )

    config.data = ml_collections.ConfigDict()
    config.data.source = "embedded"  # 'embedded' | 'tfds' (GLUE prepared with TFDS).
    # 'source' | 'follows' (embedded) | 'glue/<task>' (source='tfds').
    config.data.task = "source"
    config.data.tfds_data_dir = pretrain.data.tfds_data_dir
    config.data.tokenizer_path = ""  # '' = the pre-trained encoders' tokenizer.
    config.data.tokenizer_cache_dir = pretrain.data.tokenizer_cache_dir
    config.data.vocab_size = pretrain.data.vocab_size
    config.data.seq_len = 64  # [CLS] A [SEP] (B [SEP]), truncated longest first.
    config.data.batch_size = 32 if not smoke else 8
    config.data.eval_batch_size = 64 if not smoke else 16
    config.data.train_split = "train"
    config.data.eval_split = ""  # '' = the task's (e.g. validation_matched for MNLI).
    config.data.worker_count = 0

    config.optim = ml_collections.ConfigDict(pretrain.optim.to_dict())
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 40 if not smoke else 2

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 400 if not smoke else 10
    config.train.eval_every = 100 if not smoke else 10
    config.train.eval_examples = 0 if not smoke else 64  # 0 = the whole eval split.
    config.train.eval_at_start = True  # Also evaluate the untrained model (step 0).
    # A step whose loss or gradients are NaN/Inf is skipped (counted in
    # train/nonfinite_skipped); this many in a row end the run (0 = never).
    config.train.max_nonfinite_streak = 10

    config.mesh = ml_collections.ConfigDict(pretrain.mesh.to_dict())
    config.checkpoint = ml_collections.ConfigDict(pretrain.checkpoint.to_dict())
    config.checkpoint.every_steps = config.train.eval_every
    config.log = ml_collections.ConfigDict(pretrain.log.to_dict())
    config.log.every_steps = 10 if not smoke else 2

    config.baseline = ml_collections.ConfigDict({"enabled": True})
    # The comparison runner (python -m dwt_jax.finetune.compare): strategies and named
    # variants ('dynamic_kd_selection' distils only the most uncertain 10% of a batch).
    config.compare = ml_collections.ConfigDict()
    config.compare.strategies = COMPARED
    # Dynamic KD with the KL of the other strategies (its default MSE on logits is the
    # paper's code's choice), then with data selection, then with objective adaptation.
    kl = {"kd": "kl", "tau": 1.0}
    config.compare.variants = ml_collections.ConfigDict(
        {
            "dynamic_kd_kl": {"strategy": "dynamic_kd", "dynamic_kd": kl},
            "dynamic_kd_selection": {
                "strategy": "dynamic_kd",
                # The uniform teacher average (as avg_teachers) on the 10% most uncertain.
                "dynamic_kd": {**kl, "adoption": "none", "selection": "entropy", "ratio": 0.1},
            },
            "dynamic_kd_adaptive": {
                "strategy": "dynamic_kd",
                "dynamic_kd": {**kl, "objective": "adaptive"},
            },
        }
    )
    return config
