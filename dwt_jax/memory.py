"""The memory model of the planner: per-device bytes and FLOPs of every stage of a config.

State bytes are exact: shapes from ``jax.eval_shape`` of the real init, per-device
slices from the logical-axis rules. Activations are counted from the model (a BERT
encoder or a GPT-2 / Llama decoder, by ``model.family``): what each layer keeps for
its backward (per remat policy), the loss's [B,M,V] buffers (a causal LM predicts at
every position, M = L, in vocabulary slices: no [B,L,V] logits), FSDP-gathered
weights and the teachers' outputs. Which intermediates XLA keeps
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
from dwt_jax.distill.dwt import hidden_layer_pairs
from dwt_jax.distill.terms import head_settings
from dwt_jax.errors import ConfigError
from dwt_jax.models.families import ModelConfig, make_lm, model_config_from
from dwt_jax.objectives import objective_for
from dwt_jax.optim import make_optimizer
from dwt_jax.schema import model_config, validate_types
from dwt_jax.sharding import resolve_mesh_shape
from dwt_jax.teachers import (
    boxed_params,
    check_same_vocabulary,
    check_vocabulary,
    is_cache,
    plan_teacher,
)

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


def boxed_state(config: ml_collections.ConfigDict, teacher_configs: Sequence[ModelConfig]) -> Any:
    """The run's train state as boxed abstract values: the init of ``train.py``, traced."""
    cfg = model_config_from(config.model)
    model = make_lm(cfg)
    init = functools.partial(
        state.init_boxed_state,
        model=model,
        optimizer=make_optimizer(config.optim, config.train.num_steps)[0],
        strategy=make_strategy(config.distill),
        model_inputs=objective_for(cfg).model_inputs(model, config),
        teacher_configs=tuple(teacher_configs),
    )
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def param_count(boxed_tree: Any) -> int:
    """Parameters (elements) of a tree of boxed abstract values."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nn.meta.unbox(boxed_tree)))


def format_count(n: int) -> str:
    """A parameter count for people: '1.12B', '245.9M', '35.0K'."""
    for unit, scale, digits in (("B", 1e9, 2), ("M", 1e6, 1), ("K", 1e3, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


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
    per residual add + LayerNorm (RMSNorm for Llama) and [B,L,F] tensors of the GELU
    (SwiGLU for Llama; inputs and outputs at least), bytes per dropout-mask element,
    whether bf16 values are kept in f32, and whether remat lowers the peak."""

    name: str
    layer_norm: int
    gelu: int
    mask_bytes: int
    f32_activations: bool
    honours_remat: bool
    # Bytes per element of a hash-dropout mask (model.dropout_rng='hash'): recomputed
    # from the element's index in the backward, so nothing unless the backend keeps it.
    hash_mask_bytes: int = 0
    # Decoders: [B,L,D] tensors per RMSNorm, [B,L,F] tensors of Llama's SwiGLU and of
    # GPT-2's tanh GELU, and f32 [B,H,L,L] tensors of the masked softmax.
    rms_norm: float = 2
    swiglu: float = 3
    gelu_tanh: float = 2
    causal_scores: int = 1

    def dropout_mask_bytes(self, cfg: ModelConfig) -> int:
        """Bytes a dropout mask keeps per element under the config's dropout RNG."""
        return self.mask_bytes if cfg.dropout_rng == "threefry" else self.hash_mask_bytes

    def itemsize(self, cfg: ModelConfig) -> int:
        """Bytes per element of compute-dtype activations as the backend keeps them."""
        return 4 if self.f32_activations else np.dtype(cfg.compute_dtype).itemsize

    def remat(self, cfg: ModelConfig) -> str:
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
    # Decoders, from the per-layer growth of XLA:CPU's temp with F, L, H and D: an
    # RMSNorm keeps 3 [B,L,D] tensors, SwiGLU 4.5 [B,L,F] and the tanh GELU 2.5, and the
    # masked softmax 3 f32 [B,H,L,L] (masked logits, exponentials, probabilities).
    "cpu": Profile(
        "xla-cpu", 5, 4, 8, f32_activations=True, honours_remat=False,
        rms_norm=3, swiglu=4.5, gelu_tanh=2.5, causal_scores=3,
    ),
    # What autodiff must keep: inputs and outputs, masks as bool (GPU/TPU; unmeasured):
    # the softmax's f32 output and its cast, SwiGLU's gate, up and product.
    "fused": Profile("fused", 2, 2, 1, f32_activations=False, honours_remat=True),
}  # fmt: skip
# [B,M,V] f32 buffers live at the loss: logits, the CE softmax and the logits'
# gradient; a soft term adds the teacher's logits, p_t, the tempered student
# softmax and the KL's p_t > 0 select.
LOGIT_BUFFERS = {"mlm": 3, "per_teacher": 4}
# A causal LM's fused head (losses.fused_lm_losses) keeps, per [B·L, slice] of the
# vocabulary, the student's logits and their gradient, and per teacher its logits and
# probabilities (JSD_β three more: the mixture's); read off XLA:CPU.
CAUSAL_LOGIT_BUFFERS = {"lm": 2, "kl": 2, "reverse_kl": 2, "jsd": 5}


