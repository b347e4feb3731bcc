"""Config validation: the shipped configs pass, bad ones fail with one clear line."""

from __future__ import annotations

import pytest
from testutil import load_config

from dwt_jax.configuration import ConfigError, resolve_mesh_shape, validate_config


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
