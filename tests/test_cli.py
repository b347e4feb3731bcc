"""Every command line of the package: a bad flag, a missing flag, a bad value, a config
error or an unusable workdir is one ``dwt_jax: error:`` line and exit status 2, with
nothing printed on stdout and nothing written; and a run's terminal shows no library
INFO lines unless ``--verbosity=1`` asks for them.

The bad command lines run in children forked from one driver process (this file run
as a script) that imported every command's module once and never started JAX's
backend, as tests/test_bad_inputs.py does: a fresh interpreter per case would cost
~3 s of imports each on the 2-core machine. Each child runs the command's
``run_cli()``, which is what ``python -m dwt_jax.<command>`` runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
from typing import Any

import cli_forks
import pytest
from testutil import REPO_ROOT

from dwt_jax import cli, logs
from dwt_jax.errors import ConfigError

MODULES = {
    "main": "dwt_jax.main",
    "plan": "dwt_jax.plan",
    "export": "dwt_jax.export",
    "study": "dwt_jax.study",
    "compare": "dwt_jax.finetune.compare",
    "generate": "dwt_jax.generate",
}
PRETRAIN = "configs/pretrain.py:smoke"
FINETUNE = "configs/finetune/base.py:smoke"
LONG_NAME = "n" * 300  # Longer than any Linux filesystem's 255-byte names.
WORKERS = 2
CASE_TIMEOUT_S = 120.0
INFO_LINE = re.compile(r"^I\d{4} |INFO")  # absl's INFO format, or Python's.


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad command line of ``command``: ``{case}`` is the case's own empty
    directory (nothing may appear in it), ``{unwritable}`` a directory this process
    cannot write; the error line must contain ``field``."""

    name: str
    command: str
    field: str
    args: tuple[str, ...]


def _required(command: str) -> tuple[str, ...]:
    """Good values of the command's required flags."""
    data = (
        "--config.data.tfds_data_dir={data}/tfds",
        "--config.data.tokenizer_cache_dir={data}/tok",
    )
    return {
        "main": (f"--config={PRETRAIN}", "--workdir={case}/run", *data),
        "plan": (f"--config={PRETRAIN}",),
        "export": ("--workdir={case}/no_such_run", "--out={case}/hf"),
        "study": ("--workdir={case}/run",),
        "compare": (f"--config={FINETUNE}", "--workdir={case}/run", *data),
        "generate": ("--workdir={case}/no_such_run", "--prompt=hi"),
    }[command]


BAD_VALUES = {
    "main": ("--num_processes", "--num_processes=two"),
    "plan": ("--devices", "--devices=abc"),
    "export": ("--step", "--step=abc"),
    "study": ("--quick", "--quick=maybe"),
    "compare": ("data.batch_size", "--config.data.batch_size=abc"),
    "generate": ("--top_k", "--top_k=abc"),
}
MISSING = {"main": "--workdir", "plan": "--config", "export": "--out", "study": "--workdir"}
MISSING["compare"] = "--config"
MISSING["generate"] = "--prompt"
CONFIG_ERRORS = {  # A ConfigError raised once the flags are parsed.
    "main": ("model.num_heads", ("--config.model.num_heads=3",)),
    "plan": ("--devices", ("--devices=0",)),
    "export": ("--workdir", ()),  # The run to export does not exist.
    "study": (
        "study.reference_teacher",
        ("--config=configs/study/dwt_study.py:quick", "--config.study.reference_teacher=99"),
    ),
    "compare": ("--config", ("--config=configs/pretrain.py:smoke",)),
    "generate": ("--workdir", ()),  # The run to sample from does not exist.
}
BAD_WORKDIRS = {
    "object_store": "gs://dwt-cli-test-bucket/run",
    "unwritable": "{unwritable}/run",
    "file_component": "{case}/a_file/run",
    "file_itself": "{case}/a_file",
    "name_too_long": "{case}/" + LONG_NAME,
}


def _without(args: tuple[str, ...], flag: str) -> tuple[str, ...]:
    return tuple(a for a in args if not a.startswith(f"{flag}="))


def _replace(args: tuple[str, ...], new: str) -> tuple[str, ...]:
    """``args`` with ``new`` in place of the flag it sets (in its place: a config's
    overrides must follow it), or ``args`` if that flag is not among them."""
    flag = new.split("=", 1)[0]
    return tuple(new if a.split("=", 1)[0] == flag else a for a in args)


