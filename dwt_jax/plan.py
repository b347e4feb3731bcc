"""``python -m dwt_jax.plan --config=configs/base.py``: memory and FLOPs per device.

Plans every stage of a config (the DWT pipeline's teacher stage, then the student
with its teacher) under the configured mesh, for the local device count or any
``--devices N`` (no devices needed), and says whether it fits (the model is in
``dwt_jax.memory``). ``--measure`` compiles the real step on the local devices and
prints XLA's figures beside the plan's.
"""

from __future__ import annotations

import json
import math
import os
import resource
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn
from jax.sharding import Mesh
from ml_collections import config_flags

from dwt_jax import cli, sharding, state, steps
from dwt_jax.config_files import is_finetune
from dwt_jax.configuration import ConfigError, resolve_mesh_shape
from dwt_jax.distill import make_strategy
from dwt_jax.memory import (
    PROFILES,
    GiB,
    MiB,
    default_device_memory,
    format_count,
    plan_config,
    training_stages,
    verdict,
)
from dwt_jax.models.families import ModelConfig, make_lm, model_config_from
from dwt_jax.objectives import objective_for
from dwt_jax.optim import make_optimizer
from dwt_jax.teachers import abstract_params

_XLA_PARTS = ("argument", "output", "alias", "temp")


def _device0_bytes(tree: Any) -> int:
    """Bytes of device 0's slice of every array: a placed array's first shard, or an
    abstract one's shard shape under its sharding (what the compiled step is given)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            total += x.addressable_shards[0].data.nbytes
        else:
            total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def build_step(
    config: ml_collections.ConfigDict,
    teacher_configs: Sequence[ModelConfig],
    mesh: Mesh,
    place: bool = True,
) -> dict[str, Any]:
    """The stage's compiled step, its state and teachers (random, placed on the mesh;
    with ``place=False`` only abstract: compiling needs no arrays), as ``train.py``
    sets them up."""
    rules = sharding.configured_teacher_rules(config)
    optimizer, schedule = make_optimizer(config.optim, config.train.num_steps)
    cfg = model_config_from(config.model)
    model, objective = make_lm(cfg), objective_for(cfg)
    common = {"model": model, "strategy": make_strategy(config.distill), "optimizer": optimizer}
    materialise, abstract_state, state_shardings = state.create_train_state(
        seed=config.seed,
        model_inputs=objective.model_inputs(model, config),
        mesh=mesh,
        teacher_configs=teacher_configs,
        **common,
    )
    t_models = [make_lm(t) for t in teacher_configs]
    t_abstract = [abstract_params(t, mesh, rules) for t in t_models]
    batch_spec = objective.batch_spec(config)
    batch_shardings = sharding.batch_shardings(batch_spec, mesh)
    step = steps.make_train_step(
        **common,
        schedule=schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        grad_accum_steps=config.optim.grad_accum_steps,
        teacher_models=t_models,
        teacher_shardings=[s for _, s in t_abstract],
        teacher_rules=[rules] * len(t_models),
    )
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in batch_spec.items()
    }
    with sharding.activate(mesh):
        compiled = step.jitted.lower(abstract_state, batch, tuple(a for a, _ in t_abstract))
    built = {"compiled": compiled.compile(), "step": step, "batch_spec": batch_spec}
    if not place:
        return {**built, "state": abstract_state, "teachers": [a for a, _ in t_abstract]}
    # Teachers with random params drawn in place: no checkpoint is needed to measure.
    t_params = [
        jax.jit(
            lambda m=m: nn.meta.unbox(
                m.init(jax.random.PRNGKey(1), **state.dummy_inputs(m, 8), deterministic=True)[
                    "params"
                ]
            ),
            out_shardings=s,
        )()
        for m, (_, s) in zip(t_models, t_abstract, strict=True)
    ]
    return {**built, "state": materialise(), "teachers": t_params}


def measure_stage(
    config: ml_collections.ConfigDict,
    teacher_configs: Sequence[ModelConfig],
    devices: Sequence[jax.Device],
    run_steps: int = 2,
) -> dict[str, int]:
    """What device 0 holds (state, teachers) and XLA's memory analysis of the stage's
    compiled step on ``devices``; with ``run_steps``, the state and teachers are placed
    on the devices and stepped (the process's max-RSS growth), else the device-0 bytes
    are the compiled step's argument slices."""
    mesh = sharding.make_mesh(config.mesh, devices)
    built = build_step(config, teacher_configs, mesh, place=run_steps > 0)
    analysis = built["compiled"].memory_analysis()
    live, teachers = built["state"], built["teachers"]
    measured = {
        "state": _device0_bytes(live),
        "student_params": _device0_bytes(live.params["student"]),
        "optimizer": _device0_bytes(live.opt_state),
        "teacher_params": _device0_bytes(teachers),
        **{f"xla_{k}": int(getattr(analysis, f"{k}_size_in_bytes")) for k in _XLA_PARTS},
    }
    measured["xla_peak"] = measured["xla_argument"] + measured["xla_output"]
    measured["xla_peak"] += measured["xla_temp"] - measured["xla_alias"]
    if run_steps:
        # Ones are valid everywhere: token 1, one segment, position 1, all weights 1.
        spec = built["batch_spec"]
        batch = sharding.shard_batch({k: np.ones(v.shape, v.dtype) for k, v in spec.items()}, mesh)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(run_steps):
            live, _ = built["step"](live, batch, teachers)
        jax.block_until_ready(live)
        # The whole process (every local device): a sanity figure only (kB on Linux).
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        measured["rss_growth"] = 1024 * (after - before)
    return measured


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def _stage_lines(name: str, p: dict[str, Any], rules_name: str) -> list[str]:
    rows = [
        ("params of the trained model", p["student_params"]),
        ("adapter params", p["adapter_params"]),
        ("gradients", p["gradients"]),
        ("optimizer (AdamW mu+nu, f32)", p["optimizer"]),
        ("grad accumulation buffer", p["fixed_grad_accum"]),
        ("activations saved for backward", p["activations_saved"]),
        ("loss [B,M,V] buffers (one slice)", p["activations_loss"]),
        ("remat recompute (one layer)", p["activations_recompute"]),
        ("FSDP-gathered weights", p["fsdp_gathered_weights"]),
        ("batch", p["fixed_batch"]),
    ]
    for i, t in enumerate(p["teachers"]):
        rows += [
            (f"teacher {i} params ({rules_name} rules)", t["params"]),
            (f"teacher {i} forward peak", t["forward"]),
            (f"teacher {i} outputs kept for the loss", t["outputs"]),
        ]
    rows.append(("resident (state, teachers, batch)", p["resident"]))
    head = (
        f"stage '{name}': {p['model']}, {p['dtype']}, remat {p['remat']}; "
        f"batch {p['batch_per_device']} per device"
    )
    lines = [head] + [f"  {label:<36}{_size(v):>12}" for label, v in rows if v]
    f = p["flops"]
    teachers = ", ".join(format_count(t["param_count"]) for t in p["teachers"])
    lines += [
        f"  {'peak estimate (' + p['peak_phase'] + ')':<36}{_size(p['peak']):>12}   {p['verdict']}",
        f"  parameters: {p['param_count']:,} trained"
        + (f"; teachers {teachers}" if teachers else ""),
        f"  FLOPs per step: student fwd+bwd {f['student_fwd_bwd']:.3g}, teachers fwd "
        f"{f['teachers_fwd']:.3g}, total {f['total']:.3g}, per device {f['per_device']:.3g}, "
        f"per token {f['per_token']:.3g}",
    ]
    if "measured" in p:
        m = p["measured"]
        teachers = f", teachers {_size(m['teacher_params'])}" if p["teachers"] else ""
        lines += [
            f"  measured on device 0: state {_size(m['state'])} (plan/measured "
            f"{p['fixed_state'] / m['state']:.3f}){teachers}",
            f"  XLA: argument {_size(m['xla_argument'])} + output {_size(m['xla_output'])} - "
            f"alias {_size(m['xla_alias'])} + temp {_size(m['xla_temp'])} = peak "
            f"{_size(m['xla_peak'])} (plan/measured {p['peak'] / m['xla_peak']:.3f})",
        ]
        if "rss_growth" in m:  # Every local device is in this process.
            lines.append(
                f"  process max-RSS growth over 2 steps: {_size(m['rss_growth'])} (all local "
                f"devices; XLA peak x {jax.local_device_count()} = "
                f"{_size(m['xla_peak'] * jax.local_device_count())})"
            )
    return lines


def format_report(report: dict[str, Any]) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"dwt_jax plan: {report['devices']} device(s), mesh {mesh}; {report['profile']} "
        f"activation profile; device memory {_size(report['device_memory'])} "
        f"({report['device_memory_source']}); figures per device",
    ]
    for name, p in report["stages"].items():
        lines += ["", *_stage_lines(name, p, report["teacher_sharding"])]
    return "\n".join(lines)


