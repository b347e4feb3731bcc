"""``python -m dwt_jax.cache_teacher --config=<the student's config> --workdir=DIR``:
runs the config's teacher (``teacher.workdirs[0]``: a run of this stack or ``hf:DIR``)
once over the pre-training data, in the order the student's pipeline reads it, and
writes its top-k targets per predicted position into DIR (docs/methods.md#teacher-caches;
the format: `dwt_jax.data.teacher_cache`). A student then reads it with
``--config.teacher.cache=DIR`` and runs no teacher.

Settings: ``cache.top_k``, ``cache.top_p``, ``cache.dtype``, ``cache.batches_per_shard``
and ``cache.num_batches`` (0: ``train.num_steps``); the temperature is
``distill.tau`` (constant). The teacher's held-out metrics, on the run's eval batches,
go into the manifest (the 'gap' schedule compares the student with them).

Resumable: complete shards are kept and the data iterator resumes from the state saved
with the last of them, so a build killed and restarted writes the same shards as one
that never stopped. Each process writes its own shards. A progress line per shard gives
positions/s and bytes written; the last line the bytes per position.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from dwt_jax import cli, sharding, steps
from dwt_jax import teachers as teachers_lib
from dwt_jax.config_files import PRETRAIN_REFERENCE, fields_as_in
from dwt_jax.configuration import validate_pretrain
from dwt_jax.data import teacher_cache
from dwt_jax.data import tokenizer as tokenizer_lib
from dwt_jax.errors import ConfigError
from dwt_jax.main import define_distributed_flags, start_distributed
from dwt_jax.objectives import objective_for
from dwt_jax.objectives.base import make_evaluator
from dwt_jax.sparse_loss import topk_targets
from dwt_jax.stages import with_tokenizer_source

_EXAMPLES = {"config": "configs/causal.py", "workdir": "runs/teacher_cache"}
_ROW_BLOCK = 256  # Positions per block of the teacher's logits.


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """A checked cache build: the config, the teacher, the manifest to write."""

    config: ml_collections.ConfigDict
    teacher: teachers_lib.TeacherPlan
    field: str
    manifest: dict[str, Any]
    mesh_shape: dict[str, int]


def _cache_settings(config: ml_collections.ConfigDict, vocab: int) -> dict[str, Any]:
    cache = config.cache
    k, top_p, dtype = cache.top_k, cache.top_p, cache.dtype
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ConfigError(f"cache.top_k={k!r} must be an integer in [1, {vocab}] (the vocabulary).")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"cache.top_p={top_p!r} must be a number in (0, 1].")
    if dtype not in teacher_cache.DTYPES:
        raise ConfigError(f"cache.dtype={dtype!r}; use one of {', '.join(teacher_cache.DTYPES)}.")
    per_shard, num = cache.batches_per_shard, cache.num_batches
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise ConfigError(f"cache.batches_per_shard={per_shard!r} must be an integer >= 1.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ConfigError(
            f"cache.num_batches={num!r} must be an integer >= 0 (0: train.num_steps)."
        )
    return {
        "top_k": int(k),
        "top_p": float(top_p),
        "dtype": str(dtype),
        "batches_per_shard": int(per_shard),
        "num_batches": int(num or config.train.num_steps),
    }


def plan_cache(config: ml_collections.ConfigDict, workdir: str) -> CachePlan:
    """Checks everything a build reads, by the files, before anything runs."""
    config = with_tokenizer_source(config)
    with fields_as_in(config, PRETRAIN_REFERENCE):
        model_config, mesh_shape = validate_pretrain(config, jax.device_count())
        specs = [str(s) for s in config.teacher.workdirs]
        if len(specs) != 1 or teachers_lib.is_cache(specs[0]):
            raise ConfigError(
                f"teacher.workdirs={tuple(specs)!r}: a cache is built from one teacher (a run's "
                "workdir or hf:DIR); set --config.teacher.workdirs=\"('DIR',)\"."
            )
        field = "teacher.workdirs[0]"
        teacher = teachers_lib.plan_teacher(specs[0], field)
        teachers_lib.check_vocabulary(teacher, model_config, field)
        tau = config.distill.tau
        if tau.name != "constant":
            raise ConfigError(
                f"distill.tau is {tau.name!r}: a cache holds the teacher at one temperature; "
                "set distill.tau to a constant."
            )
        settings = _cache_settings(config, model_config.vocab_size)
        if config.teacher.get("cache", ""):
            raise ConfigError("teacher.cache is set: a cache is built from a teacher, not a cache.")
    objective = objective_for(model_config)
    batch = int(config.data.batch_size) // jax.process_count()
    positions = int(config.data.seq_len if objective.name == "clm" else config.data.max_predictions)
    manifest = {
        "format": teacher_cache.FORMAT,
        "teacher": {
            "spec": specs[0],
            "step": teacher.step,
            "num_params": _param_count(teacher),
            "model": dataclasses.asdict(teacher.config),
        },
        "identity": teacher_cache.run_identity(config, objective.name, jax.process_count()),
        "temperature": float(tau.value),
        "vocab_size": int(model_config.vocab_size),
        "rows_per_batch": batch,
        "positions_per_row": positions,
        **settings,
    }
    return CachePlan(config, teacher, field, manifest, mesh_shape)


def _param_count(plan: teachers_lib.TeacherPlan) -> int:
    from dwt_jax.models.families import make_lm

    return sum(
        int(np.prod(x.shape))
        for x in jax.tree.leaves(teachers_lib.boxed_params(make_lm(plan.config)))
    )


def _targets_fn(teacher: teachers_lib.Teacher, manifest: dict[str, Any], causal: bool):
    """batch → the teacher's top-k targets per predicted position, [B, P, ...]."""
    hidden_key, decoder_key = (
        ("lm_hidden", "lm_decoder") if causal else ("masked_hidden", "mlm_decoder")
    )
    k, top_p, tau = manifest["top_k"], manifest["top_p"], manifest["temperature"]

    def targets(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        (out,) = steps.run_teachers([teacher.model], [params], batch, None, [teacher.rules])
        hidden = out[hidden_key]
        embedding, bias = out[decoder_key]
        labels = batch["targets"] if causal else batch["masked_ids"]
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        rows = h.shape[0]
        blocks = -(-rows // _ROW_BLOCK)
        pad = blocks * _ROW_BLOCK - rows
        h = jnp.concatenate([h, jnp.zeros((pad, h.shape[1]), h.dtype)])
        y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])

        def block(x):
            h_b, y_b = x
            z = jnp.dot(h_b, embedding.T.astype(h_b.dtype), preferred_element_type=jnp.float32)
            if bias is not None:
                z = z + bias.astype(jnp.float32)
            return topk_targets(z, y_b, k, temperature=tau, top_p=top_p)._asdict()

        result = jax.lax.map(block, (h.reshape(blocks, _ROW_BLOCK, -1), y.reshape(blocks, -1)))
        return {
            name: value.reshape(-1, *value.shape[2:])[:rows].reshape(*lead, *value.shape[2:])
            for name, value in result.items()
        }

    return targets


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    pieces = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
    return np.concatenate([pieces[start] for start in sorted(pieces)])


