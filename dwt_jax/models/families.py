"""Model families by name (``model.family``): the config class and the pre-training
model of each. A new family is a new module and a row here; nothing else tests a
family's name.

- ``bert``: BERT-style encoders, masked LM (`dwt_jax.models.bert`);
- ``gpt2``: GPT-2 decoders, causal LM (`dwt_jax.models.gpt2`);
- ``llama``: Llama-family decoders (Llama, Qwen2, Qwen3, Mistral), causal LM
  (`dwt_jax.models.llama`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from dwt_jax.models.bert import make_model as make_bert
from dwt_jax.models.config import BertConfig
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.gpt2 import GPT2LMHeadModel
from dwt_jax.models.llama import LlamaForCausalLM

ModelConfig = BertConfig | DecoderConfig

FAMILIES: dict[str, type] = {"bert": BertConfig, "gpt2": DecoderConfig, "llama": DecoderConfig}
# What each family is pre-trained on (also the name of the strategy that trains it alone).
FAMILY_OBJECTIVES: dict[str, str] = {"bert": "mlm", "gpt2": "clm", "llama": "clm"}
_CAUSAL_MODELS: dict[str, type[nn.Module]] = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def family_of(values: Mapping[str, Any]) -> str:
    """The family a model section names (``bert`` when it names none)."""
    return str(values.get("family", "bert"))


def objective_of_section(values: Mapping[str, Any]) -> str:
    """'mlm' or 'clm' for a model section, by its family (an unknown family: 'mlm';
    the section's own check names it)."""
    return FAMILY_OBJECTIVES.get(str(values.get("family", "bert")), "mlm")


def config_class(values: Mapping[str, Any]) -> type:
    """The config dataclass of the family ``values`` names; ValueError if unknown."""
    family = values.get("family", "bert")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is unknown: use one of {tuple(FAMILIES)}.")
    return FAMILIES[family]


def model_config_from(values: Mapping[str, Any]) -> ModelConfig:
    """The checked config of a model section of any family (ValueError naming the
    field otherwise)."""
    values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
    return config_class(values).from_config(values)


def objective(config: ModelConfig) -> str:
    """'mlm' (an encoder) or 'clm' (a decoder): what the family is pre-trained on."""
    return config.objective


def make_lm(config: ModelConfig) -> nn.Module:
    """The pre-training model of ``config``'s family: `BertMLM` or a `CausalLM`."""
    if config.objective == "mlm":
        return make_bert(config, head="mlm")
    config.validate()
    return _CAUSAL_MODELS[config.family](config)
