"""The device mesh, the logical-axis rules and the placement of arrays on the mesh.

This module is the only one that knows mesh axis names. The model names its
parameter and activation axes logically ('batch', 'embed', 'mlp', ...); the rules
table below maps those names to the mesh axes ('data', 'fsdp', 'tensor'):

* the batch is split over data × fsdp (data parallelism and FSDP);
* parameters' hidden ('embed') dimension is split over fsdp (ZeRO-3 style);
* attention heads, MLP units and the vocabulary are split over tensor (Megatron).

A mesh axis is used at most once per array: in an activation ('batch', 'length',
'embed') 'batch' takes fsdp first, so the hidden dimension stays whole there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwt_jax.configuration import MESH_AXES, resolve_mesh_shape

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("masked", None),
    ("position", None),
    ("type_vocab", None),
    ("norm", None),
    ("classes", None),
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


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of logically partitioned (boxed) abstract values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def abstract_on_mesh(boxed_tree: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(unboxed ShapeDtypeStructs carrying their shardings, the NamedShardings) of a
    tree of logically partitioned abstract values (e.g. from ``jax.eval_shape``)."""
    shardings = logical_shardings(boxed_tree, mesh)
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


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this host's part of the global batch into global arrays on the mesh."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for name, value in local_batch.items()
    }


def batch_shardings(batch_spec: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: batch_sharding(mesh, len(spec.shape)) for name, spec in batch_spec.items()}


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Makes ``mesh`` and the logical-axis rules current: trace model code inside this."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
