"""Host memory settings that must be in place when the process starts.

XLA's CPU runtime allocates each step's temporary buffer (666 MB for the issue-7
benchmark step) with ``malloc``, which glibc serves with a fresh ``mmap`` and returns
with ``munmap``: every step the kernel zero-fills and maps it again, 4 KiB page by
page (~165,000 page faults, 0.2 s of a 1.35 s step on the 2-core benchmark machine).
With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc asks for
transparent huge pages on those mappings (``madvise``), 512× fewer faults; the step
then took 1.15 s. Tunables are read when the process starts, so the entry points
re-execute themselves once with the setting added (`reexec_with_huge_pages`).

``DWT_JAX_HUGE_PAGES=0`` turns this off; a ``GLIBC_TUNABLES`` that already sets
``glibc.malloc.hugetlb`` is left as it is. Standard library only: it runs before
anything else is imported.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DWT_JAX_HUGE_PAGES"


def huge_page_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None if this one is already right (or the
    setting is turned off, or this is not Linux with glibc)."""
    if environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with `TUNABLE` set, if needed."""
    env = huge_page_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
