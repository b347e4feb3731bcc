"""Shared fixtures of the fine-tuning tests: the smoke config, the co-finetuned teachers
and fast compilation.

Every run here uses configs/finetune/base.py:smoke (the embedded 'source' task, 10
steps, warm-up 2) with no pre-training, at a constant ``LEARNING_RATE`` (so that a
run's schedule does not depend on its length: a resume to more steps equals a
straight run). The teachers are co-finetuned once per session and reused by every
student test.

Compiling dominates these tests' time. Their runs compile many identical programs
(the eval steps in every run, the same strategy's train step in the comparison, the
pipeline and a resume), so while they run (only then) they share a JAX persistent
compilation cache and compile with ``jax_disable_most_optimizations`` (about a third
faster on XLA:CPU; the programs of all these runs are compiled alike): see
``compile_fast``.
"""

from __future__ import annotations

import contextlib
import os

import jax
import ml_collections
import pytest
from testutil import load_config

from dwt_jax import stages as pipeline
from dwt_jax.finetune import run as finetune_run

# At the smoke config's learning rate (1e-3, decaying linearly over the 10 steps) the
# held-out loss of the smaller teacher (1 layer of width 16) falls by only 0.002 from
# ln 8. At a constant 3e-3 after the 2 warm-up steps, every model's held-out loss falls
# by 0.019 (that teacher) to 0.09 in 10 steps: the label prior is learnt.
LEARNING_RATE = 3e-3
# The 'dynamic_kd_selection' variant of the config, distilling a quarter of each batch
# of 8 in these tests (the config's 10% would be 1 row).
SELECTION = {"selection": "entropy", "ratio": 0.25}


def make_finetune_config(data_cache_dir: str, **train) -> ml_collections.ConfigDict:
    """configs/finetune/base.py:smoke with the session's data caches, no pre-training,
    no progress bar and no TensorBoard; ``train`` overrides fields of ``config.train``."""
    config = load_config("smoke", name="finetune/base")
    for section in (config, config.pretrain):
        section.data.tfds_data_dir = os.path.join(data_cache_dir, "tfds")
        section.data.tokenizer_cache_dir = os.path.join(data_cache_dir, "tokenizers")
        section.log.progress = False
        section.log.tensorboard = False
    config.pretrain.train.num_steps = 0
    config.optim.learning_rate = LEARNING_RATE
    config.optim.decay = "constant"
    config.compare.variants.dynamic_kd_selection.dynamic_kd.update(SELECTION)
    config.train.update(train)
    return config


def configure_entry(config: ml_collections.ConfigDict, entry: str) -> ml_collections.ConfigDict:
    """Sets the strategy of a student entry (a strategy name, or a variant in
    ``compare.variants`` such as 'dynamic_kd_selection') as the comparison runner does."""
    strategy, overrides = pipeline.resolve_entry(config, entry)
    config.distill.strategy = strategy
    for section, values in overrides.items():
        config.distill[section].update(values)
    return config


@contextlib.contextmanager
def _fast_compilation(cache_dir: str):
    from jax._src import compilation_cache

    settings = {
        "jax_compilation_cache_dir": cache_dir,
        # Also the many small programs (e.g. Orbax's slicing of each array it saves).
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_disable_most_optimizations": True,
    }
    before = {name: jax.config.values[name] for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def fast_compilation(tmp_path_factory):
    """A context manager switching on the compilation settings of the module doc (for
    fixtures of a wider scope, which are set up before ``compile_fast``)."""
    cache_dir = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    return lambda: _fast_compilation(cache_dir)


@pytest.fixture
def compile_fast(fast_compilation):
    """The compilation settings of the module doc during a test (test modules that
    train use it: ``pytestmark = pytest.mark.usefixtures("compile_fast")``)."""
    with fast_compilation():
        yield


@pytest.fixture(scope="session")
def finetune_config(data_cache_dir):
    """``make_finetune_config`` bound to the session's data cache (a factory)."""
    return lambda **train: make_finetune_config(data_cache_dir, **train)


@pytest.fixture(scope="session")
def shared_teachers(tmp_path_factory, finetune_config, fast_compilation):
    """(workdir, result) of the smoke teachers, co-finetuned once for the session."""
    workdir = str(tmp_path_factory.mktemp("shared_teachers"))
    config = finetune_config(num_steps=finetune_config().teacher.num_steps)
    config.distill.strategy = "cofinetune"
    with fast_compilation():
        return workdir, finetune_run.run(config, workdir)


@pytest.fixture(scope="session")
def student_config(finetune_config, shared_teachers):
    """A factory of student configs (``entry``: see ``configure_entry``) learning from
    the shared teachers ('task': from none)."""

    def make(entry: str, **train) -> ml_collections.ConfigDict:
        config = configure_entry(finetune_config(**train), entry)
        config.teacher.workdirs = () if entry == "task" else (shared_teachers[0],)
        return config

    return make
