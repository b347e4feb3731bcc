"""Hugging Face decoders in real runs: a decoder run exported to a transformers
directory comes back as the teacher of configs/hf_causal_teacher.py, whose student is
grown from it without changing its function (depth 'identity', width
'hypercloning': the grown student's held-out loss before training is the teacher's),
then trained with DWT."""

from __future__ import annotations

import math
import os

import pytest
from testutil import REPO_ROOT, load_config

from dwt_jax import experiment, export, train
from dwt_jax.configuration import load_config_file


def _with_cache(config, data_cache_dir):
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    config.log.progress = False
    config.log.tensorboard = False
    return config


@pytest.fixture(scope="module")
def exported_decoder(tmp_path_factory, data_cache_dir):
    """A 4-step Llama run of configs/causal.py:smoke alone, exported for transformers."""
    root = tmp_path_factory.mktemp("hf_decoder_runs")
    config = _with_cache(load_config("smoke", name="causal"), data_cache_dir)
    config.distill.strategy = "clm"
    config.teacher.workdirs = ()
    config.train.update(num_steps=4, eval_every=4)
    config.checkpoint.every_steps = 4
    workdir, out = str(root / "run"), str(root / "hf")
    train.run(config, workdir)
    files = export.export(workdir, out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    return out


def test_example_config_grows_the_hf_teacher_without_changing_its_function(
    exported_decoder, data_cache_dir, tmp_path
):
    path = os.path.join(REPO_ROOT, "configs", "hf_causal_teacher.py")
    config = _with_cache(load_config_file(path, exported_decoder), data_cache_dir)
    stages = experiment.plan_stages(config, str(tmp_path))
    assert [name for name, _, _ in stages] == ["student", "baseline"]
    student = stages[0][1]
    assert student.teacher.workdirs == (f"hf:{exported_decoder}",)
    assert (student.model.hidden_size, student.model.num_layers) == (64, 4)
    assert (student.model.num_heads, student.model.num_kv_heads) == (8, 4)
    assert stages[1][1].data.tokenizer_path == exported_decoder
    experiment.check_stages(stages)

    # The student stage alone, at a learning rate too small to move the weights: its
    # held-out loss is the teacher's (the growth is exact), then DWT trains it.
    student.train.update(num_steps=2, eval_every=2)
    student.checkpoint.every_steps = 2
    student.optim.update(learning_rate=1e-9, warmup_steps=0)
    result = train.run(student, str(tmp_path / "grown"))
    metrics = result.eval_metrics
    assert metrics["eval/loss"] == pytest.approx(metrics["teacher/loss"], abs=1e-4)
    assert metrics["eval/bits_per_byte"] == pytest.approx(
        metrics["teacher/bits_per_byte"], abs=1e-4
    )
    assert math.isfinite(metrics["eval/perplexity"])
    with pytest.raises(ValueError, match="needs the teacher's directory after a colon"):
        load_config_file(path, None)


def test_a_cache_built_from_a_hugging_face_teacher_serves_a_student(
    exported_decoder, data_cache_dir, tmp_path
):
    """python -m dwt_jax.cache_teacher's code with ``hf:DIR`` as the teacher (its
    tokenizer becomes the run's), then a student that reads the cache and trains."""
    from dwt_jax import cache_teacher
    from dwt_jax.data import teacher_cache

    config = _with_cache(load_config("smoke", name="causal"), data_cache_dir)
    config.teacher.workdirs = (f"hf:{exported_decoder}",)
    config.train.update(num_steps=2, eval_every=2)
    config.checkpoint.every_steps = 2
    config.baseline.enabled = False
    config.cache.update(top_k=8, batches_per_shard=1)
    cache = str(tmp_path / "cache")
    lines: list[str] = []
    summary = cache_teacher.build(cache_teacher.plan_cache(config, cache), cache, lines.append)
    assert summary["shards_written"] == 2 and summary["bytes_per_position"] == 8 * 4 + 8
    assert any("positions/s" in line for line in lines)
    manifest = teacher_cache.read_manifest(cache, "test")
    assert manifest["teacher"]["spec"] == f"hf:{exported_decoder}"
    assert manifest["identity"]["tokenizer"]["sha256"]

    student = _with_cache(load_config("smoke", name="causal"), data_cache_dir)
    student.train.update(num_steps=2, eval_every=2)
    student.checkpoint.every_steps = 2
    student.baseline.enabled = False
    student.teacher.cache = cache
    student.data.tokenizer_path = exported_decoder  # The cache's tokenizer.
    results = experiment.run(student, str(tmp_path / "student"))
    assert results["run"].final_step == 2
    assert "teacher/loss" in results["run"].eval_metrics
