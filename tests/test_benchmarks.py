"""benchmarks/step.py runs end to end on tiny shapes (its figures are not checked here:
speed is measured by the benchmark, not by tests)."""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest
from testutil import REPO_ROOT


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
