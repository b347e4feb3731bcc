"""Config files: loading ``get_config(variant)`` by path, copying, and what a config is.

Configs are Python files (``configs/base.py:smoke``), not a package, so one config
can build on another wherever it is run from. A config file that cannot be read or
run (a syntax error, an exception in ``get_config``) is a ``ConfigError`` naming the
file and the line, never a traceback. The shipped reference configs set every field
a run reads: `dwt_jax.schema` takes each field's kind from them, and
`fields_as_in` names a missing field as they have it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from dwt_jax.errors import ConfigError

# The shipped configs that set every field a run reads.
PRETRAIN_REFERENCE = "configs/base.py"
FINETUNE_REFERENCE = "configs/finetune/base.py"
REFERENCES = (PRETRAIN_REFERENCE, FINETUNE_REFERENCE)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FINETUNE_MODE = "finetune"


def is_finetune(config: Any) -> bool:
    """Whether ``config`` describes fine-tuning (``mode='finetune'``) or pre-training."""
    return config.get("mode", "pretrain") == FINETUNE_MODE


def _where(error: BaseException, path: str) -> str:
    """'line N' of ``path`` where ``error`` was raised (or the syntax error sits)."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    return f"line {frames[-1].lineno}" if frames else "get_config"


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of a config file, loaded by path.

    Any failure to read or run it is a one-line ``ConfigError`` naming the file.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found; pass --config=<path to a config>.")
    name = "dwt_jax_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get_config = module.get_config
        config = get_config(variant)
    except ConfigError:
        raise
    except AttributeError as e:
        if "get_config" in str(e):
            raise ConfigError(
                f"config file {path} has no get_config(); define get_config(variant=None) "
                "returning an ml_collections.ConfigDict."
            ) from None
        raise _file_error(path, e) from None
    except Exception as e:
        raise _file_error(path, e) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"config file {path}: get_config() returned {type(config).__name__}, not a "
            "ConfigDict; return the config from get_config()."
        )
    return config


def _file_error(path: str, error: BaseException) -> ConfigError:
    message = " ".join(str(getattr(error, "msg", None) or error).split()) or "no message"
    return ConfigError(
        f"config file {path} failed at {_where(error, os.path.abspath(path))}: "
        f"{type(error).__name__}: {message}; fix the file."
    )


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy (a stage's config never writes into the user's)."""
    return ml_collections.ConfigDict(config.to_dict())


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of nested ConfigDicts."""
    if not isinstance(node, ml_collections.ConfigDict):
        return [prefix]
    return [
        p for key in node for p in leaf_paths(node[key], f"{prefix}{'.' if prefix else ''}{key}")
    ]


def lookup(config: Any, path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted ``path`` in nested ConfigDicts / mappings."""
    node = config
    for part in path.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def load_reference(reference: str) -> ml_collections.ConfigDict | None:
    """A shipped reference config (None outside a checkout of the repository)."""
    path = os.path.join(REPO, reference)
    return load_config_file(path, None) if os.path.isfile(path) else None


@contextlib.contextmanager
def fields_as_in(config: ml_collections.ConfigDict, reference: str) -> Iterator[None]:
    """Turns a field the config lacks (an AttributeError / KeyError while reading it)
    into a ConfigError naming the field as the ``reference`` config has it; other
    such errors pass through."""
    try:
        yield
    except (AttributeError, KeyError) as e:
        names = re.findall(r"'(\w+)'", str(e))
        if not names:
            raise
        try:
            shipped = load_reference(reference)
        except ConfigError:
            shipped = None
        if shipped is None:
            raise
        missing = [
            p
            for p in leaf_paths(shipped)
            if p.split(".")[-1] == names[0] and not lookup(config, p)[0]
        ]
        if not missing:
            raise
        _, value = lookup(shipped, missing[0])
        raise ConfigError(
            f"{missing[0]} is missing from the config; add it ({reference} sets "
            f"{missing[0]}={value!r})."
        ) from None
