"""The kind of every config field, taken from the shipped reference configs.

``configs/base.py`` and ``configs/finetune/base.py`` set every field a run reads;
the kind of a field is the kind of its value there (an integer, a number, True or
False, a string, a list of strings or numbers). A list that is empty in the
reference (``teacher.workdirs = ()``, ``data.text_files = ()``) holds paths or
patterns: a string or a list of strings. Model sections take their kinds from the
``BertConfig`` and ``DecoderConfig`` dataclasses (``model.family`` picks one). There
is no second table to keep in step with the configs.

``validate_types`` runs first on every config, so the range checks after it
compare numbers with numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from dwt_jax.config_files import REFERENCES, leaf_paths, load_reference, lookup
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig
from dwt_jax.models.decoder_config import DecoderConfig
from dwt_jax.models.families import ModelConfig, model_config_from

INT = "an integer"
NUMBER = "a number"
BOOL = "True or False"
STR = "a string"
STRS = "a list of strings"
PATTERNS = "a string or a list of strings"
NUMBERS = "a list of numbers"

# Sections that hold model architectures (typed from BertConfig) or free-form
# entries (a comparison's variants override strategy sections by name).
_MODEL_SECTIONS = ("model", "teacher.model", "teacher.models", "pretrain.model")
_FREE_SECTIONS = ("compare.variants",)

_ANNOTATION_KINDS = {"int": INT, "float": NUMBER, "str": STR, "bool": BOOL}
# Every family's fields; a name both families have is of one kind in both.
MODEL_FIELD_KINDS: dict[str, str] = {
    f.name: _ANNOTATION_KINDS[str(f.type)]
    for config_class in (BertConfig, DecoderConfig)
    for f in dataclasses.fields(config_class)
    if str(f.type) in _ANNOTATION_KINDS
}


def kind_of(value: Any) -> str | None:
    """The kind a reference value declares (None: no kind, e.g. a None default)."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, str):
        return STR
    if isinstance(value, (list, tuple)):
        if not value:
            return PATTERNS
        items = {kind_of(v) for v in value}
        if items <= {INT, NUMBER}:
            return NUMBERS
        return STRS if items == {STR} else None
    return None


def _typed(path: str) -> bool:
    return not any(path == s or path.startswith(s + ".") for s in _MODEL_SECTIONS + _FREE_SECTIONS)


@functools.cache
def field_kinds() -> dict[str, str]:
    """Dotted path → kind of every field the reference configs set (model sections
    aside); a field both set is of the wider kind (a number over an integer)."""
    kinds: dict[str, str] = {}
    for reference in REFERENCES:
        config = load_reference(reference)
        if config is None:  # Installed without the repository's configs: kinds unknown.
            continue
        for path in leaf_paths(config):
            kind = kind_of(lookup(config, path)[1])
            if kind is None or not _typed(path):
                continue
            previous = kinds.setdefault(path, kind)
            if previous != kind and {previous, kind} == {INT, NUMBER}:
                kinds[path] = NUMBER
    return kinds


def _is_kind(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUMBER:
        return number and math.isfinite(value)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STR:
        return isinstance(value, str)
    if kind == PATTERNS and isinstance(value, str):
        return True
    if not isinstance(value, (list, tuple)):
        return False
    item = NUMBER if kind == NUMBERS else STR
    return all(_is_kind(v, item) for v in value)


def _kind_hint(value: Any, kind: str) -> str:
    """What to write instead of ``value`` (the part of the message after the kind)."""
    if kind == INT and isinstance(value, float) and value.is_integer():
        return f"; write {int(value)}"
    if kind in (INT, NUMBER) and isinstance(value, str):
        try:
            number = int(value) if kind == INT else float(value)
        except ValueError:
            return ""
        return f"; write {number} without quotes"
    if kind == BOOL and isinstance(value, str) and value.lower() in ("true", "false"):
        return f"; write {value.capitalize()} without quotes"
    if kind in (STRS, PATTERNS) and isinstance(value, str):
        return f", e.g. ({value!r},)"
    return ""


def a(name: str) -> str:
    """``name`` with its indefinite article ('an int', 'a str')."""
    return f"{'an' if name[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {name}"


def check_kind(value: Any, kind: str, field: str) -> None:
    """A ConfigError unless ``value`` (the setting ``field``) is of ``kind``."""
    if _is_kind(value, kind):
        return
    if kind == NUMBER and isinstance(value, float):
        raise ConfigError(f"{field}={value!r} is not a finite number; set a finite value.")
    raise ConfigError(
        f"{field}={value!r} is {a(type(value).__name__)} but must be "
        f"{kind}{_kind_hint(value, kind)}."
    )


def model_sections(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """(field, section) of every model architecture in the config."""
    sections = []
    if "model" in config:
        sections.append(("model", config.model))
    teacher = config.get("teacher", None)
    if teacher is not None:
        if teacher.get("model", None) is not None:
            sections.append(("teacher.model", teacher.model))
        models = teacher.get("models", None)
        if isinstance(models, (list, tuple)):
            sections += [(f"teacher.models[{k}]", m) for k, m in enumerate(models)]
    return sections


def check_model_kinds(section: Any, field: str) -> None:
    """Every architecture setting of a model section holds a value of its kind."""
    for name, value in section.items():
        if name in MODEL_FIELD_KINDS:
            check_kind(value, MODEL_FIELD_KINDS[name], f"{field}.{name}")


def validate_types(config: ml_collections.ConfigDict) -> None:
    """Every known field that the config sets holds a value of its kind."""
    for path, kind in field_kinds().items():
        found, value = lookup(config, path)
        if found:
            check_kind(value, kind, path)
    for field, section in model_sections(config):
        if not isinstance(section, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(
                f"{field} is {a(type(section).__name__)}; it must be a section of model "
                "settings (a ConfigDict like configs/pretrain.py's model)."
            )
        check_model_kinds(section, field)


def model_config(section: Any, field: str = "model", **extra: Any) -> ModelConfig:
    """The checked config of a model section of its family (``model.family``: a
    ``BertConfig`` or a ``DecoderConfig``; ``extra`` fields set on top, e.g.
    ``num_labels``), errors naming ``field`` (e.g. ``teacher.model``)."""
    check_model_kinds(section, field)
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    try:
        config = model_config_from({**values, **extra})
        config.validate()
    except (TypeError, ValueError) as e:
        message = str(e)
        if field != "model":
            message = message.replace("model.", f"{field}.")
        raise ConfigError(message) from None
    return config
