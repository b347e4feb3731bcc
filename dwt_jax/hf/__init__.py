"""Hugging Face interop: model directories in, dwt_jax runs out.

Encoders (BERT, RoBERTa; masked LM and classifiers) and decoders (GPT-2, Llama,
Qwen2, Qwen3, Mistral; causal LM).

- ``convert`` / ``decoder_convert``: pure config and parameter conversions through
  the name tables (``names`` / ``decoder_names``), with a strict check of unused,
  missing and misshapen weights.
- ``files``: reading a model directory (``config.json``, ``model.safetensors``, a
  sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``, the tokenizer)
  and writing an encoder's; ``decoder_files``: writing a decoder's.

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
from dwt_jax.hf.decoder_convert import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    export_decoder_params,
    export_family,
    import_decoder_params,
)
from dwt_jax.hf.decoder_files import export_decoder_dir
from dwt_jax.hf.decoder_names import DECODER_FAMILIES, DecoderFamily
from dwt_jax.hf.files import (
    PREFIX,
    HFCheckpoint,
    config_of,
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
    "DECODER_FAMILIES",
    "FAMILIES",
    "PREFIX",
    "DecoderFamily",
    "Family",
    "HFCheckpoint",
    "HFConversionError",
    "ImportReport",
    "config_from_hf",
    "config_of",
    "config_to_hf",
    "decoder_config_from_hf",
    "decoder_config_to_hf",
    "export_decoder_dir",
    "export_decoder_params",
    "export_family",
    "export_params",
    "family_of",
    "hf_path",
    "import_decoder_params",
    "import_params",
    "is_hf",
    "load_params",
    "load_tokenizer",
    "plan",
    "read_weights",
    "write_dir",
]
