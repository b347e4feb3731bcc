"""The device mesh, the logical-axis rules and the placement of arrays on the mesh.

This module is the only one that knows mesh axis names. The model names its
parameter and activation axes logically ('batch', 'embed', 'mlp', ...); the rules
table below maps those names to the mesh axes ('data', 'fsdp', 'tensor'):

* the batch is split over data × fsdp (data parallelism and FSDP);
* parameters' hidden ('embed') dimension is split over fsdp (ZeRO-3 style);
* attention heads, MLP units and the vocabulary are split over tensor (Megatron).

A mesh axis is used at most once per array: in an activation ('batch', 'length',
'embed') 'batch' takes fsdp first, so the hidden dimension stays whole there.

Teachers may be placed by other rules (``TEACHER_RULES``, chosen by name with
``teacher.sharding``): a small teacher kept whole on every device costs memory but no
all-gather of its weights in each step.

Multi-host: every array here is a global ``jax.Array``; ``to_host`` and
``put_on_mesh`` move whole trees between host NumPy and the mesh on every process
(neither ``jax.device_get`` nor ``jax.device_put`` can cross hosts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwt_jax.errors import ConfigError

if TYPE_CHECKING:
    from dwt_jax.models.config import BertConfig

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # Grouped-query attention's key/value heads.
    ("kv", None),
    ("qkv", None),  # GPT-2's fused [D, 3, H, K] projection: q, k, v.
    ("length", None),
    ("masked", None),
    ("position", None),
    ("type_vocab", None),
    ("norm", None),
    ("classes", None),
)

Rules = tuple[tuple[str, Any], ...]


def _without(rules: Rules, names: tuple[str, ...]) -> Rules:
    """``rules`` with the logical axes ``names`` mapped to no mesh axis."""
    return tuple((name, None if name in names else axes) for name, axes in rules)


# Placement of teacher parameters (and the teacher's activations), by name.
TEACHER_RULES: dict[str, Rules] = {
    # As the student: FSDP over 'embed', tensor parallelism over heads/mlp/vocab.
    "student": LOGICAL_AXIS_RULES,
    # Tensor-parallel only: weights whole across data/fsdp, so the teacher's forward
    # needs no all-gather of its weights (small teachers in FSDP runs).
    "no_fsdp": _without(LOGICAL_AXIS_RULES, ("embed",)),
    # Every weight whole on every device; the forward is data-parallel only.
    "replicated": _without(LOGICAL_AXIS_RULES, ("embed", "vocab", "mlp", "heads", "kv_heads")),
}


def teacher_rules(name: str) -> Rules:
    """The rules table named ``name`` (see ``TEACHER_RULES``)."""
    if name not in TEACHER_RULES:
        raise ValueError(
            f"teacher.sharding={name!r} is unknown; use one of {', '.join(TEACHER_RULES)}."
        )
    return TEACHER_RULES[name]


MESH_AXES = ("data", "fsdp", "tensor")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with a single -1 filled so that the product is ``num_devices``."""
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        _require(
            isinstance(size, int) and not isinstance(size, bool) and (size == -1 or size > 0),
            f"mesh.{axis}={size!r} must be a positive integer or -1 (fill with the rest).",
        )
    given = " * ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
    fill = [axis for axis, size in sizes.items() if size == -1]
    _require(
        len(fill) <= 1,
        f"mesh.{' and mesh.'.join(fill)} are -1; at most one axis may be -1 (fill with the "
        "rest): give the others sizes.",
    )
    known = math.prod(size for size in sizes.values() if size != -1)
    devices = f"{num_devices} device{'s' if num_devices != 1 else ''}"
    if fill:
        _require(
            num_devices % known == 0,
            f"{given} cannot cover {devices}: the fixed axes' product {known} must divide "
            f"the device count; set axes whose product divides {num_devices}.",
        )
        sizes[fill[0]] = num_devices // known
    _require(
        math.prod(sizes.values()) == num_devices,
        f"{given} needs {math.prod(sizes.values())} devices but {devices} "
        f"{'are' if num_devices != 1 else 'is'} available; set one mesh axis to -1 (fill) "
        "or make their product the device count.",
    )
    return sizes


