"""The planner for the decoder families: FLOPs of GPT-2 and Llama against counts read
off their parameter trees, exact state bytes, the activation model against XLA's own
figures, and the plan of configs/scale/llama_1b.py."""

from __future__ import annotations

import math
import os

import jax
import pytest
from flax import linen as nn
from flax import traverse_util
from testutil import REPO_ROOT, load_config

from dwt_jax import flops, memory, plan
from dwt_jax.configuration import load_config_file, validate_config
from dwt_jax.models.config import BertConfig
from dwt_jax.models.families import make_lm, model_config_from
from dwt_jax.teachers import boxed_params

LLAMA_1B = os.path.join(REPO_ROOT, "configs", "scale", "llama_1b.py")
CPU = memory.PROFILES["cpu"]


def _decoder(family: str = "llama", **fields):
    section = {"family": family, "vocab_size": 96, "hidden_size": 32, "num_layers": 2,
               "num_heads": 4, "mlp_dim": 48, "max_len": 64, **fields}  # fmt: skip
    return model_config_from(section)


def _kernel_elements(cfg) -> int:
    """Elements of every matmul weight of the model's real parameter tree (q/k/v/o,
    the MLP, an untied head), read by shape: no formula of the architecture."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed_params(make_lm(cfg))))
    return sum(math.prod(v.shape) for path, v in flat.items() if path[-1] == "kernel")


@pytest.mark.parametrize(
    "cfg",
    [
        _decoder("llama", num_kv_heads=2, tie_embeddings=False),
        _decoder("llama", num_kv_heads=1, head_dim=16, qkv_bias=True, qk_norm=True),
        _decoder("gpt2"),
    ],
    ids=["llama-gqa-untied", "llama-qwen-style", "gpt2-tied"],
)
def test_forward_flops_per_token_from_the_parameter_tree(cfg):
    """2 FLOPs per weight of every matmul a token goes through (a tied head is the
    embedding table, which has no 'kernel'), plus causal attention's scores and values,
    2·2·L·H·K each halved. Embedding lookups, biases and norms cost nothing."""
    seq = 24
    head = 0 if not cfg.tied else cfg.vocab_size * cfg.hidden_size
    matmuls = 2 * (_kernel_elements(cfg) + head)
    attention = cfg.num_layers * (2 * 2 * seq * cfg.num_heads * cfg.head_dim) // 2
    assert flops.causal_lm_flops_per_token(cfg, seq) == matmuls + attention
    assert flops.causal_lm_forward_flops(cfg, 3, seq) == 3 * seq * (matmuls + attention)


def test_gqa_cuts_the_key_value_flops_and_attention_is_half():
    d, h, k, layers = 32, 4, 8, 2
    full = _decoder(num_kv_heads=4)
    grouped = _decoder(num_kv_heads=1)
    # k and v projections: 2·D·G·K each, per layer and token.
    saved = layers * 2 * (2 * d * (h - 1) * k)
    assert (
        flops.causal_lm_flops_per_token(full, 16) - flops.causal_lm_flops_per_token(grouped, 16)
        == saved
    )
    # Scores and values grow with the sequence at half the bidirectional rate 4·H·K.
    per_position = flops.causal_lm_flops_per_token(full, 17) - flops.causal_lm_flops_per_token(
        full, 16
    )
    assert per_position == layers * (4 * h * k) // 2
    # GPT-2's MLP has 2 matmuls, Llama's SwiGLU 3 (same sizes otherwise).
    gpt2, llama = _decoder("gpt2"), _decoder("llama")
    assert (
        flops.decoder_layer_flops_per_token(llama, 16)
        - flops.decoder_layer_flops_per_token(gpt2, 16)
        == 2 * d * 48
    )


def test_step_flops_dispatch_on_the_objective():
    student, teacher = _decoder(num_kv_heads=2), _decoder(hidden_size=16, num_heads=2)
    fwd = flops.causal_lm_forward_flops
    step = flops.pretrain_step_flops(student, [teacher], 4, 16)
    assert step == 3 * fwd(student, 4, 16) + fwd(teacher, 4, 16)
    bert = BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, mlp_dim=8, max_len=8)
    assert flops.lm_forward_flops(bert, 3, 5, 2) == flops.mlm_forward_flops(bert, 3, 5, 2)
    with pytest.raises(ValueError, match="max_predictions"):
        flops.pretrain_step_flops(bert, [], 3, 5)


def _llama_1b_hand_count(m) -> int:
    """Parameters of a Llama by hand: embeddings, head, q/k/v/o, SwiGLU, two RMSNorms
    per layer and the final one."""
    d, k = m.hidden_size, m.hidden_size // m.num_heads
    attention = d * m.num_heads * k * 2 + d * m.num_kv_heads * k * 2
    layer = attention + 3 * d * m.mlp_dim + 2 * d
    head = 0 if m.tie_embeddings else d * m.vocab_size
    return m.vocab_size * d + head + m.num_layers * layer + d


@pytest.fixture(scope="module")
def llama_1b_report():
    config = load_config_file(LLAMA_1B, "8xh100")
    return config, plan.make_report(config, num_devices=8, device_memory_gib=80, platform="gpu")


def test_llama_1b_plan(llama_1b_report):
    config, report = llama_1b_report
    assert list(report["stages"]) == ["teacher", "student"] and report["fits"]
    student, teacher = report["stages"]["student"], report["stages"]["teacher"]
    count = _llama_1b_hand_count(config.model)
    assert 1.0e9 < count < 1.2e9 and student["param_count"] == count  # Exactly.
    assert teacher["param_count"] == _llama_1b_hand_count(config.teacher.model)
    assert 0.2e9 < teacher["param_count"] < 0.3e9
    # FSDP over 8: params, gradients and both AdamW moments, float32, an eighth each.
    assert student["student_params"] == pytest.approx(4 * count / 8, rel=1e-3)
    assert student["optimizer"] == pytest.approx(8 * count / 8, rel=1e-3)
    # Per token: ≈ 6·N for the student (3 × the forward's 2·N) and 2·N for the teacher,
    # plus attention; the step's figure is the FLOPs module's.
    f, seq = student["flops"], config.data.seq_len
    # N: the matmul weights (the head's, not the embedding table's or the norms').
    n_s = count - 32000 * 2048 - (2 * 22 + 1) * 2048
    n_t = teacher["param_count"] - 32000 * 1024 - (2 * 16 + 1) * 1024
    attention = 3 * 22 * 2 * seq * 2048 + 16 * 2 * seq * 1024  # Causal: 2·L·H·K a layer.
    assert f["per_token"] == pytest.approx(6 * n_s + 2 * n_t + attention, rel=1e-12)
    assert f["total"] == flops.pretrain_step_flops(
        model_config_from(config.model), [model_config_from(config.teacher.model)], 512, seq
    )
    # The fused head: one vocabulary slice of logits, never the [B,L,V] array.
    b = student["batch_per_device"]
    assert student["activations_loss"] == (2 + 2) * b * seq * 8000 * 4
    text = plan.format_report(report)
    assert "stage 'student': dwt, llama 22 layers, hidden 2048" in text
    assert f"parameters: {count:,} trained" in text and "per token" in text
    assert load_config_file(LLAMA_1B, "gpu8").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("variant", "devices", "memory_gib"), [("v4-32", 16, 32), ("v5e-64", 64, 16)]
)
def test_llama_1b_tpu_variants_fit_with_room(variant, devices, memory_gib):
    """Every stage validates at the variant's device count; the student's planned peak
    leaves half the memory free (the fused profile is unmeasured)."""
    config = load_config_file(LLAMA_1B, variant)
    stages = memory.training_stages(config)
    for stage_config, _ in stages.values():
        validate_config(stage_config, devices)
    stage_config, teachers = stages["student"]
    student = memory.plan_stage(stage_config, teachers, devices, memory.PROFILES["fused"])
    assert student["peak"] <= 0.5 * memory_gib * memory.GiB
    assert memory.verdict(student, memory.GiB, memory.PROFILES["fused"]).startswith("DOES NOT FIT")
    assert (
        load_config_file(LLAMA_1B, "tpu").to_dict() == load_config_file(LLAMA_1B, "v4-32").to_dict()
    )


def _small_causal(mesh=(1, 1, 1)):
    config = load_config("smoke", name="causal")
    config.model.update(hidden_size=64, num_heads=4, num_kv_heads=2, mlp_dim=176, max_len=128)
    config.model.update(tie_embeddings=False)
    config.teacher.model.update(num_heads=2, num_kv_heads=2, max_len=128)
    config.data.update(seq_len=128, batch_size=8)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return config


def test_decoder_plan_agrees_with_xla_within_20_percent():
    """A DWT step of a Llama student (GQA, untied head) with its teacher on a
    data × fsdp × tensor mesh (the key/value heads split over tensor), planned vs
    compiled on CPU: the state and teachers' slices exactly, the peak within 20%."""
    config = _small_causal((2, 2, 2))
    stage_config, teachers = memory.training_stages(config)["student"]
    planned = memory.plan_stage(stage_config, teachers, 8, CPU)
    measured = plan.measure_stage(stage_config, teachers, jax.devices()[:8], run_steps=0)
    assert planned["student_params"] == measured["student_params"]
    assert planned["optimizer"] == measured["optimizer"]
    assert planned["fixed_state"] == measured["state"]
    assert planned["fixed_teacher_params"] == measured["teacher_params"] > 0
    assert 0.8 <= planned["peak"] / measured["xla_peak"] <= 1.2, (planned, measured)


def test_the_planner_knows_several_pipeline_teachers_and_caches(tmp_path):
    """teacher.models: one planned stage per teacher, the student planned with all of
    them; a cached teacher adds no parameters and no forward pass."""
    config = load_config("smoke", name="causal")
    small = config.teacher.model.copy_and_resolve_references()
    config.teacher.models = (small, small)
    stages = memory.training_stages(config)
    assert list(stages) == ["teacher0", "teacher1", "student"]
    assert len(stages["student"][1]) == 2
    config.teacher.models = ()
    config.teacher.workdirs = (f"cache:{tmp_path}",)
    assert memory.training_stages(config)["student"][1] == []
