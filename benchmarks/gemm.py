"""GEMM floor of the causal DWT step: XLA:CPU's and PyTorch's matrix-multiply speed on
exactly the matrix shapes that step multiplies.

    python benchmarks/gemm.py                          # configs/causal.py, issue 17's shapes
    python benchmarks/gemm.py --rounds 5 --json benchmarks/results/gemm.json \\
        --markdown benchmarks/results/gemm.md

The causal benchmark (``benchmarks/step.py --family llama``) compares our DWT step with
PyTorch references of the same step. This one asks what bounds that comparison: it
lists every matrix product of one DWT step at the benchmark's shapes (student forward
and backward, teacher forward, the row-blocked LM heads; `inventory`), times each
shape alone as one jitted XLA ``dot`` and as one ``torch.matmul``, each framework in a
child process of its own (their thread pools never meet), alternating rounds, and
sums count × time per framework. That sum is the step's **GEMM floor** on each
backend: the time its matrix products alone take at that backend's speed on these
shapes, before any element-wise work, memory traffic between them or scheduling.
Each product is also timed with its operands in the other two layouts (A·B, A·Bᵀ,
Aᵀ·B): the sum of the fastest is the floor if every transpose were free (a compiler
may choose layouts), the lower of the two bounds. A step cannot run faster than that
unless its GEMMs run faster than they do alone.

With ``--step_json`` (default: ``benchmarks/results/step_llama.json``, the causal
benchmark's last figures) it also states the step time a speed-up target over a
reference implies, beside our floor. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("nn", "nt", "tn")  # A·B, A·Bᵀ, Aᵀ·B: how the operands are stored.


@dataclasses.dataclass(frozen=True)
class Gemm:
    """``count`` products per step of an [m, k] by [k, n] matrix pair (``batch`` of them
    at once), their operands stored as ``mode`` says (see `MODES`)."""

    name: str
    m: int
    k: int
    n: int
    mode: str
    count: int
    batch: int = 1

    @property
    def flops(self) -> int:
        """FLOPs of one product (2 per multiply-add)."""
        return 2 * self.batch * self.m * self.k * self.n

    @property
    def key(self) -> tuple[int, int, int, str, int]:
        return (self.m, self.k, self.n, self.mode, self.batch)


def _linear(name: str, rows: int, d_in: int, d_out: int, count: int, train: bool) -> list[Gemm]:
    """``x [rows, d_in] @ W [d_in, d_out]``; when trained also its two backward products,
    ``dx = g Wᵀ`` and ``dW = xᵀ g``."""
    out = [Gemm(name, rows, d_in, d_out, "nn", count)]
    if train:
        out += [
            Gemm(f"{name} dx", rows, d_out, d_in, "nt", count),
            Gemm(f"{name} dW", d_in, rows, d_out, "tn", count),
        ]
    return out


def _decoder(prefix: str, cfg: Any, batch: int, seq_len: int, train: bool) -> list[Gemm]:
    """The products of a Llama-family decoder body on ``batch`` × ``seq_len`` tokens."""
    n, d, layers = batch * seq_len, cfg.hidden_size, cfg.num_layers
    h, hd = cfg.num_heads, cfg.head_dim or cfg.hidden_size // cfg.num_heads
    g = cfg.num_kv_heads or h
    rows = (h // g) * seq_len  # The queries that share one key/value head.
    out = _linear(f"{prefix} q", n, d, h * hd, layers, train)
    out += _linear(f"{prefix} k, v", n, d, g * hd, 2 * layers, train)
    out += _linear(f"{prefix} o", n, h * hd, d, layers, train)
    # Scores q·kᵀ and the weighted sum p·v, per sequence and key/value head (as the model
    # computes them: the full L × L, causal masking applied to the scores).
    out.append(Gemm(f"{prefix} scores", rows, hd, seq_len, "nt", layers, batch * g))
    out.append(Gemm(f"{prefix} p·v", rows, seq_len, hd, "nn", layers, batch * g))
    if train:
        out += [
            Gemm(f"{prefix} scores dq", rows, seq_len, hd, "nn", layers, batch * g),
            Gemm(f"{prefix} scores dk", seq_len, rows, hd, "tn", layers, batch * g),
            Gemm(f"{prefix} p·v dp", rows, hd, seq_len, "nt", layers, batch * g),
            Gemm(f"{prefix} p·v dv", seq_len, rows, hd, "tn", layers, batch * g),
        ]
    out += _linear(f"{prefix} MLP gate, up", n, d, cfg.mlp_dim, 2 * layers, train)
    out += _linear(f"{prefix} MLP down", n, cfg.mlp_dim, d, layers, train)
    return out


def _head(prefix: str, d: int, vocab: int, tokens: int, block: int, train: bool) -> list[Gemm]:
    """The tied LM head in row blocks (``losses.fused_lm_loss``): logits ``h Eᵀ`` per
    block; when trained, ``dh = g E`` and ``dE += gᵀ h`` in the same block."""
    rows = block if block and tokens % block == 0 else tokens
    count = tokens // rows
    out = [Gemm(f"{prefix} LM head logits", rows, d, vocab, "nt", count)]
    if train:
        out += [
            Gemm(f"{prefix} LM head dh", rows, vocab, d, "nn", count),
            Gemm(f"{prefix} LM head dE", vocab, rows, d, "tn", count),
        ]
    return out


def inventory(student: Any, teacher: Any, batch: int, seq_len: int, block: int) -> list[Gemm]:
    """Every matrix product of one causal DWT step: the student's forward and backward,
    the teacher's forward, and both LM heads."""
    tokens = batch * seq_len
    return [
        *_decoder("student", student, batch, seq_len, train=True),
        *_head("student", student.hidden_size, student.vocab_size, tokens, block, True),
        *_decoder("teacher", teacher, batch, seq_len, train=False),
        *_head("teacher", teacher.hidden_size, teacher.vocab_size, tokens, block, False),
    ]


