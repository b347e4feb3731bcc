"""DWT from a Hugging Face BERT teacher into a larger student.

The teacher is a local Hugging Face model directory (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, and its tokenizer) with an MLM head.
The student takes the teacher's vocabulary, tokenizer and position table, is twice
as wide and twice as deep, starts from the teacher's weights grown by parameter
remapping (DWT's initialisation, docs/methods.md#remapping), and learns from the
teacher's soft labels; the same student trained alone is the baseline.

Get a teacher where you have internet (any BERT or RoBERTa MLM checkpoint works;
BERT-mini, 4 layers of width 256, is small enough for a CPU)::

    python -c "import transformers as t; m = 'google/bert_uncased_L-4_H-256_A-4'; \\
        t.AutoModelForMaskedLM.from_pretrained(m).save_pretrained('hf/bert-mini'); \\
        t.AutoTokenizer.from_pretrained(m).save_pretrained('hf/bert-mini')"

then run, naming the directory after the colon::

    python -m dwt_jax.main --config=configs/hf_teacher.py:hf/bert-mini --workdir=runs/hf_dwt
    # Export the student for transformers:
    python -m dwt_jax.export --workdir=runs/hf_dwt/student --out=hf/student

The text is the embedded corpus by default; for Wikipedia prepared with TFDS add
``--config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en``.
"""

from __future__ import annotations

import json
import os

import ml_collections

from dwt_jax.configuration import load_config_file


def get_config(teacher_dir: str | None = None) -> ml_collections.ConfigDict:
    """The config for the teacher in ``teacher_dir`` (``configs/hf_teacher.py:DIR``)."""
    if not teacher_dir:
        raise ValueError(
            "configs/hf_teacher.py needs the teacher's directory after a colon: "
            "--config=configs/hf_teacher.py:path/to/hf_model (see the file's docstring)."
        )
    from dwt_jax.hf import config_from_hf

    path = os.path.expanduser(teacher_dir)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(
            f"{path} has no config.json: download a Hugging Face model into it first "
            "(see configs/hf_teacher.py's docstring)."
        )
    with open(config_file) as f:
        teacher, _ = config_from_hf(json.load(f), config_file)

    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config_file(os.path.join(here, "base.py"), None)
    del config.teacher.model  # The teacher exists: no teacher stage.
    config.teacher.workdirs = (f"hf:{path}",)
    config.teacher.student_init = "remap"  # Grow the teacher into the student.
    # The student: the teacher's vocabulary and positions, twice as wide and deep.
    config.model.update(
        vocab_size=teacher.vocab_size,
        max_len=teacher.max_len,
        type_vocab_size=teacher.type_vocab_size,
        position_offset=teacher.position_offset,
        layer_norm_eps=teacher.layer_norm_eps,
        hidden_size=2 * teacher.hidden_size,
        num_heads=2 * teacher.num_heads,
        mlp_dim=2 * teacher.mlp_dim,
        num_layers=2 * teacher.num_layers,
    )
    config.data.tokenizer_path = path  # The teacher's tokenizer (also the default).
    config.data.vocab_size = teacher.vocab_size
    config.data.seq_len = min(128, teacher.max_seq_len)
    config.optim.learning_rate = 5e-4
    return config
