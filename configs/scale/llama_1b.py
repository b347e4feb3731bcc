"""DWT at 1B scale for decoders: a 0.25B Llama teacher, then a 1.1B Llama student, on C4.

The pipeline of ``configs/causal.py`` (teacher → student with DWT → student alone) at
real sizes. The student is TinyLlama-shaped with Llama 3's grouped-query ratio and
RoPE base: 22 layers × 2048, 32 query heads over 8 key/value heads (head width 64),
SwiGLU MLP 5632, an untied LM head, 32,000-token vocabulary, 2048 positions, RoPE θ =
500,000: 1.12B parameters (0.99B without the embedding table and the head). The weak
teacher is the same design at 0.25B: 16 layers × 1024, 16 heads over 4 key/value
heads, MLP 2816, untied. Both train on 2048-token packed documents, 512 sequences (1M
tokens) per step, 24k steps (25B tokens, about 20 per student parameter), AdamW 3e-4
with 2k warm-up steps and cosine decay to a tenth, in bfloat16 with every block
rematerialised. The DWT loss is ``α_h·CE + α_s·τ²·KL(p_teacher^τ ‖ p_student^τ)`` over
every predicted token (``distill.divergence``: 'kl' | 'reverse_kl' | 'jsd'). Every
stage takes the same budget: ``train.num_steps`` for the student and the baseline,
``teacher.num_steps`` for the teacher (a short trial sets both).
``--config.baseline.enabled=False`` skips the student-alone stage.

A teacher you already have replaces the teacher stage: a run of this stack or a
Hugging Face Llama directory with the same 32,000-token vocabulary, e.g.
``--config.teacher.workdirs="('hf:/path/to/llama-250m',)"`` (set the path; the same
on every host).

Data: TFDS ``c4/en`` prepared in array_record format (once, where TensorFlow and
Apache Beam are installed; C4 is large, see the TFDS catalogue)::

    tfds build c4/en --file_format=array_record \\
        --data_dir=gs://YOUR_BUCKET/tensorflow_datasets

The TPU variants read it from ``gs://YOUR_BUCKET/tensorflow_datasets``, the GPU
variant from ``~/tensorflow_datasets``; override with ``--config.data.tfds_data_dir``.
Evaluation reads C4's validation split (held-out loss, perplexity, bits per byte).

Tokenizer: ``data.tokenizer_path`` should point at a 32,000-token Llama-style
tokenizer directory (``hf:DIR`` or a path holding ``tokenizer.json``), the same path
on every host, saved where there is internet with ``AutoTokenizer.from_pretrained(...)
.save_pretrained('hf/llama-tokenizer')`` inside the checkout (``launch/tpu_pod.sh
install`` copies the checkout to every worker). Left empty (the default), process 0
trains a byte-level BPE of ``data.vocab_size`` (32,000) tokens on the train split
first and shares it with the other processes.

Plan before launching (memory and FLOPs per device, no devices needed)::

    python -m dwt_jax.plan --config=configs/scale/llama_1b.py:8xh100 --devices=8 \\
        --platform=gpu --device_memory_gib=80

Launch (from the repository root; see launch/README.md)::

  # TPU v4-32 (16 chips, 4 hosts):
  launch/tpu_pod.sh all --name dwt-llama --zone us-central2-b --accelerator v4-32 \\
      --config configs/scale/llama_1b.py:v4-32 --workdir gs://YOUR_BUCKET/dwt/llama_1b \\
      -- --config.data.tokenizer_path=hf/llama-tokenizer
  # TPU v5e-64 (64 chips, 16 hosts):
  launch/tpu_pod.sh all --name dwt-llama --zone us-west4-a --accelerator v5e-64 \\
      --config configs/scale/llama_1b.py:v5e-64 --workdir gs://YOUR_BUCKET/dwt/llama_1b \\
      -- --config.data.tokenizer_path=hf/llama-tokenizer
  # One host with 8 H100 (80 GB):
  launch/gpu_local.sh --config configs/scale/llama_1b.py:8xh100 --workdir runs/llama_1b \\
      -- --config.data.tokenizer_path=hf/llama-tokenizer
  # SLURM, N nodes of 8 H100 (one process per GPU; FSDP inside a node, data across):
  sbatch --nodes=4 launch/slurm.sbatch --config configs/scale/llama_1b.py:8xh100 \\
      --workdir /shared/runs/llama_1b -- --config.data.tokenizer_path=hf/llama-tokenizer

Variants (``configs/scale/llama_1b.py:<variant>``), one per kind of hardware; the
optimisation (global batch, learning rate, steps) is the same in all of them.
``tpu`` is another name for ``v4-32`` and ``gpu8`` for ``8xh100``:
  v4-32   16 TPU v4 chips (32 GiB each): FSDP over 8 chips × tensor parallelism over
          2 (within a host), 64 sequences per FSDP shard, 16 per micro-batch.
  v5e-64  64 TPU v5e chips (16 GiB each): FSDP over 16 chips × tensor parallelism
          over 4 (within a host), 32 sequences per FSDP shard, 8 per micro-batch.
  8xh100  8 H100 GPUs (80 GB each) per host: FSDP over a host's 8 GPUs (NVLink), data
          parallel across hosts; 64 sequences per GPU on one host, 16 per micro-batch.
"""

