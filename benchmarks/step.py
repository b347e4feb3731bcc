"""Train-step benchmark: the jitted DWT step and the student-only step on fixed shapes.

    python benchmarks/step.py                      # BERT: the default shapes below
    python benchmarks/step.py --batch=16 --steps=20 --json=benchmarks/results/step.json
    python benchmarks/step.py --family llama --steps 10 \\
        --json benchmarks/results/step_llama.json --markdown benchmarks/results/step_llama.md
    python benchmarks/step.py --config configs/scale/llama_1b.py:8xh100 --batch 8 \\
        --platform gpu --torch off                 # a config's models (benchmarks/gpu.sh)

BERT default shapes (issue 7): student 4 layers / 256 hidden / 4 heads / 1024 MLP,
teacher 2 / 128 / 2 / 512, vocabulary 30522, batch 32 × 128 tokens, 20 predictions
per sequence, dropout 0.1. For each step it reports the median time over ``--steps``
timed steps after two warm-up steps, tokens/s, compile time, model FLOPs per step
(student forward+backward, teacher forward, MLM heads on masked positions only), MFU
against this machine's dense matmul throughput (in the models' compute dtype)
measured in the same run, and the teacher's overhead (DWT step / student-only step)
beside the FLOP-ideal ratio. Prints a markdown table and writes JSON.

``--family llama``: the causal DWT step of ``configs/causal.py`` (a Llama student
4 × 256, 4 heads over 2 KV heads, MLP 688, taught by a Llama 2 × 128, 4 heads over 2
KV heads, MLP 344; tied heads; the config's fused LM head in
``distill.vocab_chunk_size`` slices and its AdamW) at vocabulary 32,000, batch 8 × 256
(one document per row), dropout 0, float32; model FLOPs count the LM heads at every
position. ``--config PATH[:variant]`` takes the student and teacher of any config
(``--tiny`` shrinks them, for a dry run); ``--vocab``, ``--seq_len``, ``--dropout``,
``--dtype`` and ``--vocab_chunk_size`` override the config, and ``--chunk_sweep``
times the DWT step at several vocabulary slices instead.

When torch and transformers are installed (``pip install torch==2.13.0`` for the CPU
build) it also times two PyTorch references at the same shapes (BERT:
``torch_reference.py``; Llama: ``torch_causal_reference.py``), stepped in a child
process so that neither framework's thread pools or heap disturb the other,
alternating with our steps two at a time (so a slow spell of a shared machine hits
all of them alike), and reports the DWT step's speed-up over each. Both processes
start with the same environment (``dwt_jax.hostenv``). For Llama each reference has
its own child (``--references a|b`` times one), every row reports MFU and its
process's peak RSS (VmHWM: ours read in this process right after the DWT step's
warm-up, before the student-only step is built; each reference's in its child after
all its steps), and the table adds the fastest step's time beside the median: on a
shared machine the PyTorch CPU kernels slow down far more than XLA's under another
process's load (see ``torch_causal_reference.py``), so compare in quiet spells and
note the load averages recorded with the figures. ``--no-student-only`` leaves the
student-only step out.
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
import ml_collections
import numpy as np

from dwt_jax import flops, hostenv, sharding
from dwt_jax.configuration import load_config_file
from dwt_jax.distill.terms import head_settings
from dwt_jax.models.families import model_config_from, objective_of_section
from dwt_jax.plan import build_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
_SIZE_FIELDS = ("num_layers", "hidden_size", "num_heads", "mlp_dim")
# Per family: the config whose models are benchmarked (None: configs/base.py with the
# --student/--teacher sizes) and the shapes used unless given.
FAMILY_DEFAULTS = {
    "bert": {"config": None, "vocab": 30522, "batch": 32, "seq_len": 128, "dropout": 0.1},
    "llama": {
        "config": "configs/causal.py", "vocab": 32000, "batch": 8, "seq_len": 256,
        "dropout": 0.0,
    },
}  # fmt: skip
# --tiny: every model shrunk to these sizes (the teacher smaller), for CPU dry runs of
# big configs; the families' other choices (GQA, tying, remat, dtype) stay.
TINY = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "mlp_dim": 128}
TINY_TEACHER = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64}
TINY_SHAPES = {"vocab": 512, "batch": 2, "seq_len": 64}
# Dense bfloat16 matmul peaks (FLOP/s) of GPUs by device kind, for MFU against the
# nominal figure (first match wins); the measured matmul throughput is the default.
NOMINAL_BF16_PEAKS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("GH200", 989e12), ("A100", 312e12),
)  # fmt: skip


def matmul_flops_per_s(n: int = 2048, repeats: int = 10, dtype: Any = np.float32) -> float:
    """Dense matmul throughput of device 0 in ``dtype`` (median of ``repeats``)."""
    x = np.random.default_rng(0).standard_normal((n, n), np.float32)
    a = jax.device_put(jnp.asarray(x, dtype))
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def _config(args: argparse.Namespace, strategy: str):
    """BERT from ``configs/base.py`` with the --student/--teacher sizes (issue 7)."""
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


def _shrink(model: ml_collections.ConfigDict, sizes: dict[str, int]) -> None:
    grouped = model.get("num_kv_heads", 0) not in (0, model.num_heads)
    model.update(sizes)
    if "num_kv_heads" in model:  # Keep grouped-query attention grouped.
        model.update(num_kv_heads=sizes["num_heads"] // 2 if grouped else 0, head_dim=0)


def _file_config(s: argparse.Namespace, strategy: str) -> ml_collections.ConfigDict:
    """The student and teacher of ``s.config`` (``path[:variant]``) on one device, one
    micro-batch of ``s.batch`` sequences, with the shapes ``s`` overrides."""
    config = load_config_file(*_split(s.config))
    for model, tiny in ((config.model, TINY), (config.teacher.model, TINY_TEACHER)):
        if s.tiny:
            _shrink(model, tiny)
        if s.vocab is not None:
            model.vocab_size = s.vocab
        if s.dropout is not None:
            model.dropout_rate = s.dropout
            if "attention_dropout_rate" in model:
                model.attention_dropout_rate = s.dropout
        if s.dtype is not None:
            model.dtype = s.dtype
    seq_len = s.seq_len or config.data.seq_len
    for model in (config.model, config.teacher.model):
        model.max_len = max(model.max_len, seq_len)
    config.data.update(seq_len=seq_len, batch_size=s.batch, vocab_size=config.model.vocab_size)
    if s.predictions is not None and "max_predictions" in config.data:
        config.data.max_predictions = s.predictions
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.optim.grad_accum_steps = 1
    config.teacher.workdirs = ()
    config.distill.strategy = strategy
    if s.vocab_chunk_size is not None:
        config.distill.vocab_chunk_size = s.vocab_chunk_size
    return config


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every shape resolved: the family's defaults, or with an explicit
    ``--config`` that config's values for whatever is not given (the batch excepted:
    a config's is global)."""
    s = argparse.Namespace(**vars(args))
    explicit = getattr(args, "config", None)
    if explicit:
        config = load_config_file(*_split(explicit))
        family = config.model.get("family", "bert")
    else:
        family = getattr(args, "family", "bert")
    defaults = FAMILY_DEFAULTS[family]
    s.family, s.config = family, explicit or defaults["config"]
    for name in ("tiny", "dtype", "vocab_chunk_size", "platform", "chunk_sweep"):
        setattr(s, name, getattr(args, name, None))
    for name in ("vocab", "batch", "seq_len", "dropout", "predictions"):
        value = getattr(args, name, None)
        if value is None and s.tiny and name in TINY_SHAPES:
            value = TINY_SHAPES[name]
        if value is None and (name == "batch" or not explicit):
            value = defaults.get(name, 20 if name == "predictions" else None)
        setattr(s, name, value)
    return s