def make_report(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    device_memory_gib: float | None = None,
    measure: bool = False,
    platform: str | None = None,
) -> dict[str, Any]:
    """Plans (and with ``measure`` measures) every stage; raises ``ConfigError``."""
    if is_finetune(config):
        raise ConfigError(
            "the planner covers pre-training configs (the DWT pipeline and MLM runs); "
            "fine-tuning configs (mode='finetune') are not planned yet: plan a "
            "pre-training config of the same model, batch and sequence length instead "
            "(an upper bound: the MLM head's [B,M,V] logits outweigh a classifier's)."
        )
    num_devices = jax.device_count() if num_devices is None else num_devices
    if num_devices <= 0:
        raise ConfigError(f"--devices={num_devices} must be a positive integer.")
    if measure and num_devices != jax.device_count():
        raise ConfigError(
            f"--measure runs on the {jax.device_count()} local device(s); drop --devices="
            f"{num_devices} or plan without --measure."
        )
    platform = platform or jax.devices()[0].platform
    profile = PROFILES["cpu" if platform == "cpu" else "fused"]
    memory, source = default_device_memory()
    if device_memory_gib is not None:
        memory, source = int(device_memory_gib * GiB), "--device_memory_gib"
    plans = plan_config(config, num_devices, profile)
    for p in plans.values():
        p["verdict"] = verdict(p, memory, profile)
    if measure:
        for name, (stage_config, teacher_configs) in training_stages(config).items():
            plans[name]["measured"] = measure_stage(stage_config, teacher_configs, jax.devices())
    return {
        "devices": num_devices,
        "mesh": resolve_mesh_shape(config.mesh, num_devices),
        "platform": platform,
        "profile": profile.name,
        "device_memory": memory,
        "device_memory_source": source,
        "stages": plans,
        "teacher_sharding": config.teacher.get("sharding", "student"),
        "fits": all(p["peak"] <= memory for p in plans.values()),
    }


