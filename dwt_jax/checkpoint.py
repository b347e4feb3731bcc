"""Orbax checkpoints: the train state and the data iterator, saved and restored together.

Layout: ``<workdir>/checkpoints/<step>/{state,data}``. Orbax writes each step into a
temporary directory and renames it when complete, so a kill during a save leaves the
previous checkpoints intact; ``max_to_keep`` only deletes old steps after a newer
one is committed. Saves are asynchronous: device arrays are copied to host memory,
then written in the background while training goes on.

Resuming (``Checkpointer.restore_latest``) reads the newest step and falls back to
older ones when it is unreadable (a truncated file, a missing piece): a warning, and
the unreadable step is moved to ``<workdir>/checkpoints_corrupt/`` once an older one
has been restored, so that the run can save that step again. Once a step is
committed, ``dwt_manifest.json`` in it records its files and their sizes: a file cut
short or missing is found from it before Orbax reads anything. A checkpoint whose
arrays do not match the model being resumed is a config error
(``check_matches``), never a fall-back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dwt_jax import readers
from dwt_jax.errors import ConfigError
from dwt_jax.state import TrainState

CONFIG_FILE = "config.json"
CORRUPT_DIR_SUFFIX = "_corrupt"  # <workdir>/checkpoints_corrupt/<step>[.<n>]
MANIFEST_FILE = "dwt_manifest.json"  # In each step: its files and their sizes.


def _path_name(path: tuple) -> str:
    """'params/student/bert/...' of a key path, the same for a TrainState and for the
    nested dicts and lists Orbax's metadata has."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        _path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def _one_line(error: BaseException) -> str:
    """The innermost cause of ``error``, on one short line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _files(step_dir: str) -> dict[str, int]:
    """Sizes of the files of the step's items (``state/``, ``data/``)."""
    sizes = {}
    for item in ("state", "data"):
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                path = os.path.join(root, name)
                sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
    return sizes


def write_manifest(step_dir: str) -> None:
    """Records every file of a committed step and its size (process 0), so that a file
    cut short or lost later is found before Orbax reads the step."""
    if jax.process_index() != 0 or not os.path.isdir(step_dir):
        return
    path, files = os.path.join(step_dir, MANIFEST_FILE), _files(step_dir)
    with open(path + ".tmp", "w") as f:
        json.dump({"files": files}, f, indent=0, sort_keys=True)
    os.replace(path + ".tmp", path)


def check_manifest(step_dir: str) -> str:
    """'' if every file the step's manifest lists is there with its size (or the step
    has no manifest: killed right after its commit); else what is wrong."""
    path = os.path.join(step_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return ""
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST_FILE} cannot be read: {_one_line(e)}"
    found = _files(step_dir)
    for name, size in sorted(expected.items()):
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, {size} when saved"
    return ""