# --- Timing, in a child process per framework ----------------------------------------


def _operands(shape: tuple[int, int, int, str, int], rng: Any) -> tuple[Any, Any]:
    m, k, n, mode, batch = shape
    a = (k, m) if mode == "tn" else (m, k)
    b = (n, k) if mode == "nt" else (k, n)
    lead = (batch,) if batch > 1 else ()
    return (
        rng.standard_normal(lead + a, dtype="float32"),
        rng.standard_normal(lead + b, dtype="float32"),
    )


def _product(mode: str, xp: Any):
    def swap(x):
        return xp.swapaxes(x, -1, -2) if hasattr(xp, "swapaxes") else x.transpose(-1, -2)

    if mode == "nn":
        return lambda a, b: xp.matmul(a, b)
    if mode == "nt":
        return lambda a, b: xp.matmul(a, swap(b))
    return lambda a, b: xp.matmul(swap(a), b)


def time_shapes(framework: str, shapes: list[list], repeats: int) -> list[float]:
    """Median seconds of each shape's product in ``framework`` ('jax' or 'torch'),
    after three warm-up calls."""
    import numpy as np

    rng = np.random.default_rng(0)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        def prepare(shape):
            f = jax.jit(_product(shape[3], jnp))
            a, b = (jnp.asarray(x) for x in _operands(shape, rng))
            return lambda: f(a, b).block_until_ready()
    else:
        import torch

        torch.set_grad_enabled(False)

        def prepare(shape):
            f = _product(shape[3], torch)
            a, b = (torch.from_numpy(x) for x in _operands(shape, rng))
            return lambda: f(a, b)

    medians = []
    for shape in shapes:
        run = prepare(tuple(shape))
        for _ in range(3):
            run()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        medians.append(statistics.median(seconds))
    return medians


def _child(framework: str, shapes: list[tuple], repeats: int) -> list[float]:
    command = [sys.executable, os.path.abspath(__file__), "--child", framework]
    command += ["--repeats", str(repeats)]
    done = subprocess.run(
        command, input=json.dumps([list(s) for s in shapes]), capture_output=True,
        text=True, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the {framework} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# --- The report --------------------------------------------------------------------


def _models(config: str, vocab: int | None) -> tuple[Any, Any, int, int, int]:
    from dwt_jax.configuration import load_config_file
    from dwt_jax.distill.terms import head_settings
    from dwt_jax.models.families import model_config_from

    path, _, variant = config.partition(":")
    cfg = load_config_file(os.path.join(REPO_ROOT, path), variant or None)
    if vocab:
        cfg.model.vocab_size = cfg.teacher.model.vocab_size = vocab
    student, teacher = model_config_from(cfg.model), model_config_from(cfg.teacher.model)
    block = head_settings(cfg.distill)["block_rows"]
    return student, teacher, block, cfg.data.batch_size, cfg.data.seq_len


def run(args: argparse.Namespace) -> dict[str, Any]:
    student, teacher, block, batch, seq_len = _models(args.config, args.vocab)
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    gemms = inventory(student, teacher, batch, seq_len, block)
    # Every product in all three layouts: the best is its floor with free transposes.
    shapes = sorted({(g.m, g.k, g.n, mode, g.batch) for g in gemms for mode in MODES})
    frameworks = ["jax"] + (["torch"] if args.torch != "off" and _torch_available() else [])
    if args.torch == "on" and "torch" not in frameworks:
        raise SystemExit("--torch on: torch is not installed (pip install torch==2.13.0)")
    rounds: dict[str, list[list[float]]] = {f: [] for f in frameworks}
    load_start = list(os.getloadavg())
    for _ in range(args.rounds):  # Alternating, so a slow spell hits both.
        for framework in frameworks:
            rounds[framework].append(_child(framework, shapes, args.repeats))
    seconds = {
        f: {s: statistics.median(r[i] for r in rounds[f]) for i, s in enumerate(shapes)}
        for f in frameworks
    }
    rows = []
    for g in gemms:
        row = {**dataclasses.asdict(g), "gflop_per_step": g.count * g.flops / 1e9}
        for f in frameworks:
            t = seconds[f][g.key]
            best = min(seconds[f][(g.m, g.k, g.n, mode, g.batch)] for mode in MODES)
            row[f] = {
                "s_per_product": t, "s_per_step": g.count * t, "gflop_per_s": g.flops / t / 1e9,
                "best_layout_s_per_step": g.count * best,
            }  # fmt: skip
        rows.append(row)
    floors = {f: sum(r[f]["s_per_step"] for r in rows) for f in frameworks}
    best_floors = {f: sum(r[f]["best_layout_s_per_step"] for r in rows) for f in frameworks}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
        "config": args.config, "batch": batch, "seq_len": seq_len,
        "vocab": student.vocab_size, "head_block_rows": block, "rounds": args.rounds,
        "repeats": args.repeats, "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()), "gemms": rows,
        "gflop_per_step": sum(r["gflop_per_step"] for r in rows), "floor_s": floors,
        "best_layout_floor_s": best_floors,
    }  # fmt: skip
    step = _step_figures(args.step_json)
    if step:
        results["step"] = step
    return results


