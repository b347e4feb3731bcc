"""The memory model of the planner: per-device bytes and FLOPs of every stage of a config.

State bytes are exact: shapes from ``jax.eval_shape`` of the real init, per-device
slices from the logical-axis rules. Activations are counted from the model: what
each layer keeps for its backward (per remat policy), the loss's [B,M,V] buffers,
FSDP-gathered weights and the teachers' outputs. Which intermediates XLA keeps
depends on its fusion, hence two ``PROFILES``. The peak is the state, teachers and
batch plus the largest phase: a teacher's forward, the student's loss (everything
saved) or the optimiser update (gradients and one tree of temporaries).
``dwt_jax.plan`` is the command line around it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec

from dwt_jax import flops, sharding, stages, state
from dwt_jax.configuration import validate_config
from dwt_jax.distill import make_strategy
from dwt_jax.distill.base import head_settings
from dwt_jax.distill.dwt import hidden_layer_pairs
from dwt_jax.errors import ConfigError
from dwt_jax.models.bert import make_model
from dwt_jax.models.config import BertConfig
from dwt_jax.optim import make_optimizer
from dwt_jax.schema import model_config, validate_types
from dwt_jax.sharding import resolve_mesh_shape
from dwt_jax.teachers import boxed_params, check_same_vocabulary, check_vocabulary, plan_teacher

MiB, GiB = 2**20, 2**30
_PLAN_DIR = "<workdir>"  # Stage directories are only names here.


def per_device_bytes(
    shape: Sequence[int], itemsize: int, spec: PartitionSpec | None, mesh_sizes: dict[str, int]
) -> int:
    """Bytes of device 0's (the largest) slice of an array laid out by ``spec``: each
    dimension is split over the product of the mesh axes its entry names, rounded up."""
    entries = tuple(spec or ()) + (None,) * (len(shape) - len(spec or ()))
    elements = 1
    for dim, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        elements *= -(-dim // math.prod(mesh_sizes[a] for a in axes))
    return elements * itemsize


def tree_bytes(boxed_tree: Any, rules: sharding.Rules, mesh_sizes: dict[str, int]) -> int:
    """Per-device bytes of a tree of boxed abstract values (from ``jax.eval_shape``)."""
    specs = jax.tree.leaves(
        sharding.partition_specs(boxed_tree, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None,
    )
    values = jax.tree.leaves(nn.meta.unbox(boxed_tree))
    return sum(
        per_device_bytes(v.shape, np.dtype(v.dtype).itemsize, s, mesh_sizes)
        for v, s in zip(values, specs, strict=True)
    )


def boxed_state(config: ml_collections.ConfigDict, teacher_configs: Sequence[BertConfig]) -> Any:
    """The run's train state as boxed abstract values: the init of ``train.py``, traced."""
    init = functools.partial(
        state.init_boxed_state,
        model=make_model(BertConfig.from_config(config.model)),
        optimizer=make_optimizer(config.optim, config.train.num_steps)[0],
        strategy=make_strategy(config.distill),
        model_inputs=state.dummy_model_inputs(config.data.seq_len, config.data.max_predictions),
        teacher_configs=tuple(teacher_configs),
    )
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def state_bytes(boxed: Any, mesh_sizes: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of the state's parts: student, adapters, optimiser, the rest."""
    rules = sharding.LOGICAL_AXIS_RULES
    return {
        "student_params": tree_bytes(boxed.params["student"], rules, mesh_sizes),
        "adapter_params": tree_bytes(boxed.params.get("adapters", {}), rules, mesh_sizes),
        "optimizer": tree_bytes(boxed.opt_state, rules, mesh_sizes),
        # Everything else in the state (step, RNG, strategy state, counters).
        "other": tree_bytes(boxed.replace(params={}, opt_state=()), rules, mesh_sizes),
    }


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a backend's compile keeps for the backward of one layer: [B,L,D] tensors
    per residual add + LayerNorm and [B,L,F] tensors of the GELU (inputs and outputs at
    least), bytes per dropout-mask element, whether bf16 values are kept in f32, and
    whether remat lowers the peak."""

    name: str
    layer_norm: int
    gelu: int
    mask_bytes: int
    f32_activations: bool
    honours_remat: bool
    # Bytes per element of a hash-dropout mask (model.dropout_rng='hash'): recomputed
    # from the element's index in the backward, so nothing unless the backend keeps it.
    hash_mask_bytes: int = 0

    def dropout_mask_bytes(self, cfg: BertConfig) -> int:
        """Bytes a dropout mask keeps per element under the config's dropout RNG."""
        return self.mask_bytes if cfg.dropout_rng == "threefry" else self.hash_mask_bytes

    def itemsize(self, cfg: BertConfig) -> int:
        """Bytes per element of compute-dtype activations as the backend keeps them."""
        return 4 if self.f32_activations else np.dtype(cfg.compute_dtype).itemsize

    def remat(self, cfg: BertConfig) -> str:
        """The remat policy in effect ('none' where the backend undoes it)."""
        return cfg.remat if self.honours_remat else "none"


PROFILES = {
    # Read off the live set at the peak of the base config's step on XLA:CPU: a
    # LayerNorm keeps three unfused intermediates (x̂, the broadcast 1/σ, x̂·γ) besides
    # its input and output; the erf GELU two erf-derivative terms; a dropout mask stays
    # as the two u32 words of the threefry loop that drew it. XLA:CPU converts bf16
    # operands to f32 and keeps those, and schedules a remat'd layer's recomputation
    # right after its forward (its inputs are ready), so remat saves nothing there
    # (measured: 'full' 570 MiB vs 'none' 586 MiB on the base config).
    "cpu": Profile("xla-cpu", 5, 4, 8, f32_activations=True, honours_remat=False),
    # What autodiff must keep: inputs and outputs, masks as bool (GPU/TPU; unmeasured).
    "fused": Profile("fused", 2, 2, 1, f32_activations=False, honours_remat=True),
}
# [B,M,V] f32 buffers live at the loss: logits, the CE softmax and the logits'
# gradient; a soft term adds the teacher's logits, p_t, the tempered student
# softmax and the KL's p_t > 0 select.
LOGIT_BUFFERS = {"mlm": 3, "per_teacher": 4}


def _sizes(cfg: BertConfig, b: int, seq: int, m: int, t: int) -> dict[str, int]:
    """Per-device element counts of activations (heads, mlp, vocab split over tensor)."""
    heads = -(-cfg.num_heads // t)
    return {
        "resid": b * seq * cfg.hidden_size,
        "heads": b * seq * heads * cfg.head_dim,
        "scores": b * heads * seq * seq,
        "mlp": b * seq * -(-cfg.mlp_dim // t),
        "masked": b * m * cfg.hidden_size,
        "logits": b * m * -(-cfg.vocab_size // t),
    }


def layer_bytes(cfg: BertConfig, s: dict[str, int], prof: Profile, train: bool) -> int:
    """One encoder layer's tensors kept for its backward without remat (``train``), or
    live in a forward (teachers: deterministic, no dropout)."""
    c = prof.itemsize(cfg)
    drop = prof.dropout_mask_bytes(cfg) if train and cfg.dropout_rate > 0 else 0
    attn_drop = train and cfg.attention_dropout_rate > 0
    total = 4 * s["heads"] * c  # q, k, v and the context: operands of the einsums/projection.
    total += s["scores"] * 4  # The softmax output (f32 scores), for the softmax backward.
    if attn_drop or c != 4:  # The dropped (or cast) probabilities: the context einsum's operand.
        total += s["scores"] * (c + (prof.dropout_mask_bytes(cfg) if attn_drop else 0))
    total += 2 * s["resid"] * (prof.layer_norm * c + drop)  # Two residual adds + LayerNorms.
    return total + s["mlp"] * prof.gelu * c  # The MLP's GELU.


def _remat_layer_bytes(cfg: BertConfig, s: dict[str, int], prof: Profile) -> int:
    """What one layer keeps under its remat policy (its input always: remat's argument)."""
    c, policy = prof.itemsize(cfg), prof.remat(cfg)
    if policy == "none":
        return layer_bytes(cfg, s, prof, train=True)
    if policy == "minimal":  # Input, 'attn_out' and 'mlp_out' (checkpoint_name).
        return 3 * s["resid"] * c
    if policy == "dots":  # Input and every matmul result (scores in f32).
        return (3 * s["resid"] + 4 * s["heads"] + s["mlp"]) * c + 4 * s["scores"]
    return s["resid"] * c  # 'full': the input only.


def student_activations(
    cfg: BertConfig, s: dict[str, int], prof: Profile, logit_buffers: int
) -> dict[str, int]:
    """Bytes kept for the backward, the loss's working set, and one layer recomputed."""
    c = prof.itemsize(cfg)
    drop = prof.dropout_mask_bytes(cfg) + c if cfg.dropout_rate > 0 else 0
    embeddings = s["resid"] * (prof.layer_norm * c + drop)
    head = s["masked"] * (1 + prof.layer_norm + prof.gelu) * c  # Gather, transform.
    saved = embeddings + cfg.num_layers * _remat_layer_bytes(cfg, s, prof) + head
    remat = prof.remat(cfg) != "none"
    recompute = layer_bytes(cfg, s, prof, train=True) if remat else 0
    return {"saved": saved, "loss": logit_buffers * s["logits"] * 4, "recompute": recompute}


def gathered_weight_bytes(cfg: BertConfig, mesh: dict[str, int], prof: Profile) -> int:
    """FSDP: the all-gathered kernels autodiff keeps as residuals (no remat), the
    decoder (word embeddings) included, each still split over tensor and cast to the
    compute dtype (the matmuls' operands)."""
    if mesh["fsdp"] == 1 or prof.remat(cfg) != "none":
        return 0
    d, f, v, t = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size, mesh["tensor"]
    per_layer = 4 * d * -(-d // t) + 2 * d * -(-f // t)
    return prof.itemsize(cfg) * (cfg.num_layers * per_layer + d * -(-v // t))


def _hidden_term_bytes(
    config: ml_collections.ConfigDict, cfg: BertConfig, teachers: Sequence[BertConfig], b: int
) -> int:
    """DWT's hidden term: per matched pair the projected student state and the loss's
    difference, f32 [B,L,D_t]."""
    how, seq = config.distill.get("hidden_layer_map", "uniform"), config.data.seq_len
    pairs = [len(hidden_layer_pairs(how, cfg.num_layers, t.num_layers)) for t in teachers]
    return sum(8 * b * seq * t.hidden_size * n for t, n in zip(teachers, pairs, strict=True))


def _plan_teacher(
    cfg: BertConfig,
    rules: sharding.Rules,
    mesh: dict[str, int],
    b: int,
    config: ml_collections.ConfigDict,
    prof: Profile,
    hidden: bool,
) -> dict[str, Any]:
    """A teacher's params under its rules, its forward's peak and the outputs kept."""
    t = 1 if dict(rules)["heads"] is None else mesh["tensor"]  # 'replicated': whole heads.
    s = _sizes(cfg, b, config.data.seq_len, config.data.max_predictions, t)
    hidden_states = (cfg.num_layers + 1) * s["resid"] * prof.itemsize(cfg) if hidden else 0
    return {
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "params": tree_bytes(boxed_params(make_model(cfg, head="mlm")), rules, mesh),
        # One layer's working set at a time, then its logits and kept hidden states.
        "forward": layer_bytes(cfg, s, prof, train=False) + 4 * s["logits"] + hidden_states,
        "hidden_states": hidden_states,
    }


def _step_flops(
    cfg: BertConfig, teachers: Sequence[BertConfig], config: ml_collections.ConfigDict, n: int
) -> dict[str, int | float]:
    shape = (config.data.batch_size, config.data.seq_len, config.data.max_predictions)
    student = 3 * flops.mlm_forward_flops(cfg, *shape)
    total = flops.pretrain_step_flops(cfg, teachers, *shape)
    return {"student_fwd_bwd": student, "teachers_fwd": total - student, "total": total,
            "per_device": total / n}  # fmt: skip


def plan_stage(
    config: ml_collections.ConfigDict,
    teacher_configs: Sequence[BertConfig],
    num_devices: int,
    profile: Profile,
) -> dict[str, Any]:
    """Every per-device figure of one stage (one training run)."""
    mesh = resolve_mesh_shape(config.mesh, num_devices)
    cfg = BertConfig.from_config(config.model)
    accum, shards = config.optim.grad_accum_steps, mesh["data"] * mesh["fsdp"]
    b = config.data.batch_size // shards // accum
    parts = state_bytes(boxed_state(config, teacher_configs), mesh)
    params = parts["student_params"] + parts["adapter_params"]
    buffers = LOGIT_BUFFERS["mlm"] + LOGIT_BUFFERS["per_teacher"] * len(teacher_configs)
    s = _sizes(cfg, b, config.data.seq_len, config.data.max_predictions, mesh["tensor"])
    strategy = make_strategy(config.distill)
    head = head_settings(config.distill)  # The pre-training strategies' MLM head.
    chunk = head["chunk_size"] if head["fused"] else 0
    if chunk:  # The fused head (losses.fused_mlm_losses) holds one vocabulary slice.
        s["logits"] = min(s["logits"], b * config.data.max_predictions * chunk)
    act = student_activations(cfg, s, profile, buffers)
    hidden = bool(strategy.teacher_output_kwargs.get("output_hidden_states"))
    if hidden:
        act["saved"] += _hidden_term_bytes(config, cfg, teacher_configs, b)
    rules = sharding.configured_teacher_rules(config)
    teachers = [_plan_teacher(t, rules, mesh, b, config, profile, hidden) for t in teacher_configs]
    gathered = gathered_weight_bytes(cfg, mesh, profile)
    fixed = {
        "state": sum(parts.values()),
        "teacher_params": sum(t["params"] for t in teachers),
        "batch": 4 * b * accum * (4 * config.data.seq_len + 3 * config.data.max_predictions),
        "grad_accum": params if accum > 1 else 0,  # The scan's running sum of gradients.
    }
    loss_phase = act["saved"] + max(act["loss"], act["recompute"]) + gathered
    phases = {
        "teacher_forward": max((t["forward"] for t in teachers), default=0),
        "student_loss": loss_phase + sum(t["hidden_states"] for t in teachers),
        "update": 2 * params,  # Gradients and one tree of temporaries (clipped, updates).
    }
    return {
        "model": f"{config.distill.strategy}, {cfg.num_layers} layers, hidden {cfg.hidden_size}",
        "remat": cfg.remat, "dtype": cfg.dtype, "mesh": mesh, "batch_per_device": b,
        **parts, "gradients": params, **{f"activations_{k}": v for k, v in act.items()},
        "fsdp_gathered_weights": gathered, "teachers": teachers,
        **{f"fixed_{k}": v for k, v in fixed.items()},
        **{f"phase_{k}": v for k, v in phases.items()},
        "resident": sum(fixed.values()), "peak_phase": max(phases, key=phases.get),
        "peak": sum(fixed.values()) + max(phases.values()),
        "flops": _step_flops(cfg, teacher_configs, config, num_devices),
    }  # fmt: skip


def _teacher_configs(
    config: ml_collections.ConfigDict, stages: dict[str, ml_collections.ConfigDict]
) -> list[BertConfig]:
    """The stage's teachers (a pipeline's own teacher stage is ``teacher.model``), by
    their configs only; a teacher with another vocabulary is refused as the run would."""
    configs, student = [], model_config(config.model)
    for i, spec in enumerate(config.teacher.workdirs):
        if spec == os.path.join(_PLAN_DIR, "teacher") and "teacher" in stages:
            cfg = BertConfig.from_config(stages["teacher"].model)
            check_same_vocabulary(cfg, student, "teacher.model")
        else:
            plan = plan_teacher(spec, f"teacher.workdirs[{i}]")
            check_vocabulary(plan, student, f"teacher.workdirs[{i}]")
            cfg = plan.config
        configs.append(cfg)
    return configs


def training_stages(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, list[BertConfig]]]:
    """{stage: (config, teacher configs)} of the config's training runs; the baseline is
    the student alone, never above the student stage, so it is left out."""
    planned = {n: c for n, c, _ in stages.plan_stages(config, _PLAN_DIR) if n != "baseline"}
    return {name: (c, _teacher_configs(c, planned)) for name, c in planned.items()}


def plan_config(
    config: ml_collections.ConfigDict, num_devices: int, profile: Profile
) -> dict[str, dict[str, Any]]:
    """Validates ``config`` for ``num_devices`` and plans every training stage."""
    validate_types(config)
    plans = {}
    for name, (stage_config, teacher_configs) in training_stages(config).items():
        try:
            validate_config(stage_config, num_devices)
        except ConfigError as e:
            raise ConfigError(f"{stages.user_fields(str(e), name)} (in the {name} stage)") from None
        plans[name] = plan_stage(stage_config, teacher_configs, num_devices, profile)
    return plans


def default_device_memory() -> tuple[int, str]:
    """(bytes per device, where the figure comes from) for the local devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
    # CPU devices (real or --xla_force_host_platform_device_count fakes) share the RAM.
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = jax.local_device_count()
    return ram // count, f"host RAM / {count} local CPU device(s)"


def verdict(plan: dict[str, Any], memory: int, profile: Profile) -> str:
    """'fits (X% of device memory)' or 'DOES NOT FIT ...' with the knobs that would help."""
    if plan["peak"] <= memory:
        return f"fits ({100 * plan['peak'] / memory:.1f}% of device memory)"
    state = plan["fixed_state"] + plan["phase_update"]
    activations = plan["phase_student_loss"]
    hints = ["more mesh.fsdp (splits params, gradients and AdamW state)"]
    act_hints = ["a smaller data.batch_size or more optim.grad_accum_steps"]
    if profile.honours_remat and plan["remat"] != "full":
        act_hints.insert(0, "model.remat='full'")
    if plan["dtype"] == "float32" and not profile.f32_activations:
        act_hints.append("model.dtype='bfloat16'")
    hints = act_hints + hints if activations > state else hints + act_hints
    if plan["fixed_teacher_params"] > state / 2:
        hints.append("teacher.sharding='student' (splits the teachers too)")
    over = (plan["peak"] - memory) / GiB
    return f"DOES NOT FIT ({over:.2f} GiB over); try {', '.join(hints)}"
