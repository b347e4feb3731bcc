"""Guarded readers of the files and directories a user hands the stack.

Whatever can be wrong with a path the user named — it is missing, a directory where a
file belongs (or a file where a directory belongs), unreadable, not UTF-8, not JSON,
not a tokenizer, not loadable by a library — becomes one ``ConfigError`` (or the
subclass passed as ``error``, e.g. ``DataConfigError``) with a one-line message that
starts with ``what`` (the field, flag or role the path came from), names the path,
says what is wrong and how to fix it::

    teacher.workdirs[0]: /runs/t/config.json is not valid JSON (line 3, column 5:
    Expecting ','); restore it from a copy or re-create the run.

(one line in reality). Nothing else escapes: no ``FileNotFoundError``, no
``UnicodeDecodeError``, no ``JSONDecodeError``, no Rust panic of ``tokenizers``.

Every function takes:

- ``what``: how the message starts, e.g. ``'data.tokenizer_path'``, ``'--config'``,
  ``'teacher.workdirs[0]'``; ``''`` starts it with the path.
- ``fix``: the advice that ends the message (a default says to repair or replace it).
- ``error``: the ``ConfigError`` subclass to raise.

Paths may be ``str`` or ``os.PathLike`` and are ``~``-expanded. The API:

- ``check_file(path, what) -> str``: the path of an existing, readable regular file.
- ``check_directory(path, field, must_exist=True) -> str``: the path of a directory;
  with ``must_exist=False`` a missing path is accepted when it can be created (its
  nearest existing ancestor is a directory).
- ``read_bytes(path, what) -> bytes``: the file's bytes.
- ``read_text(path, what) -> str``: the file as strict UTF-8 text, with universal
  newlines (``\\r\\n`` and ``\\r`` read as ``\\n``), as ``open(path, encoding='utf-8')``
  reads it; a byte-order mark is kept.
- ``read_json(path, what, expect=None) -> Any``: the parsed JSON file (a leading
  byte-order mark is allowed); ``expect=dict`` (or ``list``...) also refuses JSON of
  another type.
- ``load_with(path, what, loader, kind=...) -> T``: ``loader(path)`` for files that a
  library parses (safetensors, a torch checkpoint): any exception it raises becomes
  one ``error``: 'cannot read PATH as ``kind`` (the exception's message)'.
- ``load_tokenizer_file(path, what) -> tokenizers.Tokenizer``: a ``tokenizer.json``.
- ``check_workdir(workdir, flag='--workdir')``: a directory a run may create and
  write (not an object-store URL, no file on its path, names and length within the
  filesystem's limits, its nearest existing directory writable); creates nothing.
- ``one_line(exc_or_text) -> str``: an exception's message on one (bounded) line.

For example, a run's saved config and a config file's text::

    saved = readers.read_json(os.path.join(workdir, "config.json"), field, expect=dict,
                              fix="restore it from a copy or re-create the run")
    source = readers.read_text(path, "--config", fix="fix the path given to --config")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dwt_jax.errors import ConfigError

if TYPE_CHECKING:
    import tokenizers

T = TypeVar("T")

DEFAULT_FIX = "repair or replace it"
# Characters kept free below a workdir for the run's own files
# (checkpoints/<step>.orbax-checkpoint-tmp/...).
PATH_RESERVE = 200
_MAX_DETAIL_CHARS = 300
_JSON_TYPES = {
    dict: "a JSON object",
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON integer",
    float: "a JSON number",
    bool: "JSON true or false",
    type(None): "JSON null",
}


def one_line(detail: BaseException | str) -> str:
    """An exception's message (or a text) on one line of at most ~300 characters."""
    text = " ".join(str(detail).split())
    if isinstance(detail, BaseException) and not text:
        text = type(detail).__name__
    if len(text) > _MAX_DETAIL_CHARS:
        text = text[: _MAX_DETAIL_CHARS - 3].rstrip() + "..."
    return text


def _expand(path: str | os.PathLike) -> str:
    return os.path.expanduser(os.fspath(path))


def _show(path: str) -> str:
    """The path for a one-line message (quoted if it holds a newline or other oddity)."""
    return path if path and path.isprintable() else repr(path)


