"""Numerical parity with transformers (CPU PyTorch), export round trips, identity.

Tiny randomly initialised BertForMaskedLM, RobertaForMaskedLM and
Bert/RobertaForSequenceClassification: imported, our hidden states and logits match
transformers' to 1e-4 in float32 on a batch with padding and two token types; our
export reloads in transformers with no missing or unexpected weight and gives the
same logits; import∘export is the identity on the weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from hf_helpers import inputs, max_diff_on_tokens, our_outputs, template, their_outputs

from dwt_jax import hf
from dwt_jax.hf.convert import export_params, import_params

TOL = 1e-4
MLM_KINDS = ("bert_mlm", "roberta_mlm")
CLS_KINDS = ("bert_cls", "roberta_cls")


def _import(path: str, head: str):
    checkpoint = hf.plan(f"hf:{path}", "test")
    fresh = ("bert/pooler",) if head == "mlm" else ()
    params, report = hf.load_params(
        checkpoint, template(checkpoint.config, head), head=head, allow_fresh=fresh
    )
    return checkpoint, params, report


@pytest.mark.parametrize("kind", MLM_KINDS)
def test_mlm_hidden_states_and_logits_match_transformers(hf_dirs, kind):
    path, model = hf_dirs[kind]
    checkpoint, params, report = _import(path, "mlm")
    assert report.fresh == ("bert/pooler/dense/bias", "bert/pooler/dense/kernel")
    batch = inputs(kind)
    logits, out = our_outputs(checkpoint.config, params, "mlm", batch)
    theirs = their_outputs(model, batch)
    assert len(out["hidden_states"]) == len(theirs.hidden_states) == 3
    for ours_h, their_h in zip(out["hidden_states"], theirs.hidden_states, strict=True):
        assert max_diff_on_tokens(ours_h, their_h.numpy(), batch["attention_mask"]) < TOL
    assert max_diff_on_tokens(logits, theirs.logits.numpy(), batch["attention_mask"]) < TOL
    # Not vacuous: the logits vary across tokens by far more than the tolerance.
    assert float(np.std(theirs.logits.numpy())) > 100 * TOL


@pytest.mark.parametrize("kind", CLS_KINDS)
def test_classifier_logits_match_transformers(hf_dirs, kind):
    path, model = hf_dirs[kind]
    checkpoint, params, report = _import(path, "classifier")
    assert report.fresh == ()
    assert checkpoint.config.num_labels == 3
    batch = inputs(kind)
    logits, out = our_outputs(checkpoint.config, params, "classifier", batch)
    theirs = their_outputs(model, batch)
    mask = batch["attention_mask"]
    for ours_h, their_h in zip(out["hidden_states"], theirs.hidden_states, strict=True):
        assert max_diff_on_tokens(ours_h, their_h.numpy(), mask) < TOL
    np.testing.assert_allclose(np.asarray(logits), theirs.logits.numpy(), atol=TOL)


@pytest.mark.parametrize("kind", [*MLM_KINDS, *CLS_KINDS])
def test_export_reloads_in_transformers_with_the_same_logits(hf_dirs, kind, tmp_path):
    path, model = hf_dirs[kind]
    head = "mlm" if kind in MLM_KINDS else "classifier"
    checkpoint, params, _ = _import(path, head)
    out = str(tmp_path / "export")
    files = hf.write_dir(out, params, checkpoint.config, head)
    assert {"config.json", "model.safetensors"} <= set(files)
    reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    batch = inputs(kind)
    ours = their_outputs(reloaded.eval(), batch).logits.numpy()
    theirs = their_outputs(model, batch).logits.numpy()
    assert (
        max_diff_on_tokens(
            ours.reshape(ours.shape[0], -1, ours.shape[-1]),
            theirs.reshape(theirs.shape[0], -1, theirs.shape[-1]),
            batch["attention_mask"] if head == "mlm" else np.ones((ours.shape[0], 1)),
        )
        < TOL
    )


@pytest.mark.parametrize("kind", [*MLM_KINDS, *CLS_KINDS])
def test_import_then_export_is_the_identity_on_weights(hf_dirs, kind):
    path, _ = hf_dirs[kind]
    head = "mlm" if kind in MLM_KINDS else "classifier"
    checkpoint, params, _ = _import(path, head)
    original = hf.read_weights(path)
    exported = export_params(params, checkpoint.config, head)
    tied = set(checkpoint.family.tied)
    expected = {k: v for k, v in original.items() if k not in tied}
    assert set(exported) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("kind", ["bert_mlm", "roberta_mlm"])
def test_export_then_import_is_the_identity_on_our_params(hf_dirs, kind):
    """The other direction, from our own (random, non-HF) parameters."""
    checkpoint = hf.plan(f"hf:{hf_dirs[kind][0]}", "test")
    ours = template(checkpoint.config, "mlm")
    ours = {k: v for k, v in ours.items()}  # pooler included: MLM export drops it
    state = export_params(ours, checkpoint.config, "mlm")
    back, report = import_params(
        state,
        checkpoint.config,
        checkpoint.family,
        template(checkpoint.config, "mlm"),
        allow_fresh=("bert/pooler",),
    )
    flat_ours = hf.convert._flatten(ours)
    flat_back = hf.convert._flatten(back)
    for key in report.loaded:
        np.testing.assert_array_equal(flat_back[key], flat_ours[key], err_msg=key)
    assert len(report.loaded) == len(flat_ours) - 2


def test_transformers_autoclasses_pick_the_exported_architecture(hf_dirs, tmp_path):
    path, _ = hf_dirs["bert_cls"]
    checkpoint, params, _ = _import(path, "classifier")
    out = str(tmp_path / "cls")
    hf.write_dir(out, params, checkpoint.config, "classifier", problem_type="regression")
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.problem_type == "regression"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification"
