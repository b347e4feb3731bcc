"""The top-k teacher cache on disk: manifest, ArrayRecord shards, and the join of cached
entries to the student's batches (docs/methods.md#teacher-caches).

A cache directory holds

    manifest.json                       what the cache is: the teacher, the tokenizer's
                                        hash, the data, packing and masking settings,
                                        top_k / top_p / temperature / dtype, the number
                                        of batches and how many go in a shard
    shards/p00000-s00000.array_record   one record per host-local batch, in the order
                                        the student's pipeline reads them
    shards/p00000-s00000.json           written after its shard: records, bytes,
                                        sha256 and the data iterator's state after
                                        the shard's last batch (where a build resumes)

A shard is complete when its ``.json`` exists and the shard's size matches it; a shard
is written under a temporary name and renamed into place, so a kill leaves either a
complete shard or none. Each host (process) writes and reads its own shards
(``p<process index>``).

A record is the batch's arrays, raw and in a fixed order: ``logp`` [rows, P, k] in the
cache's dtype, ``ids`` [rows, P, k] (uint16 for vocabularies below 65535, with 65535
for a dropped slot; else int32 with −1), ``tail`` and ``label_logp`` [rows, P]
float32 — P the predicted positions per row (the row length for a causal LM, the
masked slots for a masked LM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from dwt_jax import readers
from dwt_jax.errors import ConfigError

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT = 1
DTYPES = ("float32", "float16", "bfloat16")
# The batch fields a cache adds, per teacher index j: f"cache{j}_{name}".
FIELDS = ("logp", "ids", "tail", "label_logp")
_U16_DROPPED = 65535
# The dtypes a record's fields have once decoded and joined to a batch (the others keep
# their stored dtype).
JOINED_DTYPES = {"logp": np.dtype(np.float32), "ids": np.dtype(np.int32)}


def field_name(index: int, name: str) -> str:
    """The batch key of cached field ``name`` of teacher ``index``."""
    return f"cache{index}_{name}"


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # A dependency of jax.

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How one record is laid out: rows per host batch, positions per row, k, the
    log-probability dtype and whether ids are uint16."""

    rows: int
    positions: int
    top_k: int
    dtype: str
    vocab_size: int

    @property
    def small_ids(self) -> bool:
        return self.vocab_size < _U16_DROPPED

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        rp, k = (self.rows, self.positions), self.top_k
        return {
            "logp": ((*rp, k), _np_dtype(self.dtype)),
            "ids": ((*rp, k), np.dtype(np.uint16 if self.small_ids else np.int32)),
            "tail": (rp, np.dtype(np.float32)),
            "label_logp": (rp, np.dtype(np.float32)),
        }

    @property
    def record_bytes(self) -> int:
        return sum(int(np.prod(s)) * d.itemsize for s, d in self.shapes().values())

    @property
    def bytes_per_position(self) -> float:
        return self.record_bytes / (self.rows * self.positions)

    def encode(self, arrays: Mapping[str, np.ndarray]) -> bytes:
        """One record from the host batch's targets (ids −1 where a slot was dropped)."""
        parts = []
        for name, (shape, dtype) in self.shapes().items():
            value = np.asarray(arrays[name])
            if value.shape != shape:
                raise ValueError(f"cache field {name} has shape {value.shape}, expected {shape}")
            if name == "ids" and self.small_ids:
                value = np.where(value < 0, _U16_DROPPED, value)
            parts.append(np.ascontiguousarray(value.astype(dtype)).tobytes())
        return b"".join(parts)

    def decode(self, record: bytes) -> dict[str, np.ndarray]:
        """The arrays of one record: ``logp`` float32, ``ids`` int32 (−1 dropped)."""
        if len(record) != self.record_bytes:
            raise ValueError(f"a record has {len(record)} bytes, expected {self.record_bytes}")
        out, offset = {}, 0
        for name, (shape, dtype) in self.shapes().items():
            size = int(np.prod(shape)) * dtype.itemsize
            value = np.frombuffer(record, dtype, count=int(np.prod(shape)), offset=offset)
            offset += size
            value = value.reshape(shape)
            if name == "ids" and self.small_ids:
                value = np.where(value == _U16_DROPPED, -1, value.astype(np.int32))
            out[name] = value.astype(JOINED_DTYPES.get(name, value.dtype))
        return out