from __future__ import annotations

import os

import ml_collections

from dwt_jax.configuration import load_config_file

# What each variant runs on: the device count the mesh must cover (jax.device_count()
# of the whole run), the hosts (one JAX process each on TPU) and memory per device.
HARDWARE = {
    "v4-32": {"devices": 16, "hosts": 4, "memory_gib": 32},
    "v5e-64": {"devices": 64, "hosts": 16, "memory_gib": 16},
    "8xh100": {"devices": 8, "hosts": 1, "memory_gib": 80},
}
# Names the variants also answer to.
ALIASES = {"tpu": "v4-32", "gpu8": "8xh100"}

# The hardware-dependent fields of each variant (the plans quoted are
# `python -m dwt_jax.plan --platform=tpu|gpu`, the fused-activation profile, with
# XLA's attention, which materialises each layer's [B,H,L,L] scores).
_VARIANTS = {
    "v4-32": {
        # 1.1B params × 16 bytes (weights, AdamW moments, gradients) = 18 GB over 8
        # FSDP shards; the 2 tensor shards (a host has 4 chips) split heads and MLP.
        "mesh": {"data": -1, "fsdp": 8, "tensor": 2},
        # 64 sequences per shard, 16 per micro-batch: planned peak 11.8 GiB of 32.
        "grad_accum_steps": 4,
        "worker_count": 16,  # Grain processes per host (a v4 host has 240 vCPUs).
        "checkpoint_every": 1000,
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "v5e-64": {
        "mesh": {"data": -1, "fsdp": 16, "tensor": 4},  # 16 GiB per chip: split 64 ways.
        # 32 sequences per shard, 8 per micro-batch: planned peak 4.0 GiB of 16.
        "grad_accum_steps": 4,
        "worker_count": 16,  # 4 chips and 112 vCPUs per host.
        "checkpoint_every": 500,  # v5e slices are often spot capacity: save more often.
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "8xh100": {
        "mesh": {"data": -1, "fsdp": 8, "tensor": 1},  # FSDP within a node.
        # 64 sequences per GPU on one host, 16 per micro-batch: planned peak 20 GiB of 80.
        "grad_accum_steps": 4,
        # One process feeds all 8 GPUs (launch/gpu_local.sh): many tokenizing workers.
        # launch/slurm.sbatch runs one process per GPU and lowers it (DATA_WORKERS).
        "worker_count": 32,
        "checkpoint_every": 1000,
        "tfds_data_dir": "~/tensorflow_datasets",
    },
}

# The student: a Llama with grouped-query attention and an untied head (1.12B).
STUDENT = {
    "family": "llama",
    "vocab_size": 32000,  # A Llama-2-style tokenizer's; divisible by every mesh.tensor.
    "hidden_size": 2048,
    "num_layers": 22,
    "num_heads": 32,
    "num_kv_heads": 8,  # Grouped-query attention: 4 query heads per key/value head.
    "head_dim": 0,  # hidden_size / num_heads = 64.
    "mlp_dim": 5632,
    "max_len": 2048,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,  # Llama 3's base.
    "rope_scaling": "none",
    "tie_embeddings": False,
    "qkv_bias": False,
    "qk_norm": False,
    "sliding_window": 0,
    "dropout_rate": 0.0,  # Single-epoch pre-training: no dropout.
    "dtype": "bfloat16",  # Compute; parameters stay float32.
    "initializer_range": 0.02,
    "remat": "full",  # Keep each block's input only; recompute the block in backward.
    "dropout_rng": "hash",
}
# The weak teacher: the same design at 0.25B.
TEACHER = {
    **STUDENT,
    "hidden_size": 1024,
    "num_layers": 16,
    "num_heads": 16,
    "num_kv_heads": 4,
    "mlp_dim": 2816,
    "remat": "full",
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The Llama-1B DWT pipeline for one kind of hardware (``llama_1b.py:<variant>``)."""
    variant = ALIASES.get(variant, variant)
    if variant not in _VARIANTS:
        raise ValueError(
            f"configs/scale/llama_1b.py needs a hardware variant after a colon, one of "
            f"{', '.join((*_VARIANTS, *ALIASES))} (got {variant!r}); e.g. "
            "--config=configs/scale/llama_1b.py:8xh100."
        )
    hardware = _VARIANTS[variant]
    here = os.path.dirname(os.path.abspath(__file__))
    # Data fields, loop and the DWT objective as configs/causal.py (the decoder pipeline).
    config = load_config_file(os.path.join(here, "..", "causal.py"), None)

    config.model = ml_collections.ConfigDict(STUDENT)
    # Pre-trained first into <workdir>/teacher, unless teacher.workdirs names one.
    config.teacher.model = ml_collections.ConfigDict(TEACHER)
    config.teacher.num_steps = 24_000  # Teacher pre-training steps (same budget).
    # In the student's run: the teacher's weights whole across data/fsdp (split over
    # tensor only), so its forward gathers no weights; 0.25B × 4 bytes / mesh.tensor.
    config.teacher.sharding = "no_fsdp"
    config.teacher.student_init = "scratch"  # 'remap' grows the student from the teacher.

    # Causal DWT: α_h·CE + α_s·τ²·D(p_t^τ ‖ p_s^τ) over every predicted token.
    config.distill.strategy = "dwt"
    config.distill.divergence = "kl"  # 'kl' | 'reverse_kl' | 'jsd' (with jsd_beta).
    config.distill.hidden_weight = 0.0  # Logits only (the teacher is half as wide).
    # The LM heads and the loss run in 8000-token vocabulary slices: no [B,L,V] logits.
    # (Not row blocks: those count rows across the batch's shards, and a few hundred
    # rows split over 32-64 devices would leave each a sliver; vocabulary slices do not
    # depend on the mesh.)
    config.distill.vocab_chunk_size = 8000
    config.distill.head_block_rows = 0

    # C4 through TFDS (see the docstring for preparing it).
    config.data.source = "tfds"
    config.data.tfds_name = "c4/en"
    config.data.tfds_data_dir = hardware["tfds_data_dir"]  # A gs:// path works too.
    config.data.text_field = "text"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    # A 32,000-token Llama-style tokenizer, the same path on every host; '' trains a
    # byte-level BPE of data.vocab_size tokens on the train split.
    config.data.tokenizer_path = ""
    config.data.vocab_size = 32000
    config.data.seq_len = 2048
    config.data.worker_count = hardware["worker_count"]
    config.data.batch_size = 512  # Global: 512 × 2048 = 1M tokens per step.
    config.data.eval_batch_size = 256

    # AdamW as in Llama pre-training; cosine decay to a tenth of the peak.
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 2000
    config.optim.decay = "cosine"
    config.optim.end_lr_factor = 0.1
    config.optim.weight_decay = 0.1
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 1.0
    config.optim.grad_accum_steps = hardware["grad_accum_steps"]

    config.train.num_steps = 24_000  # 25B tokens: ~20 per student parameter.
    config.train.eval_every = 1000
    config.train.eval_batches = 8  # 2048 held-out sequences (4M tokens) per evaluation.

    config.mesh.update(hardware["mesh"])

    config.checkpoint.every_steps = hardware["checkpoint_every"]
    config.checkpoint.max_to_keep = 3
    config.checkpoint.async_save = True

    config.log.every_steps = 50  # Plain log lines when not on a terminal.
    return config
