"""Crash-safe checkpoints: ``RUN_DIR/checkpoints/step-XXXXXXXX/`` + a ``latest`` pointer.

A checkpoint is written by ``accelerator.save_state`` into a temporary directory, which is renamed
into place only when complete; then the ``latest`` file is replaced atomically. A crash at any
moment leaves ``latest`` pointing at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cmtkd_graph.errors import UserError

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
RESUMED = "resumed from"  # how the run's log (train.log) starts the line of each resumption


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator: Any, run_dir: Path, trainer_state: dict, keep: int) -> Path:
    """Save everything ``accelerator`` tracks plus ``trainer_state``; all processes must call this."""
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
    name = json.loads(pointer.read_text())["checkpoint"]
    path = checkpoints_dir(run_dir) / name
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume: checkpoint {path} is incomplete or was deleted")
    return path


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


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
