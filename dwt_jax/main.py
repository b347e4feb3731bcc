"""Command line: ``python -m dwt_jax.main --config=configs/base.py --workdir=DIR``.

Override any config field with ``--config.<section>.<field>=<value>``. A bad command
line or config ends with one line on stderr, ``dwt_jax: error: <what, and the fix>``,
and exit status 2, before anything is compiled or written.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NoReturn

import ml_collections
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

EXIT_BAD_INPUT = 2
_EXAMPLES = {"config": "configs/base.py", "workdir": "runs/my_run"}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}
# Loggers whose INFO lines say nothing to a user: JAX probing for a TPU on every start.
_QUIET_LOGGERS = ("jax._src.xla_bridge",)


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Ends the process with one line on stderr and exit status ``status`` (2: bad
    input)."""
    line = " ".join(str(message).split())  # One line, whatever the message held.
    print(f"dwt_jax: error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def _config_argument(argv: list[str]) -> str:
    """The value given to --config (the last one), or ''."""
    return _flag_value(argv, "config") or ""


def _overrides(argv: list[str]) -> list[str]:
    """The config fields that ``--config.<field>=...`` arguments set, in order."""
    names = []
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if match:
            names.append(match.group(1))
    return names


def _missing_config_message(argv: list[str]) -> str:
    path = _config_argument(argv).split(":", 1)[0]
    return (
        f"--config={_config_argument(argv)}: no config file {path!r}; pass the path of a "
        f"config file, e.g. --config={_EXAMPLES['config']}."
    )


def _unknown_field_message(argv: list[str]) -> str:
    """Which ``--config.<field>`` names no field of the config, and the fields there are."""
    from ml_collections.config_dict import config_dict

    from dwt_jax.configuration import load_config_file

    spec = _config_argument(argv)
    path, _, variant = spec.partition(":")
    try:
        config = load_config_file(path, variant or None)
    except Exception:  # The flag parser reported it; here only the names are looked up.
        config = None
    for name in _overrides(argv):
        node, parts = config, name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = sorted(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
                listing = f" ({where} has: {', '.join(known)})" if known else ""
                return f"--config.{name}: {spec} has no field {name}; check the spelling{listing}."
            node = node[part]
    return f"--config overrides name a field that {spec} does not have; check their spelling."


def _flag_value(argv: list[str], name: str) -> str | None:
    """The (last) value given to ``--name`` on the command line, or None."""
    value = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, flags=re.DOTALL)
        if match:
            value = (
                match.group(1) if match.group(1) is not None else (argv[i + 1 : i + 2] or [""])[0]
            )
    return value


def _flag_error_message(error: flags.Error, argv: list[str]) -> str:
    """One line for an absl flag error: the flag, its value, and what to pass instead."""
    text = str(error)
    match = re.match(r"flag --([^=\s]+)=", text)
    if not match:  # An unknown flag, a missing value, flags in the wrong order, ...
        return f"{text.splitlines()[0].rstrip('.')}; see --helpshort for the flags."
    name = match.group(1)
    if "must have a value other than None" in text:
        if name == "config" and _config_argument(argv):
            return (
                f"--config={_config_argument(argv)}: get_config() returned None; return the "
                "config from get_config()."
            )
        return f"--{name} is required; pass it, e.g. --{name}={_EXAMPLES.get(name, '...')}."
    value = _flag_value(argv, name)
    reason = text.removeprefix(f"flag --{name}={value}: ")
    if name == "config":  # The config file raised: the last line of its traceback.
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        last = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else reason
        return f"--config={value}: {last}"
    flag_type = flags.FLAGS[name].parser.flag_type() if name in flags.FLAGS else ""
    if flag_type not in _KINDS:
        return (
            f"--{name}={value!r}: {reason.splitlines()[0].rstrip('.') if reason else 'bad value'}."
        )
    kind = _KINDS[flag_type]
    default = flags.FLAGS[name].default
    if isinstance(default, bool):
        example = str(default).lower()
    elif isinstance(default, (int, float)):
        example = repr(default)
    else:
        example = {"int": "1", "float": "0.5", "bool": "true"}[flag_type]
    field = name.removeprefix("config.")
    what = f"the config field {field}" if name.startswith("config.") else f"--{name}"
    return f"--{name}={value!r} is not {kind}; {what} takes {kind}, e.g. --{name}={example}."


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``--help`` included), every error as one line and exit 2."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error_message(e, argv))
    except OSError:  # Overrides of a config file that could not be read.
        fail(_missing_config_message(argv))
    except (AttributeError, KeyError):  # An override names no field of the config.
        fail(_unknown_field_message(argv))
    config = _CONFIG.value
    try:
        config.keys()  # A config file that was not found reads as an error object.
    except OSError:
        fail(_missing_config_message(argv))
    except AttributeError:
        pass
    if not isinstance(config, ml_collections.ConfigDict):
        fail(
            f"--config={_config_argument(argv)}: get_config() returned "
            f"{type(config).__name__}, not a ConfigDict; return the config from get_config()."
        )
    return remaining


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(
            f"unexpected arguments {' '.join(argv[1:])!r}; flags take the form --name=value "
            "(see --helpshort)."
        )
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    from dwt_jax import distributed, experiment  # Late import: flags parse before jax starts.
    from dwt_jax.train import NonFiniteError

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
        fail(str(e))
    except NonFiniteError as e:  # The run diverged: not bad input, so status 1.
        fail(str(e), status=1)
    if any(result.interrupted for result in results.values()):
        sys.exit(130)
    import jax

    if jax.process_index() != 0:
        return
    for name, result in results.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        stage = "" if name == "run" else f"{name} "
        print(f"dwt_jax: {stage}finished at step {result.final_step}. {summary}", flush=True)


def run_cli() -> None:
    """The entry point of ``python -m dwt_jax.main``."""
    from dwt_jax import hostenv

    hostenv.reexec_with_huge_pages()  # Before jax allocates anything (hostenv's doc).
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run_cli()
