"""Helpers shared by the tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str | None = "smoke", name: str = "pretrain") -> ml_collections.ConfigDict:
    """configs/<name>.py[:variant] as the CLI would load it."""
    from dwt_jax.configuration import load_config_file

    return load_config_file(os.path.join(REPO_ROOT, "configs", f"{name}.py"), variant)
