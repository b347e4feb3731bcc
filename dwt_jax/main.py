"""Command line: ``python -m dwt_jax.main --config=configs/base.py --workdir=DIR``.

Override any config field with ``--config.<section>.<field>=<value>``. A bad config
ends with one line naming the field and exit status 2, before anything is written.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dwt_jax.configuration import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':variant'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-process runs: 'auto' joins one when a TPU pod, SLURM or MPI launch is detected "
    "(or the three flags below are given); 'on' always calls jax.distributed.initialize().",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for runs started by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0-based.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from dwt_jax import distributed, experiment  # Late import: flags parse before jax starts.

    try:
        launch = distributed.plan_launch(
            _DISTRIBUTED.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        distributed.initialize(launch)
        results = experiment.run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"dwt_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(result.interrupted for result in results.values()):
        sys.exit(130)
    import jax

    if jax.process_index() != 0:
        return
    for name, result in results.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        stage = "" if name == "run" else f"{name} "
        print(f"dwt_jax: {stage}finished at step {result.final_step}. {summary}", flush=True)


if __name__ == "__main__":
    from dwt_jax import hostenv

    hostenv.reexec_with_huge_pages()  # Before jax allocates anything (hostenv's doc).
    app.run(main)
