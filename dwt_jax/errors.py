"""The exceptions a user sees, in one module that imports nothing of ours.

Every module that refuses bad input raises one of these; the command lines turn
``ConfigError`` into one ``dwt_jax: error:`` line and exit status 2, and
``NonFiniteError`` into one line and exit status 1. Keeping them here means the
data, model and Hugging Face packages never import the config validator.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field, a file or a run that the user named cannot be used.

    The message names the field or path, the bad value and what would fix it.
    """


class DataConfigError(ConfigError):
    """A data config names something that does not exist or is not prepared."""


class NonFiniteError(RuntimeError):
    """The loss or gradients stayed NaN/Inf for ``train.max_nonfinite_streak`` steps."""
