"""Session fixtures: tiny transformers models written to temporary directories."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import make_hf_model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (directory written by save_pretrained, the model)."""
    out = {}
    for seed, kind in enumerate(
        ("bert_mlm", "roberta_mlm", "bert_cls", "roberta_cls", "bert_pretraining")
    ):
        model = make_hf_model(kind, seed)
        path = str(tmp_path_factory.mktemp(kind))
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out