def _check_json_path(path: str) -> None:
    """``--json`` names a file that can be written (checked before the planning)."""
    target = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise ConfigError(f"--json={path} is a directory; name a file, e.g. --json=plan.json.")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--json={path} cannot be written ({parent} is not a writable directory); "
            "name a file in a directory you can write to."
        )


def main(argv: list[str]) -> None:
    """CLI: flags → the report on stdout (and ``--json``); ``cli.run`` turns a
    ``ConfigError`` into one line and exit 2."""
    del argv  # The flag parser refused positional arguments.
    f = flags.FLAGS
    if f.json:
        _check_json_path(f.json)
    report = make_report(f.config, f.devices, f.device_memory_gib, f.measure, f.platform)
    print(format_report(report), flush=True)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(report, out, indent=2, sort_keys=True)


def _define_flags() -> None:
    """The CLI's flags (defined only when run, so importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file, optionally with ':variant'.", lock_config=True
    )
    flags.DEFINE_integer("devices", None, "Devices to plan for (default: the local ones).")
    flags.DEFINE_float("device_memory_gib", None, "Memory per device in GiB (default: queried).")
    flags.DEFINE_bool("measure", False, "Also compile the step and measure on the local devices.")
    flags.DEFINE_string("json", None, "Also write every figure to this JSON file.")
    flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "Plan for this backend.")
    flags.mark_flags_as_required(["config"])


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.plan``."""
    _define_flags()
    cli.run(main, {"config": "configs/base.py", "json": "plan.json"}, config_flag="config")


if __name__ == "__main__":
    run_cli()
