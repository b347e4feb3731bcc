"""The top-k teacher cache end to end (docs/methods.md#teacher-caches): a cache at k = V
serves a student that trains as the online one does; a cached run killed and restarted
ends bitwise equal; a cache build killed and restarted writes the same shards; a cache
that does not match the run is refused before anything trains."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from kill_helpers import (
    assert_same_state,
    deterministic_metrics,
    env,
    interrupted_run,
    restore_state,
    run,
)
from testutil import REPO_ROOT

from dwt_jax.data import teacher_cache
from dwt_jax.metrics import read_metrics

STEPS = 6
VOCAB = 512  # configs/causal.py:smoke's model.vocab_size.
COMMON = [
    "--config=configs/causal.py:smoke",
    f"--config.train.num_steps={STEPS}",
    "--config.log.tensorboard=False",
]
STUDENT = [
    *COMMON,
    "--config.baseline.enabled=False",
    "--config.distill.alpha_s.name=constant",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=3",
]


def _cache_argv(workdir: str, teacher: str, data: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dwt_jax.cache_teacher",
        *COMMON,
        f"--config.teacher.workdirs=('{teacher}',)",
        f"--config.cache.top_k={VOCAB}",
        "--config.cache.dtype=float32",
        "--config.cache.batches_per_shard=2",
        *extra,
        f"--workdir={workdir}",
        f"--config.data.tfds_data_dir={data}/tfds",
        f"--config.data.tokenizer_cache_dir={data}/tokenizers",
    ]


def _build(workdir: str, teacher: str, data: str, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _cache_argv(workdir, teacher, data, *extra),
        cwd=REPO_ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_cache_dir):
    """A smoke decoder teacher (the pipeline's teacher stage)."""
    workdir = str(tmp_path_factory.mktemp("cache_teacher"))
    run([*STUDENT, f"--config.teacher.num_steps={STEPS}"], workdir, data_cache_dir)
    return os.path.join(workdir, "teacher")


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, teacher, data_cache_dir):
    """The teacher's cache at k = V (float32): 3 shards of 2 batches."""
    workdir = str(tmp_path_factory.mktemp("full_cache"))
    result = _build(workdir, teacher, data_cache_dir)
    return workdir, result


@pytest.fixture(scope="module")
def online_student(tmp_path_factory, teacher, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("online_student"))
    run([*STUDENT, f"--config.teacher.workdirs=('{teacher}',)"], workdir, data_cache_dir)
    return workdir


@pytest.fixture(scope="module")
def cached_student(tmp_path_factory, full_cache, data_cache_dir):
    workdir = str(tmp_path_factory.mktemp("cached_student"))
    result = run([*STUDENT, f"--config.teacher.cache={full_cache[0]}"], workdir, data_cache_dir)
    return workdir, result


def test_the_build_reports_progress_and_storage(full_cache):
    workdir, result = full_cache
    assert "dwt_jax: cache shard 1/3:" in result.stdout and "positions/s" in result.stdout
    per_position = VOCAB * (4 + 2) + 8  # float32 log-probs, uint16 ids, tail, label.
    assert f"{per_position:.1f} bytes per position" in result.stdout
    manifest = teacher_cache.read_manifest(workdir, "test")
    assert manifest["num_batches"] == STEPS and manifest["top_k"] == VOCAB
    assert set(manifest["teacher_eval"]) >= {"loss", "perplexity"}
    assert manifest["identity"]["length"] == {"data.seq_len": 64}


def test_a_student_from_the_full_cache_trains_as_the_online_one(online_student, cached_student):
    """k = V: the same loss and soft term at every step (within 1e-5), and the same
    parameters at the end within the sharded-step tests' tolerance; no teacher runs."""
    cached, result = cached_student
    assert "cached: " in result.stdout and "no forward pass" in result.stdout
    online_lines = {m["step"]: m for m in read_metrics(online_student) if "train/loss" in m}
    cached_lines = {m["step"]: m for m in read_metrics(cached) if "train/loss" in m}
    assert sorted(online_lines) == sorted(cached_lines) == list(range(1, STEPS + 1))
    for step, online in online_lines.items():
        assert cached_lines[step]["train/loss"] == pytest.approx(online["train/loss"], abs=1e-5)
        assert cached_lines[step]["distill/kl"] == pytest.approx(online["distill/kl"], abs=1e-5)
    a = restore_state(online_student, STEPS)["params"]["student"]
    b = restore_state(cached, STEPS)["params"]["student"]
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_a_cached_run_killed_and_restarted_ends_bitwise_equal(
    cached_student, full_cache, data_cache_dir, tmp_path
):
    straight, _ = cached_student
    workdir = str(tmp_path / "killed")
    args = [*STUDENT, f"--config.teacher.cache={full_cache[0]}"]
    # SIGKILL only: a six-step run may end before a SIGTERM is seen.
    plan = [(signal.SIGKILL, "step"), (signal.SIGKILL, "saving")]
    endings = interrupted_run(args, workdir, workdir, data_cache_dir, plan, seed=3)
    assert len(endings) >= 2, endings
    assert_same_state(straight, workdir, STEPS)
    assert deterministic_metrics(workdir) == deterministic_metrics(straight), endings


