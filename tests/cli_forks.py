"""Command lines run in children forked from one driver process.

A fresh interpreter per bad command line would cost ~3 s of imports each on the
2-core machine; the driver (a test file run as a script) imports the package once
and forks a child per case, ``workers`` at a time. Each case of the spec is
``{"argv": [...], "module": "dwt_jax.main", "env": {...}}`` (module and env
optional); the results are its exit status, stdout, stderr and seconds.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any, NoReturn

MAIN = "dwt_jax.main"


def run_in_child(module: str, argv: list[str], env: dict[str, str], out: str) -> NoReturn:
    """Runs ``module``'s command line with ``argv`` in this forked process, its output
    in ``<out>.stdout`` / ``<out>.stderr``; never returns."""
    code = 1
    try:
        for fd, suffix in ((1, "stdout"), (2, "stderr")):
            target = os.open(f"{out}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)
        os.environ.update(env)
        sys.argv = [module.replace(".", "/") + ".py", *argv]
        try:
            importlib.import_module(module).run_cli()
            code = 0
        except SystemExit as e:  # As the interpreter would end.
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def drive(
    spec_file: str,
    results_file: str,
    modules: Iterable[str] = (MAIN,),
    workers: int = 2,
    timeout_s: float = 120.0,
) -> None:
    """Forks a child per case of ``spec_file`` (``workers`` at a time); writes their
    exit statuses and output to ``results_file``."""
    for module in modules:  # Imported once here, in every child for free.
        importlib.import_module(module)
    with open(spec_file) as f:
        spec = json.load(f)
    out_dir = os.path.dirname(results_file)
    pending, running, results = list(spec.items()), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            name, case = pending.pop(0)
            out = os.path.join(out_dir, f"case_{name}")
            pid = os.fork()
            if pid == 0:
                run_in_child(case.get("module", MAIN), case["argv"], case.get("env", {}), out)
            running[pid] = (name, case, out, time.monotonic())
        for pid, (name, case, out, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - start > timeout_s:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            if done:
                del running[pid]
                with open(f"{out}.stdout") as f_out, open(f"{out}.stderr") as f_err:
                    results[name] = {
                        "argv": case["argv"],
                        "rc": os.waitstatus_to_exitcode(status),
                        "stdout": f_out.read(),
                        "stderr": f_err.read(),
                        "seconds": time.monotonic() - start,
                    }
        time.sleep(0.01)
    with open(results_file, "w") as f:
        json.dump(results, f, indent=1)


def run_cases(spec: dict[str, Any], tmp: str, script: str) -> dict[str, Any]:
    """Runs ``script`` (a test file whose ``__main__`` calls `drive`) on ``spec`` in a
    fresh process from the repository root; returns the results by case."""
    from testutil import REPO_ROOT

    from dwt_jax import hostenv

    spec_file, results_file = os.path.join(tmp, "spec.json"), os.path.join(tmp, "results.json")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env = hostenv.huge_page_environment(env) or env  # Set already: children never re-exec.
    driver = subprocess.run(
        [sys.executable, os.path.abspath(script), spec_file, results_file],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if driver.returncode != 0:
        raise AssertionError(f"the driver failed: {driver.stderr[-3000:]}")
    with open(results_file) as f:
        return json.load(f)


def assert_one_error_line(result: dict[str, Any], field: str, where: str) -> None:
    """A refused command line: exit status 2, no traceback, and exactly one stderr line,
    ``dwt_jax: error: ...``, that names ``field``."""
    stderr, stdout = result["stderr"], result["stdout"]
    assert "Traceback" not in stderr + stdout, f"{where}: traceback\n{stderr[-3000:]}"
    assert result["rc"] == 2, f"{where}: exit status {result['rc']}\n{stderr[-3000:]}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"{where}: {len(lines)} stderr lines\n{stderr[-3000:]}"
    assert lines[0].startswith("dwt_jax: error: "), f"{where}: {lines[0]}"
    assert field in lines[0], f"{where}: {field!r} not named in\n{lines[0]}"