def check_matches(step_dir: str, abstract_state: Any) -> None:
    """Raises ConfigError if the state saved in ``step_dir`` has other arrays than
    ``abstract_state`` (the model and optimiser the config builds): names the first
    parameter that differs and both shapes. An unreadable step raises OSError/ValueError
    of its own (the caller treats that as corruption)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = _shapes(handler.metadata(epath.Path(step_dir) / "state"))
    finally:
        handler.close()
    if not saved:
        raise ValueError(f"{step_dir}/state has no array metadata")
    wanted = _shapes(abstract_state)
    problems = []
    for name, (shape, dtype) in wanted.items():
        if name not in saved:
            problems.append(f"{name} (shape {shape}) is not in the checkpoint")
        elif saved[name] != (shape, dtype):
            problems.append(
                f"{name} has shape {saved[name][0]} {saved[name][1]} in the checkpoint but "
                f"{shape} {dtype} in the model built from the config"
            )
    problems += [
        f"the checkpoint has {name} that the config's model lacks"
        for name in saved
        if name not in wanted
    ]
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise ConfigError(
            f"the checkpoint {step_dir} does not match the config: {problems[0]}{more}; "
            "resume with the config the run was saved with (its config.json), or use a "
            "new --workdir."
        )


def saved_steps(directory: str) -> list[int]:
    """The committed steps in a checkpoint directory, oldest first ([] if there is
    none); read-only (Orbax's temporary directories are not integers)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def check_saved_state(directory: str, abstract_state: Any) -> None:
    """``check_matches`` on the newest step in ``directory`` whose metadata reads,
    read-only and before anything expensive; unreadable steps are left to
    ``Checkpointer.restore_latest``."""
    for step in reversed(saved_steps(directory)):
        try:
            check_matches(os.path.join(directory, str(step)), abstract_state)
        except ConfigError:
            raise
        except Exception:  # Unreadable: restore_latest warns and falls back.
            continue
        return


def _all_processes(ok: bool) -> bool:
    """True if ``ok`` holds on every process (each host restores its own shards)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def warn(message: str) -> None:
    """A warning on stderr (process 0; the others log it)."""
    if jax.process_index() == 0:
        print(f"dwt_jax: warning: {message}", file=sys.stderr, flush=True)
    else:
        logging.warning("%s", message)


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
        self._unsealed: set[int] = set()  # Saved here, committed, no manifest yet.

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_iterator: Any) -> bool:
        """Starts saving ``step``; returns False if that step is already saved."""
        if step in self._manager.all_steps():
            return False
        self.wait()  # Orbax waits for the previous save anyway; seal it first.
        self._unsealed.add(step)
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore_latest(
        self, abstract_state: TrainState, data_iterator: Any
    ) -> tuple[int, TrainState] | tuple[None, None]:
        """(step, state) of the newest readable checkpoint, the data iterator restored
        with it; (None, None) if there is none.

        An unreadable step is skipped with a warning, and moved aside once an older
        one restored (nothing is deleted); if no step can be read, a ConfigError
        lists them. A step that reads but does not match ``abstract_state`` is a
        ConfigError (``check_matches``)."""
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            reason = check_manifest(self.step_dir(step))
            try:
                if not reason:
                    check_matches(self.step_dir(step), abstract_state)
                    state = self.restore(step, abstract_state, data_iterator)
            except ConfigError:
                raise
            except Exception as e:  # Any failure to read the step is corruption.
                reason = _one_line(e)
            if _all_processes(not reason):
                if unreadable:
                    self._set_aside([s for s, _ in unreadable])
                    warn(f"resumed from step {step}, the newest readable checkpoint.")
                if not os.path.exists(os.path.join(self.step_dir(step), MANIFEST_FILE)):
                    write_manifest(self.step_dir(step))  # Read whole: seal it now.
                return step, state
            reason = reason or "another process could not read its part"
            unreadable.append((step, reason))
            warn(
                f"checkpoint step {step} in {self.directory} cannot be read ({reason}); "
                "trying the one before it."
            )
        if unreadable:
            listed = "; ".join(f"step {s}: {r}" for s, r in unreadable)
            raise ConfigError(
                f"no checkpoint in {self.directory} can be read ({listed}); restore the "
                "directory from a backup, or move it away to start the run from scratch."
            )
        return None, None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps to ``<directory>_corrupt/`` (process 0), so that the
        run can save those steps again and the files stay for inspection."""
        if jax.process_index() == 0:
            target_dir = self.directory.rstrip("/") + CORRUPT_DIR_SUFFIX
            os.makedirs(target_dir, exist_ok=True)
            for step in steps:
                target, n = os.path.join(target_dir, str(step)), 0
                while os.path.exists(target):
                    n += 1
                    target = os.path.join(target_dir, f"{step}.{n}")
                shutil.move(self.step_dir(step), target)
                warn(f"moved the unreadable checkpoint step {step} to {target}.")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dwt_jax:set_aside_checkpoints")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True at the step every host saves at after a pre-emption notice reached any
        of them (JAX's pre-emption sync point; multi-process runs only)."""
        if jax.process_count() == 1:
            return False
        return bool(self._manager.reached_preemption(step))

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
        """Blocks until every asynchronous save has been committed (and sealed)."""
        self._manager.wait_until_finished()
        committed = set(self._manager.all_steps())
        for step in sorted(self._unsealed):
            if step in committed:
                write_manifest(self.step_dir(step))
        self._unsealed.clear()

    def close(self) -> None:
        self.wait()
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
    saved = readers.read_json(
        path,
        "--workdir",
        expect=dict,
        fix="restore it from a copy, or use a new --workdir (the run's config is unknown)",
    )
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
