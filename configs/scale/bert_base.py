"""DWT at BERT-base scale: a BERT-medium teacher, then a BERT-base student, on Wikipedia.

The pipeline of ``configs/base.py`` (teacher → student with DWT → student alone) at
real sizes: the weak teacher is BERT-medium (8 layers × 512, 8 heads, MLP 2048), the
student BERT-base (12 × 768, 12 heads, MLP 3072); both have BERT's 30,522-token
uncased vocabulary and 512 positions, and train on 128-token packed sequences with
at most 20 masked positions, batch 1024, 250k steps (= BERT's 1M steps × 256
sequences), AdamW 2e-4 with 10k warm-up steps and linear decay. Every stage takes
the same budget: ``train.num_steps`` for the student and the baseline,
``teacher.num_steps`` for the teacher (a short trial sets both).
``--config.baseline.enabled=False`` skips the student-alone stage.

Data: TFDS ``wikipedia/20230601.en`` prepared in array_record format (once, where
TensorFlow and Apache Beam are installed)::

    tfds build wikipedia/20230601.en --file_format=array_record \\
        --data_dir=gs://YOUR_BUCKET/tensorflow_datasets

The TPU variants read it from ``gs://YOUR_BUCKET/tensorflow_datasets``, the GPU
variant from ``~/tensorflow_datasets``; override with ``--config.data.tfds_data_dir``.
Wikipedia has only a train split: the first 20,000 articles are held out for eval.

Tokenizer: ``data.tokenizer_path`` should point at a bert-base-uncased tokenizer
directory (vocab 30522), the same path on every host; saved where there is internet
with ``transformers.AutoTokenizer.from_pretrained('bert-base-uncased')
.save_pretrained('hf/bert-base-uncased')`` inside the checkout (``launch/tpu_pod.sh
install`` copies the checkout to every worker). Left empty (the default), process 0
trains a 30,522-entry WordPiece vocabulary on the train split first (hours on all of
Wikipedia) and shares it with the other processes.

Launch (from the repository root; see launch/README.md)::

  # TPU v4-32 (16 chips, 4 hosts):
  launch/tpu_pod.sh all --name dwt-base --zone us-central2-b --accelerator v4-32 \\
      --config configs/scale/bert_base.py:v4-32 --workdir gs://YOUR_BUCKET/dwt/bert_base \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # TPU v5e-64 (64 chips, 16 hosts):
  launch/tpu_pod.sh all --name dwt-base --zone us-west4-a --accelerator v5e-64 \\
      --config configs/scale/bert_base.py:v5e-64 --workdir gs://YOUR_BUCKET/dwt/bert_base \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # One host with 8 H100 (80 GB):
  launch/gpu_local.sh --config configs/scale/bert_base.py:8xh100 --workdir runs/bert_base \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # SLURM, N nodes of 8 H100 (one process per GPU; the mesh fills every GPU):
  sbatch --nodes=2 launch/slurm.sbatch --config configs/scale/bert_base.py:8xh100 \\
      --workdir /shared/runs/bert_base -- --config.data.tokenizer_path=hf/bert-base-uncased

Variants (``configs/scale/bert_base.py:<variant>``), one per kind of hardware; the
optimisation (global batch, learning rate, steps) is the same in all of them:
  v4-32   16 TPU v4 chips (32 GiB each): data-parallel, 64 sequences per chip.
  v5e-64  64 TPU v5e chips (16 GiB each): data-parallel, 16 sequences per chip.
  8xh100  8 H100 GPUs (80 GB each) per host: data-parallel, 128 sequences per GPU
          on one host (fewer with more SLURM nodes: the batch is global).
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

# The hardware-dependent fields of each variant.
_VARIANTS = {
    "v4-32": {
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},  # 110M params: plain data parallel.
        # 64 sequences per chip: 13 GiB per device compiled for CPU (activations in
        # float32, an upper bound for bfloat16 on the TPU), of 32.
        "remat": "none",
        "grad_accum_steps": 1,
        "worker_count": 16,  # Grain processes per host (a v4 host has 240 vCPUs).
        "checkpoint_every": 5000,
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "v5e-64": {
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "remat": "none",  # 16 sequences per chip: 4.6 GiB (CPU-compiled upper bound).
        "grad_accum_steps": 1,
        "worker_count": 16,  # 4 chips and 112 vCPUs per host.
        "checkpoint_every": 2000,  # v5e slices are often spot capacity: save more often.
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "8xh100": {
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "remat": "none",  # 128 sequences per GPU on one host: 25 GiB (CPU upper bound).
        "grad_accum_steps": 1,
        # One process feeds all 8 GPUs (launch/gpu_local.sh): many tokenizing workers.
        # launch/slurm.sbatch runs one process per GPU and lowers it (DATA_WORKERS).
        "worker_count": 32,
        "checkpoint_every": 5000,
        "tfds_data_dir": "~/tensorflow_datasets",
    },
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The BERT-base DWT pipeline for one kind of hardware (``bert_base.py:<variant>``)."""
    if variant not in _VARIANTS:
        raise ValueError(
            f"configs/scale/bert_base.py needs a hardware variant after a colon, one of "
            f"{', '.join(_VARIANTS)} (got {variant!r}); e.g. "
            "--config=configs/scale/bert_base.py:8xh100."
        )
    hardware = _VARIANTS[variant]
    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config_file(os.path.join(here, "..", "base.py"), None)

    # The student: BERT-base (110M parameters), bfloat16 compute, float32 parameters.
    config.model.update(
        vocab_size=30522,  # bert-base-uncased's vocabulary.
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        max_len=512,  # BERT's position table (sequences here are 128 long).
        dtype="bfloat16",
        remat=hardware["remat"],
    )

    # The weak teacher, pre-trained first into <workdir>/teacher: BERT-medium (41M).
    config.teacher.model = ml_collections.ConfigDict(config.model.to_dict())
    config.teacher.model.update(num_layers=8, hidden_size=512, num_heads=8, mlp_dim=2048)
    config.teacher.model.remat = "none"  # Small: its activations fit everywhere.
    config.teacher.num_steps = 250_000  # Teacher pre-training steps (same budget).
    # Its 41M weights, whole on every device: no gather of teacher weights per step.
    config.teacher.sharding = "replicated"

    # Wikipedia through TFDS (see the docstring for preparing it).
    config.data.source = "tfds"
    config.data.tfds_name = "wikipedia/20230601.en"
    config.data.tfds_data_dir = hardware["tfds_data_dir"]  # A gs:// path works too.
    config.data.text_field = "text"
    config.data.train_split = "train[20000:]"  # Wikipedia has a train split only:
    config.data.eval_split = "train[:20000]"  # its first 20,000 articles are held out.
    # A bert-base-uncased tokenizer directory (vocab.txt / tokenizer.json), the same on
    # every host; '' trains a WordPiece vocabulary of data.vocab_size on the train split.
    config.data.tokenizer_path = ""
    config.data.vocab_size = 30522  # Size of a trained vocabulary (BERT's).
    config.data.seq_len = 128  # BERT's phase-1 length.
    config.data.max_predictions = 20  # 15% of 128, rounded up (BERT: 20).
    config.data.mask_prob = 0.15
    config.data.worker_count = hardware["worker_count"]
    config.data.batch_size = 1024  # Global, all devices together.
    config.data.eval_batch_size = 1024

    # AdamW; the peak rate is BERT's 1e-4 at batch 256, scaled by sqrt(4) for 1024.
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 10_000
    config.optim.decay = "linear"
    config.optim.end_lr_factor = 0.0
    config.optim.weight_decay = 0.01
    config.optim.b1 = 0.9
    config.optim.b2 = 0.98  # RoBERTa's choice for large batches (BERT used 0.999).
    config.optim.eps = 1e-6
    config.optim.grad_clip_norm = 1.0
    config.optim.grad_accum_steps = hardware["grad_accum_steps"]

    config.train.num_steps = 250_000  # 1024 × 250k = BERT's 256 × 1M sequences.
    config.train.eval_every = 10_000
    config.train.eval_batches = 16  # 16k held-out sequences per evaluation.

    config.mesh.update(hardware["mesh"])

    config.checkpoint.every_steps = hardware["checkpoint_every"]
    config.checkpoint.max_to_keep = 3
    config.checkpoint.async_save = True

    config.log.every_steps = 100  # Plain log lines when not on a terminal.
    return config
