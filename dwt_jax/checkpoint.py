"""Orbax checkpoints: the train state and the data iterator, saved and restored together.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. Orbax writes each step into a
temporary directory and renames it when complete, so a kill during a save leaves the
previous checkpoints intact; ``max_to_keep`` only deletes old steps after a newer
one is committed. Saves are asynchronous: device arrays are copied to host memory,
then written in the background while training goes on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from dwt_jax.configuration import ConfigError
from dwt_jax.state import TrainState

CONFIG_FILE = "config.json"


class Checkpointer:
    """Saves and restores (train state, data-iterator state) under one step number."""

    def __init__(
        self, directory: str, *, max_to_keep: int | None = None, async_save: bool = True
    ) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any) -> bool:
        """Starts saving ``step``; returns False if that step is already saved."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState, data_iterator: Any) -> TrainState:
        """Restores ``step`` into arrays shaped and sharded like ``abstract_state``.

        The data iterator is restored in place: its next batch is the one that
        followed the last batch trained on before the save.
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored["state"]

    def restore_student_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only ``state.params['student']`` (a teacher's weights): no optimiser
        state is read, each array lands in the sharding ``abstract_params`` carries."""
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": {"student": abstract_params}},
                    restore_args={"params": {"student": restore_args}},
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]["student"]

    def wait(self) -> None:
        """Blocks until every asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records the config of the run; the first writer wins (resumes keep the original).
    Process 0 writes it (hosts may share the workdir)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0 and not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(path + ".tmp", path)


def check_resume_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run whose model or data layout differs from the saved one."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    fixed = {
        "model": list(config.model.keys()),
        "data": [
            "seq_len",
            "max_predictions",
            "batch_size",
            "source",
            "tfds_name",
            "task",
            "vocab_size",
        ],
    }
    for section, fields in fixed.items():
        for field in fields:
            if field not in config[section]:
                continue
            before = saved.get(section, {}).get(field)
            now = config[section][field]
            if isinstance(now, tuple):
                now = list(now)
            if field in saved.get(section, {}) and before != now:
                raise ConfigError(
                    f"{section}.{field}={now!r} differs from {before!r} in the run saved in "
                    f"{workdir}; use the saved value to resume, or a new --workdir."
                )
