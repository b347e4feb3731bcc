"""Which log records reach the terminal: warnings and errors unless asked for more.

The project's own lines (the start line, progress, evaluations, stage lines) are
printed, not logged. The libraries under it log at INFO through absl and Python's
``logging``: Orbax logs dozens of lines (some multi-hundred-character dictionaries)
at every checkpoint save and restore, TFDS at every dataset load, Grain and JAX at
start-up. absl's
``app.run`` turns its ``--verbosity`` flag's default (-1) into 0, which is INFO
there; `configure` maps it so that INFO needs asking for:

    --verbosity  -1 or 0 (default)  warnings and errors
                 1                  and INFO (absl's format: ``I1202 18:40:54 ...``)
                 2 or more          and DEBUG
                 -2 / -3            errors only / fatal only

absl's handler sits on the root logger and every library logger inherits the
root's level, so that level is all there is to set; ``--logger_levels`` (absl)
still sets one logger's level. Standard library and absl only: it runs before
anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

# absl's own logger; "absl" is the name absl.logging gives it.
_ABSL_LOGGER = "absl"


def level_for(verbosity: int) -> int:
    """The standard ``logging`` level that ``--verbosity=verbosity`` shows."""
    if verbosity >= 2:
        return logging.DEBUG
    if verbosity == 1:
        return logging.INFO
    if verbosity >= -1:
        return logging.WARNING
    return logging.ERROR if verbosity == -2 else logging.CRITICAL


def configure(verbosity: int = 0) -> int:
    """Sets the level of the root logger (and absl's) for ``verbosity``; returns it.

    Call it after absl's flags are parsed and before the command's heavy imports
    (``dwt_jax.cli.run`` does): absl resets the root level whenever its
    ``--verbosity`` flag is set.
    """
    from absl import logging as absl_logging

    level = level_for(int(verbosity))
    root = logging.getLogger()
    root.setLevel(level)
    absl_logger = logging.getLogger(_ABSL_LOGGER)
    if absl_logging.get_absl_handler() in root.handlers:
        absl_logger.setLevel(logging.NOTSET)  # It inherits the root's level, as absl has it.
    else:
        absl_logger.setLevel(level)
    return level


@contextlib.contextmanager
def only_errors(logger_name: str = _ABSL_LOGGER) -> Iterator[None]:
    """Only errors from ``logger_name`` meanwhile (TFDS warns while it probes or builds
    a dataset)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_dataset_build() -> Iterator[None]:
    """Around TFDS's ``download_and_prepare`` of a dataset: unless INFO is shown, no
    progress bars, no "Downloading and preparing dataset" lines on stdout and no
    warning that the folder it is about to fill has no ``dataset_info.json``.

    Only the first run with a data cache builds the dataset; the caller has imported
    ``tensorflow_datasets`` already.
    """
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # For the process: at this verbosity bars never show.
    with only_errors(_ABSL_LOGGER), contextlib.redirect_stdout(io.StringIO()):
        yield
