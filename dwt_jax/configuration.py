"""Validation of a run config before any compilation or I/O.

Every check raises :class:`ConfigError` with one line that names the field, the bad
value and what would fix it. ``main`` turns it into that line on stderr and exit
status 2. ``validate_types`` runs first: every known field holds a value of its kind
(an integer, a number, a string, ...), so the range checks after it compare numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from dwt_jax.models.config import BertConfig

KNOWN_SOURCES = ("embedded", "tfds", "text_files")
KNOWN_DECAYS = ("linear", "cosine", "constant")
KNOWN_STUDENT_INITS = ("scratch", "remap")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A config field holds a value the run cannot use."""


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of a config file, loaded by path (configs are files,
    not a package, so one config can build on another wherever it is run from)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found; pass --config=<path to a config>.")
    name = "dwt_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def copy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy (a stage's config never writes into the user's)."""
    return ml_collections.ConfigDict(config.to_dict())


# The shipped configs that set every field a run reads (``fields_as_in``).
PRETRAIN_REFERENCE = "configs/base.py"
FINETUNE_REFERENCE = "configs/finetune/base.py"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of nested ConfigDicts."""
    if not isinstance(node, ml_collections.ConfigDict):
        return [prefix]
    return [p for key in node for p in _paths(node[key], f"{prefix}{'.' if prefix else ''}{key}")]


@contextlib.contextmanager
def fields_as_in(config: ml_collections.ConfigDict, reference: str) -> Iterator[None]:
    """Turns a field the config lacks (an AttributeError / KeyError while reading it)
    into a ConfigError naming the field as the ``reference`` config has it; other
    such errors pass through."""
    try:
        yield
    except (AttributeError, KeyError) as e:
        names = re.findall(r"'(\w+)'", str(e))
        path = os.path.join(_REPO, reference)
        if not names or not os.path.isfile(path):
            raise
        try:
            shipped = load_config_file(path, None)
        except Exception:
            raise e from None
        missing = [
            p for p in _paths(shipped) if p.split(".")[-1] == names[0] and not _lookup(config, p)[0]
        ]
        if not missing:
            raise
        _, value = _lookup(shipped, missing[0])
        raise ConfigError(
            f"{missing[0]} is missing from the config; add it ({reference} sets "
            f"{missing[0]}={value!r})."
        ) from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------
# Kinds of values.

INT = "an integer"
NUMBER = "a number"
BOOL = "True or False"
STR = "a string"
STRS = "a list of strings"
PATTERNS = "a string or a list of strings"
NUMBERS = "a list of numbers"

_SCHEDULE_FIELDS = {"name": STR, "value": NUMBER, "end_value": NUMBER, "steps": INT}
_KD_FIELDS = {"kd": STR, "tau": NUMBER, "kd_weight": NUMBER}

# The kind of every field a run reads (dotted paths; '*' in a section name: each of
# the sections listed after it). Model sections are typed from BertConfig.
FIELD_KINDS: dict[str, str] = {
    "seed": INT,
    "mode": STR,
    "init.workdir": STR,
    "init.fresh_mlm_head": BOOL,
    "teacher.workdirs": STRS,
    "teacher.init_workdirs": STRS,
    "teacher.student_init": STR,
    "teacher.sharding": STR,
    "teacher.num_steps": INT,
    "teacher.remap.depth": STR,
    "teacher.remap.width": STR,
    "teacher.remap.noise_std": NUMBER,
    "distill.strategy": STR,
    "distill.fused_mlm_head": BOOL,
    "distill.vocab_chunk_size": INT,
    "distill.form": STR,
    "distill.alpha_h": NUMBER,
    "distill.hidden_weight": NUMBER,
    "distill.hidden_loss": STR,
    "distill.hidden_layer_map": STR,
    **{f"distill.alpha_s.{k}": v for k, v in _SCHEDULE_FIELDS.items()},
    **{f"distill.tau.{k}": v for k, v in _SCHEDULE_FIELDS.items()},
    **{f"distill.mt_bert.{k}": v for k, v in {**_KD_FIELDS, "hidden_weight": NUMBER}.items()},
    **{
        f"distill.rl_kd.{k}": v
        for k, v in {
            **_KD_FIELDS,
            "alpha": NUMBER,
            "reward": STR,
            "baseline_decay": NUMBER,
            "policy_learning_rate": NUMBER,
            "warmup_steps": INT,
        }.items()
        if k != "kd_weight"
    },
    **{
        f"distill.dynamic_kd.{k}": v
        for k, v in {
            **_KD_FIELDS,
            "adoption": STR,
            "selection": STR,
            "ratio": NUMBER,
            "objective": STR,
        }.items()
    },
    **{
        f"distill.{s}.{k}": v
        for s in ("ca_mkd", "avg_teachers", "random_teacher", "best_teacher", "fixed_weights")
        for k, v in _KD_FIELDS.items()
    },
    "distill.fixed_weights.weights": NUMBERS,
    "data.source": STR,
    "data.task": STR,
    "data.tfds_name": STR,
    "data.tfds_data_dir": STR,
    "data.text_field": STR,
    "data.text_files": PATTERNS,
    "data.eval_text_files": PATTERNS,
    "data.train_split": STR,
    "data.eval_split": STR,
    "data.tokenizer_path": STR,
    "data.tokenizer_cache_dir": STR,
    "data.vocab_size": INT,
    "data.seq_len": INT,
    "data.max_predictions": INT,
    "data.mask_prob": NUMBER,
    "data.worker_count": INT,
    "data.batch_size": INT,
    "data.eval_batch_size": INT,
    "optim.learning_rate": NUMBER,
    "optim.warmup_steps": INT,
    "optim.decay": STR,
    "optim.end_lr_factor": NUMBER,
    "optim.weight_decay": NUMBER,
    "optim.b1": NUMBER,
    "optim.b2": NUMBER,
    "optim.eps": NUMBER,
    "optim.grad_clip_norm": NUMBER,
    "optim.grad_accum_steps": INT,
    "train.num_steps": INT,
    "train.eval_every": INT,
    "train.eval_batches": INT,
    "train.eval_examples": INT,
    "train.eval_at_start": BOOL,
    "train.max_nonfinite_streak": INT,
    "mesh.data": INT,
    "mesh.fsdp": INT,
    "mesh.tensor": INT,
    "checkpoint.every_steps": INT,
    "checkpoint.max_to_keep": INT,
    "checkpoint.async_save": BOOL,
    "log.every_steps": INT,
    "log.tensorboard": BOOL,
    "log.progress": BOOL,
    "baseline.enabled": BOOL,
}

_ANNOTATION_KINDS = {"int": INT, "float": NUMBER, "str": STR, "bool": BOOL}
MODEL_FIELD_KINDS: dict[str, str] = {
    f.name: _ANNOTATION_KINDS[str(f.type)]
    for f in dataclasses.fields(BertConfig)
    if str(f.type) in _ANNOTATION_KINDS
}


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


def check_kind(value: Any, kind: str, field: str) -> None:
    """A ConfigError unless ``value`` (the setting ``field``) is of ``kind``."""
    if _is_kind(value, kind):
        return
    if kind == NUMBER and isinstance(value, float):
        raise ConfigError(f"{field}={value!r} is not a finite number; set a finite value.")
    raise ConfigError(
        f"{field}={value!r} is {_a(type(value).__name__)} but must be "
        f"{kind}{_kind_hint(value, kind)}."
    )


def _a(name: str) -> str:
    """``name`` with its indefinite article ('an int', 'a str')."""
    return f"{'an' if name[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {name}"


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
    """(found, value) of a dotted ``path`` in nested ConfigDicts / mappings."""
    node = config
    for part in path.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _model_sections(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
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


def validate_types(config: ml_collections.ConfigDict) -> None:
    """Every known field that the config sets holds a value of its kind."""
    for path, kind in FIELD_KINDS.items():
        found, value = _lookup(config, path)
        if found:
            check_kind(value, kind, path)
    for field, section in _model_sections(config):
        if not isinstance(section, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(
                f"{field} is {_a(type(section).__name__)}; it must be a section of model "
                "settings (a ConfigDict like configs/pretrain.py's model)."
            )
        _check_model_kinds(section, field)


def _check_model_kinds(section: Any, field: str) -> None:
    for name, value in section.items():
        if name in MODEL_FIELD_KINDS:
            check_kind(value, MODEL_FIELD_KINDS[name], f"{field}.{name}")


def model_config(section: Any, field: str = "model") -> BertConfig:
    """The ``BertConfig`` of a model section, errors naming ``field`` (e.g.
    ``teacher.model``) instead of ``model``."""
    _check_model_kinds(section, field)
    try:
        return BertConfig.from_config(section)
    except (TypeError, ValueError) as e:
        message = str(e)
        if field != "model":
            message = message.replace("model.", f"{field}.")
        raise ConfigError(message) from None


# ---------------------------------------------------------------------------
# Ranges.


def _positive_int(config: ml_collections.ConfigDict, section: str, field: str) -> int:
    value = config[section][field]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{section}.{field}={value!r} must be a positive integer; set it to 1 or more.",
    )
    return value


def _non_negative_int(config: ml_collections.ConfigDict, section: str, field: str) -> int:
    value = config[section][field]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        f"{section}.{field}={value!r} must be an integer >= 0.",
    )
    return value


def _number_in(
    config: ml_collections.ConfigDict, section: str, field: str, lo: float, hi: float
) -> float:
    value = config[section][field]
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi,
        f"{section}.{field}={value!r} must be a number in [{lo}, {hi}].",
    )
    return float(value)


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a single -1 filled so that the product is ``num_devices``."""
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        _require(
            isinstance(size, int) and not isinstance(size, bool) and (size == -1 or size > 0),
            f"mesh.{axis}={size!r} must be a positive integer or -1 (fill with the rest).",
        )
    given = " * ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    fill = [axis for axis, size in sizes.items() if size == -1]
    _require(
        len(fill) <= 1,
        f"mesh.{' and mesh.'.join(fill)} are -1; at most one axis may be -1 (fill with the "
        "rest): give the others sizes.",
    )
    known = math.prod(size for size in sizes.values() if size != -1)
    devices = f"{num_devices} device{'s' if num_devices != 1 else ''}"
    if fill:
        _require(
            num_devices % known == 0,
            f"{given} cannot cover {devices}: the fixed axes' product {known} must divide "
            f"the device count; set axes whose product divides {num_devices}.",
        )
        sizes[fill[0]] = num_devices // known
    _require(
        math.prod(sizes.values()) == num_devices,
        f"{given} needs {math.prod(sizes.values())} devices but {devices} "
        f"{'are' if num_devices != 1 else 'is'} available; set one mesh axis to -1 (fill) "
        "or make their product the device count.",
    )
    return sizes


