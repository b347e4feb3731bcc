"""Range checks of a run config, before any compilation or I/O.

Every check raises :class:`ConfigError` with one line that names the field, the bad
value and what would fix it. The kinds of the values are checked first
(`dwt_jax.schema.validate_types`), so the checks here compare numbers. Loading
config files lives in `dwt_jax.config_files`, mesh arithmetic with the mesh in
`dwt_jax.sharding`, and each strategy's own settings in the strategy.
"""

from __future__ import annotations

import ml_collections

from dwt_jax.config_files import (
    FINETUNE_REFERENCE,
    PRETRAIN_REFERENCE,
    copy_config,
    fields_as_in,
    load_config_file,
)
from dwt_jax.errors import ConfigError
from dwt_jax.models.config import BertConfig
from dwt_jax.objectives import objective_for
from dwt_jax.schema import STRS, check_kind, model_config, validate_types
from dwt_jax.sharding import (
    MESH_AXES,
    check_model_fits_mesh,
    configured_teacher_rules,
    resolve_mesh_shape,
)

KNOWN_SOURCES = ("embedded", "tfds", "text_files")
KNOWN_DECAYS = ("linear", "cosine", "constant")
KNOWN_STUDENT_INITS = ("scratch", "remap")

__all__ = [
    "FINETUNE_REFERENCE",
    "MESH_AXES",
    "PRETRAIN_REFERENCE",
    "ConfigError",
    "check_model_fits_mesh",
    "check_teacher_model",
    "copy_config",
    "fields_as_in",
    "load_config_file",
    "model_config",
    "resolve_mesh_shape",
    "validate_config",
    "validate_pretrain",
    "validate_teacher_sharding",
    "validate_training",
    "validate_types",
    "validate_workdirs",
]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
    post_ln = (
        config.model.get("family", "bert") == "bert" and config.model.get("norm", "post") != "pre"
    )
    _require(
        not (remap.depth == "identity" and post_ln),
        "teacher.remap.depth='identity' on a model.norm='post' student: identity blocks need "
        "model.norm='pre' (a post-LN block re-normalises its output); use depth='fna' or "
        "'stack'.",
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


def validate_teacher_sharding(config: ml_collections.ConfigDict) -> tuple:
    """The rules table of ``teacher.sharding`` (a ConfigError names an unknown one)."""
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
    window = getattr(model, "sliding_window", 0)
    _require(
        not 0 < window < seq_len,
        f"model.sliding_window={window} is shorter than data.seq_len={seq_len}: this "
        "stack attends to every earlier token of a document, which a model trained with "
        f"a {window}-token window never did; set data.seq_len <= {window}.",
    )
    objective_for(model).check_data(config, model)
    _positive_int(config, "data", "vocab_size")
    _require(
        data.tokenizer_path or data.vocab_size <= model.vocab_size,
        f"data.vocab_size={data.vocab_size} exceeds model.vocab_size={model.vocab_size}; the "
        "model must embed every token id: raise model.vocab_size or lower data.vocab_size.",
    )
    _non_negative_int(config, "data", "worker_count")
    return seq_len


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> BertConfig:
    """Checks every field a pre-training run reads, the strategy's own settings too
    (by building it); returns the student's model config. A run checks the same
    through its `RunKind`, which keeps the strategy it builds."""
    from dwt_jax import teachers  # Teacher plans import jax: only when asked.
    from dwt_jax.distill import make_strategy  # Strategies import jax: only when asked.

    with fields_as_in(config, PRETRAIN_REFERENCE):
        model, mesh = _validate_config(config, num_devices)
        strategy = make_strategy(config.distill)
        if strategy.num_teachers[0] > 0 and not config.teacher.workdirs:
            several = tuple(config.teacher.get("models", ()) or ())
            if "model" not in config.teacher and not several:
                raise ConfigError(
                    f"distill.strategy={config.distill.strategy!r} needs a teacher: list "
                    "teacher workdirs in teacher.workdirs, or give a teacher.model section "
                    "to train one first."
                )
            sections = (
                [(f"teacher.models[{k}]", m) for k, m in enumerate(several)]
                if several
                else [("teacher.model", config.teacher.model)]
            )
            for field, section in sections:
                teacher = model_config(section, field)
                teachers.check_same_vocabulary(teacher, model, field)
                check_teacher_model(teacher, field, config, mesh)
    return model


def check_teacher_model(
    teacher: BertConfig, field: str, config: ml_collections.ConfigDict, mesh: dict[str, int]
) -> None:
    """A teacher the pipeline trains first (``field``, e.g. ``teacher.model``) has room
    for the student's sequences and dimensions that fit the mesh under its layout."""
    seq_len = int(config.data.seq_len)
    _require(
        seq_len <= teacher.max_seq_len,
        f"data.seq_len={seq_len} exceeds the teacher's {teacher.max_seq_len} positions "
        f"({field}.max_len={teacher.max_len} - {field}.position_offset="
        f"{teacher.position_offset}); raise {field}.max_len or lower data.seq_len.",
    )
    check_model_fits_mesh(teacher, mesh, field, configured_teacher_rules(config))


def validate_pretrain(
    config: ml_collections.ConfigDict, num_devices: int
) -> tuple[BertConfig, dict[str, int]]:
    """Checks every field a pre-training run reads but the strategy's settings (the
    strategy checks those itself); returns the student's model config and the mesh."""
    with fields_as_in(config, PRETRAIN_REFERENCE):
        return _validate_config(config, num_devices)


def _validate_config(
    config: ml_collections.ConfigDict, num_devices: int
) -> tuple[BertConfig, dict[str, int]]:
    for section in ("model", "teacher", "distill", "data", "optim", "train", "mesh", "checkpoint"):
        _require(
            section in config, f"config has no '{section}' section; start from configs/base.py."
        )
    validate_types(config)
    model = model_config(config.model)
    _validate_data(config, model)
    mesh = validate_training(config, num_devices)
    check_model_fits_mesh(model, mesh, "model")
    _positive_int(config, "train", "eval_batches")
    _require(
        config.teacher.student_init in KNOWN_STUDENT_INITS,
        f"teacher.student_init={config.teacher.student_init!r} is unknown; use one of "
        f"{', '.join(KNOWN_STUDENT_INITS)}.",
    )
    workdirs = validate_workdirs(config.teacher.workdirs, "teacher.workdirs")
    validate_teacher_sharding(config)
    if "num_steps" in config.teacher:
        _positive_int(config, "teacher", "num_steps")
    if config.teacher.student_init == "remap":
        _validate_remap(config, len(workdirs))
    return model, mesh


def validate_workdirs(workdirs: object, field: str) -> tuple[str, ...]:
    """A list of run settings (workdirs or 'hf:DIR'), each a non-empty string."""
    check_kind(workdirs, STRS, field)  # Runs, not patterns: a string is refused.
    for index, spec in enumerate(workdirs):
        _require(
            isinstance(spec, str) and bool(spec),
            f"{field}[{index}]={spec!r} must name a run's workdir or 'hf:DIR'.",
        )
    return tuple(workdirs)