def test_a_build_killed_and_restarted_writes_the_same_shards(
    full_cache, teacher, data_cache_dir, tmp_path
):
    workdir = str(tmp_path / "cache")
    proc = subprocess.Popen(
        _cache_argv(workdir, teacher, data_cache_dir),
        cwd=REPO_ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = os.path.join(workdir, "shards", teacher_cache.shard_name(0, 0) + ".json")
    deadline = time.monotonic() + 300
    while proc.poll() is None and not os.path.exists(first) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert os.path.exists(first)
    result = _build(workdir, teacher, data_cache_dir)
    assert "cache shard 1/3" not in result.stdout  # Shard 0 was kept, not rewritten.
    names = sorted(os.listdir(os.path.join(full_cache[0], "shards")))
    assert sorted(os.listdir(os.path.join(workdir, "shards"))) == names
    for name in names:
        assert filecmp.cmp(
            os.path.join(full_cache[0], "shards", name),
            os.path.join(workdir, "shards", name),
            shallow=False,
        ), name


def _refused(args: list[str], workdir: str, data: str) -> str:
    """Runs the student CLI, expecting exit 2 and one error line before any training."""
    from kill_helpers import argv

    result = subprocess.run(
        argv(args, workdir, data), cwd=REPO_ROOT, env=env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("dwt_jax: error: "), result.stderr[-3000:]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints"))
    return lines[0]


def _edited_copy(cache: str, tmp_path, edit) -> str:
    copy = str(tmp_path / "edited")
    shutil.copytree(cache, copy)
    path = os.path.join(copy, teacher_cache.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return copy


def _student_config(data: str, cache: str):
    """STUDENT's config, in this process, reading ``cache``."""
    from testutil import load_config

    config = load_config("smoke", name="causal")
    config.data.tfds_data_dir = os.path.join(data, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data, "tokenizers")
    config.train.num_steps = STEPS
    config.log.tensorboard = False
    config.baseline.enabled = False
    config.distill.alpha_s.name = "constant"
    config.teacher.cache = cache
    return config


def _refused_here(config, workdir: str) -> str:
    """The run refused in this process: one line, before anything is trained."""
    from dwt_jax import experiment
    from dwt_jax.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        experiment.run(config, workdir)
    message = str(caught.value)
    assert "\n" not in message
    assert not os.path.isdir(os.path.join(workdir, "checkpoints"))
    return message


def test_a_cache_for_another_tokenizer_is_refused_by_the_cli(full_cache, data_cache_dir, tmp_path):
    line = _refused(
        [*STUDENT, f"--config.teacher.cache={full_cache[0]}", "--config.data.vocab_size=400"],
        str(tmp_path / "run"),
        data_cache_dir,
    )
    assert "another tokenizer" in line and full_cache[0] in line, line


def _set(path: str, value):
    def edit(config):
        *sections, key = path.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[key] = value

    return edit


@pytest.mark.parametrize(
    "what, edit, expected",
    [
        ("data", _set("seed", 7), "does not match this run's data"),
        ("length", _set("data.seq_len", 32), "does not match this run's length"),
        ("temperature", _set("distill.tau.value", 2.0), "temperature"),
        ("steps", _set("train.num_steps", STEPS + 2), "holds 6 batches"),
        ("remap", _set("teacher.student_init", "remap"), "is a cache (no weights)"),
    ],
)
def test_a_cache_for_another_run_is_refused(
    what, edit, expected, full_cache, data_cache_dir, tmp_path
):
    config = _student_config(data_cache_dir, full_cache[0])
    edit(config)
    message = _refused_here(config, str(tmp_path / "run"))
    assert expected in message and full_cache[0] in message, (what, message)


def test_a_cache_with_other_masking_is_refused(full_cache, data_cache_dir, tmp_path):
    def edit(manifest):
        manifest["identity"]["masking"]["objective"] = "mlm"

    cache = _edited_copy(full_cache[0], tmp_path, edit)
    message = _refused_here(_student_config(data_cache_dir, cache), str(tmp_path / "r"))
    assert "masking" in message and "objective='mlm'" in message, message


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_cache_is_refused(damage, full_cache, data_cache_dir, tmp_path):
    cache = _edited_copy(full_cache[0], tmp_path, lambda manifest: None)
    shard = os.path.join(cache, "shards", teacher_cache.shard_name(0, 1) + ".array_record")
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    else:
        os.remove(shard)
    message = _refused_here(_student_config(data_cache_dir, cache), str(tmp_path / "r"))
    assert damage in message and "p00000-s00001.array_record" in message, message


SEVERAL_TEACHERS = """
import importlib.util

_spec = importlib.util.spec_from_file_location("causal", {path!r})
_causal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_causal)


def get_config(variant=None):
    config = _causal.get_config(variant)
    small = config.teacher.model.copy_and_resolve_references()
    smaller = small.copy_and_resolve_references()
    smaller.num_layers = 1
    config.teacher.models = (small, smaller)
    return config
"""


def test_several_teachers_trained_first_then_mixed_per_token(tmp_path, full_cache, data_cache_dir):
    """teacher.models: the pipeline pre-trains each teacher, then the student learns from
    both and the cache, weighted per token by its uncertainty ('dynamic'); the weights
    are logged per teacher and sum to 1."""
    config = tmp_path / "several.py"
    config.write_text(SEVERAL_TEACHERS.format(path=os.path.join(REPO_ROOT, "configs", "causal.py")))
    workdir = str(tmp_path / "run")
    result = run(
        [
            f"--config={config}:smoke",
            "--config.train.num_steps=4",
            "--config.teacher.num_steps=2",
            "--config.log.tensorboard=False",
            "--config.baseline.enabled=False",
            "--config.distill.teacher_weighting=dynamic",
        ],
        workdir,
        data_cache_dir,
    )
    assert "teacher0 finished at step 2" in result.stdout
    assert "teacher1 finished at step 2" in result.stdout
    lines = [m for m in read_metrics(os.path.join(workdir, "student")) if "train/loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert m["distill/weight0"] + m["distill/weight1"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < m["distill/uncertainty"] <= 1.0
    # A cached teacher next to a teacher that runs: the cache's 6 batches cover 4 steps.
    both = run(
        [
            *STUDENT[:1],
            "--config.train.num_steps=4",
            "--config.log.tensorboard=False",
            "--config.baseline.enabled=False",
            "--config.distill.alpha_s.name=constant",
            f"--config.teacher.workdirs=('{os.path.join(workdir, 'teacher0')}',)",
            f"--config.teacher.cache={full_cache[0]}",
            "--config.distill.teacher_weighting=ca_mkd",
        ],
        str(tmp_path / "both"),
        data_cache_dir,
    )
    assert "no forward pass" in both.stdout
    mixed = [m for m in read_metrics(str(tmp_path / "both")) if "train/loss" in m]
    assert all(m["distill/weight0"] + m["distill/weight1"] == pytest.approx(1.0) for m in mixed)


def test_a_masked_lm_cache_serves_a_bert_student(data_cache_dir, tmp_path):
    """BERT: the cache holds the masked slots ([B, max_predictions, k]) of the student's
    own masking, and a student trains from it with no teacher forward pass."""
    from testutil import load_config

    from dwt_jax import cache_teacher, experiment, train

    smoke_config = load_config("smoke", name="base")
    smoke_config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    smoke_config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    smoke_config.baseline.enabled = False
    teacher = smoke_config.copy_and_resolve_references()
    teacher.distill.strategy = "mlm"
    teacher.teacher.workdirs = ()
    teacher.train.update(num_steps=2, eval_every=2)
    teacher.checkpoint.every_steps = 2
    teacher.log.tensorboard = False
    train.run(teacher, str(tmp_path / "teacher"))

    config = smoke_config.copy_and_resolve_references()
    config.train.update(num_steps=2, eval_every=2)
    config.checkpoint.every_steps = 2
    config.log.tensorboard = False
    config.teacher.workdirs = (str(tmp_path / "teacher"),)
    config.cache.update(top_k=16, batches_per_shard=1)
    cache = str(tmp_path / "cache")
    cache_teacher.build(cache_teacher.plan_cache(config, cache), cache, lambda line: None)
    manifest = teacher_cache.read_manifest(cache, "test")
    assert manifest["identity"]["masking"]["objective"] == "mlm"
    assert manifest["positions_per_row"] == config.data.max_predictions
    reader = teacher_cache.CacheReader(cache, manifest, 0)
    first = reader.batch(0)
    assert first["ids"].shape == (config.data.batch_size, config.data.max_predictions, 16)
    np.testing.assert_allclose(
        np.exp(first["logp"]).sum(-1) + first["tail"], 1.0, atol=2e-3
    )  # float16 log-probabilities

    config.teacher.workdirs = ()
    config.teacher.cache = cache
    results = experiment.run(config, str(tmp_path / "student"))
    assert results["run"].final_step == 2
    lines = [m for m in read_metrics(str(tmp_path / "student")) if "train/loss" in m]
    assert all(m["distill/kl"] >= 0 for m in lines)


def test_gap_compares_the_student_with_the_best_of_several_teachers():
    from dwt_jax.driver import teacher_loss

    assert teacher_loss({"teacher/loss": 5.0, "eval/loss": 4.0}, "loss") == 5.0
    several = {"teacher0/loss": 5.5, "teacher1/loss": 5.2, "teacher1/accuracy": 0.3}
    assert teacher_loss(several, "loss") == 5.2
    assert teacher_loss({"eval/loss": 4.0}, "loss") is None