def _validate_schedule(
    config: ml_collections.ConfigDict, name: str, lo: float, hi: float, meaning: str
) -> None:
    """``distill.<name>``: a known schedule whose values lie in [lo, hi] (0 < v for the
    temperature); ``meaning`` says the range in the error."""
    from dwt_jax.distill.schedules import KNOWN_SCHEDULES, make_schedule

    field = f"distill.{name}"
    section = config.distill[name]
    _require(
        isinstance(section, (Mapping, ml_collections.ConfigDict)),
        f"{field}={section!r} must be a schedule section: {{'name': 'constant', 'value': "
        "1.0, 'end_value': 1.0, 'steps': 0}.",
    )
    unknown = sorted(set(section) - set(_SCHEDULE_FIELDS))
    _require(
        not unknown,
        f"{field}.{unknown[0] if unknown else ''} is not a schedule setting; use "
        f"{', '.join(_SCHEDULE_FIELDS)}.",
    )
    for key in ("name", "value"):
        _require(key in section, f"{field}.{key} is missing; set it (see configs/base.py).")
    _require(
        section["name"] in KNOWN_SCHEDULES,
        f"{field}.name={section['name']!r} is unknown; use one of {', '.join(KNOWN_SCHEDULES)}.",
    )
    positive = name == "tau"
    for key in ("value", "end_value"):
        if key not in section:
            continue
        value = section[key]
        ok = value > 0 if positive else lo <= value
        _require(ok and value <= hi, f"{field}.{key}={value!r} must be in {meaning}.")
    steps = section.get("steps", 0)
    _require(
        steps > 0 or section["name"] == "constant",
        f"{field}.steps={steps!r}: schedule {section['name']!r} needs the step at which it "
        f"reaches its end; set {field}.steps > 0 (or {field}.name='constant').",
    )
    if positive:
        _require(
            section["name"] not in ("ki", "cutoff"),
            f"{field}.name={section['name']!r} takes the temperature to 0; use constant, "
            "linear, cosine or strong_to_normal.",
        )
    try:
        make_schedule(section, field)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _validate_dwt(config: ml_collections.ConfigDict) -> None:
    from dwt_jax.distill.dwt import FORMS, HIDDEN_LAYER_MAPS, HIDDEN_LOSSES

    distill = config.distill
    _require(
        distill.form in FORMS,
        f"distill.form={distill.form!r} is unknown; use one of {', '.join(FORMS)}.",
    )
    _number_in(config, "distill", "alpha_h", 0.0, 1e3)
    if distill.form == "ki":  # (1 - α_t)·MLM + α_t·τ²·KL: a convex mix.
        _validate_schedule(
            config, "alpha_s", 0.0, 1.0, "[0, 1] for distill.form='ki' ((1-α)·MLM + α·KL)"
        )
    else:  # α_h·MLM + α_s(t)·τ²·KL.
        _validate_schedule(
            config, "alpha_s", 0.0, 1e3, "[0, 1000] (the KL weight: 1 = Normal, 4 = Strong)"
        )
    _validate_schedule(config, "tau", 0.0, 1e3, "(0, 1000] (a temperature is positive)")
    if distill.get("hidden_weight", 0.0):
        _number_in(config, "distill", "hidden_weight", 0.0, 1e3)
        _require(
            distill.hidden_loss in HIDDEN_LOSSES,
            f"distill.hidden_loss={distill.hidden_loss!r} is unknown; use one of "
            f"{', '.join(HIDDEN_LOSSES)}.",
        )
        _require(
            distill.hidden_layer_map in HIDDEN_LAYER_MAPS,
            f"distill.hidden_layer_map={distill.hidden_layer_map!r} is unknown; use one of "
            f"{', '.join(HIDDEN_LAYER_MAPS)}.",
        )


