"""``python -m dwt_jax.study``."""

from dwt_jax.study.run import run_cli

if __name__ == "__main__":
    run_cli()
