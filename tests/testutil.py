"""Helpers shared by the tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str | None = "smoke", name: str = "pretrain") -> ml_collections.ConfigDict:
    """configs/<name>.py[:variant] as the CLI would load it."""
    path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"dwt_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
