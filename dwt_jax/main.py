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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from dwt_jax import experiment  # Late import: flags parse before jax starts.

    try:
        results = experiment.run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f"dwt_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(result.interrupted for result in results.values()):
        sys.exit(130)
    for name, result in results.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        stage = "" if name == "run" else f"{name} "
        print(f"dwt_jax: {stage}finished at step {result.final_step}. {summary}", flush=True)


if __name__ == "__main__":
    app.run(main)
