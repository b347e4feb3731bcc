"""One process of a two-process run on this machine (started by tests/test_distributed.py).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR MESH

Joins the run through ``dwt_jax.distributed`` (2 CPU devices per process), runs two
DWT updates (tests/dwt_step_helpers.py) on the global MESH ('data,fsdp,tensor'),
each process feeding only its own rows, and process 0 writes the losses and the
updated parameters to OUT_DIR for the test to compare with one device.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import json

import jax
import numpy as np
from dwt_step_helpers import build_dwt_step, run_steps
from flax import traverse_util

from dwt_jax import distributed


def main() -> None:
    process_id, num_processes, port, out_dir, mesh = sys.argv[1:6]
    launch = distributed.plan_launch(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
    )
    distributed.initialize(launch, timeout_s=60)
    assert jax.process_count() == int(num_processes) and jax.device_count() == 4
    mesh_shape = tuple(int(x) for x in mesh.split(","))
    params, history = run_steps(build_dwt_step(jax.devices(), mesh_shape))
    if jax.process_index() == 0:
        flat = traverse_util.flatten_dict(params, sep="/")
        np.savez(os.path.join(out_dir, "params.npz"), **{k: np.asarray(v) for k, v in flat.items()})
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(history, f)
    print(f"process {jax.process_index()}: ok", flush=True)


if __name__ == "__main__":
    main()