def _cases() -> list[Case]:
    cases = []
    for command in MODULES:
        required = _required(command)
        cases.append(Case(f"{command}_unknown_flag", command, "--bogus", (*required, "--bogus=1")))
        cases.append(
            Case(f"{command}_misspelt_flag", command, "--workdr", (*required, "--workdr=x"))
        )
        missing = MISSING[command]
        given = _without(required, missing)
        if missing == "--config":  # Its overrides go with it.
            given = tuple(a for a in given if not a.startswith("--config."))
        cases.append(Case(f"{command}_missing_flag", command, missing, given))
        if command not in ("export", "generate"):  # The commands with a --config file.
            config = f"--config={FINETUNE if command == 'compare' else PRETRAIN}"
            first = ("--config.seed=1", config, *_without(required, "--config"))
            cases.append(Case(f"{command}_override_first", command, "comes before --config", first))
        field, arg = BAD_VALUES[command]
        cases.append(Case(f"{command}_bad_value", command, field, (*required, arg)))
        field, args = CONFIG_ERRORS[command]
        given = required
        for arg in args:
            replaced = _replace(given, arg)
            given = replaced if replaced != given else (*given, arg)
        cases.append(Case(f"{command}_config_error", command, field, given))
        cases.append(Case(f"{command}_stray_argument", command, "stray", (*required, "stray")))
    for command in ("study", "compare", "main"):
        for kind, workdir in BAD_WORKDIRS.items():
            args = (*_without(_required(command), "--workdir"), f"--workdir={workdir}")
            cases.append(Case(f"{command}_workdir_{kind}", command, "--workdir", args))
    for name, file in (("syntax_error", "syntax_error.py"), ("raises", "raises.py")):
        for command in ("plan", "study"):
            args = (*_without(_required(command), "--config"), f"--config={{tmp}}/{file}")
            cases.append(Case(f"{command}_config_file_{name}", command, file, args))
    cases.append(
        Case(
            "study_override_without_config",
            "study",
            "no --config is given",
            (*_required("study"), "--config.seed=1"),
        )
    )
    cases.append(
        Case("export_out_object_store", "export", "--out", ("--workdir={case}", "--out=gs://b/hf"))
    )
    cases.append(
        Case(
            "plan_json_unwritable", "plan", "--json", (f"--config={PRETRAIN}", "--json={case}/x/y")
        )
    )
    return cases


CASES = _cases()


def _unwritable_dir(tmp: str) -> str:
    """A directory this process cannot write: mode 0555, or /proc/self for root."""
    path = os.path.join(tmp, "read_only")
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    return path if not os.access(path, os.W_OK) else "/proc/self"


def _fill(text: str, tmp: str, case: Case, data: str) -> str:
    unwritable = _unwritable_dir(tmp)
    where = os.path.join(tmp, case.name)
    return text.format(case=where, unwritable=unwritable, data=data, tmp=tmp)


BROKEN_CONFIGS = {  # Config files that fail to load: the error names the file and line.
    "syntax_error.py": "def get_config(variant=None)\n    return None\n",
    "raises.py": "def get_config(variant=None):\n    raise RuntimeError('no config today')\n",
}


