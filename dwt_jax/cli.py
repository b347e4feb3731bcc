"""What every command line of the package shares: one-line errors and a quiet start.

A bad command line (an unknown flag, a missing required flag, a value of the wrong
kind, a config file that cannot be loaded, a workdir that cannot be used) ends with
one line on stderr, ``dwt_jax: error: <what, and the fix>``, and exit status 2,
before anything is compiled or written. ``run`` is ``absl.app.run`` with that flag
parser, the logging set-up of `dwt_jax.logs`, and ``ConfigError`` (status 2) and
``NonFiniteError`` (status 1) turned into one line each::

    if __name__ == "__main__":
        cli.run(main, examples={"workdir": "runs/my_run"}, config_flag="config")

Light on purpose: absl and the standard library only, so a bad flag is reported
before jax is imported by the command (for the commands that import it late).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from absl import app, flags

from dwt_jax.errors import ConfigError, NonFiniteError
from dwt_jax.readers import check_workdir  # Re-exported: the CLIs check --workdir first.

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DIVERGED",
    "check_workdir",
    "fail",
    "flag_error_message",
    "flag_value",
    "make_flags_parser",
    "run",
]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1
ERROR_PREFIX = "dwt_jax: error: "
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false"}
_SAMPLE = {"int": "1", "float": "0.5", "bool": "true"}
# Characters kept for the files a run writes below its workdir (as dwt_jax.loop does).

FlagsParser = Callable[[list[str]], list[str]]


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Ends the process with one line on stderr and exit status ``status`` (2: bad
    input)."""
    line = " ".join(str(message).split())  # One line, whatever the message held.
    print(f"{ERROR_PREFIX}{line}", file=sys.stderr, flush=True)
    sys.exit(status)


def flag_value(argv: list[str], name: str) -> str | None:
    """The (last) value given to ``--name`` on the command line, or None."""
    value = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, flags=re.DOTALL)
        if match:
            value = (
                match.group(1) if match.group(1) is not None else (argv[i + 1 : i + 2] or [""])[0]
            )
    return value


def _example(name: str, examples: Mapping[str, str]) -> str:
    return f"--{name}={examples.get(name, '...')}"


def flag_error_message(
    error: flags.Error,
    argv: list[str],
    examples: Mapping[str, str] | None = None,
    config_flag: str | None = None,
) -> str:
    """One line for an absl flag error: the flag, its value, and what to pass instead.

    ``examples`` maps flag names to a sample value for "--x is required" messages;
    ``config_flag`` names the command's config-file flag, whose errors are the last
    line of the config file's traceback.
    """
    examples = examples or {}
    text = str(error)
    order = re.match(r"Found --([^=\s]+)\S* in argv before a value for --(\S+) was specified", text)
    if order:  # ml_collections reads a config's overrides after the config file.
        return (
            f"--{order.group(1)} comes before --{order.group(2)}; give "
            f"--{order.group(2)}=FILE first, then the overrides of its fields."
        )
    if isinstance(error, flags.UnrecognizedFlagError):
        name = getattr(error, "flagname", "") or text
        if config_flag and name.startswith(f"{config_flag}.") and config_flag in flags.FLAGS:
            return (
                f"--{name} overrides a field of the config, but no --{config_flag} is given; "
                f"pass {_example(config_flag, examples)} before it."
            )
        close = re.search(r"Did you mean: (.*?)\s*\?", text)
        hint = f" (did you mean --{close.group(1).split(',')[0].strip()}?)" if close else ""
        return f"unknown flag --{name}{hint}; see --helpshort for the flags."
    match = re.match(r"flag --([^=\s]+)=", text)
    if not match:  # A missing value, flags in the wrong order, ...
        return f"{text.splitlines()[0].rstrip('.')}; see --helpshort for the flags."
    name = match.group(1)
    if "must have a value other than None" in text:
        if name == config_flag and flag_value(argv, name):
            return (
                f"--{name}={flag_value(argv, name)}: get_config() returned None; return the "
                "config from get_config()."
            )
        return f"--{name} is required; pass it, e.g. {_example(name, examples)}."
    value = flag_value(argv, name)
    reason = text.removeprefix(f"flag --{name}={value}: ")
    if name == config_flag:  # The config file raised: the last line of its traceback.
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        last = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else reason
        return f"--{name}={value}: {last}"
    flag_type = flags.FLAGS[name].parser.flag_type() if name in flags.FLAGS else ""
    if flag_type not in _KINDS:
        first = reason.splitlines()[0].rstrip(".") if reason else "bad value"
        return f"--{name}={value!r}: {first}."
    kind = _KINDS[flag_type]
    default = flags.FLAGS[name].default
    if isinstance(default, bool):
        sample = str(default).lower()
    elif isinstance(default, (int, float)):
        sample = repr(default)
    else:
        sample = _SAMPLE[flag_type]
    field = name.removeprefix(f"{config_flag}.") if config_flag else name
    what = f"the config field {field}" if field != name else f"--{name}"
    return f"--{name}={value!r} is not {kind}; {what} takes {kind}, e.g. --{name}={sample}."


