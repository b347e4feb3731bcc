"""A real pretrained BERT checkpoint: AntiBERTy (8 layers, hidden 512, 26M parameters,
a BertForMaskedLM-style model pre-trained on 558M antibody sequences).

It is the one real BERT checkpoint within reach offline here: the ``antiberty==0.1.3``
wheel (a test dependency, from the package registry) ships its ``config.json``,
``pytorch_model.bin`` and ``vocab.txt``. transformers turns it into the directory a
user downloads (``config.json``, ``model.safetensors``, ``vocab.txt``); we import that
and must reproduce transformers' hidden states and logits, and our export of it must
load back with the same logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from hf_helpers import max_diff_on_tokens, our_outputs, template

from dwt_jax import hf
from dwt_jax.hf.convert import HFConversionError

# Heavy chains of two antibodies (the second is shorter: padding in the batch).
SEQUENCES = (
    "E V Q L V E S G G G L V Q P G G S L R L S C A A S G F T F S S Y A M S W V R Q A P G K",
    "Q V Q L Q E S G P G L V K P S E T L S L T C T V S G G S I S S",
)


def _package_checkpoint() -> tuple[str, str]:
    spec = importlib.util.find_spec("antiberty")  # Located, not imported.
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("antiberty==0.1.3 is a test dependency: pip install -e '.[test]'")
    root = os.path.join(spec.submodule_search_locations[0], "trained_models")
    return os.path.join(root, "AntiBERTy_md_smooth"), os.path.join(root, "vocab.txt")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(the package's raw directory, the directory a user would download, transformers'
    model)."""
    raw, vocab = _package_checkpoint()
    model = transformers.BertForMaskedLM.from_pretrained(raw).eval()
    path = str(tmp_path_factory.mktemp("antiberty"))
    model.save_pretrained(path)
    # The tokenizer as older BERT downloads ship it: vocab.txt and its settings (the
    # residues are upper-case letters: no lower-casing).
    shutil.copy(vocab, path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False}, f)
    assert sorted(os.listdir(path)) == [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    return raw, path, model


def _batch(path: str) -> dict[str, np.ndarray]:
    tokenizer = hf.load_tokenizer(path)
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(list(SEQUENCES))
    ids = np.array([[2, *e.ids, 3] for e in encodings])  # [CLS] ... [SEP]
    mask = np.array([[1, *e.attention_mask, 1] for e in encodings])
    ids = np.where(mask == 1, ids, 0)
    return {"input_ids": ids, "attention_mask": mask, "types": np.zeros_like(ids)}


def test_real_checkpoint_reproduces_transformers(real):
    _, path, model = real
    checkpoint = hf.plan(f"hf:{path}", "teacher.workdirs[0]")
    assert (checkpoint.config.num_layers, checkpoint.config.hidden_size) == (8, 512)
    params, _ = hf.load_params(
        checkpoint, template(checkpoint.config, "mlm"), allow_fresh=("bert/pooler",)
    )
    batch = _batch(path)
    assert not (batch["input_ids"][batch["attention_mask"] == 1] == 1).any()
    logits, out = our_outputs(checkpoint.config, params, "mlm", batch)
    with torch.no_grad():
        theirs = model(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            output_hidden_states=True,
        )
    mask = batch["attention_mask"]
    for ours_h, their_h in zip(out["hidden_states"], theirs.hidden_states, strict=True):
        assert max_diff_on_tokens(ours_h, their_h.numpy(), mask) < 1e-4
    assert max_diff_on_tokens(logits, theirs.logits.numpy(), mask) < 1e-4
    # A real model: it predicts the residues of a real sequence far above chance (1/20).
    predicted = np.asarray(logits).argmax(-1)
    real_tokens = (mask == 1) & (batch["input_ids"] > 4)
    accuracy = float((predicted == batch["input_ids"])[real_tokens].mean())
    assert accuracy > 0.5, accuracy


def test_raw_package_checkpoint_names_its_extra_heads(real):
    """The package's own pytorch_model.bin carries AntiBERTy's species/chain/graft heads:
    the strict check names them, and dropping them knowingly gives the same weights."""
    raw, path, _ = real
    checkpoint = hf.plan(f"hf:{raw}", "init.workdir")
    target = template(checkpoint.config, "mlm")
    with pytest.raises(HFConversionError, match=r"cls\.chain\.bias, cls\.chain\.weight"):
        hf.load_params(checkpoint, target, allow_fresh=("bert/pooler",))
    from_raw, report = hf.load_params(
        checkpoint, target, ignore=("cls.species", "cls.chain", "cls.graft")
    )
    assert report.fresh == ()  # The raw checkpoint has its pooler.
    from_dir, _ = hf.load_params(hf.plan(f"hf:{path}", "t"), target, allow_fresh=("bert/pooler",))
    flat_raw, flat_dir = hf.convert._flatten(from_raw), hf.convert._flatten(from_dir)
    for key, value in flat_dir.items():
        if not key.startswith("bert/pooler/"):
            np.testing.assert_array_equal(flat_raw[key], value, err_msg=key)


def test_real_checkpoint_export_reloads_with_the_same_logits(real, tmp_path):
    _, path, model = real
    checkpoint = hf.plan(f"hf:{path}", "t")
    params, _ = hf.load_params(
        checkpoint, template(checkpoint.config, "mlm"), allow_fresh=("bert/pooler",)
    )
    out = str(tmp_path / "export")
    hf.write_dir(out, params, checkpoint.config, "mlm", tokenizer_dir=path)
    reloaded, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    batch = _batch(out)
    args = {
        "input_ids": torch.tensor(batch["input_ids"]),
        "attention_mask": torch.tensor(batch["attention_mask"]),
    }
    with torch.no_grad():
        before, after = model(**args).logits.numpy(), reloaded.eval()(**args).logits.numpy()
    assert max_diff_on_tokens(after, before, batch["attention_mask"]) == 0.0
