"""Masked-language-model pre-training of one BERT-style encoder on the embedded corpus.

This is pre-training alone (no teacher); ``configs/pretrain.py`` builds the DWT pipeline
on top of it, and uses this file's runs as its weak teacher and its baseline.

The default runs on a laptop-class CPU in minutes, with no download: the corpus is
the English prose that ships with Python (``pydoc_data`` topics and the standard
library's docstrings), built once into a TFDS dataset, tokenised with a WordPiece
vocabulary trained on it.

Launch (from the repository root)::

    python -m dwt_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
    python -m dwt_jax.main --config=configs/pretrain.py:smoke --workdir=/tmp/smoke
    python -m dwt_jax.main --config=configs/pretrain.py --workdir=runs/pretrain \
        --config.train.num_steps=2000 --config.optim.learning_rate=5e-4

Variants (``configs/pretrain.py:<variant>``):
  (none)  4 layers, hidden 256, 4 heads, MLP 1024, sequences of 128 tokens.
  smoke   a tiny model and a few steps; runs in seconds (used by the tests).
"""

from __future__ import annotations

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Returns the base pre-training config, or one of its variants."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, dropout, data shuffling and masking.

    # The student: the model being trained. Field names match dwt_jax.models.BertConfig.
    config.model = ml_collections.ConfigDict()
    config.model.vocab_size = 8192  # Must be >= the tokenizer's vocabulary size.
    config.model.hidden_size = 256
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.mlp_dim = 1024
    config.model.max_len = 128  # Position embeddings; must be >= data.seq_len.
    config.model.type_vocab_size = 2  # BERT segment A/B embeddings.
    config.model.dropout_rate = 0.1
    config.model.attention_dropout_rate = 0.1
    config.model.layer_norm_eps = 1e-12
    config.model.norm = "post"  # 'post' (BERT) or 'pre' (pre-LN with a final LayerNorm).
    config.model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
    config.model.initializer_range = 0.02
    config.model.num_labels = 2  # Classifier head size (fine-tuning only).
    config.model.remat = "none"  # Rematerialisation: 'none' | 'full' | 'dots' | 'minimal'.
    config.model.position_offset = 0  # Added to position ids (RoBERTa: 2).
    # Dropout's random bits: 'hash' (counter hash, cheap) | 'threefry' (flax nn.Dropout).
    config.model.dropout_rng = "hash"

    # The student's starting weights: '' = random; a run's workdir, or 'hf:DIR' for a
    # Hugging Face BERT/RoBERTa directory, of the same architecture as `model`.
    config.init = ml_collections.ConfigDict()
    config.init.workdir = ""
    config.init.fresh_mlm_head = False  # Allow a checkpoint without an MLM head.

    # Teachers for distillation. Empty = pre-train the student alone.
    config.teacher = ml_collections.ConfigDict()
    # Workdirs of runs of this stack whose latest checkpoint is a teacher, or 'hf:DIR'
    # Hugging Face BERT/RoBERTa directories with an MLM head; each is frozen.
    config.teacher.workdirs = ()
    # A top-k teacher cache (python -m dwt_jax.cache_teacher) to learn from instead of
    # running a teacher: the same as listing 'cache:DIR' in teacher.workdirs.
    config.teacher.cache = ""
    # Student initialisation: 'scratch', or 'remap' (grown from the first teacher's weights).
    config.teacher.student_init = "scratch"
    # How teachers are laid out on the mesh: 'student' (the student's rules: FSDP +
    # tensor), 'no_fsdp' (tensor-parallel only, no per-step all-gather of the teacher's
    # weights) or 'replicated' (whole on every device; for small teachers).
    config.teacher.sharding = "student"

    # The top-k teacher cache python -m dwt_jax.cache_teacher writes for this config
    # (docs/methods.md#teacher-caches): per predicted position the teacher's top_k
    # log-probabilities at distill.tau, their ids and the mass outside them; top_p < 1
    # keeps only the fewest of the k that reach that mass. num_batches = 0 caches
    # train.num_steps batches.
    config.cache = ml_collections.ConfigDict()
    config.cache.top_k = 32
    config.cache.top_p = 1.0
    config.cache.dtype = "float16"  # Of the log-probabilities: 'float32' | 'float16' | 'bfloat16'.
    config.cache.batches_per_shard = 64
    config.cache.num_batches = 0

    # The training objective, by name: 'mlm' (masked-LM cross-entropy, no teacher) or
    # 'dwt' (see configs/base.py and dwt_jax/distill/dwt.py).
    config.distill = ml_collections.ConfigDict()
    config.distill.strategy = "mlm"
    # The MLM decoder and its losses fused, in vocabulary slices of this many entries
    # (0 = all at once): the [B, M, V] logits are never built (losses.fused_mlm_losses).
    # 2048 was fastest on the CPU benchmark (benchmarks/step.py); False = plain logits.
    config.distill.fused_mlm_head = True
    config.distill.vocab_chunk_size = 2048

    # Input pipeline (see dwt_jax/data/pipeline.py).
    config.data = ml_collections.ConfigDict()
    config.data.source = "embedded"  # 'embedded' | 'tfds' | 'text_files'.
    config.data.tfds_name = ""  # TFDS name for source='tfds', e.g. 'wikipedia/20230601.en'.
    config.data.tfds_data_dir = "~/.cache/dwt_jax/tensorflow_datasets"  # Embedded + TFDS data.
    config.data.text_field = "text"  # Feature holding the text in a TFDS dataset.
    config.data.text_files = ()  # Local UTF-8 files/globs for source='text_files'.
    config.data.eval_text_files = ()  # Held-out files; empty = a hashed 5% of text_files.
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.tokenizer_path = ""  # tokenizer.json / vocab.txt / HF dir; '' = train one.
    config.data.tokenizer_cache_dir = "~/.cache/dwt_jax/tokenizers"
    config.data.vocab_size = 8192  # WordPiece vocabulary size when training a tokenizer.
    config.data.seq_len = 128  # Packed sequence length.
    config.data.max_predictions = 20  # Masked positions per sequence (static shape).
    config.data.mask_prob = 0.15  # Fraction of real tokens selected for prediction.
    config.data.worker_count = 0  # Grain worker processes (0 = in the main process).
    config.data.batch_size = 32  # Global batch size (all hosts and devices together).
    config.data.eval_batch_size = 32  # Global eval batch size.

    # Optimiser: AdamW with linear warm-up then decay.
    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3  # Peak learning rate.
    config.optim.warmup_steps = 100
    config.optim.decay = "linear"  # 'linear' | 'cosine' | 'constant' after warm-up.
    config.optim.end_lr_factor = 0.0  # Final lr = learning_rate * end_lr_factor.
    config.optim.weight_decay = 0.01  # Not applied to biases, LayerNorm and embeddings.
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98
    config.optim.eps = 1e-6
    config.optim.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables it.
    config.optim.grad_accum_steps = 1  # Micro-batches per update (splits data.batch_size).

    # The loop.
    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 600  # Total optimiser updates; a rerun with more resumes.
    config.train.eval_every = 200  # Steps between held-out evaluations (and at the end).
    config.train.eval_batches = 8  # Held-out batches per evaluation (the same each time).
    # A step whose loss or gradients are NaN/Inf is skipped (counted in
    # train/nonfinite_skipped); this many in a row end the run (0 = never).
    config.train.max_nonfinite_streak = 10

    # Device mesh: product must equal the number of devices; one axis may be -1 (fill).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 200  # Also saved at the end and on SIGTERM/SIGINT.
    config.checkpoint.max_to_keep = 3
    config.checkpoint.async_save = True  # Write in the background while training goes on.

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 20  # Train metrics to metrics.jsonl / TensorBoard.
    config.log.tensorboard = True
    config.log.progress = True  # A progress bar with loss, tokens/s and ETA.

    if variant in (None, "", "default"):
        return config
    if variant == "smoke":
        return _smoke(config)
    raise ValueError(f"Unknown variant {variant!r} of configs/pretrain.py; known: 'smoke'.")


def _smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A tiny model and a few steps: the end-to-end path in seconds."""
    config.model.vocab_size = 1024
    config.model.hidden_size = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.max_len = 64
    config.data.vocab_size = 1024
    config.data.seq_len = 64
    config.data.max_predictions = 10
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.optim.warmup_steps = 2
    config.train.num_steps = 6
    config.train.eval_every = 3
    config.train.eval_batches = 2
    config.checkpoint.every_steps = 3
    config.log.every_steps = 1
    config.log.progress = False
    return config