def _validate_remap(config: ml_collections.ConfigDict, num_teachers: int) -> None:
    from dwt_jax.remap import DEPTH_METHODS, WIDTH_METHODS

    _require(
        num_teachers > 0 or "model" in config.teacher,
        "teacher.student_init='remap' needs a teacher to grow the student from; set "
        "teacher.workdirs.",
    )
    _require(
        "remap" in config.teacher, "teacher.student_init='remap' needs a teacher.remap section."
    )
    remap = config.teacher.remap
    _require(
        remap.depth in DEPTH_METHODS,
        f"teacher.remap.depth={remap.depth!r} is unknown; use one of {', '.join(DEPTH_METHODS)}.",
    )
    _require(
        remap.width in WIDTH_METHODS,
        f"teacher.remap.width={remap.width!r} is unknown; use one of {', '.join(WIDTH_METHODS)}.",
    )
    _number_in(config.teacher, "remap", "noise_std", 0.0, 10.0)


def validate_training(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Batch sizes against the mesh, optimiser, steps, checkpoints and logging (every
    kind of run has these; the kinds of the values checked first by
    ``validate_types``); returns the resolved mesh shape."""
    for section in ("data", "optim", "train", "mesh", "checkpoint", "log"):
        _require(
            section in config, f"config has no '{section}' section; start from configs/base.py."
        )
    batch = _positive_int(config, "data", "batch_size")
    eval_batch = _positive_int(config, "data", "eval_batch_size")

    mesh = resolve_mesh_shape(config.mesh, num_devices)
    batch_shards = mesh["data"] * mesh["fsdp"]
    accum = _positive_int(config, "optim", "grad_accum_steps")
    step = accum * batch_shards
    _require(
        batch % step == 0,
        f"data.batch_size={batch} must be divisible by optim.grad_accum_steps={accum} times "
        f"the data-parallel size mesh.data*mesh.fsdp={batch_shards}; use a multiple of "
        f"{step} (e.g. {max(1, round(batch / step)) * step}).",
    )
    _require(
        eval_batch % batch_shards == 0,
        f"data.eval_batch_size={eval_batch} must be divisible by the data-parallel size "
        f"mesh.data*mesh.fsdp={batch_shards}; use a multiple of {batch_shards}.",
    )

    _require(
        config.optim.learning_rate > 0,
        f"optim.learning_rate={config.optim.learning_rate!r} must be > 0.",
    )
    _number_in(config, "optim", "learning_rate", 0.0, 10.0)
    _non_negative_int(config, "optim", "warmup_steps")
    _require(
        config.optim.decay in KNOWN_DECAYS,
        f"optim.decay={config.optim.decay!r} is unknown; use one of {', '.join(KNOWN_DECAYS)}.",
    )
    _number_in(config, "optim", "end_lr_factor", 0.0, 1.0)
    _number_in(config, "optim", "weight_decay", 0.0, 1.0)
    _number_in(config, "optim", "b1", 0.0, 0.999999)
    _number_in(config, "optim", "b2", 0.0, 0.999999)
    if "eps" in config.optim:
        _require(
            0 < config.optim.eps <= 1.0,
            f"optim.eps={config.optim.eps!r} must be in (0, 1] (Adam's denominator term).",
        )
    _number_in(config, "optim", "grad_clip_norm", 0.0, 1e9)

    _positive_int(config, "train", "num_steps")
    _positive_int(config, "train", "eval_every")
    if config.train.get("max_nonfinite_streak", None) is not None:
        _non_negative_int(config, "train", "max_nonfinite_streak")  # 0 = never stop.
    _positive_int(config, "checkpoint", "every_steps")
    _positive_int(config, "checkpoint", "max_to_keep")
    _positive_int(config, "log", "every_steps")
    return mesh


# Model dimensions and the logical axis that names each in the parameters.
_SHARDED_DIMS = (
    ("hidden_size", "embed"),
    ("num_heads", "heads"),
    ("mlp_dim", "mlp"),
    ("vocab_size", "vocab"),
)


def check_model_fits_mesh(
    model: BertConfig, mesh: dict[str, int], section: str, rules: Sequence | None = None
) -> None:
    """Every dimension a mesh axis splits (under ``rules``, default the student's)
    must divide evenly over it: an array cannot be split into unequal shards."""
    from dwt_jax.sharding import LOGICAL_AXIS_RULES

    table = dict(LOGICAL_AXIS_RULES if rules is None else rules)
    for field, logical in _SHARDED_DIMS:
        axes = table.get(logical) or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        size, parts = getattr(model, field), math.prod(mesh[a] for a in axes)
        if size % parts:
            where = "*".join(f"mesh.{a}" for a in axes)
            hint = (
                f"pad the vocabulary to a multiple of {parts} (e.g. "
                f"{-(-size // parts) * parts}) or use a smaller {where}"
                if field == "vocab_size"
                else f"use a {where} that divides it"
            )
            raise ConfigError(
                f"{section}.{field}={size} is not divisible by {where}={parts}, which "
                f"splits it; {hint}."
            )


def validate_teacher_sharding(config: ml_collections.ConfigDict) -> tuple:
    """The rules table of ``teacher.sharding`` (a ConfigError names an unknown one)."""
    from dwt_jax.sharding import configured_teacher_rules

    try:
        return configured_teacher_rules(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_data(config: ml_collections.ConfigDict, model: BertConfig) -> int:
    """The pre-training data section against the model; returns ``data.seq_len``."""
    data = config.data
    _require(
        data.source in KNOWN_SOURCES,
        f"data.source={data.source!r} is unknown; use one of {', '.join(KNOWN_SOURCES)}.",
    )
    if data.source == "tfds":
        _require(bool(data.tfds_name), "data.tfds_name is empty; name the TFDS dataset to read.")
    if data.source == "text_files":
        _require(bool(data.text_files), "data.text_files is empty; list the text files to read.")
    seq_len = _positive_int(config, "data", "seq_len")
    _require(
        seq_len <= model.max_seq_len,
        f"data.seq_len={seq_len} exceeds the model's {model.max_seq_len} positions "
        f"(model.max_len={model.max_len} - model.position_offset={model.position_offset}); "
        "lower data.seq_len or raise model.max_len.",
    )
    max_predictions = _positive_int(config, "data", "max_predictions")
    _require(
        max_predictions <= seq_len,
        f"data.max_predictions={max_predictions} exceeds data.seq_len={seq_len}; lower it.",
    )
    _number_in(config, "data", "mask_prob", 1e-6, 1.0)
    _positive_int(config, "data", "vocab_size")
    _require(
        data.tokenizer_path or data.vocab_size <= model.vocab_size,
        f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={model.vocab_size}; the "
        "model must embed every token id: raise model.vocab_size or lower data.vocab_size.",
    )
    _non_negative_int(config, "data", "worker_count")
    return seq_len


def _validate_teacher_model(
    config: ml_collections.ConfigDict,
    model: BertConfig,
    seq_len: int,
    mesh: dict[str, int],
    rules: tuple,
) -> None:
    """``teacher.model``, the teacher the pipeline trains first: one vocabulary with the
    student, room for the sequences, dimensions that fit the mesh."""
    teacher = model_config(config.teacher.model, "teacher.model")
    _require(
        teacher.vocab_size == model.vocab_size,
        f"teacher.model.vocab_size={teacher.vocab_size} differs from model.vocab_size="
        f"{model.vocab_size}; soft labels need one vocabulary: set teacher.model.vocab_size="
        f"{model.vocab_size}.",
    )
    _require(
        seq_len <= teacher.max_seq_len,
        f"data.seq_len={seq_len} exceeds the teacher's {teacher.max_seq_len} positions "
        f"(teacher.model.max_len={teacher.max_len} - teacher.model.position_offset="
        f"{teacher.position_offset}); raise teacher.model.max_len or lower data.seq_len.",
    )
    check_model_fits_mesh(teacher, mesh, "teacher.model", rules)
    if "num_steps" in config.teacher:
        _positive_int(config, "teacher", "num_steps")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> BertConfig:
    """Checks every field the run uses; returns the student's model config."""
    with fields_as_in(config, PRETRAIN_REFERENCE):
        return _validate_config(config, num_devices)


def _validate_config(config: ml_collections.ConfigDict, num_devices: int) -> BertConfig:
    for section in ("model", "teacher", "distill", "data", "optim", "train", "mesh", "checkpoint"):
        _require(
            section in config, f"config has no '{section}' section; start from configs/base.py."
        )
    validate_types(config)
    model = model_config(config.model)
    seq_len = _validate_data(config, model)
    mesh = validate_training(config, num_devices)
    check_model_fits_mesh(model, mesh, "model")
    _positive_int(config, "train", "eval_batches")

    # Late import: strategies import losses/jax.
    from dwt_jax.distill import FINETUNE_STRATEGIES, PRETRAIN_STRATEGIES, make_strategy

    strategy = config.distill.strategy
    _require(
        strategy not in FINETUNE_STRATEGIES,
        f"distill.strategy={strategy!r} is a fine-tuning strategy; this is a pre-training "
        "config: start from configs/finetune/base.py to use it.",
    )
    _require(
        strategy in PRETRAIN_STRATEGIES,
        f"distill.strategy={strategy!r} is unknown; use one of "
        f"{', '.join(sorted(PRETRAIN_STRATEGIES))}.",
    )
    _require(
        config.teacher.student_init in KNOWN_STUDENT_INITS,
        f"teacher.student_init={config.teacher.student_init!r} is unknown; use one of "
        f"{', '.join(KNOWN_STUDENT_INITS)}.",
    )
    workdirs = config.teacher.workdirs
    _require(
        isinstance(workdirs, Sequence) and not isinstance(workdirs, str),
        f"teacher.workdirs={workdirs!r} must be a list of workdirs, e.g. ('runs/teacher',).",
    )
    for index, spec in enumerate(workdirs):
        _require(
            isinstance(spec, str) and bool(spec),
            f"teacher.workdirs[{index}]={spec!r} must name a run's workdir or 'hf:DIR'.",
        )
    teacher_rules = validate_teacher_sharding(config)
    low, high = PRETRAIN_STRATEGIES[strategy].num_teachers
    count = len(workdirs)
    if count == 0 and low > 0:
        _require(
            "model" in config.teacher,
            f"distill.strategy={strategy!r} needs a teacher: list teacher workdirs in "
            "teacher.workdirs, or give a teacher.model section to train one first.",
        )
        _validate_teacher_model(config, model, seq_len, mesh, teacher_rules)
    else:
        _require(
            low <= count and (high is None or count <= high),
            f"teacher.workdirs lists {count} teacher(s) but distill.strategy={strategy!r} "
            f"takes {low if low == high else f'{low} to {high}'}; "
            + ("clear teacher.workdirs." if high == 0 else "list that many."),
        )
    if strategy == "dwt":
        _validate_dwt(config)
    if config.teacher.student_init == "remap":
        _validate_remap(config, count)
    try:
        make_strategy(config.distill)  # The strategy's own checks (e.g. the MLM head's).
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model
