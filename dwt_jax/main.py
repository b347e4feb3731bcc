"""Command line: ``python -m dwt_jax.main --config=configs/base.py --workdir=DIR``.

Override any config field with ``--config.<section>.<field>=<value>``. A bad command
line or config ends with one line on stderr, ``dwt_jax: error: <what, and the fix>``,
and exit status 2, before anything is compiled or written (`dwt_jax.cli`). The
terminal shows the run's own lines and warnings; ``--verbosity=1`` adds the INFO logs
of the libraries under it (Orbax, TFDS, Grain, JAX; `dwt_jax.logs`).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from dwt_jax import cli
from dwt_jax.cli import EXIT_BAD_INPUT, fail

__all__ = ["EXIT_BAD_INPUT", "fail", "main", "parse_flags", "run_cli"]

_EXAMPLES = {"config": "configs/base.py", "workdir": "runs/my_run"}
# absl's flag parsing, every error as one line and exit 2 (``--help`` still works).
parse_flags = cli.make_flags_parser(_EXAMPLES, config_flag="config")


def _define_flags() -> None:
    """The command's flags (defined when it runs: importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file, optionally with ':variant'.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
    flags.mark_flags_as_required(["config", "workdir"])
    define_distributed_flags()


def define_distributed_flags() -> None:
    """The flags of a multi-process launch (``main``, ``cache_teacher``)."""
    flags.DEFINE_enum(
        "distributed",
        "auto",
        ["auto", "on", "off"],
        "Multi-process runs: 'auto' joins one when a TPU pod, SLURM or MPI launch is "
        "detected (or the three flags below are given); 'on' always calls "
        "jax.distributed.initialize().",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0, for runs started by hand."
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process's id, 0-based.")


def main(argv: list[str]) -> None:
    """Runs the config in the workdir (``cli.run`` turns a ``ConfigError`` into one
    line and exit 2, a ``NonFiniteError`` into one line and exit 1); 130 if stopped."""
    del argv  # The flag parser refused positional arguments.
    f = flags.FLAGS
    cli.check_workdir(f.workdir)  # Before jax starts: a bad workdir costs nothing.
    from dwt_jax import experiment  # Late import: flags parse before jax starts.

    start_distributed()
    results = experiment.run(f.config, f.workdir)
    if any(result.interrupted for result in results.values()):
        sys.exit(130)
    import jax

    if jax.process_index() != 0:
        return
    for name, result in results.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        stage = "" if name == "run" else f"{name} "
        print(f"dwt_jax: {stage}finished at step {result.final_step}. {summary}", flush=True)


def start_distributed() -> None:
    """Joins the multi-process run the flags (or the environment) describe, if any."""
    from dwt_jax import distributed

    f = flags.FLAGS
    launch = distributed.plan_launch(
        f.distributed,
        coordinator_address=f.coordinator_address,
        num_processes=f.num_processes,
        process_id=f.process_id,
    )
    distributed.initialize(launch)


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.main``."""
    from dwt_jax import hostenv

    hostenv.reexec_with_huge_pages()  # Before jax allocates anything (hostenv's doc).
    _define_flags()
    cli.run(main, _EXAMPLES, config_flag="config")


if __name__ == "__main__":
    run_cli()
