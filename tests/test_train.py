"""The smoke run end to end, in process and through the CLI; resume and its exactness."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from testutil import REPO_ROOT

from dwt_jax import train
from dwt_jax.configuration import ConfigError
from dwt_jax.metrics import read_metrics

EXPECTED_TRAIN_KEYS = {
    "train/loss",
    "train/mlm_loss",
    "train/mlm_accuracy",
    "optim/lr",
    "grads/global_norm",
    "perf/tokens_per_s",
}
EXPECTED_EVAL_KEYS = {"eval/mlm_loss", "eval/mlm_accuracy", "eval/perplexity"}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, data_cache_dir):
    """Smoke run to step 6, then the same command with num_steps=9 (a resume)."""
    from testutil import load_config

    workdir = str(tmp_path_factory.mktemp("resumed"))

    def config(num_steps):
        c = load_config("smoke")
        c.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
        c.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
        c.train.num_steps = num_steps
        c.optim.decay = "constant"  # The schedule must not depend on num_steps here.
        return c

    first = train.run(config(6), workdir)
    lines_after_first = len(read_metrics(workdir))
    second = train.run(config(9), workdir)
    return workdir, first, second, lines_after_first, config


def test_smoke_run_writes_metrics_events_and_checkpoints(resumed_run):
    workdir, first, _, lines_after_first, _ = resumed_run
    assert (first.start_step, first.final_step) == (0, 6)
    lines = read_metrics(workdir)[:lines_after_first]
    train_lines = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4, 5, 6]
    assert set(train_lines[-1]) >= EXPECTED_TRAIN_KEYS
    eval_lines = [line for line in lines if "eval/mlm_loss" in line]
    assert [line["step"] for line in eval_lines] == [3, 6]
    assert set(eval_lines[-1]) >= EXPECTED_EVAL_KEYS
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    for name in ("config.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(workdir, name))


def test_second_invocation_resumes_from_the_saved_step(resumed_run):
    workdir, _, second, lines_after_first, _ = resumed_run
    assert (second.start_step, second.final_step) == (6, 9)
    new_steps = [line["step"] for line in read_metrics(workdir)[lines_after_first:]]
    assert min(new_steps) == 7 and max(new_steps) == 9
    steps_saved = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*"))
    assert steps_saved[-1] == 9


def test_resumed_run_equals_uninterrupted_run(resumed_run, tmp_path):
    """Same data position, RNG and optimiser state after a resume: identical metrics.

    (With a decaying schedule the two would differ by design: the schedule spans
    ``train.num_steps``, which the second invocation raised.)
    """
    workdir, _, second, _, config = resumed_run
    straight = train.run(config(9), str(tmp_path))
    assert straight.eval_metrics == second.eval_metrics
    resumed_lines = {
        (line["step"], k): v for line in read_metrics(workdir) for k, v in line.items()
    }
    for line in read_metrics(str(tmp_path)):
        if "train/loss" in line:
            assert line["train/loss"] == resumed_lines[(line["step"], "train/loss")], line["step"]


def _cli_command(args, data_cache_dir):
    """(argv, env) of the CLI on one device (as a user runs it) with the test data cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cache = [
        f"--config.data.tfds_data_dir={data_cache_dir}/tfds",
        f"--config.data.tokenizer_cache_dir={data_cache_dir}/tokenizers",
    ]
    return [sys.executable, "-m", "dwt_jax.main", *args, *cache], env


def _cli(args, data_cache_dir):
    argv, env = _cli_command(args, data_cache_dir)
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_smoke_run(tmp_path, data_cache_dir):
    workdir = tmp_path / "cli"
    result = _cli(
        [
            "--config=configs/pretrain.py:smoke",
            f"--workdir={workdir}",
            "--config.train.num_steps=4",
        ],
        data_cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 4" in result.stdout
    assert "parameters" in result.stdout


def test_cli_bad_config_is_one_line_and_writes_nothing(tmp_path, data_cache_dir):
    workdir = tmp_path / "bad"
    result = _cli(
        [
            "--config=configs/pretrain.py:smoke",
            f"--workdir={workdir}",
            "--config.model.hidden_size=31",
        ],
        data_cache_dir,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("dwt_jax: error")]
    assert len(errors) == 1 and "model.hidden_size" in errors[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("data.tfds_name", {"source": "tfds", "tfds_name": "no_such_dataset_xyz"}),
        ("data.text_files", {"source": "text_files", "text_files": ("/nonexistent/*.txt",)}),
    ],
)
def test_missing_data_is_a_config_error_before_the_workdir_exists(
    smoke_config, tmp_path, field, overrides
):
    smoke_config.data.update(overrides)
    workdir = tmp_path / "never_created"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train.run(smoke_config, str(workdir))
    assert not workdir.exists()


def test_unwritable_workdir_is_a_config_error(smoke_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--workdir"):
        train.run(smoke_config, str(blocker / "run"))


def test_object_store_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A gs:// workdir would otherwise become a local './gs:/...' directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="object-store URLs are not supported"):
        train.check_workdir("gs://bucket/runs/base")
    assert list(tmp_path.iterdir()) == []