@pytest.fixture(scope="module")
def battery(tmp_path_factory, data_cache_dir) -> tuple[dict[str, Any], str]:
    """Runs every case (and --helpshort of each command) through the driver."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    for name, text in BROKEN_CONFIGS.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    spec = {}
    for case in CASES:
        os.makedirs(os.path.join(tmp, case.name))
        if "a_file" in " ".join(case.args):
            with open(os.path.join(tmp, case.name, "a_file"), "w") as f:
                f.write("not a directory\n")
        spec[case.name] = {
            "module": MODULES[case.command],
            "argv": [_fill(arg, tmp, case, data_cache_dir) for arg in case.args],
        }
    for command, module in MODULES.items():
        spec[f"{command}_help"] = {"module": module, "argv": ["--helpshort"]}
    return cli_forks.run_cases(spec, tmp, __file__), tmp


def test_every_command_has_every_kind_of_case():
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names)
    for command in MODULES:
        kinds = {n.removeprefix(f"{command}_") for n in names if n.startswith(f"{command}_")}
        assert {"unknown_flag", "missing_flag", "bad_value", "config_error"} <= kinds, command
    for command in ("study", "compare"):
        assert {f"{command}_workdir_{kind}" for kind in BAD_WORKDIRS} <= set(names)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_command_line_is_one_line_exit_2_and_writes_nothing(case, battery):
    results, tmp = battery
    result = results[case.name]
    where = f"case {case.name!r} ({' '.join(result['argv'])[:300]})"
    cli_forks.assert_one_error_line(result, case.field, where)
    stdout = result["stdout"]
    assert stdout == "", f"{where}: printed before refusing\n{stdout[-2000:]}"
    left = sorted(set(os.listdir(os.path.join(tmp, case.name))) - {"a_file"})
    assert left == [], f"{where}: wrote {left}"
    assert not os.path.exists(os.path.join(REPO_ROOT, "gs:")), f"{where}: wrote ./gs:"


@pytest.mark.parametrize("command", list(MODULES))
def test_help_still_works(command, battery):
    result = battery[0][f"{command}_help"]
    assert result["rc"] != 2 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert "--" in result["stdout"] and "dwt_jax: error" not in result["stderr"]


def test_too_long_name_message_says_the_limit(battery):
    line = battery[0]["study_workdir_name_too_long"]["stderr"]
    assert "is 300 characters, longer than the filesystem allows (255)" in line
    assert "choose a shorter name" in line


def test_check_workdir_refuses_each_bad_kind_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    bad = {
        "gs://bucket/run": "object-store URLs are not supported",
        "a_file/run": "is a file, not a directory",
        "a_file": "is a file, not a directory",
        f"run/{LONG_NAME}/x": "300 characters",
        "/" + "/".join(["d" * 200] * 21): "choose a shorter path",
        "": "is empty",
    }
    for workdir, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            cli.check_workdir(workdir)
    with pytest.raises(ConfigError, match="not a writable directory"):
        cli.check_workdir(os.path.join(_unwritable_dir(str(tmp_path)), "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "read_only"]
    cli.check_workdir(str(tmp_path / "new" / "run"))  # Creatable: fine, and not created.
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=r"^--out="):
        cli.check_workdir("gs://b/x", flag="--out")


def test_verbosity_levels():
    assert logs.level_for(-1) == logs.level_for(0) == logging.WARNING
    assert logs.level_for(1) == logging.INFO and logs.level_for(2) == logging.DEBUG
    assert logs.level_for(-2) == logging.ERROR
    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    before = (root.level, absl_logger.level)
    try:
        assert logs.configure(0) == logging.WARNING
        assert not logging.getLogger("orbax").isEnabledFor(logging.INFO)
        assert not absl_logger.isEnabledFor(logging.INFO)
        assert logs.configure(1) == logging.INFO
        assert logging.getLogger("orbax").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(before[0])
        absl_logger.setLevel(before[1])


def test_quiet_dataset_build_hides_the_first_build(tmp_path, capfd):
    from dwt_jax.data import embedded

    root = logging.getLogger()
    before = root.level
    try:
        logs.configure(0)
        with logs.quiet_dataset_build():
            builder = embedded.embedded_builder(str(tmp_path / "tfds"))
    finally:
        root.setLevel(before)
    out, err = capfd.readouterr()
    assert builder.is_prepared()
    assert "Downloading and preparing" not in out and "examples/s" not in err, out + err
    assert "dataset_info.json" not in err, err


# --- A real run's terminal -----------------------------------------------------------


def _run(args: list[str], data_cache_dir: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"  # Compiles faster; numbers unchecked.
    command = [
        sys.executable,
        "-m",
        "dwt_jax.main",
        f"--config={PRETRAIN}",
        f"--config.data.tfds_data_dir={data_cache_dir}/tfds",
        f"--config.data.tokenizer_cache_dir={data_cache_dir}/tokenizers",
        "--config.optim.decay=constant",  # The schedule must not depend on num_steps.
        *args,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _info_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if INFO_LINE.search(line)]


def test_run_and_resume_print_no_library_info_lines(tmp_path, data_cache_dir):
    """A fresh run (a checkpoint saved at step 3), its resume (restored, to step 4),
    and the finished run again with ``--verbosity=1`` (restored: INFO lines back)."""
    workdir = f"--workdir={tmp_path / 'run'}"
    fresh = _run([workdir, "--config.train.num_steps=3"], data_cache_dir)
    assert "starting from scratch" in fresh.stdout and "finished at step 3" in fresh.stdout
    assert _info_lines(fresh) == [], "\n".join(_info_lines(fresh)[:10])
    resumed = _run([workdir, "--config.train.num_steps=4"], data_cache_dir)
    assert "resuming at step 3" in resumed.stdout and "finished at step 4" in resumed.stdout
    assert _info_lines(resumed) == [], "\n".join(_info_lines(resumed)[:10])
    verbose = _run([workdir, "--config.train.num_steps=4", "--verbosity=1"], data_cache_dir)
    assert any(line.startswith("I") for line in _info_lines(verbose)), verbose.stderr[-2000:]


# --- The driver (this file run as a script) -------------------------------------------


if __name__ == "__main__":
    cli_forks.drive(sys.argv[1], sys.argv[2], MODULES.values(), WORKERS, CASE_TIMEOUT_S)
