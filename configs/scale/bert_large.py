"""DWT at BERT-large scale: a BERT-base-sized teacher, then a BERT-large student.

The pipeline of ``configs/base.py`` (teacher → student with DWT → student alone) with
a BERT-base-sized weak teacher (12 layers × 768, 12 heads, MLP 3072) and a BERT-large
student (24 × 1024, 16 heads, MLP 4096, 335M parameters), both with BERT's 30,522-token
uncased vocabulary and 512 positions, on 128-token packed sequences with at most 20
masked positions, batch 1024, 250k steps (= BERT's 1M steps × 256 sequences), AdamW
1e-4 (BERT-large's post-LN is unstable at higher rates) with 10k warm-up steps and
linear decay. Every stage takes the same budget: ``train.num_steps`` for the student
and the baseline, ``teacher.num_steps`` for the teacher (a short trial sets both).
``--config.baseline.enabled=False`` skips the student-alone stage. A teacher you
already have (e.g. a finished ``configs/scale/bert_base.py`` student) replaces the
teacher stage:
``--config.teacher.workdirs="('gs://YOUR_BUCKET/dwt/bert_base/student',)"``.

Data and tokenizer as in ``configs/scale/bert_base.py`` (TFDS
``wikipedia/20230601.en`` in array_record format; ``data.tokenizer_path`` should point
at a bert-base-uncased tokenizer directory, vocab 30522, the same path on every host;
'' trains a WordPiece vocabulary of that size on process 0 first).

Launch (from the repository root; see launch/README.md)::

  # TPU v4-32 (16 chips, 4 hosts):
  launch/tpu_pod.sh all --name dwt-large --zone us-central2-b --accelerator v4-32 \\
      --config configs/scale/bert_large.py:v4-32 --workdir gs://YOUR_BUCKET/dwt/bert_large \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # TPU v5e-64 (64 chips, 16 hosts):
  launch/tpu_pod.sh all --name dwt-large --zone us-west4-a --accelerator v5e-64 \\
      --config configs/scale/bert_large.py:v5e-64 --workdir gs://YOUR_BUCKET/dwt/bert_large \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # One host with 8 H100 (80 GB):
  launch/gpu_local.sh --config configs/scale/bert_large.py:8xh100 --workdir runs/bert_large \\
      -- --config.data.tokenizer_path=hf/bert-base-uncased
  # SLURM, N nodes of 8 H100 (one process per GPU; FSDP inside a node, data across):
  sbatch --nodes=4 launch/slurm.sbatch --config configs/scale/bert_large.py:8xh100 \\
      --workdir /shared/runs/bert_large -- --config.data.tokenizer_path=hf/bert-base-uncased

Variants (``configs/scale/bert_large.py:<variant>``), one per kind of hardware; the
optimisation (global batch, learning rate, steps) is the same in all of them:
  v4-32   16 TPU v4 chips (32 GiB each): FSDP over the 4 chips of a host × 4 data
          replicas, 64 sequences per chip, matmul outputs kept for the backward pass
          (remat 'dots').
  v5e-64  64 TPU v5e chips (16 GiB each): FSDP over 16 chips × 4 data replicas,
          16 sequences per chip.
  8xh100  8 H100 GPUs (80 GB each) per host: FSDP over a host's 8 GPUs (NVLink), data
          parallel across hosts; 128 sequences per GPU on one host.
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
        # 335M params × 16 bytes (weights, Adam moments, gradients) = 5.4 GB, sharded 4 ways.
        "mesh": {"data": -1, "fsdp": 4, "tensor": 1},
        # 64 sequences per chip: the step compiled for CPU (activations in float32, an
        # upper bound) needs 31 GiB per device without remat; keep matmul outputs only.
        "remat": "dots",
        "grad_accum_steps": 1,
        "worker_count": 16,  # Grain processes per host (a v4 host has 240 vCPUs).
        "checkpoint_every": 2500,
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "v5e-64": {
        "mesh": {"data": -1, "fsdp": 16, "tensor": 1},  # 16 GiB per chip: shard 16 ways.
        "remat": "none",  # 16 sequences per chip: 8.7 GiB (CPU-compiled upper bound).
        "grad_accum_steps": 1,
        "worker_count": 16,  # 4 chips and 112 vCPUs per host.
        "checkpoint_every": 1000,  # v5e slices are often spot capacity: save more often.
        "tfds_data_dir": "gs://YOUR_BUCKET/tensorflow_datasets",
    },
    "8xh100": {
        "mesh": {"data": -1, "fsdp": 8, "tensor": 1},  # FSDP within a node.
        # 128 sequences per GPU on one host: 59 GiB per device compiled for CPU (float32
        # activations, an upper bound) of the 72 GB that launch/gpu_local.sh leaves JAX.
        "remat": "none",
        "grad_accum_steps": 1,
        # One process feeds all 8 GPUs (launch/gpu_local.sh): many tokenizing workers.
        # launch/slurm.sbatch runs one process per GPU and lowers it (DATA_WORKERS).
        "worker_count": 32,
        "checkpoint_every": 2500,
        "tfds_data_dir": "~/tensorflow_datasets",
    },
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The BERT-large DWT pipeline for one kind of hardware (``bert_large.py:<variant>``)."""
    if variant not in _VARIANTS:
        raise ValueError(
            f"configs/scale/bert_large.py needs a hardware variant after a colon, one of "
            f"{', '.join(_VARIANTS)} (got {variant!r}); e.g. "
            "--config=configs/scale/bert_large.py:8xh100."
        )
    hardware = _VARIANTS[variant]
    here = os.path.dirname(os.path.abspath(__file__))
    # Data, optimiser and loop as the BERT-base run on the same hardware; the sizes, the
    # learning rate, the teacher's layout and the hardware fields differ.
    config = load_config_file(os.path.join(here, "bert_base.py"), variant)

    # The student: BERT-large (335M parameters), bfloat16 compute, float32 parameters.
    config.model.update(
        hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096, remat=hardware["remat"]
    )

    # The weak teacher, pre-trained first into <workdir>/teacher: BERT-base-sized (110M).
    config.teacher.model = ml_collections.ConfigDict(config.model.to_dict())
    config.teacher.model.update(num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072)
    config.teacher.model.remat = "none"  # A third of the student's activations.
    # In the student's run: the teacher's 110M weights whole across data/fsdp (tensor-
    # parallel only, if mesh.tensor > 1), so its forward gathers no weights.
    config.teacher.sharding = "no_fsdp"

    config.optim.learning_rate = 1e-4  # BERT-large's peak rate, with BERT's warm-up.
    config.optim.grad_accum_steps = hardware["grad_accum_steps"]
    config.data.worker_count = hardware["worker_count"]
    config.data.tfds_data_dir = hardware["tfds_data_dir"]
    config.mesh.update(hardware["mesh"])
    config.checkpoint.every_steps = hardware["checkpoint_every"]
    return config
