"""DWT from a Hugging Face decoder (GPT-2, Llama, Qwen2, Qwen3, Mistral) into a larger
student of the same family.

The teacher is a local Hugging Face model directory (``config.json``, one or sharded
``*.safetensors`` or ``pytorch_model.bin``, and its tokenizer) of a ``*ForCausalLM``
model. The student takes the teacher's vocabulary, tokenizer and architecture
settings (RoPE, grouped-query ratio, q/k norm, biases), is twice as wide (whole heads
copied) and twice as deep, starts from the teacher's weights grown without changing
the function (``teacher.remap``: depth 'identity', width 'hypercloning';
docs/methods.md#decoder-growth), and learns from the teacher's soft labels over every
predicted token; the same student trained alone is the baseline.

Get a teacher where you have internet (a small one suits a CPU; any supported
architecture works)::

    python -c "import transformers as t; m = 'HuggingFaceTB/SmolLM2-135M'; \\
        t.AutoModelForCausalLM.from_pretrained(m).save_pretrained('hf/smollm2-135m'); \\
        t.AutoTokenizer.from_pretrained(m).save_pretrained('hf/smollm2-135m')"

then run, naming the directory after the colon::

    python -m dwt_jax.main --config=configs/hf_causal_teacher.py:hf/smollm2-135m \
        --workdir=runs/hf_causal
    # Sample from the student, and export it for transformers:
    python -m dwt_jax.generate --workdir=runs/hf_causal/student --prompt="The function"
    python -m dwt_jax.export --workdir=runs/hf_causal/student --out=hf/student

The text is the embedded corpus by default; for C4 prepared with TFDS add
``--config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0``. Growth factors:
``--config.model.hidden_size=...`` (a multiple of the teacher's for exact growth),
``--config.model.num_layers=...``.
"""

from __future__ import annotations

import json
import os

import ml_collections

from dwt_jax.configuration import load_config_file

# The architecture settings a grown student shares with its teacher.
_SHARED = (
    "family",
    "vocab_size",
    "head_dim",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
    "tie_embeddings",
    "qkv_bias",
    "qk_norm",
    "sliding_window",
)


def get_config(teacher_dir: str | None = None) -> ml_collections.ConfigDict:
    """The config for the teacher in ``teacher_dir`` (``configs/hf_causal_teacher.py:DIR``)."""
    if not teacher_dir:
        raise ValueError(
            "configs/hf_causal_teacher.py needs the teacher's directory after a colon: "
            "--config=configs/hf_causal_teacher.py:path/to/hf_model (see its docstring)."
        )
    from dwt_jax.hf import config_of

    path = os.path.expanduser(teacher_dir)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{path} has no config.json: download a Hugging Face model into it first "
            "(see configs/hf_causal_teacher.py's docstring)."
        )
    with open(config_file) as f:
        teacher, _ = config_of(json.load(f), config_file, objective="clm")

    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config_file(os.path.join(here, "causal.py"), None)
    del config.teacher.model  # The teacher exists: no teacher stage.
    config.teacher.workdirs = (f"hf:{path}",)
    config.teacher.student_init = "remap"  # Grow the teacher into the student.
    config.model.update({name: getattr(teacher, name) for name in _SHARED})
    config.model.update(
        max_len=min(teacher.max_len, 1024),
        hidden_size=2 * teacher.hidden_size,
        num_heads=2 * teacher.num_heads,
        num_kv_heads=2 * teacher.num_kv_heads,
        mlp_dim=2 * teacher.mlp_dim,
        num_layers=2 * teacher.num_layers,
    )
    config.data.tokenizer_path = path  # The teacher's tokenizer (also the default).
    config.data.vocab_size = teacher.vocab_size
    config.data.seq_len = min(256, config.model.max_len)
    config.optim.learning_rate = 3e-4
    return config
