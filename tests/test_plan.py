"""The memory and FLOPs planner: exact state bytes, the activation model against XLA's
own figures for the base config, FLOPs by hand, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from testutil import REPO_ROOT, load_config

from dwt_jax import flops, memory, plan, sharding, state
from dwt_jax.configuration import ConfigError, resolve_mesh_shape
from dwt_jax.distill import make_strategy
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.optim import make_optimizer
from dwt_jax.teachers import abstract_params, boxed_params

MESH = {"data": 2, "fsdp": 4, "tensor": 3}
CPU = memory.PROFILES["cpu"]


@pytest.mark.parametrize(
    ("shape", "itemsize", "spec", "expected"),
    [
        ((10, 6), 4, P("fsdp", "tensor"), 3 * 2 * 4),  # ceil(10/4) x ceil(6/3).
        ((10, 6), 2, P(("data", "fsdp"), None), 2 * 6 * 2),  # ceil(10/8) x 6.
        ((7, 5, 3), 4, P(None, "tensor"), 7 * 2 * 3 * 4),  # A short spec: the rest whole.
        ((9,), 1, None, 9),  # Replicated.
        ((), 4, P(), 4),  # A scalar.
    ],
)
def test_per_device_bytes_by_hand(shape, itemsize, spec, expected):
    assert memory.per_device_bytes(shape, itemsize, spec, MESH) == expected


def _mesh_config(config, data, fsdp, tensor):
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    return config


def _device0(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mesh", [(1, 1, 1), (2, 2, 2)])
def test_planned_state_is_exactly_the_materialised_shards(mesh):
    """Student, adapters (DWT's hidden term), optimiser and every teacher layout."""
    config = _mesh_config(load_config("smoke", name="base"), *mesh)
    config.distill.hidden_weight = 1.0
    n = int(np.prod(mesh))
    student = BertConfig.from_config(config.model)
    teacher = make_model(BertConfig.from_config(config.teacher.model))
    mesh_sizes = resolve_mesh_shape(config.mesh, n)
    planned = memory.state_bytes(memory.boxed_state(config, [teacher.config]), mesh_sizes)
    device_mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
    materialise, _, _ = state.create_train_state(
        seed=0,
        model=make_model(student),
        optimizer=make_optimizer(config.optim, 10)[0],
        strategy=make_strategy(config.distill),
        model_inputs=state.dummy_model_inputs(config.data.seq_len, config.data.max_predictions),
        mesh=device_mesh,
        teacher_configs=[teacher.config],
    )
    live = materialise()
    assert planned["adapter_params"] > 0
    assert planned["student_params"] == _device0(live.params["student"])
    assert planned["adapter_params"] == _device0(live.params["adapters"])
    assert planned["optimizer"] == _device0(live.opt_state)
    assert sum(planned.values()) == _device0(live)
    for rules in sharding.TEACHER_RULES.values():
        abstract, shardings = abstract_params(teacher, device_mesh, rules)
        zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
        params = jax.device_put(zeros, shardings)
        assert memory.tree_bytes(boxed_params(teacher), rules, mesh_sizes) == _device0(params)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 1, 1)])
def test_base_config_plan_agrees_with_xla_within_20_percent(mesh):
    """The acceptance check: configs/base.py's student stage with its teacher, planned
    vs compiled on CPU (state exactly, the peak within 20%)."""
    config = _mesh_config(load_config(None, name="base"), *mesh)
    n = int(np.prod(mesh))
    stage_config, teachers = memory.training_stages(config)["student"]
    planned = memory.plan_stage(stage_config, teachers, n, CPU)
    measured = plan.measure_stage(stage_config, teachers, jax.devices()[:n], run_steps=0)
    assert planned["fixed_state"] == measured["state"]
    assert planned["fixed_teacher_params"] == measured["teacher_params"]
    assert 0.8 <= planned["peak"] / measured["xla_peak"] <= 1.2, (planned, measured)


def test_flops_by_hand():
    cfg = BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, mlp_dim=8, max_len=8)
    # Transform 2·D² + decoder 2·D·V per masked position: 2·3·2·(16 + 40).
    assert flops.mlm_head_forward_flops(cfg, batch=3, max_predictions=2) == 672
    # Encoder, one layer: 2·B·L·(4D² + 2DF) + 4·B·L²·D with B=3, L=5.
    encoder = 2 * 3 * 5 * (64 + 64) + 4 * 3 * 25 * 4
    assert flops.encoder_forward_flops(cfg, 3, 5) == encoder
    teacher = BertConfig(
        vocab_size=10, hidden_size=2, num_layers=1, num_heads=1, mlp_dim=4, max_len=8
    )
    t_forward = (2 * 3 * 5 * (16 + 16) + 4 * 3 * 25 * 2) + 2 * 3 * 2 * (4 + 20)
    step = flops.pretrain_step_flops(cfg, [teacher, teacher], 3, 5, 2)
    assert step == 3 * (encoder + 672) + 2 * t_forward


def _bert_large(config):
    config.model.update(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)
    config.model.update(vocab_size=30528, max_len=512, dtype="bfloat16")
    config.teacher.model.update(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
    config.teacher.model.update(vocab_size=30528, max_len=512)
    config.data.update(seq_len=512, max_predictions=80, batch_size=256, eval_batch_size=256)
    config.mesh.update(data=-1, fsdp=8, tensor=1)
    return config


def test_hypothetical_64_devices_and_impossible_memory():
    """--devices 64 needs no devices; a tiny memory says DOES NOT FIT with the knobs."""
    config = _bert_large(load_config(None, name="base"))
    report = plan.make_report(config, num_devices=64, device_memory_gib=80, platform="gpu")
    text = plan.format_report(report)
    assert "64 device(s), mesh data=8 fsdp=8 tensor=1" in text
    assert "stage 'teacher'" in text and "stage 'student'" in text
    student = report["stages"]["student"]
    assert student["batch_per_device"] == 4 and report["fits"]
    assert student["flops"]["per_device"] == pytest.approx(student["flops"]["total"] / 64)
    tiny = plan.make_report(config, num_devices=64, device_memory_gib=0.001, platform="gpu")
    assert not tiny["fits"]
    assert "DOES NOT FIT" in plan.format_report(tiny) and "mesh.fsdp" in plan.format_report(tiny)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dwt_jax.plan", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_table_json_and_bad_config(tmp_path):
    out = tmp_path / "plan.json"
    ok = _cli("--config=configs/base.py:smoke", "--devices=4", f"--json={out}",
              "--device_memory_gib=0.001")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "stage 'student'" in ok.stdout and "DOES NOT FIT" in ok.stdout
    assert json.loads(out.read_text())["stages"]["student"]["peak"] > 0
    bad = _cli("--config=configs/base.py:smoke", "--config.model.num_heads=5")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("dwt_jax: error: model.hidden_size=32") and "\n" not in lines[-1]
    assert os.path.exists(out)


def test_finetuning_configs_are_refused_by_name():
    config = load_config("smoke", name="finetune/base")
    with pytest.raises(ConfigError, match="fine-tuning configs"):
        plan.make_report(config, num_devices=1)
