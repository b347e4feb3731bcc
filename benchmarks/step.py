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

When torch and transformers are installed (``pip install torch==2.13.0`` for the CPU
build) it also times the two PyTorch references of ``torch_reference.py`` at the
same shapes, stepped in a child process so that neither framework's thread pools or
heap disturb the other, alternating with our steps two at a time (so a slow spell
of a shared machine hits all of them alike), and reports the DWT step's speed-up
over each. Both processes start with the same environment (``dwt_jax.hostenv``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dwt_jax import flops, hostenv, sharding
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


class JaxStep:
    """One configured train step on device 0, compiled at construction; a call runs one
    step, waits for it and returns its seconds."""

    def __init__(self, config, teacher_configs) -> None:
        self.teacher_configs = teacher_configs
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        start = time.perf_counter()
        built = build_step(config, teacher_configs, mesh)
        self.compile_s = time.perf_counter() - start
        self.batch = sharding.shard_batch(
            _batch(built["batch_spec"], config.model.vocab_size), mesh
        )
        self.step, self.state, self.teachers = built["step"], built["state"], built["teachers"]

    def __call__(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch, self.teachers)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


class TorchReferences:
    """The PyTorch references, stepped in a child process (``torch_reference.serve``)
    so that neither framework's thread pools or heap disturb the other's timing."""

    def __init__(self, args: argparse.Namespace) -> None:
        shapes = {
            "student": args.student, "teacher": args.teacher, "vocab": args.vocab,
            "batch": args.batch, "seq_len": args.seq_len, "predictions": args.predictions,
            "dropout": args.dropout,
        }  # fmt: skip
        command = [
            sys.executable, os.path.join(BENCHMARKS, "torch_reference.py"),
            "--serve", json.dumps(shapes), "--kinds", ",".join(REFERENCES),
        ]  # fmt: skip
        if not args.compile:
            command.append("--no-compile")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self._reply() != "ready":
            raise RuntimeError("benchmarks/torch_reference.py --serve did not start")

    def _reply(self) -> str:
        line = self.process.stdout.readline().strip()
        if not line:
            raise RuntimeError(
                f"the PyTorch reference process ended (exit status {self.process.wait()})"
            )
        return line

    def step(self, kind: str) -> float:
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        return float(self._reply())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def time_alternating(
    steps: dict[str, Callable[[], float]], timed: int, warmup: int = 2, per_round: int = 2
) -> dict[str, list[float]]:
    """Seconds of ``timed`` steps of every entry (each call runs one step and returns
    its seconds), taken ``per_round`` at a time in turn, so that a slow spell of the
    machine hits every entry alike; ``warmup`` steps of each first (the first one's
    time is returned under ``'<name>/first'``)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for index in range(warmup):
            seconds = step()
            if index == 0:
                times[f"{name}/first"] = [seconds]
    while any(len(times[name]) < timed for name in steps):
        for name, step in steps.items():
            for _ in range(min(per_round, timed - len(times[name]))):
                times[name].append(step())
    return times


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None and (
        importlib.util.find_spec("transformers") is not None
    )


REFERENCES = {
    "a": "torch (a) HF, all positions",
    "b": "torch (b) masked positions, compiled",
}
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))


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
    jax_steps = {"student only": JaxStep(_config(args, "mlm"), []), "dwt": JaxStep(dwt, [teacher])}
    entries: dict[str, Callable[[], float]] = dict(jax_steps)
    use_torch = args.torch == "on" or (args.torch == "auto" and _torch_available())
    references = TorchReferences(args) if use_torch else None
    if references is not None:
        entries.update(
            {name: functools.partial(references.step, kind) for kind, name in REFERENCES.items()}
        )
    try:
        times = time_alternating(entries, args.steps)
    finally:
        if references is not None:
            references.close()
    tokens = args.batch * args.seq_len
    for name, step in jax_steps.items():
        step_s = statistics.median(times[name])
        step_flops = flops.pretrain_step_flops(student, step.teacher_configs, *shape)
        results[name] = {
            "compile_s": step.compile_s,
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "model_flops": step_flops,
            "mfu": step_flops / step_s / peak,
        }
    for name in REFERENCES.values() if references is not None else ():
        step_s = statistics.median(times[name])
        results[name] = {
            "compile_s": times[f"{name}/first"][0],
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
        }
        results["dwt"][f"speedup vs {name}"] = results[name]["step_s"] / results["dwt"]["step_s"]
    if references is not None:
        results["torch"] = importlib.metadata.version("torch")
    results["teacher_overhead"] = results["dwt"]["step_s"] / results["student only"]["step_s"]
    results["flop_ideal_overhead"] = (
        results["dwt"]["model_flops"] / results["student only"]["model_flops"]
    )
    results["peak_rss_bytes"] = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return results


def markdown(results: dict[str, Any]) -> str:
    torch_note = f", torch {results['torch']}" if "torch" in results else ""
    lines = [
        f"Machine: {results['machine']}; jax {results['jax']}{torch_note}; float32 matmul "
        f"{results['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; peak RSS "
        f"{results['peak_rss_bytes'] / 2**30:.2f} GiB",
        "",
        "| step | median s/step | tokens/s | compile s | GFLOPs/step | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("student only", "dwt", *REFERENCES.values()):
        if name not in results:
            continue
        r = results[name]
        model_flops = f"{r['model_flops'] / 1e9:.1f}" if "model_flops" in r else "–"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} | "
            f"{model_flops} | {mfu} |"
        )
    lines += [
        "",
        f"Teacher overhead (DWT / student only): {results['teacher_overhead']:.3f}; "
        f"FLOP-ideal: {results['flop_ideal_overhead']:.3f} "
        f"(ratio {results['teacher_overhead'] / results['flop_ideal_overhead']:.3f}).",
    ]
    for name in REFERENCES.values():
        if name in results:
            lines.append(
                f"DWT step tokens/s vs {name}: {results['dwt'][f'speedup vs {name}']:.2f}×."
            )
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
    parser.add_argument(
        "--torch", choices=("auto", "on", "off"), default="auto",
        help="time the PyTorch references too (auto: when torch is installed)",
    )  # fmt: skip
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="reference (b) without torch.compile",
    )  # fmt: skip
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
    hostenv.reexec_with_huge_pages()  # As the training entry point does.
    jnp.zeros(())  # Start the backend before timing anything.
    main()