def _fail(
    error: type[ConfigError], what: str, path: str, problem: str, fix: str | None
) -> ConfigError:
    prefix = f"{what}: " if what else ""
    return error(f"{prefix}{_show(path)} {problem}; {fix or DEFAULT_FIX}.")


def _missing(path: str) -> str:
    """Why ``path`` does not exist, when a parent of it is the reason."""
    parent = os.path.dirname(path.rstrip(os.sep)) if path else ""
    while parent and parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        return f"does not exist ({_show(parent)} is a file, not a directory)"
    return "does not exist"


def check_file(
    path: str | os.PathLike,
    what: str,
    *,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> str:
    """The ``~``-expanded ``path`` of an existing, readable regular file; ``error``
    saying which of those it is not otherwise."""
    p = _expand(path)
    if not os.path.exists(p):
        raise _fail(error, what, p, _missing(p), fix)
    if os.path.isdir(p):
        raise _fail(error, what, p, "is a directory, not a file", fix)
    if not os.path.isfile(p):
        raise _fail(error, what, p, "is not a regular file", fix)
    if not os.access(p, os.R_OK):
        raise _fail(error, what, p, "cannot be read (permission denied)", fix)
    return p


def check_directory(
    path: str | os.PathLike,
    field: str,
    *,
    must_exist: bool = True,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> str:
    """The ``~``-expanded ``path`` if it is a directory (or, with ``must_exist=False``,
    does not exist but can be created); ``error`` naming ``field`` otherwise."""
    p = _expand(path)
    fix = fix or (f"set {field} to a directory" if field else "name a directory")
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        problem = "is a file, not a directory" if os.path.isfile(p) else "is not a directory"
        raise _fail(error, field, p, problem, fix)
    problem = _missing(p)
    if must_exist or not p:
        raise _fail(error, field, p, problem, fix)
    if problem != "does not exist":  # A parent is a file.
        raise _fail(error, field, p, problem.replace("does not exist", "cannot be created"), fix)
    return p


def read_bytes(
    path: str | os.PathLike,
    what: str,
    *,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> bytes:
    """The bytes of the file ``path`` (see ``check_file`` for what is refused)."""
    p = check_file(path, what, fix=fix, error=error)
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        raise _fail(error, what, p, f"cannot be read ({one_line(e.strerror or e)})", fix) from None


def _decode(
    data: bytes, p: str, what: str, fix: str | None, error: type[ConfigError], kind: str
) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 {kind} (byte {e.start} of {len(data)}: {e.reason})"
        raise _fail(error, what, p, problem, fix) from None


def read_text(
    path: str | os.PathLike,
    what: str,
    *,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> str:
    """The file ``path`` as UTF-8 text with universal newlines (module doc)."""
    p = _expand(path)
    text = _decode(read_bytes(p, what, fix=fix, error=error), p, what, fix, error, "text")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _json_type(value: Any) -> str:
    return next((name for t, name in _JSON_TYPES.items() if type(value) is t), "a JSON value")


def _parse_json(text: str, p: str, what: str, fix: str | None, error: type[ConfigError]) -> Any:
    if not text.strip():
        raise _fail(error, what, p, "is empty, not JSON", fix)
    try:
        return json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        raise _fail(error, what, p, problem, fix) from None
    except RecursionError:
        raise _fail(error, what, p, "is not valid JSON (nested too deeply)", fix) from None


def read_json(
    path: str | os.PathLike,
    what: str,
    *,
    expect: type | tuple[type, ...] | None = None,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> Any:
    """The parsed JSON file ``path``; with ``expect``, refuses a value of another type
    (e.g. ``expect=dict`` for a ``config.json`` that must be one JSON object)."""
    p = _expand(path)
    data = read_bytes(p, what, fix=fix, error=error)
    value = _parse_json(_decode(data, p, what, fix, error, "JSON"), p, what, fix, error)
    if expect is not None and not isinstance(value, expect):
        wanted = " or ".join(
            _JSON_TYPES.get(t, t.__name__)
            for t in (expect if isinstance(expect, tuple) else (expect,))
        )
        raise _fail(error, what, p, f"holds {_json_type(value)}, not {wanted}", fix)
    return value


def _is_library_failure(e: BaseException) -> bool:
    """Whether ``e`` is a parse failure of a library (Rust panics are BaseExceptions)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def load_with(
    path: str | os.PathLike,
    what: str,
    loader: Callable[[str], T],
    *,
    kind: str,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> T:
    """``loader(path)`` after ``check_file``; any exception of the loader (other than a
    ``ConfigError``, which passes through) becomes ``error``: 'cannot read PATH as
    ``kind`` (its message)'."""
    p = check_file(path, what, fix=fix, error=error)
    try:
        return loader(p)
    except ConfigError:
        raise
    except BaseException as e:
        if not _is_library_failure(e):
            raise
        prefix = f"{what}: " if what else ""
        message = f"{prefix}cannot read {_show(p)} as {kind} ({one_line(e)}); {fix or DEFAULT_FIX}."
    raise error(message)


def load_tokenizer_file(
    path: str | os.PathLike,
    what: str,
    *,
    fix: str | None = None,
    error: type[ConfigError] = ConfigError,
) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` saved in the ``tokenizer.json`` file ``path`` (as
    ``Tokenizer.from_file`` reads it); a file that is not UTF-8, not JSON (e.g.
    truncated) or not a tokenizer is ``error`` naming the path."""
    import tokenizers

    p = _expand(path)
    text = _decode(read_bytes(p, what, fix=fix, error=error), p, what, fix, error, "JSON")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except BaseException as e:
        if not _is_library_failure(e):
            raise
        detail = one_line(e)
    _parse_json(text, p, what, fix, error)  # A JSON error is the clearer message.
    problem = f"is not a tokenizer.json that the tokenizers library can read ({detail})"
    raise _fail(error, what, p, problem, fix)


def _clip(text: str, keep: int) -> str:
    """``text``, or its first ``keep`` characters and '...'."""
    return text if len(text) <= keep else text[:keep] + "..."


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """Fails early (``ConfigError``) if ``workdir`` cannot be created or written;
    creates nothing.

    Refused: an object-store URL, a path with a component that exists as a file, a
    name longer than the filesystem allows, a nearest existing directory that this
    process cannot write.
    """
    if "://" in workdir:
        # Checkpoints could go to an object store (Orbax can), but the run's other
        # files (config.json, metrics.jsonl, TensorBoard events) use the local
        # filesystem API: refuse rather than write to a local './gs:/...' directory.
        raise ConfigError(
            f"{flag}={workdir}: object-store URLs are not supported as workdirs yet; "
            "mount the bucket on every host (gcsfuse; launch/tpu_pod.sh does this for a "
            "gs:// --workdir) and pass the mounted path."
        )
    if not workdir.strip():
        raise ConfigError(f"{flag} is empty; pass a directory, e.g. {flag}=runs/my_run.")
    path = os.path.abspath(os.path.expanduser(workdir))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    probe = existing if os.path.isdir(existing) else os.path.dirname(existing)
    name_max, path_max = _limit(probe, "PC_NAME_MAX", 255), _limit(probe, "PC_PATH_MAX", 4096)
    for part in path.split(os.sep):
        if len(part.encode()) > name_max:
            raise ConfigError(
                f"{flag}={_clip(workdir, 80)}: the name {_clip(part, 24)!r} is "
                f"{len(part.encode())} "
                f"characters, longer than the filesystem allows ({name_max}); choose a "
                "shorter name."
            )
    # The run's own files go up to checkpoints/<step>.orbax-checkpoint-tmp/... below it.
    budget = path_max - PATH_RESERVE
    if len(path.encode()) > budget:
        raise ConfigError(
            f"{flag}={_clip(workdir, 80)}: the path is {len(path.encode())} characters; the files "
            f"written below it need paths under {path_max} (the filesystem's limit), so "
            f"it must stay under {budget}: choose a shorter path."
        )
    if not os.path.isdir(existing):
        where = "it is" if existing == path else f"{existing} is"
        raise ConfigError(
            f"{flag}={workdir} cannot be written ({where} a file, not a directory); choose "
            "another directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag}={workdir} cannot be written ({existing} is not a writable directory); "
            "choose a directory you can write to."
        )


def _limit(directory: str, name: str, default: int) -> int:
    """``os.pathconf(directory, name)``, or ``default`` where it cannot be queried."""
    try:
        value = os.pathconf(directory, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default