def layout_of(manifest: Mapping[str, Any]) -> CacheLayout:
    return CacheLayout(
        rows=int(manifest["rows_per_batch"]),
        positions=int(manifest["positions_per_row"]),
        top_k=int(manifest["top_k"]),
        dtype=str(manifest["dtype"]),
        vocab_size=int(manifest["vocab_size"]),
    )


def shard_name(process_index: int, shard: int) -> str:
    return f"p{process_index:05d}-s{shard:05d}"


def _shard_paths(directory: str, process_index: int, shard: int) -> tuple[str, str]:
    base = os.path.join(directory, SHARDS, shard_name(process_index, shard))
    return base + ".array_record", base + ".json"


def num_shards(manifest: Mapping[str, Any]) -> int:
    return -(-int(manifest["num_batches"]) // int(manifest["batches_per_shard"]))


def shard_records(manifest: Mapping[str, Any], shard: int) -> int:
    per = int(manifest["batches_per_shard"])
    return min(per, int(manifest["num_batches"]) - shard * per)


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token → id), order-independent."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def read_manifest(directory: str, field: str) -> dict[str, Any]:
    """A cache's manifest; a missing or unreadable one is a ``ConfigError`` naming
    ``field``."""
    if not os.path.isdir(directory):
        raise ConfigError(
            f"{field}={directory!r} does not exist; build it with python -m "
            "dwt_jax.cache_teacher --config=<the student's config> --workdir=DIR."
        )
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(
            f"{field}: {directory} is not a teacher cache ({MANIFEST} missing); build it "
            "with python -m dwt_jax.cache_teacher."
        )
    manifest = readers.read_json(path, field, expect=dict, fix="rebuild the cache")
    manifest["directory"] = directory  # For messages; not part of the file.
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{field}: {path} has format {manifest.get('format')!r}; this version reads "
            f"format {FORMAT}: rebuild the cache."
        )
    return manifest


