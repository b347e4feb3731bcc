"""Validation of a run config before any compilation or I/O.

Every check raises :class:`ConfigError` with one line that names the field and what
would fix it. ``main`` turns it into that line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(config: ml_collections.ConfigDict, section: str, field: str) -> int:
    value = config[section][field]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{section}.{field}={value!r} must be a positive integer.",
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
            isinstance(size, int) and (size == -1 or size > 0),
            f"mesh.{axis}={size!r} must be a positive integer or -1 (fill with the rest).",
        )
    fill = [axis for axis, size in sizes.items() if size == -1]
    _require(len(fill) <= 1, f"mesh.{' and mesh.'.join(fill)} are all -1; at most one may be.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        _require(
            num_devices % known == 0,
            f"mesh axes {sizes} cannot cover {num_devices} devices: the fixed axes' product "
            f"{known} must divide the device count.",
        )
        sizes[fill[0]] = num_devices // known
    _require(
        math.prod(sizes.values()) == num_devices,
        f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
        "available; set one mesh axis to -1 or match the device count.",
    )
    return sizes


def _validate_dwt(config: ml_collections.ConfigDict) -> None:
    from dwt_jax.distill.dwt import FORMS, HIDDEN_LAYER_MAPS, HIDDEN_LOSSES
    from dwt_jax.distill.schedules import make_schedule

    distill = config.distill
    _require(
        distill.form in FORMS,
        f"distill.form={distill.form!r} is unknown; use one of {', '.join(FORMS)}.",
    )
    _number_in(config, "distill", "alpha_h", 0.0, 1e3)
    for name in ("alpha_s", "tau"):
        try:
            make_schedule(distill[name], f"distill.{name}")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    _require(
        distill.tau.value > 0 and distill.tau.get("end_value", 1.0) > 0,
        "distill.tau values must be > 0 (a temperature).",
    )
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
    if distill.form == "ki":
        _require(
            0.0 <= distill.alpha_s.value <= 1.0,
            f"distill.alpha_s.value={distill.alpha_s.value} must be in [0, 1] for the KI "
            "form (1 - alpha weighs the MLM loss).",
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
    kind of run has these); returns the resolved mesh shape."""
    batch = _positive_int(config, "data", "batch_size")
    eval_batch = _positive_int(config, "data", "eval_batch_size")

    mesh = resolve_mesh_shape(config.mesh, num_devices)
    batch_shards = mesh["data"] * mesh["fsdp"]
    accum = _positive_int(config, "optim", "grad_accum_steps")
    _require(
        batch % (accum * batch_shards) == 0,
        f"data.batch_size={batch} must be divisible by optim.grad_accum_steps={accum} times "
        f"the data-parallel size mesh.data*mesh.fsdp={batch_shards}.",
    )
    _require(
        eval_batch % batch_shards == 0,
        f"data.eval_batch_size={eval_batch} must be divisible by the data-parallel size "
        f"mesh.data*mesh.fsdp={batch_shards}.",
    )

    _number_in(config, "optim", "learning_rate", 0.0, 10.0)
    _require(config.optim.learning_rate > 0, "optim.learning_rate must be > 0.")
    _require(
        isinstance(config.optim.warmup_steps, int) and config.optim.warmup_steps >= 0,
        f"optim.warmup_steps={config.optim.warmup_steps!r} must be an integer >= 0.",
    )
    _require(
        config.optim.decay in KNOWN_DECAYS,
        f"optim.decay={config.optim.decay!r} is unknown; use one of {', '.join(KNOWN_DECAYS)}.",
    )
    _number_in(config, "optim", "end_lr_factor", 0.0, 1.0)
    _number_in(config, "optim", "weight_decay", 0.0, 1.0)
    _number_in(config, "optim", "b1", 0.0, 0.999999)
    _number_in(config, "optim", "b2", 0.0, 0.999999)
    _number_in(config, "optim", "grad_clip_norm", 0.0, 1e9)

    _positive_int(config, "train", "num_steps")
    _positive_int(config, "train", "eval_every")
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


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> BertConfig:
    """Checks every field the run uses; returns the student's model config."""
    for section in ("model", "teacher", "distill", "data", "optim", "train", "mesh", "checkpoint"):
        _require(
            section in config, f"config has no '{section}' section; start from configs/base.py."
        )
    try:
        model = BertConfig.from_config(config.model)
        model.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None

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
        f"data.max_predictions={max_predictions} exceeds data.seq_len={seq_len}.",
    )
    _number_in(config, "data", "mask_prob", 1e-6, 1.0)
    _positive_int(config, "data", "vocab_size")
    _require(
        data.tokenizer_path or data.vocab_size <= model.vocab_size,
        f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={model.vocab_size}; the "
        "model must embed every token id.",
    )
    _require(
        isinstance(data.worker_count, int) and data.worker_count >= 0,
        f"data.worker_count={data.worker_count!r} must be an integer >= 0.",
    )
    mesh = validate_training(config, num_devices)
    check_model_fits_mesh(model, mesh, "model")
    _positive_int(config, "train", "eval_batches")

    # Late import: strategies import losses/jax.
    from dwt_jax.distill import FINETUNE_STRATEGIES, PRETRAIN_STRATEGIES

    _require(
        config.distill.strategy not in FINETUNE_STRATEGIES,
        f"distill.strategy={config.distill.strategy!r} is a fine-tuning strategy; this is a "
        "pre-training config: start from configs/finetune/base.py to use it.",
    )
    _require(
        config.distill.strategy in PRETRAIN_STRATEGIES,
        f"distill.strategy={config.distill.strategy!r} is unknown; use one of "
        f"{', '.join(sorted(PRETRAIN_STRATEGIES))}.",
    )
    _require(
        config.teacher.student_init in KNOWN_STUDENT_INITS,
        f"teacher.student_init={config.teacher.student_init!r} is unknown; use one of "
        f"{', '.join(KNOWN_STUDENT_INITS)}.",
    )
    _require(
        isinstance(config.teacher.workdirs, Sequence)
        and not isinstance(config.teacher.workdirs, str),
        "teacher.workdirs must be a list of workdirs, e.g. ('runs/teacher',).",
    )
    teacher_rules = validate_teacher_sharding(config)
    if "model" in config.teacher and not config.teacher.workdirs:
        try:
            teacher_model = BertConfig.from_config(config.teacher.model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"teacher.model: {e}") from None
        check_model_fits_mesh(teacher_model, mesh, "teacher.model", teacher_rules)
    strategy_cls = PRETRAIN_STRATEGIES[config.distill.strategy]
    low, high = strategy_cls.num_teachers
    count = len(config.teacher.workdirs)
    if count == 0 and low > 0:
        _require(
            "model" in config.teacher,
            f"distill.strategy={config.distill.strategy!r} needs a teacher: list teacher "
            "workdirs in teacher.workdirs, or give a teacher.model section to train one first.",
        )
    else:
        _require(
            low <= count and (high is None or count <= high),
            f"teacher.workdirs lists {count} teacher(s) but distill.strategy="
            f"{config.distill.strategy!r} takes {low if low == high else f'{low} to {high}'}.",
        )
    if config.distill.strategy == "dwt":
        _validate_dwt(config)
    if config.teacher.student_init == "remap":
        _validate_remap(config, count)
    return model
