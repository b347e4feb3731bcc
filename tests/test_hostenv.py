"""dwt_jax.hostenv: when the entry points restart with huge-page malloc, and when not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testutil import REPO_ROOT

from dwt_jax import hostenv

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only"
)


def test_adds_the_tunable_once_and_keeps_the_others():
    env = hostenv.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    if env is None:
        pytest.skip("not glibc")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostenv.huge_page_environment(env) is None  # Set: no second restart.
    assert hostenv.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert hostenv.huge_page_environment({hostenv.OPT_OUT: "0"}) is None


def test_restart_keeps_the_command_line():
    code = (
        "import os, sys; from dwt_jax import hostenv; hostenv.reexec_with_huge_pages(); "
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", code, "x", "--y=1"], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if hostenv.huge_page_environment(env) is None:
        pytest.skip("not glibc")
    assert out.strip() == "glibc.malloc.hugetlb=1 ['x', '--y=1']"
