"""DWT for decoders on the embedded corpus: a small Llama-style teacher, then a larger
Llama-style student taught by it, then the same student alone.

The decoder counterpart of ``configs/base.py``. With no teacher configured
(``teacher.workdirs`` empty) it runs three stages, each resumable in its own directory:

1. ``<workdir>/teacher``  pre-train the weak teacher (``teacher.model``, smaller);
2. ``<workdir>/student``  pre-train the larger student with DWT from that teacher:
   ``α_h·CE + α_s(t)·τ(t)²·D(p_teacher^τ ‖ p_student^τ)`` over every predicted token;
3. ``<workdir>/baseline`` the same student trained alone with the same budget;

then prints held-out loss, perplexity and bits per byte of all three side by side.
The corpus is the English prose that ships with Python, tokenised with a byte-level
BPE vocabulary trained on it (deterministically: the same ids on every machine).

Launch (from the repository root)::

    python -m dwt_jax.main --config=configs/causal.py --workdir=runs/causal
    python -m dwt_jax.main --config=configs/causal.py:smoke --workdir=/tmp/causal_smoke
    # A Hugging Face decoder as the teacher (its tokenizer comes with it):
    python -m dwt_jax.main --config=configs/hf_causal_teacher.py \
        --config.teacher.workdirs="('hf:/path/to/qwen2-0.5b',)" --workdir=runs/hf_causal

Variants: (none) the default sizes below (about 10 minutes on a 2-core CPU);
``smoke``: tiny, seconds (used by the tests); ``gpt2``: the same pipeline with GPT-2
models.
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file
from dwt_jax.distill.schedules import schedule_section

_VARIANTS = ("default", "smoke", "gpt2")


def _decoder(variant: str, **sizes) -> ml_collections.ConfigDict:
    """A decoder model section (fields of dwt_jax.models.decoder_config.DecoderConfig)."""
    model = ml_collections.ConfigDict()
    model.family = "gpt2" if variant == "gpt2" else "llama"  # 'llama' | 'gpt2'.
    model.vocab_size = 4096  # Must be >= the tokenizer's vocabulary size.
    model.hidden_size = 256
    model.num_layers = 4
    model.num_heads = 4
    model.num_kv_heads = 0 if variant == "gpt2" else 2  # Grouped-query attention (0 = H).
    model.head_dim = 0  # 0 = hidden_size // num_heads.
    model.mlp_dim = 688
    model.max_len = 256  # Longest sequence (GPT-2: its position table).
    model.norm_eps = 1e-5
    model.rope_theta = 10000.0  # Llama family: RoPE base.
    model.tie_embeddings = True  # Llama family: False for a separate LM head.
    model.qkv_bias = False  # Qwen2-style q/k/v biases.
    model.qk_norm = False  # Qwen3-style per-head q/k RMSNorm.
    model.dropout_rate = 0.0
    model.dtype = "float32"  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).
    model.initializer_range = 0.02
    model.remat = "none"  # 'none' | 'full' | 'dots' | 'minimal'.
    model.update(sizes)
    return model


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The decoder DWT pipeline config, or one of its variants."""
    variant = variant or "default"
    if variant not in _VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/causal.py; known: {_VARIANTS}.")
    smoke = variant == "smoke"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    config = load_config_file(path, "smoke" if smoke else None)

    # The student (larger) and the weak teacher (trained first into <workdir>/teacher).
    if smoke:
        tiny = {"vocab_size": 512, "max_len": 64}
        config.model = _decoder(
            variant, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, **tiny
        )
        config.teacher.model = _decoder(
            variant, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32, **tiny
        )
    else:
        config.model = _decoder(variant)
        config.teacher.model = _decoder(variant, hidden_size=128, num_layers=2, mlp_dim=344)
    del config.init["fresh_mlm_head"]  # Decoders always have their LM head.

    # Byte-level BPE trained on the corpus (data.tokenizer_path: a tokenizer.json or a
    # Hugging Face model directory instead). No masking: every token predicts the next.
    config.data.vocab_size = config.model.vocab_size
    del config.data["max_predictions"]
    del config.data["mask_prob"]
    config.data.seq_len = 64 if smoke else 256
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.1
    config.optim.b2 = 0.95
    if not smoke:
        config.optim.warmup_steps = 50
        config.train.num_steps = 400
        config.train.eval_every = 100
        config.train.eval_batches = 8
        config.checkpoint.every_steps = 100
    config.teacher.num_steps = config.train.num_steps  # Teacher pre-training steps.
    # Several weak teachers the pipeline pre-trains first (teacher0, teacher1, ...), each a
    # model section like teacher.model; empty: teacher.model alone. Their soft labels are
    # mixed per token by distill.teacher_weighting.
    config.teacher.models = ()
    config.teacher.remap = ml_collections.ConfigDict()
    config.teacher.remap.depth = "identity"  # 'identity' | 'fna' | 'stack' | 'interleave'.
    config.teacher.remap.width = "hypercloning"  # Width growth of decoders (docs/methods.md).
    config.teacher.remap.noise_std = 0.0

    # The DWT objective for decoders: α_h·CE + α_s(t)·τ(t)²·D(p_teacher^τ ‖ p_student^τ).
    config.distill.strategy = "dwt"
    config.distill.form = "dwt"  # 'dwt' | 'ki': (1-α_t)·CE + α_t·τ²·D.
    config.distill.alpha_h = 1.0
    # The default ends the teacher's role once the student has caught up with it: α_s = 1
    # until the student's held-out loss is at or below the teacher's (margin 0) at two
    # evaluations in a row, then linearly to 0 over a tenth of the run, after which the
    # run trains without the teacher's forward pass (docs/methods.md#self-ending-schedules).
    config.distill.alpha_s = schedule_section("gap", 1.0, margin=0.0, patience=2)
    config.distill.alpha_s.steps = (config.train.get_ref("num_steps") + 9) // 10  # ⌈10%⌉.
    config.distill.tau = schedule_section("constant", 1.0)
    config.distill.divergence = "kl"  # 'kl' | 'reverse_kl' | 'jsd' (generalised JSD_β).
    config.distill.jsd_beta = 0.5  # β of 'jsd'.
    # Several teachers (teacher.workdirs: runs, hf:DIR or cache:DIR) are mixed per token:
    # 'uniform' | 'ca_mkd' (by each teacher's CE on the true token) | 'dynamic' (by the
    # student's uncertainty: confident tokens lean on larger teachers) | 'fixed'
    # (teacher_weights, one per teacher): docs/methods.md#several-teachers-in-pre-training.
    config.distill.teacher_weighting = "uniform"
    config.distill.teacher_weights = (0.5, 0.5)  # Read only by 'fixed'.
    config.distill.hidden_weight = 0.0
    config.distill.hidden_loss = "mse"
    config.distill.hidden_layer_map = "uniform"

    config.baseline = ml_collections.ConfigDict()
    config.baseline.enabled = True  # The student alone, into <workdir>/baseline.
    return config
