"""Teacher-cache benchmark: the student's DWT step reading a top-k cache against the same
step running its teacher, and what a cache costs on disk.

    python benchmarks/teacher_cache.py                       # both families, defaults
    python benchmarks/teacher_cache.py --steps 10 --json benchmarks/results/teacher_cache.json \\
        --markdown benchmarks/results/teacher_cache.md

For each family's default config (``configs/base.py``: BERT, MLM; ``configs/causal.py``:
Llama, causal LM) at its own shapes: the jitted DWT train step with the online teacher
(random weights: speed does not depend on them), and with a cached teacher
(``cache.top_k`` entries per predicted position joined to the batch, no teacher
forward pass), and the student alone (the floor a cache can reach), timed alternately,
median over ``--steps`` after two warm-up steps.
The cached row adds the host-side cost of reading and decoding one batch's records
from an ArrayRecord shard on disk (``cache read``). Then, for k = 8, 32, 128 and the
log-probability dtypes float16 and float32, the bytes per predicted position of a shard
written to disk (records and ArrayRecord's own overhead), beside DistillKit's ~300 bytes
per token anchor. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from flax import linen as nn  # noqa: E402

from dwt_jax import sharding, state, steps  # noqa: E402
from dwt_jax.configuration import load_config_file  # noqa: E402
from dwt_jax.data import teacher_cache  # noqa: E402
from dwt_jax.distill import make_strategy  # noqa: E402
from dwt_jax.models.families import make_lm, model_config_from  # noqa: E402
from dwt_jax.objectives import objective_for  # noqa: E402
from dwt_jax.optim import make_optimizer  # noqa: E402
from dwt_jax.sparse_loss import topk_targets  # noqa: E402
from dwt_jax.teachers import CachedTeacher, abstract_params  # noqa: E402

FAMILIES = {"bert": "configs/base.py", "llama": "configs/causal.py"}
KS = (8, 32, 128)
DISTILLKIT_BYTES_PER_TOKEN = 300


def _config(family: str, variant: str | None = None) -> Any:
    config = load_config_file(os.path.join(REPO_ROOT, FAMILIES[family]), variant)
    config.distill.alpha_s.name = "constant"  # The soft term at every timed step.
    return config


def _batch(spec: dict[str, Any], vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch = {}
    for name, s in spec.items():
        if name.endswith("weights"):
            batch[name] = np.ones(s.shape, np.float32)
        elif name in ("segment_ids",):
            batch[name] = np.ones(s.shape, np.int32)
        elif name in ("positions",):
            batch[name] = np.broadcast_to(np.arange(s.shape[1], dtype=np.int32), s.shape).copy()
        elif name in ("token_type_ids",):
            batch[name] = np.zeros(s.shape, np.int32)
        elif name in ("masked_positions",):
            batch[name] = np.sort(
                rng.choice(spec["input_ids"].shape[1], s.shape, replace=True), axis=1
            ).astype(np.int32)
        else:
            batch[name] = rng.integers(0, vocab, s.shape).astype(np.int32)
    return batch


class Step:
    """One compiled DWT step (online or cached teacher) with its state and batch."""

    def __init__(
        self, config: Any, cached: bool, k: int, rng: np.random.Generator, alone: bool = False
    ):
        mesh = sharding.make_mesh(config.mesh)
        student_cfg = model_config_from(config.model)
        teacher_cfg = model_config_from(config.teacher.model)
        model, objective = make_lm(student_cfg), objective_for(student_cfg)
        optimizer, schedule = make_optimizer(config.optim, config.train.num_steps)
        if alone:  # The student alone: the floor a cache can bring the step down to.
            config = config.copy_and_resolve_references()
            config.distill.strategy = objective.name
        strategy = make_strategy(config.distill)
        materialise, _, state_shardings = state.create_train_state(
            seed=0, model=model, strategy=strategy, optimizer=optimizer, mesh=mesh,
            model_inputs=objective.model_inputs(model, config), teacher_configs=[teacher_cfg],
        )  # fmt: skip
        spec = objective.batch_spec(config)
        batch = _batch(spec, student_cfg.vocab_size, rng)
        t_model = make_lm(teacher_cfg)
        t_abstract, t_shardings = abstract_params(t_model, mesh)
        t_params = jax.jit(
            lambda: nn.meta.unbox(
                t_model.init(
                    jax.random.PRNGKey(1), **state.dummy_inputs(t_model, 8), deterministic=True
                )["params"]
            ),
            out_shardings=t_shardings,
        )()
        positions = config.data.seq_len if objective.name == "clm" else config.data.max_predictions
        self.positions = int(config.data.batch_size) * int(positions)
        if cached:
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t_abstract))
            labels = batch["targets"] if objective.name == "clm" else batch["masked_ids"]
            logits = rng.normal(size=(labels.size, student_cfg.vocab_size)).astype(np.float32) * 3
            targets = topk_targets(jax.numpy.asarray(logits), labels.reshape(-1), k)
            for name, value in targets._asdict().items():
                value = np.asarray(value)
                batch[teacher_cache.field_name(0, name)] = value.reshape(
                    *labels.shape, *value.shape[1:]
                )
            manifest = {
                "rows_per_batch": labels.shape[0], "positions_per_row": labels.shape[1],
                "top_k": k, "dtype": "float16", "vocab_size": student_cfg.vocab_size,
            }  # fmt: skip
            spec = {**spec, **teacher_cache.batch_spec(manifest, 0, 1)}
            t_models, t_params, t_shardings = [CachedTeacher(0, n_params)], {}, {}
        elif alone:
            t_models, t_params, t_shardings = [], None, None
        else:
            t_models = [t_model]
        step = steps.make_train_step(
            model=model, strategy=strategy, optimizer=optimizer, schedule=schedule, mesh=mesh,
            state_shardings=state_shardings,
            batch_shardings=sharding.batch_shardings(spec, mesh),
            teacher_models=t_models, teacher_shardings=[t_shardings] if t_models else [],
        )  # fmt: skip
        self.batch = sharding.shard_batch(batch, mesh)
        self.host_batch = batch
        self.state = materialise()
        self.teachers = (t_params,) if t_models else ()
        self.run = step
        began = time.perf_counter()
        self()
        self.compile_s = time.perf_counter() - began

    def __call__(self) -> float:
        began = time.perf_counter()
        self.state, metrics = self.run(self.state, self.batch, self.teachers)
        jax.block_until_ready(metrics["train/loss"])
        return time.perf_counter() - began


def _read_time(step: Step, k: int, directory: str, batches: int = 8) -> float:
    """Median seconds to read and decode one batch's cached records from disk."""
    labels_key = "cache0_tail"
    rows, positions = step.host_batch[labels_key].shape
    vocab = int(step.host_batch["cache0_ids"].max()) + 2
    manifest = {
        "rows_per_batch": rows, "positions_per_row": positions, "top_k": k,
        "dtype": "float16", "vocab_size": max(vocab, 30522), "batches_per_shard": batches,
        "num_batches": batches,
    }  # fmt: skip
    layout = teacher_cache.layout_of(manifest)
    writer = teacher_cache.ShardWriter(directory, 0, 0)
    arrays = {n: step.host_batch[teacher_cache.field_name(0, n)] for n in teacher_cache.FIELDS}
    for _ in range(batches):
        writer.write(layout.encode(arrays))
    writer.close({})
    reader = teacher_cache.CacheReader(directory, manifest, 0)
    times = []
    for index in range(batches):
        began = time.perf_counter()
        reader.batch(index)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def storage(directory: str) -> list[dict[str, Any]]:
    """Bytes per position on disk at each k and dtype (a 4-batch shard of 8 × 256)."""
    rows, positions, batches = 8, 256, 4
    rng = np.random.default_rng(0)
    out = []
    for dtype in ("float16", "float32"):
        for k in KS:
            manifest = {
                "rows_per_batch": rows, "positions_per_row": positions, "top_k": k,
                "dtype": dtype, "vocab_size": 32000, "batches_per_shard": batches,
                "num_batches": batches,
            }  # fmt: skip
            layout = teacher_cache.layout_of(manifest)
            arrays = {
                "logp": -rng.uniform(0, 20, (rows, positions, k)),
                "ids": rng.integers(0, 32000, (rows, positions, k)),
                "tail": rng.uniform(0, 1, (rows, positions)),
                "label_logp": -rng.uniform(0, 20, (rows, positions)),
            }
            where = os.path.join(directory, f"{dtype}_{k}")
            writer = teacher_cache.ShardWriter(where, 0, 0)
            for _ in range(batches):
                writer.write(layout.encode(arrays))
            size = writer.close({})
            out.append(
                {
                    "k": k, "dtype": dtype, "record_bytes_per_position": layout.bytes_per_position,
                    "disk_bytes_per_position": size / (rows * positions * batches),
                }
            )  # fmt: skip
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {jax.devices()[0]}",
        "jax": jax.__version__,
        "load_average_start": list(os.getloadavg()),
        "top_k": args.k,
        "families": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            config = _config(family, getattr(args, "variant", None))
            entries = {
                "online": Step(config, False, args.k, rng),
                "cached": Step(config, True, args.k, rng),
                "alone": Step(config, False, args.k, rng, alone=True),
            }
            online, cached = entries["online"], entries["cached"]
            times: dict[str, list[float]] = {name: [] for name in entries}
            for _ in range(2):
                for step in entries.values():
                    step()
            for _ in range(args.steps):  # Alternating: a slow spell hits all three alike.
                for name, step in entries.items():
                    times[name].append(step())
            read_s = _read_time(cached, args.k, os.path.join(tmp, family))
            row = {
                "batch": int(config.data.batch_size),
                "seq_len": int(config.data.seq_len),
                "vocab": int(config.model.vocab_size),
                "positions_per_batch": cached.positions,
                "online_step_s": statistics.median(times["online"]),
                "cached_step_s": statistics.median(times["cached"]),
                "cache_read_s": read_s,
                "alone_step_s": statistics.median(times["alone"]),
                "online_compile_s": online.compile_s,
                "cached_compile_s": cached.compile_s,
                "times_s": times,
            }
            row["speedup"] = row["online_step_s"] / (row["cached_step_s"] + read_s)
            results["families"][family] = row
        results["storage"] = storage(os.path.join(tmp, "storage"))
    results["load_average_end"] = list(os.getloadavg())
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Teacher cache (k = {results['top_k']}) on {results['machine']}, jax {results['jax']}; "
        f"load average {results['load_average_start'][0]:.2f} → "
        f"{results['load_average_end'][0]:.2f}.",
        "",
        "| family | batch × length | online step | cached step | cache read | cached total "
        "| speed-up | student alone (the floor) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, r in results["families"].items():
        total = r["cached_step_s"] + r["cache_read_s"]
        lines.append(
            f"| {family} | {r['batch']} × {r['seq_len']} | {r['online_step_s'] * 1e3:.1f} ms | "
            f"{r['cached_step_s'] * 1e3:.1f} ms | {r['cache_read_s'] * 1e3:.2f} ms | "
            f"{total * 1e3:.1f} ms | {r['speedup']:.2f}× | {r['alone_step_s'] * 1e3:.1f} ms |"
        )
    lines += [
        "",
        "| k | log-prob dtype | bytes per position (record) | on disk "
        f"| vs DistillKit's ~{DISTILLKIT_BYTES_PER_TOKEN} |",
        "|---|---|---|---|---|",
    ]
    for s in results["storage"]:
        lines.append(
            f"| {s['k']} | {s['dtype']} | {s['record_bytes_per_position']:.0f} | "
            f"{s['disk_bytes_per_position']:.1f} | "
            f"{s['disk_bytes_per_position'] / DISTILLKIT_BYTES_PER_TOKEN:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--variant", default=None, help="e.g. 'smoke': tiny models, a dry run")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args()
    results = run(args)
    table = markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
