"""Helpers shared by the tests (conftest.py holds the fixtures)."""

from __future__ import annotations

import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(variant: str | None = "smoke", name: str = "pretrain") -> ml_collections.ConfigDict:
    """configs/<name>.py[:variant] as the CLI would load it."""
    from dwt_jax.configuration import load_config_file

    return load_config_file(os.path.join(REPO_ROOT, "configs", f"{name}.py"), variant)


def raises_one_line(call, *parts: str, error: type[Exception] | None = None) -> str:
    """Runs ``call``; asserts it raises ``error`` (default ``ConfigError``) with a
    one-line message holding every part; returns the message."""
    import pytest

    from dwt_jax.errors import ConfigError

    with pytest.raises(error or ConfigError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, (part, message)
    return message
