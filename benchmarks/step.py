"""Train-step benchmark: the jitted DWT step and the student-only step on fixed shapes.

    python benchmarks/step.py                      # the default shapes below
    python benchmarks/step.py --batch=16 --steps=20 --json=benchmarks/results/step.json

Default shapes (issue 7): student 4 layers / 256 hidden / 4 heads / 1024 MLP, teacher
2 / 128 / 2 / 512, vocabulary 30522, batch 32 × 128 tokens, 20 predictions per
sequence, dropout 0.1. For each step it reports the median time over ``--steps``
timed steps after two warm-up steps, tokens/s, compile time, model FLOPs per step
(student forward+backward, teacher forward, MLM heads on masked positions only), MFU
against this machine's dense float32 matmul throughput measured in the same run, and
the teacher's overhead (DWT step / student-only step) beside the FLOP-ideal ratio.
Prints a markdown table and writes JSON.

This is the measuring harness only; the PyTorch references of issue 7 are not here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax import flops, sharding
from dwt_jax.configuration import load_config_file
from dwt_jax.models.config import BertConfig
from dwt_jax.plan import build_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SIZE_FIELDS = ("num_layers", "hidden_size", "num_heads", "mlp_dim")


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul throughput of device 0 (median of ``repeats``)."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def _config(args: argparse.Namespace, strategy: str):
    config = load_config_file(os.path.join(REPO_ROOT, "configs", "base.py"), None)
    sizes = dict(zip(_SIZE_FIELDS, args.student, strict=True))
    config.model.update(
        vocab_size=args.vocab, max_len=max(args.seq_len, 128), **sizes,
        dropout_rate=args.dropout, attention_dropout_rate=args.dropout,
    )  # fmt: skip
    config.teacher.model = config.model.copy_and_resolve_references()
    t_sizes = dict(zip(_SIZE_FIELDS, args.teacher, strict=True))
    config.teacher.model.update(**t_sizes)
    config.data.update(
        seq_len=args.seq_len, max_predictions=args.predictions, batch_size=args.batch,
        vocab_size=args.vocab,
    )  # fmt: skip
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.distill.strategy = strategy
    return config


def _batch(spec: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with the pipeline's schema: one segment per row, all predictions real."""
    rng = np.random.default_rng(seed)
    batch = {name: np.ones(s.shape, s.dtype) for name, s in spec.items()}
    batch["input_ids"] = rng.integers(5, vocab, spec["input_ids"].shape).astype(np.int32)
    rows, length = spec["input_ids"].shape
    batch["positions"] = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    batch["token_type_ids"] = np.zeros((rows, length), np.int32)
    m = spec["masked_positions"].shape[1]
    positions = np.sort(np.stack([rng.choice(length, m, replace=False) for _ in range(rows)]))
    batch["masked_positions"] = positions.astype(np.int32)
    batch["masked_ids"] = rng.integers(5, vocab, (rows, m)).astype(np.int32)
    return batch


def time_step(config, teacher_configs, steps: int) -> dict[str, float]:
    """Compile time and median step time of one configured train step on device 0."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    start = time.perf_counter()
    built = build_step(config, teacher_configs, mesh)
    compile_s = time.perf_counter() - start
    batch = sharding.shard_batch(_batch(built["batch_spec"], config.model.vocab_size), mesh)
    state, teachers, times = built["state"], built["teachers"], []
    for index in range(steps + 2):  # Two warm-up steps.
        start = time.perf_counter()
        state, metrics = built["step"](state, batch, teachers)
        jax.block_until_ready((state, metrics))
        if index >= 2:
            times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "step_s": statistics.median(times)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    peak = matmul_flops_per_s()
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {jax.devices()[0]}",
        "jax": jax.__version__,
        "matmul_flops_per_s": peak,
        "shapes": vars(args).copy(),
    }
    dwt = _config(args, "dwt")
    student = BertConfig.from_config(dwt.model)
    teacher = BertConfig.from_config(dwt.teacher.model)
    shape = (args.batch, args.seq_len, args.predictions)
    entries = {"student only": (_config(args, "mlm"), []), "dwt": (dwt, [teacher])}
    for name, (config, teachers) in entries.items():
        timing = time_step(config, teachers, args.steps)
        step_flops = flops.pretrain_step_flops(student, teachers, *shape)
        results[name] = {
            **timing,
            "tokens_per_s": args.batch * args.seq_len / timing["step_s"],
            "model_flops": step_flops,
            "mfu": step_flops / timing["step_s"] / peak,
        }
    results["teacher_overhead"] = results["dwt"]["step_s"] / results["student only"]["step_s"]
    results["flop_ideal_overhead"] = (
        results["dwt"]["model_flops"] / results["student only"]["model_flops"]
    )
    results["peak_rss_bytes"] = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Machine: {results['machine']}; jax {results['jax']}; float32 matmul "
        f"{results['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; peak RSS "
        f"{results['peak_rss_bytes'] / 2**30:.2f} GiB",
        "",
        "| step | median s/step | tokens/s | compile s | GFLOPs/step | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("student only", "dwt"):
        r = results[name]
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} | "
            f"{r['model_flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% |"
        )
    lines += [
        "",
        f"Teacher overhead (DWT / student only): {results['teacher_overhead']:.3f}; "
        f"FLOP-ideal: {results['flop_ideal_overhead']:.3f}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = "layers hidden heads mlp"
    parser.add_argument("--student", type=int, nargs=4, default=[4, 256, 4, 1024], help=sizes)
    parser.add_argument("--teacher", type=int, nargs=4, default=[2, 128, 2, 512], help=sizes)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--json", default="benchmarks/results/step.json")
    parser.add_argument("--markdown", default="benchmarks/results/step.md")
    args = parser.parse_args()
    results = run(args)
    table = markdown(results)
    print(table)
    for path, text in ((args.json, json.dumps(results, indent=2)), (args.markdown, table)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    jnp.zeros(())  # Start the backend before timing anything.
    main()