def _step_figures(path: str | None) -> dict[str, Any] | None:
    """The causal benchmark's DWT step and reference step times, if its JSON exists."""
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        bench = json.load(f)
    out = {"path": os.path.relpath(path, REPO_ROOT), "dwt_s": bench["dwt"]["step_s"]}
    for name, value in bench.items():
        if name.startswith("torch (") and isinstance(value, dict) and "step_s" in value:
            out[name] = value["step_s"]
    return out


def markdown(results: dict[str, Any]) -> str:
    frameworks = list(results["floor_s"])
    lines = [
        f"Machine: {results['machine']}; {results['config']}, batch {results['batch']} × "
        f"{results['seq_len']}, vocabulary {results['vocab']:,}, LM-head row blocks of "
        f"{results['head_block_rows']}; float32; median of {results['rounds']} rounds × "
        f"{results['repeats']} products per shape. Load average at start "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_end'])}.",
        "",
        "| product | shape (batch × m×k×n, mode) | per step | GFLOP/step | "
        + " | ".join(f"{f} GFLOP/s | {f} ms/step" for f in frameworks)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(frameworks),
    ]
    for r in results["gemms"]:
        shape = f"{r['batch']} × " if r["batch"] > 1 else ""
        shape += f"{r['m']}×{r['k']}×{r['n']} {r['mode']}"
        cells = " | ".join(
            f"{r[f]['gflop_per_s']:.0f} | {1e3 * r[f]['s_per_step']:.1f}" for f in frameworks
        )
        lines.append(
            f"| {r['name']} | {shape} | {r['count']} | {r['gflop_per_step']:.2f} | {cells} |"
        )
    total = results["gflop_per_step"]
    lines.append("")
    for f in frameworks:
        floor = results["floor_s"][f]
        best = results["best_layout_floor_s"][f]
        lines.append(
            f"GEMM floor, {f}: {floor:.3f} s/step with the operands as stored ({total:.1f} "
            f"GFLOP at {total / floor:.0f} GFLOP/s); {best:.3f} s/step if every product "
            "got its fastest layout for free."
        )
    step = results.get("step")
    if step:
        lines.append("")
        lines.append(f"Step times from {step['path']}: DWT {step['dwt_s']:.3f} s/step.")
        for name, seconds in step.items():
            if name.startswith("torch ("):
                lines.append(
                    f"- {name}: {seconds:.3f} s/step; 1.1× its speed needs ≤ "
                    f"{seconds / 1.1:.3f} s/step, 3× needs ≤ {seconds / 3:.3f} s/step."
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/causal.py", help="PATH[:variant]")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed products per shape")
    parser.add_argument("--torch", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--step_json", default=os.path.join(REPO_ROOT, "benchmarks/results/step_llama.json")
    )
    parser.add_argument("--json", default="benchmarks/results/gemm.json")
    parser.add_argument("--markdown", default="benchmarks/results/gemm.md")
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shapes = json.loads(sys.stdin.read())
        print(json.dumps(time_shapes(args.child, shapes, args.repeats)))
        return
    results = run(args)
    table = markdown(results)
    print(table)
    for path, text in ((args.json, json.dumps(results, indent=2)), (args.markdown, table)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    from dwt_jax import hostenv

    hostenv.reexec_with_huge_pages()  # As the training entry point and step.py do.
    main()