def _overrides(argv: list[str], config_flag: str) -> list[str]:
    """The config fields that ``--<config_flag>.<field>=...`` arguments set, in order."""
    names = []
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(config_flag)}\.([^=]+)", arg)
        if match:
            names.append(match.group(1))
    return names


def _missing_config_message(argv: list[str], config_flag: str, example: str) -> str:
    given = flag_value(argv, config_flag) or ""
    return (
        f"--{config_flag}={given}: no config file {given.split(':', 1)[0]!r}; pass the path "
        f"of a config file, e.g. --{config_flag}={example}."
    )


def _unknown_field_message(argv: list[str], config_flag: str) -> str:
    """Which ``--config.<field>`` names no field of the config, and the fields there are."""
    from ml_collections.config_dict import config_dict

    from dwt_jax.configuration import load_config_file

    spec = flag_value(argv, config_flag) or ""
    path, _, variant = spec.partition(":")
    try:
        config = load_config_file(path, variant or None)
    except Exception:  # The flag parser reported it; here only the names are looked up.
        config = None
    for name in _overrides(argv, config_flag):
        node, parts = config, name.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                known = sorted(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
                listing = f" ({where} has: {', '.join(known)})" if known else ""
                return (
                    f"--{config_flag}.{name}: {spec} has no field {name}; check the "
                    f"spelling{listing}."
                )
            node = node[part]
    return (
        f"--{config_flag} overrides name a field that {spec} does not have; check their spelling."
    )


def _config_load_message(error: Exception, argv: list[str], config_flag: str, example: str) -> str:
    """One line for an exception that loading ``--config`` and its overrides raised:
    no such file, the file failing (its line, from `load_config_file`), or an
    override naming no field of the config."""
    from dwt_jax.configuration import load_config_file

    spec = flag_value(argv, config_flag) or ""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        return _missing_config_message(argv, config_flag, example)
    try:
        load_config_file(path, variant or None)
    except ConfigError as e:
        return f"--{config_flag}={spec}: {e}"
    if isinstance(error, (AttributeError, KeyError)):
        return _unknown_field_message(argv, config_flag)
    reason = " ".join(str(error).split()) or "no message"
    return f"--{config_flag}={spec}: an override failed ({type(error).__name__}: {reason})."


def _check_config_value(argv: list[str], config_flag: str, example: str) -> None:
    """A config flag that was given must have loaded a ConfigDict."""
    import ml_collections

    holder = flags.FLAGS[config_flag]
    if not holder.present and holder.value is None:
        return  # Not given and optional: the command picks its default config.
    config = holder.value
    try:
        config.keys()  # A config file that was not found reads as an error object.
    except OSError:
        fail(_missing_config_message(argv, config_flag, example))
    except AttributeError:
        pass
    if not isinstance(config, ml_collections.ConfigDict):
        fail(
            f"--{config_flag}={flag_value(argv, config_flag) or ''}: get_config() returned "
            f"{type(config).__name__}, not a ConfigDict; return the config from get_config()."
        )


def make_flags_parser(
    examples: Mapping[str, str] | None = None,
    config_flag: str | None = None,
    allow_arguments: bool = False,
) -> FlagsParser:
    """A ``flags_parser`` for ``absl.app.run``: absl's flag parsing (``--help``
    included), every error as one line and exit status 2.

    ``examples``: sample values by flag name, for the "is required" messages.
    ``config_flag``: the name of a ``config_flags.DEFINE_config_file`` flag, whose
    file and ``--<name>.<field>=`` overrides are checked too. Positional arguments
    are refused unless ``allow_arguments``.
    """
    examples = dict(examples or {})
    config_example = examples.get(config_flag or "", "configs/base.py")

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            remaining = flags.FLAGS(argv)
        except flags.Error as e:
            fail(flag_error_message(e, argv, examples, config_flag))
        except Exception as e:  # The config file, or an override of one of its fields.
            if not config_flag:
                raise
            fail(_config_load_message(e, argv, config_flag, config_example))
        if config_flag:
            _check_config_value(argv, config_flag, config_example)
        if len(remaining) > 1 and not allow_arguments:
            fail(
                f"unexpected arguments {' '.join(remaining[1:])!r}; flags take the form "
                "--name=value (see --helpshort)."
            )
        return remaining

    return parse_flags


def run(
    main: Callable[[list[str]], Any],
    examples: Mapping[str, str] | None = None,
    config_flag: str | None = None,
    allow_arguments: bool = False,
) -> None:
    """``absl.app.run(main)`` for a command of the package: flags parsed by
    `make_flags_parser`, logging set by `dwt_jax.logs.configure` (absl's
    ``--verbosity``) before ``main`` runs, and ``ConfigError`` / ``NonFiniteError``
    from ``main`` turned into one line and exit status 2 / 1."""

    def run_main(argv: list[str]) -> Any:
        from dwt_jax import logs

        logs.configure(flags.FLAGS.verbosity)
        try:
            return main(argv)
        except ConfigError as e:
            fail(str(e))
        except NonFiniteError as e:  # The run diverged: not bad input, so status 1.
            fail(str(e), status=EXIT_DIVERGED)

    app.run(run_main, flags_parser=make_flags_parser(examples, config_flag, allow_arguments))