# Model dimensions and the logical axis that names each in the parameters.
_SHARDED_DIMS = (
    ("hidden_size", "embed"),
    ("num_heads", "heads"),
    ("mlp_dim", "mlp"),
    ("vocab_size", "vocab"),
    ("num_kv_heads", "kv_heads"),  # Decoders only (an encoder has no such field).
)


def check_model_fits_mesh(
    model: BertConfig, mesh: dict[str, int], section: str, rules: Sequence | None = None
) -> None:
    """Every dimension a mesh axis splits (under ``rules``, default the student's)
    must divide evenly over it: an array cannot be split into unequal shards."""
    table = dict(LOGICAL_AXIS_RULES if rules is None else rules)
    for field, logical in _SHARDED_DIMS:
        if not hasattr(model, field):
            continue
        axes = table.get(logical) or ()
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        size, parts = getattr(model, field), math.prod(mesh[a] for a in axes)
        if size % parts:
            where = "*".join(f"mesh.{a}" for a in axes)
            hint = (
                f"pad the vocabulary to a multiple of {parts} (e.g. "
                f"{-(-size // parts) * parts}) or use a smaller {where}"
                if field == "vocab_size"
                else f"use a {where} that divides it"
            )
            raise ConfigError(
                f"{section}.{field}={size} is not divisible by {where}={parts}, which "
                f"splits it; {hint}."
            )


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (all devices by default)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    # Auto axes: XLA propagates shardings from the annotated inputs and constraints.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def configured_teacher_rules(config: ml_collections.ConfigDict) -> Rules:
    """The layout of a run's teachers: ``teacher.sharding`` ('student' when absent)."""
    return teacher_rules(config.teacher.get("sharding", "student"))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of logically partitioned (boxed) abstract values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def partition_specs(boxed_tree: Any, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Mesh PartitionSpecs of a tree of boxed values, without a mesh (for planning)."""
    return nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)


def abstract_on_mesh(
    boxed_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> tuple[Any, Any]:
    """(unboxed ShapeDtypeStructs carrying their shardings, the NamedShardings) of a
    tree of logically partitioned abstract values (e.g. from ``jax.eval_shape``)."""
    shardings = logical_shardings(boxed_tree, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed_tree),
        shardings,
    )
    return abstract, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The leading (batch) dimension over data × fsdp, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_rows_per_process(mesh: Mesh, global_batch: int, process_of: Any = None) -> dict[int, int]:
    """How many rows of a global batch each process's devices hold under
    ``batch_sharding`` (``process_of(device)``: its process; default the real one)."""
    process_of = process_of or (lambda device: device.process_index)
    rows: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh, 1).devices_indices_map((global_batch,)).items():
        rows.setdefault(process_of(device), set()).update(range(*index[0].indices(global_batch)))
    return {process: len(r) for process, r in sorted(rows.items())}


def check_batch_layout(mesh: Mesh, global_batch: int, process_of: Any = None) -> None:
    """Each process feeds ``global_batch / process_count`` rows of its own (the input
    pipeline reads a disjoint slice per host): the mesh must give every process that
    many rows, i.e. lay the batch axes (data × fsdp) across hosts, not 'tensor'."""
    counts = batch_rows_per_process(mesh, global_batch, process_of)
    expected = global_batch // max(len(counts), 1)
    wrong = {p: n for p, n in counts.items() if n != expected}
    if wrong:
        process, rows = next(iter(wrong.items()))
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {process}'s devices hold {rows} rows of the "
            f"global batch of {global_batch}, but each of the {len(counts)} processes reads "
            f"{expected}; make mesh.data*mesh.fsdp a multiple of the process count and "
            "keep mesh.tensor within one host."
        )


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this host's part of the global batch into global arrays on the mesh."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for name, value in local_batch.items()
    }


def batch_shardings(batch_spec: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: batch_sharding(mesh, len(spec.shape)) for name, spec in batch_spec.items()}


def to_host(tree: Any) -> Any:
    """A tree of global arrays as NumPy arrays, whole, on every process.

    Single-process this is ``jax.device_get``; on several hosts arrays that are not
    fully addressable are all-gathered (every process must call it).
    """
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def put_on_mesh(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same values on every process) as global arrays in ``shardings``;
    each process places only its own devices' slices. Global arrays are resharded."""

    def put(x: Any, s: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array):  # Already global: reshard on the devices.
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(put, tree, shardings)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Makes ``mesh`` and the logical-axis rules current: trace model code inside this."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