def _sizes(cfg: ModelConfig, b: int, seq: int, m: int, t: int) -> dict[str, int]:
    """Per-device element counts of activations (heads, mlp, vocab split over tensor);
    ``m`` positions reach the LM head (the masked ones; a causal LM's every one)."""
    heads = -(-cfg.num_heads // t)
    kv_heads = -(-getattr(cfg, "num_kv_heads", cfg.num_heads) // t)  # GQA's fewer K/V.
    return {
        "resid": b * seq * cfg.hidden_size,
        "heads": b * seq * heads * cfg.head_dim,
        "kv": b * seq * kv_heads * cfg.head_dim,
        "scores": b * heads * seq * seq,
        "mask": b * seq * seq,  # A decoder's [B,1,L,L] bool document mask.
        "mlp": b * seq * -(-cfg.mlp_dim // t),
        "masked": b * m * cfg.hidden_size,
        "logits": b * m * -(-cfg.vocab_size // t),
    }


def _decoder_layer_bytes(cfg: ModelConfig, s: dict[str, int], prof: Profile, train: bool) -> int:
    """One GPT-2 / Llama block's tensors kept for its backward (``train``) or live in a
    forward. XLA's attention materialises the [B,H,L,L] scores (f32 softmax, then cast)."""
    c = prof.itemsize(cfg)
    drop = prof.dropout_mask_bytes(cfg) if train and cfg.dropout_rate > 0 else 0
    # q and k after RoPE, v, the context: the einsums' and o_proj's operands.
    total = (2 * s["heads"] + 2 * s["kv"]) * c
    if cfg.qk_norm:  # The per-head RMSNorms of q and k.
        total += (s["heads"] + s["kv"]) * prof.rms_norm * c
    total += s["scores"] * (4 * prof.causal_scores + (c if c != 4 else 0))
    llama = cfg.family == "llama"
    norm = prof.rms_norm if llama else prof.layer_norm
    total += 2 * s["resid"] * (norm * c + drop)  # Two residual adds + pre-norms.
    return int(total + s["mlp"] * (prof.swiglu if llama else prof.gelu_tanh) * c)


def layer_bytes(cfg: ModelConfig, s: dict[str, int], prof: Profile, train: bool) -> int:
    """One layer's tensors kept for its backward without remat (``train``), or
    live in a forward (teachers: deterministic, no dropout)."""
    if cfg.objective == "clm":
        return _decoder_layer_bytes(cfg, s, prof, train)
    c = prof.itemsize(cfg)
    drop = prof.dropout_mask_bytes(cfg) if train and cfg.dropout_rate > 0 else 0
    attn_drop = train and cfg.attention_dropout_rate > 0
    total = 4 * s["heads"] * c  # q, k, v and the context: operands of the einsums/projection.
    total += s["scores"] * 4  # The softmax output (f32 scores), for the softmax backward.
    if attn_drop or c != 4:  # The dropped (or cast) probabilities: the context einsum's operand.
        total += s["scores"] * (c + (prof.dropout_mask_bytes(cfg) if attn_drop else 0))
    total += 2 * s["resid"] * (prof.layer_norm * c + drop)  # Two residual adds + LayerNorms.
    return total + s["mlp"] * prof.gelu * c  # The MLP's GELU.


def _remat_layer_bytes(cfg: ModelConfig, s: dict[str, int], prof: Profile) -> int:
    """What one layer keeps under its remat policy (its input always: remat's argument)."""
    c, policy = prof.itemsize(cfg), prof.remat(cfg)
    if policy == "none":
        return layer_bytes(cfg, s, prof, train=True)
    if policy == "minimal":  # Input, 'attn_out' and 'mlp_out' (checkpoint_name).
        return 3 * s["resid"] * c
    if policy == "dots":  # Input and every matmul result (scores in f32).
        qkv = 4 * s["heads"]  # q, k, v and the context.
        mlp = s["mlp"]  # The MLP's input matmul(s): GPT-2's c_fc, Llama's gate and up.
        if cfg.objective == "clm":
            qkv = 2 * s["heads"] + 2 * s["kv"]
            mlp *= 2 if cfg.family == "llama" else 1
        return (3 * s["resid"] + qkv + mlp) * c + 4 * s["scores"]
    return s["resid"] * c  # 'full': the input only.


def student_activations(
    cfg: ModelConfig, s: dict[str, int], prof: Profile, logit_buffers: int
) -> dict[str, int]:
    """Bytes kept for the backward, the loss's working set, and one layer recomputed."""
    c = prof.itemsize(cfg)
    drop = prof.dropout_mask_bytes(cfg) + c if cfg.dropout_rate > 0 else 0
    if cfg.objective == "clm":
        # Embedding dropout; the final norm, whose output is the fused head's input; the
        # [B,1,L,L] document mask (one for every layer).
        norm = prof.rms_norm if cfg.family == "llama" else prof.layer_norm
        outside = int(s["resid"] * (drop + norm * c)) + s["mask"]
    else:
        embeddings = s["resid"] * (prof.layer_norm * c + drop)
        outside = embeddings + s["masked"] * (1 + prof.layer_norm + prof.gelu) * c  # Head.
    saved = outside + cfg.num_layers * _remat_layer_bytes(cfg, s, prof)
    remat = prof.remat(cfg) != "none"
    recompute = layer_bytes(cfg, s, prof, train=True) if remat else 0
    return {"saved": saved, "loss": logit_buffers * s["logits"] * 4, "recompute": recompute}


def gathered_weight_bytes(cfg: ModelConfig, mesh: dict[str, int], prof: Profile) -> int:
    """FSDP: the all-gathered kernels autodiff keeps as residuals (no remat), the LM
    head (tied: the word embeddings) included, each still split over tensor and cast
    to the compute dtype (the matmuls' operands)."""
    if mesh["fsdp"] == 1 or prof.remat(cfg) != "none":
        return 0
    d, f, v, t = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size, mesh["tensor"]
    per_layer = 4 * d * -(-d // t) + 2 * d * -(-f // t)
    if cfg.objective == "clm":
        h, g, k = -(-cfg.num_heads // t), -(-cfg.num_kv_heads // t), cfg.head_dim
        mlp = flops.MLP_MATMULS[cfg.family]
        per_layer = 2 * d * h * k + 2 * d * g * k + mlp * d * -(-f // t)
    return prof.itemsize(cfg) * (cfg.num_layers * per_layer + d * -(-v // t))


def _hidden_term_bytes(
    config: ml_collections.ConfigDict, cfg: ModelConfig, teachers: Sequence[ModelConfig], b: int
) -> int:
    """DWT's hidden term: per matched pair the projected student state and the loss's
    difference, f32 [B,L,D_t]."""
    how, seq = config.distill.get("hidden_layer_map", "uniform"), config.data.seq_len
    pairs = [len(hidden_layer_pairs(how, cfg.num_layers, t.num_layers)) for t in teachers]
    return sum(8 * b * seq * t.hidden_size * n for t, n in zip(teachers, pairs, strict=True))


def _predicted(config: ml_collections.ConfigDict, cfg: ModelConfig) -> int:
    """Positions per sequence the LM head runs at: the masked ones, or every one."""
    return config.data.seq_len if cfg.objective == "clm" else config.data.max_predictions


def _plan_teacher(
    cfg: ModelConfig,
    rules: sharding.Rules,
    mesh: dict[str, int],
    b: int,
    config: ml_collections.ConfigDict,
    prof: Profile,
    hidden: bool,
) -> dict[str, Any]:
    """A teacher's params under its rules, its forward's peak and the outputs kept."""
    t = 1 if dict(rules)["heads"] is None else mesh["tensor"]  # 'replicated': whole heads.
    s = _sizes(cfg, b, config.data.seq_len, _predicted(config, cfg), t)
    c = prof.itemsize(cfg)
    hidden_states = (cfg.num_layers + 1) * s["resid"] * c if hidden else 0
    # Its outputs in the student's loss: MLM logits at the masked positions; a causal
    # LM's final hidden states (the fused head decodes them a vocabulary slice at a time).
    outputs = s["resid"] * c if cfg.objective == "clm" else 4 * s["logits"]
    boxed = boxed_params(make_lm(cfg))
    return {
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "param_count": param_count(boxed),
        "params": tree_bytes(boxed, rules, mesh),
        # One layer's working set at a time, then its outputs and kept hidden states.
        "forward": layer_bytes(cfg, s, prof, train=False) + outputs + hidden_states,
        "outputs": outputs if cfg.objective == "clm" else 0,  # MLM: in LOGIT_BUFFERS.
        "hidden_states": hidden_states,
    }


def _step_flops(
    cfg: ModelConfig, teachers: Sequence[ModelConfig], config: ml_collections.ConfigDict, n: int
) -> dict[str, int | float]:
    shape = (config.data.batch_size, config.data.seq_len, config.data.get("max_predictions"))
    student = 3 * flops.lm_forward_flops(cfg, *shape)
    total = flops.pretrain_step_flops(cfg, teachers, *shape)
    return {"student_fwd_bwd": student, "teachers_fwd": total - student, "total": total,
            "per_device": total / n, "per_token": total / (shape[0] * shape[1])}  # fmt: skip


def plan_stage(
    config: ml_collections.ConfigDict,
    teacher_configs: Sequence[ModelConfig],
    num_devices: int,
    profile: Profile,
) -> dict[str, Any]:
    """Every per-device figure of one stage (one training run)."""
    mesh = resolve_mesh_shape(config.mesh, num_devices)
    cfg = model_config_from(config.model)
    accum, shards = config.optim.grad_accum_steps, mesh["data"] * mesh["fsdp"]
    b = config.data.batch_size // shards // accum
    boxed = boxed_state(config, teacher_configs)
    parts = state_bytes(boxed, mesh)
    params = parts["student_params"] + parts["adapter_params"]
    buffers = LOGIT_BUFFERS["mlm"] + LOGIT_BUFFERS["per_teacher"] * len(teacher_configs)
    if cfg.objective == "clm":
        per_teacher = CAUSAL_LOGIT_BUFFERS[config.distill.get("divergence", "kl")]
        buffers = CAUSAL_LOGIT_BUFFERS["lm"] + per_teacher * len(teacher_configs)
    m = _predicted(config, cfg)
    s = _sizes(cfg, b, config.data.seq_len, m, mesh["tensor"])
    strategy = make_strategy(config.distill)
    head = head_settings(config.distill)  # The LM head fused with the loss, in slices.
    chunk = head["chunk_size"] if head["fused"] or cfg.objective == "clm" else 0
    if head["block_rows"] and (head["fused"] or cfg.objective == "clm"):
        # The training loss's head (losses.fused_lm_loss) holds one block of rows, the
        # block's rows split over the batch shards, against the whole vocabulary.
        rows = min(b * m, -(-head["block_rows"] // shards))
        s["logits"] = min(s["logits"], rows * -(-cfg.vocab_size // mesh["tensor"]))
    elif chunk:  # The fused head (losses.fused_*_losses) holds one vocabulary slice.
        s["logits"] = min(s["logits"], b * m * chunk)
    act = student_activations(cfg, s, profile, buffers)
    hidden = bool(strategy.teacher_output_kwargs.get("output_hidden_states"))
    if hidden:
        act["saved"] += _hidden_term_bytes(config, cfg, teacher_configs, b)
    rules = sharding.configured_teacher_rules(config)
    teachers = [_plan_teacher(t, rules, mesh, b, config, profile, hidden) for t in teacher_configs]
    gathered = gathered_weight_bytes(cfg, mesh, profile)
    spec = objective_for(cfg).batch_spec(config)
    fixed = {
        "state": sum(parts.values()),
        "teacher_params": sum(t["params"] for t in teachers),
        # The global batch's slice on each batch shard (all micro-batches).
        "batch": sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in spec.values())
        // shards,
        "grad_accum": params if accum > 1 else 0,  # The scan's running sum of gradients.
    }
    loss_phase = act["saved"] + max(act["loss"], act["recompute"]) + gathered
    kept = sum(t["hidden_states"] + t["outputs"] for t in teachers)
    phases = {
        "teacher_forward": max((t["forward"] for t in teachers), default=0),
        "student_loss": loss_phase + kept,
        "update": 2 * params,  # Gradients and one tree of temporaries (clipped, updates).
    }
    count = param_count(boxed.params["student"])
    return {
        "model": f"{config.distill.strategy}, {cfg.family} {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, {format_count(count)} params",
        "param_count": count,
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
) -> list[ModelConfig]:
    """The stage's teachers (a pipeline's own teacher stage is ``teacher.model``), by
    their configs only; a teacher with another vocabulary is refused as the run would."""
    configs, student = [], model_config(config.model)
    for i, spec in enumerate(config.teacher.workdirs):
        stage = os.path.basename(spec) if os.path.dirname(spec) == _PLAN_DIR else ""
        if stage in stages:  # A teacher the pipeline trains first (teacher, teacher{k}).
            cfg = model_config_from(stages[stage].model)
            index = stage.removeprefix("teacher")
            check_same_vocabulary(
                cfg, student, f"teacher.models[{index}]" if index else "teacher.model"
            )
        elif is_cache(spec):  # A cached teacher: no parameters, no forward pass.
            continue
        else:
            plan = plan_teacher(spec, f"teacher.workdirs[{i}]")
            check_vocabulary(plan, student, f"teacher.workdirs[{i}]")
            cfg = plan.config
        configs.append(cfg)
    return configs


def training_stages(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, list[ModelConfig]]]:
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
