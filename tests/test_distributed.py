"""Multi-host: finding the processes, and two real processes on this machine running
a DWT step together and a whole training run (checkpoints, resume, process-0 files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from dwt_step_helpers import build_dwt_step, fewer_xla_passes, run_steps
from flax import traverse_util
from testutil import REPO_ROOT

from dwt_jax import distributed
from dwt_jax.configuration import ConfigError

TESTS = os.path.join(REPO_ROOT, "tests")


# -- finding the processes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),  # One TPU VM host.
        ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "tpu_pod"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu_pod"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ],
)
def test_detect_environment(env, expected):
    assert distributed.detect_environment(env, exists=lambda path: False) == expected


def test_a_cloud_tpu_vm_is_a_pod_worker():
    tpu = lambda path: path == "/dev/accel0"
    assert distributed.detect_environment({}, exists=tpu) == "tpu_pod"
    assert distributed.detect_environment({"TPU_SKIP_MDS_QUERY": "1"}, exists=tpu) is None


def test_plan_launch():
    none = {"exists": lambda path: False}
    assert distributed.plan_launch("auto", env={}, **none) is None
    assert distributed.plan_launch("on", env={}, **none).source == "forced"
    mpi = {"OMPI_COMM_WORLD_SIZE": "2"}
    assert distributed.plan_launch("auto", env=mpi, **none).source == "openmpi"
    assert distributed.plan_launch("off", env=mpi, **none) is None
    launch = distributed.plan_launch(
        coordinator_address="h:1234", num_processes=4, process_id=3, env={}
    )
    assert launch == distributed.Launch("explicit", "h:1234", 4, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator_address": "h:1", "num_processes": 2}, "go together"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id=2"),
        ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "needs a port"),
        ({"mode": "off", "coordinator_address": "h:1"}, "contradicts"),
        ({"mode": "maybe"}, "--distributed='maybe' is unknown"),
    ],
)
def test_plan_launch_errors_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        distributed.plan_launch(**kwargs, env={})


# -- two processes ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([TESTS, REPO_ROOT]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # 2 devices per process.
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # As fewer_xla_passes() in this process.
    }


def _run_together(commands: list[list[str]], timeout: float = 240) -> list[str]:
    """Starts the processes at once, waits for all; returns their outputs."""
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cmd in commands
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    return outputs


def test_two_processes_run_a_dwt_step_like_one_device(tmp_path):
    """2 processes × 2 CPU devices, mesh (data=2, fsdp=1, tensor=2) spanning both:
    each process feeds only its own rows; two DWT updates match one device."""
    port = _free_port()
    worker = os.path.join(TESTS, "multihost_worker.py")
    _run_together(
        [[sys.executable, worker, str(i), "2", str(port), str(tmp_path), "2,1,2"] for i in (0, 1)]
    )
    with fewer_xla_passes():
        ref_params, ref_history = run_steps(build_dwt_step(jax.devices()[:1], (1, 1, 1)))
    with open(tmp_path / "history.json") as f:
        history = json.load(f)
    for got, want in zip(history, ref_history, strict=True):
        for name in ("train/loss", "distill/kl", "distill/hidden"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-5, err_msg=name)
    params = np.load(tmp_path / "params.npz")
    ref = traverse_util.flatten_dict(ref_params, sep="/")
    assert set(params.files) == set(ref)
    for path, value in ref.items():
        np.testing.assert_allclose(params[path], value, rtol=1e-4, atol=2e-6, err_msg=path)


def _main_cmd(workdir, cache, port: int, process_id: int, num_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "dwt_jax.main", "--config=configs/pretrain.py:smoke",
        f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", f"--process_id={process_id}",
        f"--config.data.tfds_data_dir={cache}/tfds",
        f"--config.data.tokenizer_cache_dir={cache}/tokenizers",
        f"--config.train.num_steps={num_steps}", "--config.mesh.data=2",
        "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
    ]  # fmt: skip


def test_two_processes_stop_together_on_sigterm_to_one_and_resume(tmp_path, data_cache_dir):
    """A real run on 2 processes (FSDP across them). A pre-emption notice (SIGTERM)
    reaching process 1 only: JAX's pre-emption sync point brings both to the same
    step, both save it and exit 130. Restarted, they resume there; one config, one
    tokenizer, one metrics file written by process 0 with each step once."""
    import signal
    import time

    workdir = tmp_path / "run"
    port = _free_port()
    long_run = ["--config.checkpoint.every_steps=100000", "--config.log.tensorboard=False"]
    procs = [
        subprocess.Popen(
            _main_cmd(workdir, data_cache_dir, port, i, 100000) + long_run,
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 130, out[-4000:]
    assert "Stopped by" in outputs[0]
    saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert len(saved) == 1 and 4 <= saved[0] < 100000, saved
    stop = saved[0]
    port = _free_port()
    outputs = _run_together([_main_cmd(workdir, data_cache_dir, port, i, stop + 2) for i in (0, 1)])
    assert f"resuming at step {stop}" in outputs[0] and "2 process(es)" in outputs[0]
    assert f"finished at step {stop + 2}" in outputs[0]
    assert "finished at step" not in outputs[1]  # Only process 0 reports.
    with open(workdir / "metrics.jsonl") as f:
        train_steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
    assert train_steps == list(range(1, stop + 3))  # Each step once: process 0 writes alone.


def test_two_processes_build_a_cache_and_train_from_it(tmp_path, data_cache_dir):
    """python -m dwt_jax.cache_teacher on 2 processes: each writes its own shards of its
    own rows; a 2-process student then trains from the cache (the same data order)."""
    from testutil import load_config

    from dwt_jax import train
    from dwt_jax.data import teacher_cache

    teacher = load_config("smoke")
    teacher.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    teacher.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    teacher.train.update(num_steps=2, eval_every=2)
    teacher.checkpoint.every_steps = 2
    teacher.log.tensorboard = False
    train.run(teacher, str(tmp_path / "teacher"))
    common = [
        "--config=configs/base.py:smoke",
        f"--config.data.tfds_data_dir={data_cache_dir}/tfds",
        f"--config.data.tokenizer_cache_dir={data_cache_dir}/tokenizers",
        "--config.train.num_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=1", "--num_processes=2", "--config.log.tensorboard=False",
    ]  # fmt: skip
    cache = tmp_path / "cache"
    port = _free_port()
    _run_together([
        [sys.executable, "-m", "dwt_jax.cache_teacher", *common,
         f"--config.teacher.workdirs=('{tmp_path / 'teacher'}',)", "--config.cache.top_k=8",
         "--config.cache.batches_per_shard=2", f"--workdir={cache}",
         f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"]
        for i in (0, 1)
    ])  # fmt: skip
    names = sorted(os.listdir(cache / "shards"))
    assert names == [
        f"{teacher_cache.shard_name(p, s)}.{ext}"
        for p in (0, 1) for s in (0, 1) for ext in ("array_record", "json")
    ]  # fmt: skip
    manifest = teacher_cache.read_manifest(str(cache), "test")
    assert manifest["identity"]["data"]["process count"] == 2
    assert manifest["rows_per_batch"] * 2 == load_config("smoke", name="base").data.batch_size
    port = _free_port()
    outputs = _run_together([
        [sys.executable, "-m", "dwt_jax.main", *common, f"--config.teacher.cache={cache}",
         "--config.baseline.enabled=False", f"--workdir={tmp_path / 'student'}",
         f"--coordinator_address=127.0.0.1:{port}", f"--process_id={i}"]
        for i in (0, 1)
    ])  # fmt: skip
    assert "no forward pass" in outputs[0] and "finished at step 3" in outputs[0]
