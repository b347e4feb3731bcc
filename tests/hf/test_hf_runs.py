"""Hugging Face directories in real runs: export a trained run, use it as a teacher
(and grow a larger student from it), as the student's initialisation, as a fine-tuning
encoder; and the errors of each, raised before anything is compiled or written."""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from hf_helpers import our_outputs
from testutil import load_config

from dwt_jax import export, train
from dwt_jax import teachers as teachers_lib
from dwt_jax.configuration import ConfigError
from dwt_jax.finetune import run as finetune_run
from dwt_jax.models.bert import make_model

SENTENCES = ("Return the value of the named attribute.", "Raise an error if it is missing.")


def _quiet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.log.progress = False
    config.log.tensorboard = False
    return config


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache_dir):
    """(run workdir, its result, the exported Hugging Face directory, the run config)."""
    root = tmp_path_factory.mktemp("hf_runs")
    config = _quiet(load_config("smoke"))
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    workdir, out = str(root / "run"), str(root / "hf")
    result = train.run(config, workdir)
    files = export.export(workdir, out)
    assert files == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    return workdir, result, out, config


def _as_ours(batch) -> dict[str, np.ndarray]:
    """A transformers tokenizer's batch in the keys of ``hf_helpers.our_outputs``."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "types": batch["token_type_ids"],
    }


def _run_params(workdir: str):
    cfg = teachers_lib.teacher_model_config(workdir, "w")
    plan = teachers_lib.TeacherPlan(workdir, cfg, teachers_lib.latest_teacher_step(workdir, "w"))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    return cfg, jax.device_get(teachers_lib.load_teacher(plan, mesh).params)


def test_exported_run_loads_in_transformers_with_the_same_logits(exported):
    workdir, _, out, _ = exported
    model, info = transformers.BertForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="np")
    ours_tokenizer = tokenizers.Tokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
    first = [2, *ours_tokenizer.encode(SENTENCES[0]).ids, 3]  # [CLS] ... [SEP]
    assert batch["input_ids"][0][: len(first)].tolist() == first
    with torch.no_grad():
        theirs = model.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    cfg, params = _run_params(workdir)
    ours, _ = our_outputs(cfg, params, "mlm", _as_ours(batch))
    real = batch["attention_mask"][..., None] == 1
    assert float(np.abs(np.where(real, np.asarray(ours) - theirs, 0)).max()) < 1e-4


def _dwt_config(exported, **teacher) -> ml_collections.ConfigDict:
    _, _, _, base = exported
    config = _quiet(load_config("smoke", name="base"))
    config.data = ml_collections.ConfigDict(base.data.to_dict())
    config.baseline.enabled = False
    config.teacher.update(teacher)
    return config


def test_hf_teacher_reproduces_the_run_and_grows_a_larger_student(exported, tmp_path):
    """The exported run as an ``hf:`` teacher evaluates exactly as the run did, its
    tokenizer is used without being configured, and remapping grows it."""
    _, result, out, _ = exported
    config = _dwt_config(exported, workdirs=(f"hf:{out}",), student_init="remap")
    config.model.update(hidden_size=64, num_heads=2, mlp_dim=128, num_layers=3)
    config.train.num_steps = 2
    workdir = str(tmp_path / "dwt")
    dwt = train.run(config, workdir)
    assert dwt.final_step == 2
    np.testing.assert_allclose(
        dwt.eval_metrics["teacher/mlm_loss"], result.eval_metrics["eval/mlm_loss"], rtol=1e-5
    )
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["tokenizer_path"] == out


def test_hf_initialisation_starts_from_the_exported_weights(exported, tmp_path):
    _, result, out, base = exported
    config = _quiet(load_config("smoke"))
    config.data = ml_collections.ConfigDict(base.data.to_dict())
    config.init.workdir = f"hf:{out}"
    config.train.update(num_steps=1, eval_at_start=True)
    workdir = str(tmp_path / "init")
    train.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = next(json.loads(line) for line in f if "eval/mlm_loss" in line)
    assert first["step"] == 0
    np.testing.assert_allclose(
        first["eval/mlm_loss"], result.eval_metrics["eval/mlm_loss"], rtol=1e-5
    )


def test_finetuning_from_hf_and_export_as_sequence_classifier(exported, tmp_path, data_cache_dir):
    _, _, out, _ = exported
    config = load_config("smoke", name="finetune/base")
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    _quiet(config)
    config.distill.strategy = "task"
    config.model.max_len = 64  # The exported model's position table.
    config.init.workdir = f"hf:{out}"
    config.train.update(num_steps=2, eval_every=2)
    config.checkpoint.every_steps = 2
    workdir = str(tmp_path / "ft")
    finetune_run.run(config, workdir)
    hf_dir = str(tmp_path / "ft_hf")
    export.export(workdir, hf_dir)
    model, info = transformers.BertForSequenceClassification.from_pretrained(
        hf_dir, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.num_labels == 8  # The embedded 'source' task.
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="np")
    with torch.no_grad():
        theirs = model.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    cfg = finetune_run.model_config(config.model, 8, "model")
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    abstract, _ = teachers_lib.abstract_params(make_model(cfg, "classifier"), mesh)
    params = jax.device_get(finetune_run.restore_params(workdir, 2, abstract))
    ours, _ = our_outputs(cfg, params, "classifier", _as_ours(batch))
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def _other_tokenizer_copy(out: str, path) -> str:
    """The exported directory with two vocabulary entries swapped."""
    shutil.copytree(out, path)
    with open(os.path.join(path, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return str(path)


@pytest.mark.parametrize("case", ["tokenizer", "no_mlm_head", "init_shape", "missing_prefix"])
def test_errors_name_the_field_before_anything_is_written(exported, hf_dirs, tmp_path, case):
    _, _, out, _ = exported
    if case == "tokenizer":
        other = _other_tokenizer_copy(out, tmp_path / "other")
        config = _dwt_config(exported, workdirs=(f"hf:{other}",))
        config.data.tokenizer_path = out
        pattern = r"teacher\.workdirs\[0\]: the tokenizer of the Hugging Face teacher"
    elif case == "no_mlm_head":
        config = _dwt_config(exported, workdirs=(f"hf:{hf_dirs['bert_cls'][0]}",))
        pattern = r"teacher\.workdirs\[0\]: .* has no language-model head"
    elif case == "init_shape":
        config = _quiet(load_config("smoke"))
        config.data = ml_collections.ConfigDict(exported[3].data.to_dict())
        config.init.workdir = f"hf:{out}"
        config.model.hidden_size = 64
        pattern = r"init\.workdir: .* hidden_size=32 but model\.hidden_size=64"
    else:
        config = _dwt_config(exported, workdirs=(out,))
        pattern = r"teacher\.workdirs\[0\]: .* is a Hugging Face model directory; write it as 'hf:"
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern):
        train.run(config, str(workdir))
    assert not workdir.exists()


def test_export_errors(exported, tmp_path):
    workdir, _, out, _ = exported
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export.export(workdir, out)
    with pytest.raises(ConfigError, match=r"--step=5: .* has no checkpoint 5"):
        export.export(workdir, str(tmp_path / "x"), step=5)
    with pytest.raises(ConfigError, match="not a dwt_jax run"):
        export.export(str(tmp_path), str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_example_config_builds_a_larger_student_of_the_teachers_vocabulary(exported, tmp_path):
    from testutil import REPO_ROOT

    from dwt_jax import experiment
    from dwt_jax.configuration import load_config_file

    _, _, out, base = exported
    path = os.path.join(REPO_ROOT, "configs", "hf_teacher.py")
    config = load_config_file(path, out)
    config.data.tfds_data_dir = base.data.tfds_data_dir
    stages = experiment.plan_stages(config, str(tmp_path))
    assert [name for name, _, _ in stages] == ["student", "baseline"]
    student = stages[0][1]
    assert student.teacher.workdirs == (f"hf:{out}",)
    assert (student.model.vocab_size, student.model.max_len) == (1024, 64)
    assert (student.model.hidden_size, student.model.num_layers) == (64, 4)
    assert stages[1][1].data.tokenizer_path == out  # The baseline uses the same tokens.
    experiment.check_stages(stages)
    with pytest.raises(ValueError, match="needs the teacher's directory after a colon"):
        load_config_file(path, None)
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_config_file(path, str(tmp_path))


def test_hf_sequence_classifier_as_a_finetuning_teacher(
    exported, hf_dirs, tmp_path, data_cache_dir
):
    """A transformers *ForSequenceClassification directory teaches a fine-tuning student;
    its tokenizer is used, and a teacher for another label set is refused."""
    _, _, out, _ = exported
    torch.manual_seed(0)
    teacher = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=1024,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=8,
        )
    )
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(os.path.join(out, name), teacher_dir)
    config = load_config("smoke", name="finetune/base")
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    _quiet(config)
    config.distill.strategy = "avg_teachers"
    config.teacher.workdirs = (f"hf:{teacher_dir}",)
    config.train.update(num_steps=2, eval_every=2)
    config.checkpoint.every_steps = 2
    result = finetune_run.run(config, str(tmp_path / "student"))
    assert result.final_step == 2
    assert np.isfinite(result.eval_metrics["eval/task_loss"])
    vocabularies = []
    for path in (tmp_path / "student" / "tokenizer.json", os.path.join(out, "tokenizer.json")):
        with open(path) as f:
            vocabularies.append(json.load(f)["model"]["vocab"])
    assert vocabularies[0] == vocabularies[1]
    config.teacher.workdirs = (f"hf:{hf_dirs['bert_cls'][0]}",)
    with pytest.raises(ConfigError, match=r"has 3 labels but data\.task='source' has 8"):
        finetune_run.run(config, str(tmp_path / "other"))
    config.teacher.workdirs = (f"hf:{out}",)
    with pytest.raises(ConfigError, match="no sequence-classification head"):
        finetune_run.run(config, str(tmp_path / "mlm"))
    assert not (tmp_path / "other").exists() and not (tmp_path / "mlm").exists()
