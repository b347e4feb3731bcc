"""Config validation: the shipped configs pass, bad ones fail with one clear line."""

from __future__ import annotations

import ml_collections
import pytest
from testutil import load_config

from dwt_jax.configuration import (
    ConfigError,
    resolve_mesh_shape,
    validate_config,
    validate_training,
    validate_types,
)


@pytest.mark.parametrize("variant", [None, "smoke"])
def test_shipped_configs_validate(variant):
    model = validate_config(load_config(variant), num_devices=8)
    assert model.hidden_size % model.num_heads == 0


BAD_CONFIGS = [
    ("model.hidden_size", lambda c: c.model.update(hidden_size=30, num_heads=4)),
    ("model.num_layers", lambda c: c.model.update(num_layers=0)),
    ("data.batch_size", lambda c: c.data.update(batch_size=12)),  # 8 data-parallel devices
    ("data.source", lambda c: c.data.update(source="wikipedia")),
    ("data.tfds_name", lambda c: c.data.update(source="tfds", tfds_name="")),
    ("data.seq_len", lambda c: c.data.update(seq_len=4096)),
    ("data.max_predictions", lambda c: c.data.update(max_predictions=1000)),
    ("data.vocab_size", lambda c: c.data.update(vocab_size=10**6)),
    ("distill.strategy", lambda c: c.distill.update(strategy="magic")),
    ("optim.decay", lambda c: c.optim.update(decay="exponential")),
    ("optim.learning_rate", lambda c: c.optim.update(learning_rate=-1.0)),
    ("optim.grad_accum_steps", lambda c: c.optim.update(grad_accum_steps=3)),
    ("mesh", lambda c: c.mesh.update(data=16)),
    ("mesh.data", lambda c: c.mesh.update(data=-1, fsdp=-1)),
    ("train.num_steps", lambda c: c.train.update(num_steps=0)),
    ("teacher.sharding", lambda c: c.teacher.update(sharding="zero3")),
    (
        "model.vocab_size=8193 is not divisible by mesh.tensor=2",
        lambda c: (c.model.update(vocab_size=8193), c.mesh.update(data=4, tensor=2)),
    ),
    ("model.num_heads", lambda c: c.mesh.update(data=1, fsdp=1, tensor=8)),
    (
        "model.hidden_size",
        lambda c: (c.model.update(hidden_size=260), c.mesh.update(fsdp=8, data=1)),
    ),
    ("optim.eps", lambda c: c.optim.update(eps=0.0)),
    ("data.worker_count", lambda c: c.data.update(worker_count=-1)),
    ("teacher.workdirs[0]", lambda c: c.teacher.update(workdirs=("",))),
]

# Wrong kinds of values, as a config file could hold them (ConfigDict itself refuses
# most of them on assignment, so these are set on an unlocked plain-dict rebuild).
WRONG_KINDS = [
    ("data.batch_size='8' is a str but must be an integer; write 8", ("data", "batch_size", "8")),
    (
        "model.num_layers=2.0 is a float but must be an integer; write 2",
        ("model", "num_layers", 2.0),
    ),
    ("model.hidden_size=True is a bool", ("model", "hidden_size", True)),
    ("model.dropout_rate='0.1' is a str but must be a number", ("model", "dropout_rate", "0.1")),
    ("model.norm=1 is an int but must be a string", ("model", "norm", 1)),
    ("optim.learning_rate=nan is not a finite number", ("optim", "learning_rate", float("nan"))),
    ("log.tensorboard='yes' is a str but must be True or False", ("log", "tensorboard", "yes")),
    (
        "teacher.workdirs='runs/t' is a str but must be a list of strings",
        ("teacher", "workdirs", "runs/t"),
    ),
    ("train.max_nonfinite_streak=1.5 is a float", ("train", "max_nonfinite_streak", 1.5)),
    ("teacher.model.num_layers='1' is a str", ("teacher.model", "num_layers", "1")),
    ("distill.alpha_s.value='4' is a str", ("distill.alpha_s", "value", "4")),
    ("distill.tau.steps=1.0 is a float", ("distill.tau", "steps", 1.0)),
]


@pytest.mark.parametrize(("field", "corrupt"), BAD_CONFIGS, ids=[f for f, _ in BAD_CONFIGS])
def test_bad_config_names_the_field(field, corrupt):
    config = load_config(None)
    corrupt(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, num_devices=8)
    message = str(error.value)
    assert field in message
    assert "\n" not in message


