"""Multi-host start-up: ``jax.distributed.initialize()`` when a run spans processes.

One process per host (TPU VMs, one GPU node) or per GPU (SLURM) joins one JAX
runtime; after that every array is global and the same jitted step runs on every
process (SPMD). How the processes are found, in order:

1. explicit settings (``--coordinator_address``, ``--num_processes``,
   ``--process_id``), e.g. two processes on one machine, or hosts you started yourself;
2. a detected multi-process environment: a Cloud TPU VM (single- or multi-host
   slice), a SLURM job step with several tasks, an Open MPI launch; JAX reads the
   coordinator, process count and id from that environment;
3. ``--distributed=on`` forces (2) even where nothing is detected (JAX then says
   what it could not find); ``--distributed=off`` never initialises.

Nothing here touches a device: it must run before the first JAX computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import tokenizers
from jax.experimental import multihost_utils

from dwt_jax.errors import ConfigError

MODES = ("auto", "on", "off")
TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # Present on Cloud TPU VMs.


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run (None fields: JAX detects them)."""

    source: str  # 'explicit', 'tpu_pod', 'slurm', 'openmpi' or 'forced'.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1").split("(")[0])  # SLURM may write '8(x2)'.
    except ValueError:
        return 1


def detect_environment(
    env: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> str | None:
    """The multi-process environment this process runs in, or None for a single process.

    A Cloud TPU VM (its TPU device files exist) counts as a pod worker: JAX asks the
    VM's metadata server how many workers the slice has (one for a single-host slice,
    where initialising costs nothing). A one-task SLURM step is a single process.
    """
    env = os.environ if env is None else env
    hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or len([h for h in hostnames.split(",") if h]) > 1:
        return "tpu_pod"
    if any(exists(path) for path in TPU_DEVICE_FILES) and "TPU_SKIP_MDS_QUERY" not in env:
        return "tpu_pod"
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS") > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    return None


def plan_launch(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> Launch | None:
    """How (and whether) to initialise, from the flags and the environment."""
    if mode not in MODES:
        raise ConfigError(f"--distributed={mode!r} is unknown; use one of {', '.join(MODES)}.")
    explicit = (coordinator_address, num_processes, process_id)
    if mode == "off":
        if any(value is not None for value in explicit):
            raise ConfigError(
                "--distributed=off contradicts --coordinator_address/--num_processes/"
                "--process_id; drop one or the other."
            )
        return None
    if any(value is not None for value in explicit):
        if None in explicit:
            raise ConfigError(
                "--coordinator_address, --num_processes and --process_id go together; "
                "give all three (process ids 0 .. num_processes-1, the coordinator is "
                "process 0's host:port)."
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
        if ":" not in coordinator_address:
            raise ConfigError(
                f"--coordinator_address={coordinator_address!r} needs a port, e.g. "
                "10.0.0.2:1234 (process 0's host)."
            )
        return Launch("explicit", coordinator_address, num_processes, process_id)
    detected = detect_environment(env, exists)
    if detected is not None:
        return Launch(detected)
    return Launch("forced") if mode == "on" else None


def initialize(launch: Launch | None, *, timeout_s: int = 300) -> None:
    """Joins the multi-process runtime described by ``launch`` (nothing if None)."""
    if launch is None:
        return
    if launch.source == "explicit":
        # CPU processes exchange collectives over gloo (GPU/TPU have their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            initialization_timeout=timeout_s,
        )
    except (RuntimeError, ValueError) as e:
        where = launch.coordinator_address or f"the {launch.source} environment"
        raise ConfigError(
            f"could not start the multi-process run through {where} ({e}); check that "
            "every process was started with the same coordinator and process count, "
            "or run single-process with --distributed=off."
        ) from None


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
    """Process 0 runs the block first; the others wait for it, then run it too.

    For work that writes a shared cache (building a TFDS dataset, training a
    tokenizer): on a shared filesystem the others then find it done instead of racing
    to rename the same directory; on per-host disks each host builds its own copy.
    Every process must enter the block (it is a barrier).
    """
    many = jax.process_count() > 1
    if many and jax.process_index() != 0:
        multihost_utils.sync_global_devices(f"dwt_jax:{name}")
    yield
    if many and jax.process_index() == 0:
        multihost_utils.sync_global_devices(f"dwt_jax:{name}")


def broadcast_text(text: str) -> str:
    """Process 0's ``text`` on every process."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode("utf-8")


def shared_tokenizer(load: Callable[[], tokenizers.Tokenizer]) -> tokenizers.Tokenizer:
    """``load()`` run process-0-first, then process 0's tokenizer on every process.

    Training a WordPiece vocabulary is not deterministic (hash-map tie-breaks), so
    hosts that each trained their own could disagree on token ids; one vocabulary,
    broadcast, makes that impossible.
    """
    with main_process_first("tokenizer"):
        tokenizer = load()
    if jax.process_count() == 1:
        return tokenizer
    return tokenizers.Tokenizer.from_str(broadcast_text(tokenizer.to_str()))