def _same_plan(old: dict[str, Any], new: dict[str, Any]) -> bool:
    ignore = ("teacher_eval", "directory")
    return {k: v for k, v in old.items() if k not in ignore} == {
        k: v for k, v in new.items() if k not in ignore
    }


def build(plan: CachePlan, workdir: str, log=print) -> dict[str, Any]:
    """Writes (or completes) the cache; returns its summary (batches, shards written,
    bytes, bytes per position, positions/s)."""
    config, manifest = plan.config, dict(plan.manifest)
    objective = objective_for(plan.teacher.config)  # The student's too (checked).
    tokenizer = tokenizer_lib.get_tokenizer(config.data, kind=objective.tokenizer_kind)
    objective.check_tokenizer(tokenizer)
    teachers_lib.check_teacher_tokenizer(plan.teacher.workdir, tokenizer, plan.field)
    manifest["identity"]["tokenizer"] = {"sha256": teacher_cache.tokenizer_hash(tokenizer)}
    manifest_path = os.path.join(workdir, teacher_cache.MANIFEST)
    if os.path.exists(manifest_path):
        old = teacher_cache.read_manifest(workdir, "--workdir")
        if not _same_plan(old, manifest):
            raise ConfigError(
                f"--workdir={workdir} holds a cache built with other settings (teacher, data or "
                "cache section); give an empty directory, or the config it was built with."
            )
        manifest["teacher_eval"] = old.get("teacher_eval", {})
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.configured_teacher_rules(config)
    teacher = teachers_lib.load_teacher(plan.teacher, mesh, plan.field, rules)
    host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    train_iter, eval_batches = objective.make_data(config, tokenizer, mesh, host)
    spec = objective.batch_spec(config)
    batch_shardings = sharding.batch_shardings(spec, mesh)
    if not manifest.get("teacher_eval"):
        evaluate = make_evaluator(
            objective, model=teacher.model, mesh=mesh, params_shardings=teacher.shardings,
            batch_shardings=batch_shardings, constants=objective.eval_constants(tokenizer),
            rules=teacher.rules,
        )  # fmt: skip
        metrics = evaluate(teacher.params, eval_batches, "t")
        manifest["teacher_eval"] = {k.split("/", 1)[1]: v for k, v in metrics.items()}
    if jax.process_index() == 0:
        teacher_cache.write_json_atomic(
            manifest_path, {k: v for k, v in manifest.items() if k != "directory"}
        )
    # Out batch-sharded, so each process takes its own rows (the rows it fed).
    out_ndims = {"logp": 3, "ids": 3, "tail": 2, "label_logp": 2}
    jitted = jax.jit(
        _targets_fn(teacher, manifest, objective.name == "clm"),
        in_shardings=(teacher.shardings, batch_shardings),
        out_shardings={k: sharding.batch_sharding(mesh, n) for k, n in out_ndims.items()},
    )
    layout = teacher_cache.layout_of(manifest)
    process = jax.process_index()
    teacher_cache.remove_unfinished(workdir, process)  # A killed build's partial shard.
    shards = teacher_cache.num_shards(manifest)
    start = 0
    while start < shards and teacher_cache.completed_shard(workdir, manifest, process, start):
        start += 1
    if start > 0:
        done = teacher_cache.completed_shard(workdir, manifest, process, start - 1)
        train_iter.set_state(done["data_state"])
    written, positions, began = 0, 0, time.perf_counter()
    for shard in range(start, shards):
        writer = teacher_cache.ShardWriter(workdir, process, shard)
        for _ in range(teacher_cache.shard_records(manifest, shard)):
            batch = sharding.shard_batch(next(train_iter), mesh)
            with sharding.activate(mesh), nn.logical_axis_rules(teacher.rules):
                out = jitted(teacher.params, {k: batch[k] for k in spec})
            writer.write(layout.encode({k: _local_rows(v) for k, v in out.items()}))
            positions += layout.rows * layout.positions
        written += writer.close(train_iter.get_state())
        rate = positions / max(time.perf_counter() - began, 1e-9)
        log(
            f"dwt_jax: cache shard {shard + 1}/{shards}: {positions:,} positions at "
            f"{rate:,.0f} positions/s, {written:,} bytes written"
        )
    summary = {
        "batches": manifest["num_batches"],
        "shards": shards,
        "shards_written": shards - start,
        "bytes_per_position": layout.bytes_per_position,
        "positions_per_second": positions / max(time.perf_counter() - began, 1e-9),
        "bytes_written": written,
    }
    log(
        f"dwt_jax: cache {workdir} complete: {manifest['num_batches']} batches in {shards} "
        f"shard(s), k={manifest['top_k']}, {layout.bytes_per_position:.1f} bytes per position."
    )
    if hasattr(train_iter, "close"):
        train_iter.close()
    return summary


def _define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "The student's config (its teacher, data and cache sections).",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "Directory of the cache.")
    flags.mark_flags_as_required(["config", "workdir"])
    define_distributed_flags()  # Each host of a multi-process build writes its own shards.


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    cli.check_workdir(f.workdir)
    start_distributed()
    build(plan_cache(f.config, f.workdir), f.workdir)


def run_cli() -> None:
    _define_flags()
    cli.run(main, _EXAMPLES, config_flag="config")


if __name__ == "__main__":
    run_cli()