def test_mesh_fill_axis():
    config = load_config(None).mesh
    config.update(data=-1, fsdp=2, tensor=2)
    assert resolve_mesh_shape(config, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    config.update(data=2, fsdp=2, tensor=-1)
    assert resolve_mesh_shape(config, 8)["tensor"] == 2


@pytest.mark.parametrize(
    ("message", "edit"), WRONG_KINDS, ids=[m.split("=")[0] for m, _ in WRONG_KINDS]
)
def test_wrong_kind_of_value_names_the_field(message, edit):
    values = load_config("smoke", name="base").to_dict()
    path, key, value = edit
    section = values
    for part in path.split("."):
        section = section[part]
    section[key] = value
    with pytest.raises(ConfigError) as error:
        validate_config(ml_collections.ConfigDict(values), num_devices=1)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# Pre-training DWT (configs/base.py): schedules, teacher.model, the strategy's settings.
BAD_DWT = [
    ("distill.alpha_s.name='sometimes' is unknown", {"distill.alpha_s.name": "sometimes"}),
    ("distill.alpha_s.value=-1.0 must be in [0, 1000]", {"distill.alpha_s.value": -1.0}),
    (
        "distill.alpha_s.end_value=1.5 must be in [0, 1] for distill.form='ki'",
        {"distill.form": "ki", "distill.alpha_s.end_value": 1.5},
    ),
    ("distill.tau.value=0.0 must be in (0, 1000]", {"distill.tau.value": 0.0}),
    ("distill.tau.end_value=-2.0 must be in (0", {"distill.tau.end_value": -2.0}),
    (
        "distill.tau.name='ki' takes the temperature to 0",
        {"distill.tau.name": "ki", "distill.tau.steps": 5},
    ),
    (
        "distill.alpha_s.steps=0: schedule 'cosine'",
        {"distill.alpha_s.name": "cosine", "distill.alpha_s.steps": 0},
    ),
    ("distill.alpha_s.stepz is not a schedule setting", {"distill.alpha_s.stepz": 5}),
    ("distill.alpha_h=-1.0 must be a number in [0.0", {"distill.alpha_h": -1.0}),
    (
        "distill.hidden_loss='l1' is unknown",
        {"distill.hidden_weight": 1.0, "distill.hidden_loss": "l1"},
    ),
    ("distill.vocab_chunk_size=-1", {"distill.vocab_chunk_size": -1}),
    (
        "teacher.model.vocab_size=2048 differs from model.vocab_size=1024",
        {"teacher.model.vocab_size": 2048},
    ),
    (
        "teacher.model.hidden_size=32 is not divisible by teacher.model.num_heads=3",
        {"teacher.model.num_heads": 3},
    ),
    ("exceeds the teacher's 32 positions", {"teacher.model.max_len": 32}),
    ("teacher.num_steps=0 must be a positive integer", {"teacher.num_steps": 0}),
    (
        "teacher.remap.depth='deep' is unknown",
        {"teacher.student_init": "remap", "teacher.remap.depth": "deep"},
    ),
    (
        "teacher.remap.depth='identity' on a model.norm='post' student",
        {"teacher.student_init": "remap", "teacher.remap.depth": "identity"},
    ),
    ("train.max_nonfinite_streak=-1 must be an integer >= 0", {"train.max_nonfinite_streak": -1}),
]


@pytest.mark.parametrize(("message", "fields"), BAD_DWT, ids=[m.split("=")[0] for m, _ in BAD_DWT])
def test_bad_dwt_config_names_the_field(message, fields):
    config = load_config("smoke", name="base")
    config.unlock()
    for name, value in fields.items():
        *sections, key = name.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[key] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config, num_devices=1)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_field_is_named_with_the_shipped_value():
    config = load_config("smoke", name="base")
    del config.distill["form"]
    with pytest.raises(ConfigError, match=r"^distill\.form is missing .*distill\.form='dwt'"):
        validate_config(config, num_devices=1)


def test_shipped_finetune_configs_have_the_right_kinds():
    for variant in (None, "smoke"):
        config = load_config(variant, name="finetune/base")
        validate_types(config)
        validate_training(config, num_devices=8)
        validate_config(config.pretrain, num_devices=8)
