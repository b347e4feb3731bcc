"""Hugging Face interop: BERT/RoBERTa model directories in, dwt_jax runs out.

- ``convert``: pure config and parameter conversions through the name table
  (``names``), with a strict check of unused, missing and misshapen weights.
- ``files``: reading a model directory (``config.json``, ``model.safetensors`` or
  ``pytorch_model.bin``, the tokenizer) and writing one.

Anywhere a run accepts another run's workdir as a teacher or an initialisation,
``hf:DIR`` names a Hugging Face model directory instead.
"""

from dwt_jax.hf.convert import (
    HFConversionError,
    ImportReport,
    config_from_hf,
    config_to_hf,
    export_params,
    family_of,
    import_params,
)
from dwt_jax.hf.files import (
    PREFIX,
    HFCheckpoint,
    hf_path,
    is_hf,
    load_params,
    load_tokenizer,
    plan,
    read_weights,
    write_dir,
)
from dwt_jax.hf.names import FAMILIES, Family

__all__ = [
    "FAMILIES",
    "PREFIX",
    "Family",
    "HFCheckpoint",
    "HFConversionError",
    "ImportReport",
    "config_from_hf",
    "config_to_hf",
    "export_params",
    "family_of",
    "hf_path",
    "import_params",
    "is_hf",
    "load_params",
    "load_tokenizer",
    "plan",
    "read_weights",
    "write_dir",
]
