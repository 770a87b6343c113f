"""Crash-safe checkpoints: ``RUN_DIR/checkpoints/step-XXXXXXXX/`` + a ``latest`` pointer.

A checkpoint is written by ``accelerator.save_state`` into a temporary directory, which is renamed
into place only when complete; then the ``latest`` file is replaced atomically. A crash at any
moment leaves ``latest`` pointing at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.safe_files import read_json_object

log = logging.getLogger("cmtkd_graph")

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
RESUMED = "resumed from"  # how the run's log (train.log) starts the line of each resumption


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    trainer_state: dict,
    keep: int,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Save everything ``accelerator`` tracks plus ``trainer_state``; all processes must call this.
    ``write_more(directory)``: what else the main process writes into the checkpoint (the weights'
    moving average), before it becomes the latest."""
    root = checkpoints_dir(run_dir)
    name = f"step-{trainer_state['step']:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / TRAINER_STATE, trainer_state)
        if write_more is not None:
            write_more(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json_atomic(root / LATEST, {"checkpoint": name, **trainer_state})
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The last complete checkpoint of a run, or a UserError saying what is missing."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        raise UserError(f"--resume: {run_dir} has no complete checkpoint ({pointer} is missing)")
    name = _read_json(pointer).get("checkpoint")
    if not isinstance(name, str) or not name.startswith("step-"):
        raise UserError(f"--resume: {pointer} names no checkpoint ({name!r}); the file is damaged")
    path = checkpoints_dir(run_dir) / name
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume: checkpoint {path} is incomplete or was deleted")
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    return _read_json(checkpoint / TRAINER_STATE)


def check_checkpoint(checkpoint: Path, process_index: int = 0) -> None:
    """Before a resumed run writes anything: its checkpoint's files are whole, or one line naming the
    damaged one. A random-state file that cannot be read only warns (accelerate would skip it
    silently): the run continues, with fresh random states, not bit-identical to an uninterrupted one."""
    from safetensors import SafetensorError, safe_open

    state = read_trainer_state(checkpoint)
    if not isinstance(state.get("step"), int) or not isinstance(state.get("epoch"), int):
        raise UserError(f"--resume: {checkpoint / TRAINER_STATE} has no step/epoch; the file was changed")
    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):  # a cut file fails here: its header covers more
                pass
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise UserError(
                f"--resume: {file} is damaged ({first_line(err)}); restore it or start the run again"
            ) from None
    random_states = checkpoint / f"random_states_{process_index}.pkl"
    if random_states.is_file():
        from accelerate.utils.other import load

        try:
            load(random_states)
        except Exception as err:  # a cut pickle fails in many ways
            log.warning(
                f"warning: {random_states} cannot be read ({first_line(err)}); the run continues with "
                "fresh random states, so it is not bit-identical to an uninterrupted one"
            )


def _read_json(path: Path) -> dict:
    return read_json_object(path, what="--resume", fix="restore it or start the run again")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed write


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