def write_json_atomic(path: str, value: Any) -> None:
    """``value`` as JSON at ``path``, via a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def completed_shard(
    directory: str, manifest: Mapping[str, Any], process_index: int, shard: int
) -> dict[str, Any] | None:
    """The shard's record (its ``.json``) if the shard is complete, else None."""
    data_path, meta_path = _shard_paths(directory, process_index, shard)
    if not os.path.isfile(meta_path) or not os.path.isfile(data_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("bytes") != os.path.getsize(data_path):
        return None
    if meta.get("records") != shard_records(manifest, shard):
        return None
    return meta


def check_shards(directory: str, manifest: Mapping[str, Any], process_index: int, field: str):
    """Refuses (``ConfigError`` naming ``field`` and the shard) a cache with a missing,
    truncated or unfinished shard of this process."""
    for shard in range(num_shards(manifest)):
        data_path, meta_path = _shard_paths(directory, process_index, shard)
        if not os.path.isfile(meta_path) or not os.path.isfile(data_path):
            raise ConfigError(
                f"{field}: shard {os.path.basename(data_path)} of {directory} is missing "
                "(the build did not finish); rerun python -m dwt_jax.cache_teacher with the "
                "same --config and --workdir to complete it."
            )
        if completed_shard(directory, manifest, process_index, shard) is None:
            raise ConfigError(
                f"{field}: shard {os.path.basename(data_path)} of {directory} is truncated "
                f"or damaged ({os.path.getsize(data_path)} bytes, not what "
                f"{os.path.basename(meta_path)} records); delete both files and rerun "
                "python -m dwt_jax.cache_teacher to rewrite it."
            )


def remove_unfinished(directory: str, process_index: int) -> None:
    """Deletes this process's temporary shard files (a killed build's partial shard)."""
    shards = os.path.join(directory, SHARDS)
    prefix = shard_name(process_index, 0).split("-")[0] + "-"
    if os.path.isdir(shards):
        for name in os.listdir(shards):
            if name.startswith(prefix) and ".tmp" in name:
                os.remove(os.path.join(shards, name))


class ShardWriter:
    """Writes one shard: records appended, then ``close(data_state)`` renames the file
    into place and writes its ``.json`` (the shard is complete from then on)."""

    def __init__(self, directory: str, process_index: int, shard: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self._data_path, self._meta_path = _shard_paths(directory, process_index, shard)
        os.makedirs(os.path.dirname(self._data_path), exist_ok=True)
        self._tmp = f"{self._data_path}.tmp{os.getpid()}"
        self._writer = ArrayRecordWriter(self._tmp, "group_size:1")
        self._hash = hashlib.sha256()
        self.records = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self._hash.update(record)
        self.records += 1

    def close(self, data_state: Any) -> int:
        """Finishes the shard; returns its size in bytes."""
        self._writer.close()
        os.replace(self._tmp, self._data_path)
        size = os.path.getsize(self._data_path)
        write_json_atomic(
            self._meta_path,
            {
                "records": self.records,
                "bytes": size,
                "sha256": self._hash.hexdigest(),
                "data_state": data_state,
            },
        )
        return size


class CacheReader:
    """Random access to one process's cached batches: ``batch(n)`` is batch n's arrays."""

    def __init__(self, directory: str, manifest: Mapping[str, Any], process_index: int):
        self.directory = directory
        self.manifest = dict(manifest)
        self.layout = layout_of(manifest)
        self.process_index = process_index
        self._per_shard = int(manifest["batches_per_shard"])
        self._open: tuple[int, Any] | None = None
        from array_record.python.array_record_module import ArrayRecordReader

        self._reader_class = ArrayRecordReader

    def __len__(self) -> int:
        return int(self.manifest["num_batches"])

    def batch(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(
                f"batch {index} is past the end of the teacher cache in {self.directory} "
                f"({len(self)} batches); rebuild it with cache.num_batches >= train.num_steps."
            )
        shard, offset = divmod(index, self._per_shard)
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            path = _shard_paths(self.directory, self.process_index, shard)[0]
            self._open = (shard, self._reader_class(path, "readahead_buffer_size:0"))
        (record,) = self._open[1].read([offset])
        return self.layout.decode(record)


class JoinIterator(grain.DatasetIterator):
    """Adds batch n's cached entries to the parent iterator's batch n; ``caches`` maps
    the teacher's index (its fields' names) to its reader. Its state is the parent's
    and n, so a restored iterator joins the right entries."""

    def __init__(self, parent: grain.DatasetIterator, caches: Mapping[int, CacheReader]):
        super().__init__(parent)
        self._caches = dict(caches)
        self._index = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        for j, cache in self._caches.items():
            for name, value in cache.batch(self._index).items():
                batch[field_name(j, name)] = value
        self._index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "batch": self._index}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._index = int(state["batch"])


def batch_spec(manifest: Mapping[str, Any], index: int, process_count: int) -> dict[str, Any]:
    """Shapes and dtypes of the cached fields in one GLOBAL batch, as joined."""
    import jax

    return {
        field_name(index, name): jax.ShapeDtypeStruct(
            (shape[0] * process_count, *shape[1:]), JOINED_DTYPES.get(name, dtype)
        )
        for name, (shape, dtype) in layout_of(manifest).shapes().items()
    }


def run_identity(config: Any, objective: str, process_count: int) -> dict[str, dict[str, Any]]:
    """What a cache must share with a run to serve it, by group (the tokenizer's hash
    is added by the builder, from the tokenizer itself)."""
    data = config.data
    identity = {
        "data": {
            "data.source": str(data.get("source", "embedded")),
            "data.tfds_name": str(data.get("tfds_name", "")),
            "data.text_files": [str(f) for f in (data.get("text_files", ()) or ())],
            "data.text_field": str(data.get("text_field", "text")),
            "data.train_split": str(data.get("train_split", "train")),
            "seed": int(config.seed),
            "data.batch_size": int(data.batch_size),
            "process count": int(process_count),
        },
        "masking": {"objective": objective},
        "length": {"data.seq_len": int(data.seq_len)},
    }
    if objective == "mlm":
        identity["masking"]["data.max_predictions"] = int(data.max_predictions)
        identity["masking"]["data.mask_prob"] = float(data.get("mask_prob", 0.15))
    return identity


def check_identity(
    manifest: Mapping[str, Any], identity: Mapping[str, Mapping[str, Any]], field: str
) -> None:
    """Refuses, naming the first difference, a cache built for another run."""
    directory = str(manifest.get("directory", ""))
    cached = manifest.get("identity", {})
    for group, values in identity.items():
        for key, ours in values.items():
            theirs = cached.get(group, {}).get(key)
            if theirs != ours:
                raise ConfigError(
                    f"{field}: the cache {directory} does not match this run's {group}: it was "
                    f"built with {key}={theirs!r}, this run has {key}={ours!r}; rebuild it "
                    "with python -m dwt_jax.cache_teacher --config=<this run's config>."
                )