def _head_text(results: dict[str, Any]) -> str:
    """How the step's LM head ran: row blocks (gradients in the forward pass) or
    vocabulary slices (a recomputing backward pass)."""
    rows = results.get("head_block_rows", 0)
    if rows:
        return f"LM head and loss in {rows}-row blocks, gradients in the forward pass"
    return f"fused LM head in {results['vocab_chunk_size']}-entry vocabulary slices"


def _split(config: str) -> tuple[str, str | None]:
    path, _, variant = config.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    return path, variant or None


def make_config(s: argparse.Namespace, teacher: bool) -> ml_collections.ConfigDict:
    """The DWT stage (``teacher``) or the student alone ('mlm' or 'clm', by the
    student's family), as ``plan.build_step`` takes it."""
    config = _file_config(s, "dwt") if s.config else _config(s, "dwt")
    if not teacher:
        config.distill.strategy = objective_of_section(config.model)
    return config


def _mlm_batch(spec: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
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


def _causal_batch(spec: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One document per row (no padding): every token but the last predicts the next.
    The ids are ``torch_causal_reference.token_ids``'s (same seed: same batch)."""
    rows, length = spec["input_ids"].shape
    input_ids = np.random.default_rng(seed).integers(3, vocab, (rows, length)).astype(np.int32)
    targets = np.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    weights = np.ones((rows, length), np.float32)
    weights[:, -1] = 0.0
    return {
        "input_ids": input_ids,
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
        "targets": targets,
        "target_weights": weights,
    }


def _batch(spec: dict[str, Any], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    return (_causal_batch if "targets" in spec else _mlm_batch)(spec, vocab, seed)


def _count(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


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
        params = self.state.params
        self.param_count = _count(params.get("student", params))
        self.teacher_param_counts = [_count(t) for t in self.teachers]

    def __call__(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch, self.teachers)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM, the high-water mark of its own
    address space, as ``torch_reference.peak_rss_bytes`` reads it in the children
    (``ru_maxrss`` also counts a parent a process was forked from, which Linux carries
    across ``execve``), or ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_now() -> dict[str, int]:
    """This process's peak RSS so far and, where the device reports it (GPUs, TPUs),
    device 0's peak bytes in use."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


class TorchReferences:
    """PyTorch references, stepped in child processes (``serve_steps`` of
    ``torch_reference.py``) so that neither framework's thread pools or heap disturb
    the other's timing: one child for all ``kinds``, or with ``separate`` one per kind
    (each then reports its own peak RSS)."""

    def __init__(
        self, script: str, setup: dict[str, Any], kinds: tuple[str, ...], compile: bool,
        separate: bool = False,
    ) -> None:  # fmt: skip
        self.processes: dict[str, subprocess.Popen] = {}
        try:
            for group in [(kind,) for kind in kinds] if separate else [kinds]:
                command = [
                    sys.executable, os.path.join(BENCHMARKS, script),
                    "--serve", json.dumps(setup), "--kinds", ",".join(group),
                ]  # fmt: skip
                if not compile:
                    command.append("--no-compile")
                process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                self.processes.update(dict.fromkeys(group, process))
            for process in self._unique():  # They start side by side; nothing is timed yet.
                if self._reply(process) != "ready":
                    raise RuntimeError(f"benchmarks/{script} --serve did not start")
        except BaseException:
            self.close()
            raise

    def _unique(self) -> list[subprocess.Popen]:
        return list({id(p): p for p in self.processes.values()}.values())

    @staticmethod
    def _reply(process: subprocess.Popen) -> str:
        line = process.stdout.readline().strip()
        if not line:
            raise RuntimeError(
                f"the PyTorch reference process ended (exit status {process.wait()}); "
                "its error is above"
            )
        return line

    def _ask(self, kind: str, request: str) -> str:
        process = self.processes[kind]
        process.stdin.write(request + "\n")
        process.stdin.flush()
        return self._reply(process)

    def step(self, kind: str) -> float:
        return float(self._ask(kind, kind))

    def peak_rss(self, kind: str) -> int:
        return int(self._ask(kind, "peak_rss"))

    def close(self) -> None:
        for process in self._unique():
            if process.stdin and not process.stdin.closed:
                process.stdin.close()
            process.wait()


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
CAUSAL_REFERENCES = {
    "a": "torch (a) HF, full logits",
    "b": "torch (b) chunked head, compiled",
}
CAUSAL_EAGER_B = "torch (b) chunked head, eager"


def causal_reference_names(compile: bool) -> dict[str, str]:
    return {**CAUSAL_REFERENCES, **({} if compile else {"b": CAUSAL_EAGER_B})}


def causal_setup(dwt: ml_collections.ConfigDict, student, teacher, expect: list[int]) -> dict:
    """``torch_causal_reference.Setup`` fields of the DWT stage's config; ValueError for
    what the stock HF Llama cannot express."""
    for name, cfg in (("model", student), ("teacher.model", teacher)):
        plain = (
            cfg.family == "llama" and not cfg.qkv_bias and not cfg.qk_norm
            and cfg.rope_scaling == "none" and not cfg.sliding_window
            and cfg.head_dim * cfg.num_heads == cfg.hidden_size
        )  # fmt: skip
        if not plain:
            raise ValueError(
                f"{name}: the PyTorch references are plain transformers LlamaForCausalLM "
                "(no q/k/v bias or q/k norm, RoPE unscaled, full attention, head_dim = "
                "hidden_size / num_heads); use --torch off for this config."
            )
    if student.tie_embeddings != teacher.tie_embeddings:
        raise ValueError("the PyTorch references tie both LM heads or neither; use --torch off.")
    sizes = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "mlp_dim")
    optim = dwt.optim
    return {
        "student": [getattr(student, k) for k in sizes],
        "teacher": [getattr(teacher, k) for k in sizes],
        "vocab": student.vocab_size, "batch": dwt.data.batch_size, "seq_len": dwt.data.seq_len,
        "tie_embeddings": student.tie_embeddings, "rope_theta": student.rope_theta,
        "norm_eps": student.norm_eps, "vocab_chunk": int(dwt.distill.get("vocab_chunk_size", 0)),
        "learning_rate": optim.learning_rate, "b1": optim.b1, "b2": optim.b2, "eps": optim.eps,
        "weight_decay": optim.weight_decay, "clip_norm": optim.grad_clip_norm,
        "expect_params": expect,
    }  # fmt: skip


def _peak(s: argparse.Namespace, dtype: str) -> tuple[float, float | None]:
    """(measured matmul FLOP/s in the compute dtype, the device's nominal bf16 peak)."""
    on_cpu = jax.default_backend() == "cpu"
    n = getattr(s, "matmul_size", None) or (2048 if on_cpu else 8192)
    measured = matmul_flops_per_s(n, dtype=jnp.dtype(dtype))
    kind = jax.devices()[0].device_kind
    nominal = next((v for k, v in NOMINAL_BF16_PEAKS if k in kind), None)
    return measured, (nominal if dtype == "bfloat16" and not on_cpu else None)


def _check_platform(s: argparse.Namespace) -> None:
    if s.platform and jax.default_backend() != s.platform:
        raise SystemExit(
            f"benchmarks/step.py --platform={s.platform}: JAX sees no {s.platform.upper()} "
            f"(its backend is {jax.default_backend()!r}, devices {jax.devices()}); check "
            "the driver (nvidia-smi), CUDA_VISIBLE_DEVICES and that jax has the CUDA plugin."
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = _settings(args)
    _check_platform(s)
    dwt = make_config(s, teacher=True)
    student = model_config_from(dwt.model)
    teacher = model_config_from(dwt.teacher.model)
    causal = student.objective == "clm"
    peak, nominal = _peak(s, student.dtype)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {jax.devices()[0]}",
        "jax": jax.__version__,
        "matmul_flops_per_s": peak,
        "shapes": vars(args).copy(),
        "family": s.family,
        "load_average_start": list(os.getloadavg()),
    }
    if nominal:
        results["nominal_peak_flops_per_s"] = nominal
    if s.config:
        results["config"] = s.config
        results["settings"] = {
            "batch": dwt.data.batch_size, "seq_len": dwt.data.seq_len, "tiny": bool(s.tiny),
        }  # fmt: skip
        results["student_config"] = vars(student).copy()
        results["teacher_config"] = vars(teacher).copy()
        results["vocab_chunk_size"] = int(dwt.distill.get("vocab_chunk_size", 0))
        results["head_block_rows"] = head_settings(dwt.distill)["block_rows"]
    # The DWT step first, alone: its warm-up sets the process's peak memory for it.
    dwt_step = JaxStep(dwt, [teacher])
    for _ in range(2):
        dwt_step()
    results["dwt_memory"] = memory_now()
    jax_steps = {"dwt": dwt_step}
    if getattr(s, "student_only", True):
        jax_steps = {"student only": JaxStep(make_config(s, teacher=False), []), **jax_steps}
    results["params"] = {"student": dwt_step.param_count, "teacher": dwt_step.teacher_param_counts}
    entries: dict[str, Callable[[], float]] = dict(jax_steps)
    use_torch = s.torch == "on" or (s.torch == "auto" and _torch_available())
    references, names = None, {}
    if use_torch and causal:
        names = causal_reference_names(s.compile)
        names = {k: v for k, v in names.items() if k in getattr(s, "references", "ab")}
        expect = [dwt_step.param_count, *dwt_step.teacher_param_counts]
        setup = causal_setup(dwt, student, teacher, expect)
        references = TorchReferences(
            "torch_causal_reference.py", setup, tuple(names), s.compile, separate=True
        )
        results["params"]["torch_checked_equal"] = True  # The children check (Setup).
    elif use_torch and s.config is None:  # The BERT references: the issue-7 shapes.
        names = REFERENCES
        shapes = {
            "student": s.student, "teacher": s.teacher, "vocab": s.vocab, "batch": s.batch,
            "seq_len": s.seq_len, "predictions": s.predictions, "dropout": s.dropout,
        }  # fmt: skip
        references = TorchReferences("torch_reference.py", shapes, tuple(names), s.compile)
    if references is not None:
        entries.update({name: functools.partial(references.step, k) for k, name in names.items()})
    try:
        times = time_alternating(entries, s.steps)
        torch_rss = {name: references.peak_rss(k) for k, name in names.items()} if names else {}
    finally:
        if references is not None:
            references.close()
    batch, seq_len = dwt.data.batch_size, dwt.data.seq_len
    tokens = batch * seq_len
    predictions = None if causal else dwt.data.max_predictions
    step_flops = {
        name: flops.pretrain_step_flops(student, step.teacher_configs, batch, seq_len, predictions)
        for name, step in jax_steps.items()
    }
    for name, step in jax_steps.items():
        step_s = statistics.median(times[name])
        results[name] = {
            "compile_s": step.compile_s,
            "step_s": step_s,
            "min_step_s": min(times[name]),
            "times_s": times[name],
            "tokens_per_s": tokens / step_s,
            "model_flops": step_flops[name],
            "mfu": step_flops[name] / step_s / peak,
        }
        if nominal:
            results[name]["mfu_nominal"] = step_flops[name] / step_s / nominal
    results["dwt"].update(results["dwt_memory"])
    for name in names.values():
        step_s = statistics.median(times[name])
        results[name] = {
            "compile_s": times[f"{name}/first"][0],
            "step_s": step_s,
            "min_step_s": min(times[name]),
            "times_s": times[name],
            "tokens_per_s": tokens / step_s,
        }
        results["dwt"][f"speedup vs {name}"] = results[name]["step_s"] / results["dwt"]["step_s"]
        results["dwt"][f"min-step speedup vs {name}"] = (
            results[name]["min_step_s"] / results["dwt"]["min_step_s"]
        )
        if causal:  # The same model and math: the same model FLOPs.
            results[name].update(
                model_flops=step_flops["dwt"],
                mfu=step_flops["dwt"] / step_s / peak,
                peak_rss_bytes=torch_rss[name],
            )
            results["dwt"][f"memory vs {name}"] = results["dwt"]["peak_rss_bytes"] / torch_rss[name]
        else:
            results[name]["child_peak_rss_bytes"] = torch_rss[name]  # Both kinds' process.
    if references is not None:
        results["torch"] = importlib.metadata.version("torch")
    if "student only" in results:
        alone = results["student only"]
        results["teacher_overhead"] = results["dwt"]["step_s"] / alone["step_s"]
        results["flop_ideal_overhead"] = results["dwt"]["model_flops"] / alone["model_flops"]
    results["peak_rss_bytes"] = peak_rss_bytes()
    results["load_average_end"] = list(os.getloadavg())
    return results


def sweep_chunks(args: argparse.Namespace) -> dict[str, Any]:
    """The DWT step alone at each vocabulary slice of ``--chunk_sweep`` (alternating,
    as ``run``): which ``distill.vocab_chunk_size`` is fastest here."""
    s = _settings(args)
    _check_platform(s)
    steps: dict[str, JaxStep] = {}
    for chunk in s.chunk_sweep:
        s.vocab_chunk_size = chunk
        dwt = make_config(s, teacher=True)
        steps[f"vocab_chunk_size={chunk}"] = JaxStep(dwt, [model_config_from(dwt.teacher.model)])
    times = time_alternating(dict(steps), s.steps)
    tokens = dwt.data.batch_size * dwt.data.seq_len
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {jax.devices()[0]}",
        "jax": jax.__version__,
        "shapes": vars(args).copy(),
        "family": s.family,
        "load_average_end": list(os.getloadavg()),
        "chunks": {
            name: {
                "step_s": statistics.median(times[name]),
                "tokens_per_s": tokens / statistics.median(times[name]),
                "compile_s": step.compile_s,
            }
            for name, step in steps.items()
        },
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _head(results: dict[str, Any]) -> str:
    torch_note = f", torch {results['torch']}" if "torch" in results else ""
    dtype = results.get("student_config", {}).get("dtype", "float32")
    return (
        f"Machine: {results['machine']}; jax {results['jax']}{torch_note}; {dtype} matmul "
        f"{results['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; peak RSS "
        f"{_gib(results['peak_rss_bytes'])} GiB"
    )


def _memory_lines(results: dict[str, Any]) -> list[str]:
    """Device memory and nominal-peak MFU, where the device reports them (GPUs)."""
    lines = []
    memory = results.get("dwt_memory", {})
    if "device_peak_bytes" in memory:
        lines.append(
            f"Device peak memory after the DWT step's warm-up: "
            f"{_gib(memory['device_peak_bytes'])} GiB."
        )
    if "nominal_peak_flops_per_s" in results:
        nominal = results["nominal_peak_flops_per_s"] / 1e12
        lines.append(
            f"MFU against the nominal {nominal:.0f} TFLOP/s: DWT "
            f"{100 * results['dwt']['mfu_nominal']:.1f}%"
            + (
                f", student only {100 * results['student only']['mfu_nominal']:.1f}%."
                if "student only" in results
                else "."
            )
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    if results.get("family") == "llama":
        return markdown_causal(results)
    lines = [
        _head(results),
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
    lines.append("")
    if "teacher_overhead" in results:
        lines.append(
            f"Teacher overhead (DWT / student only): {results['teacher_overhead']:.3f}; "
            f"FLOP-ideal: {results['flop_ideal_overhead']:.3f} "
            f"(ratio {results['teacher_overhead'] / results['flop_ideal_overhead']:.3f})."
        )
    for name in REFERENCES.values():
        if name in results:
            lines.append(
                f"DWT step tokens/s vs {name}: {results['dwt'][f'speedup vs {name}']:.2f}×."
            )
    return "\n".join(lines + _memory_lines(results))


def _describe(cfg: dict[str, Any]) -> str:
    kv = cfg.get("num_kv_heads", cfg["num_heads"])
    return (
        f"{cfg['num_layers']} × {cfg['hidden_size']}, {cfg['num_heads']} heads / {kv} KV "
        f"heads, MLP {cfg['mlp_dim']}"
    )


def markdown_causal(results: dict[str, Any]) -> str:
    """The causal benchmark's table: every row with MFU and its process's peak RSS."""
    st, te, sh = results["student_config"], results["teacher_config"], results["settings"]
    params = results["params"]
    checked = " (the PyTorch models' counts are equal)" if params.get("torch_checked_equal") else ""
    load = results["load_average_start"], results["load_average_end"]
    lines = [
        _head(results),
        f"Student {_describe(st)}; teacher {_describe(te)}; vocabulary {st['vocab_size']:,}, "
        f"{'tied' if st['tie_embeddings'] else 'untied'} LM heads; batch {sh['batch']} × "
        f"{sh['seq_len']}; {st['dtype']}, dropout {st['dropout_rate']:g}; {_head_text(results)}"
        ". Parameters: student "
        f"{params['student']:,}, teacher {params['teacher'][0]:,}{checked}.",
        f"Load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load[0])}; "
        f"at end {', '.join(f'{x:.2f}' for x in load[1])}.",
        "",
        "| step | median s/step | min s/step | tokens/s | compile s | GFLOPs/step | MFU | "
        "peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("student only", "dwt", *CAUSAL_REFERENCES.values(), CAUSAL_EAGER_B):
        if name not in results:
            continue
        r = results[name]
        rss = _gib(r["peak_rss_bytes"]) if "peak_rss_bytes" in r else "–"
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['min_step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['compile_s']:.1f} | {r['model_flops'] / 1e9:.1f} | {100 * r['mfu']:.1f}% | "
            f"{rss} |"
        )
    lines.append("")
    if "teacher_overhead" in results:
        lines.append(
            f"Teacher overhead (DWT / student only): {results['teacher_overhead']:.3f}; "
            f"FLOP-ideal: {results['flop_ideal_overhead']:.3f}."
        )
    dwt = results["dwt"]
    for name in (*CAUSAL_REFERENCES.values(), CAUSAL_EAGER_B):
        if name in results:
            lines.append(
                f"DWT step vs {name}: {dwt[f'speedup vs {name}']:.2f}× tokens/s "
                f"(fastest steps: {dwt[f'min-step speedup vs {name}']:.2f}×), "
                f"{dwt[f'memory vs {name}']:.2f}× peak RSS."
            )
    return "\n".join(lines + _memory_lines(results))


def markdown_sweep(results: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in results["load_average_end"])
    lines = [
        f"Machine: {results['machine']}; jax {results['jax']}; the DWT step alone "
        f"(--family {results['family']}); load average (1, 5, 15 min) at the end {load}",
        "",
        "| vocabulary slice | median s/step | tokens/s | compile s |",
        "|---|---|---|---|",
    ]
    for name, r in results["chunks"].items():
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = "layers hidden heads mlp (BERT without --config)"
    parser.add_argument("--family", choices=tuple(FAMILY_DEFAULTS), default="bert")
    parser.add_argument(
        "--config", default=None,
        help="PATH[:variant]: benchmark this config's student and teacher (one device; "
        "default: configs/causal.py for --family llama)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="shrink the config's models")
    parser.add_argument("--student", type=int, nargs=4, default=[4, 256, 4, 1024], help=sizes)
    parser.add_argument("--teacher", type=int, nargs=4, default=[2, 128, 2, 512], help=sizes)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=None)
    parser.add_argument("--predictions", type=int, default=None, help="MLM: masked per row")
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--vocab_chunk_size", type=int, default=None)
    parser.add_argument(
        "--chunk_sweep", type=lambda v: [int(x) for x in v.split(",")], default=None,
        help="comma-separated vocabulary slices: time the DWT step at each, nothing else",
    )  # fmt: skip
    parser.add_argument(
        "--platform", choices=("cpu", "gpu", "tpu"), default=None,
        help="fail at once unless JAX's backend is this one",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument(
        "--no-student-only", dest="student_only", action="store_false",
        help="time the DWT step (and the references) only",
    )  # fmt: skip
    parser.add_argument(
        "--matmul_size", type=int, default=None,
        help="n of the n×n matmul that measures the peak (default: 2048 on CPUs, else 8192)",
    )  # fmt: skip
    parser.add_argument(
        "--torch", choices=("auto", "on", "off"), default="auto",
        help="time the PyTorch references too (auto: when torch is installed)",
    )  # fmt: skip
    parser.add_argument(
        "--references", default="ab", choices=("ab", "a", "b"),
        help="Llama: which PyTorch references to time",
    )  # fmt: skip
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="reference (b) without torch.compile",
    )  # fmt: skip
    parser.add_argument("--json", default="benchmarks/results/step.json")
    parser.add_argument("--markdown", default="benchmarks/results/step.md")
    args = parser.parse_args()
    if args.chunk_sweep:
        results = sweep_chunks(args)
        table = markdown_sweep(results)
    else:
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
