"""Test session set-up: 8 fake CPU devices, one embedded-corpus cache for all tests, and
one JAX compilation cache for the session.

XLA_FLAGS must be set before jax is imported anywhere, hence here. The compilation
cache is new for every session (a temporary directory), so it only saves the
recompiles of identical programs within one test run: the same smoke models built
by many tests, and by the subprocesses of CLI tests (they inherit the variables).
"""

from __future__ import annotations

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dwt_jax_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import ml_collections
import pytest
from testutil import load_config


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory) -> str:
    """Where the embedded TFDS corpus and trained tokenizers live for the session."""
    return str(tmp_path_factory.mktemp("dwt_cache"))


@pytest.fixture
def smoke_config(data_cache_dir) -> ml_collections.ConfigDict:
    """configs/pretrain.py:smoke with the session's data cache."""
    config = load_config("smoke")
    config.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
    config.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
    return config
