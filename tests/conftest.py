"""Test session set-up: 8 fake CPU devices, and one embedded-corpus cache for all tests.

XLA_FLAGS must be set before jax is imported anywhere, hence here.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

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
