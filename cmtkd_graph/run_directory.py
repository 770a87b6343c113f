"""A run directory's life: chosen, created, locked, resumed, and cleaned up after a failed start.

Training calls one function, :func:`take`, before it writes anything, and gets a
:class:`RunDirectory` that it releases at the end. The rules it keeps:

* **One writer.** The directory is locked (``RUN_DIR/.lock``, an ``flock`` held for the life of the
  process; its text names the holder's pid, host and start). A second writer stops with one line
  naming the holder. The kernel drops the lock of a process that dies, so a lock left by a killed run
  is stale and the next run takes it over, saying so.
* **New runs never share.** ``runs/NAME``, else ``runs/NAME-1``, ``-2``...: the first directory this
  process creates (``mkdir`` is atomic) or finds empty and locks first.
* **Nothing that was there is removed.** A fresh start that fails before its first optimizer step
  removes what it wrote, and the directory only if this process created it and nothing else is in it;
  never a directory, or a file, that existed before the run. A resumed run removes nothing.

Only the main process of a launch takes the directory; the others are told its path
(:func:`take` broadcasts it, and an error, so that no process waits for a main one that stopped).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmtkd_graph.checkpoint import LATEST, checkpoints_dir
from cmtkd_graph.errors import UserError
from cmtkd_graph.runtime.process import TRAIN_LOG

log = logging.getLogger("cmtkd_graph")

LOCK_FILE = ".lock"
SPEC_FILE = "spec.yaml"
FINAL_FILE = "final.json"
RUN_TRACES = frozenset({SPEC_FILE, TRAIN_LOG})
"""What a run writes first: a directory holding either holds a run (perhaps one that never reached a
checkpoint), not a user's own files."""
Mode = Literal["new", "resume", "auto"]
"""new: a new run directory from the spec's; resume: continue the given run directory; auto: the
spec's run directory, continued where it has a checkpoint, started fresh in it otherwise."""


class RunDirectoryBusy(UserError):
    """Another process holds the run directory's lock."""


@dataclass
class RunDirectory:
    """A run directory this process works in (or, on a process other than the main one, its path)."""

    path: Path
    resumed: bool = False
    """It holds a checkpoint to continue from (``--resume``, or ``--resume auto`` that found one)."""
    created: bool = False
    """This process made the directory."""
    existed_before: frozenset[str] = frozenset()
    """Its entries when this process took it: never removed by this process."""
    lock: RunLock | None = field(default=None, repr=False)

    def remove_failed_start(self) -> None:
        """After a fresh start failed before its first optimizer step: remove what this run wrote, and
        the directory if this process created it and nothing else is in it. A resumed run keeps all."""
        if self.lock is None or self.resumed:
            return
        _close_log_files(self.path)
        for entry in self.path.iterdir():
            if entry.name in self.existed_before or entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.release()
        if self.created:
            with contextlib.suppress(OSError):  # not empty: something this run did not write is in it
                self.path.rmdir()

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def take(state, target: Path, mode: Mode) -> RunDirectory:
    """The run directory of this launch, taken by its main process (``state``: accelerate's
    PartialState) and shared with the others. ``target``: the spec's run directory (new, auto) or
    the directory to resume."""
    from accelerate.utils import broadcast_object_list

    target = Path(os.path.abspath(target.expanduser()))  # `..` resolved: the log names the real place
    taken: RunDirectory | None = None
    shared: list = [None]
    if state.is_main_process:
        try:
            try:
                taken = _TAKERS[mode](target)
            except OSError as err:  # e.g. no permission to create it
                problem = err.strerror or str(err)
                raise UserError(f"{target}: cannot be used as a run directory ({problem})") from None
            shared = [(str(taken.path), taken.resumed, None)]
        except UserError as err:
            shared = [(None, False, err.problems)]
            if state.num_processes == 1:
                raise
    if state.num_processes > 1:
        broadcast_object_list(shared)
    path, resumed, problems = shared[0]
    if problems is not None:
        raise UserError(problems)
    return taken or RunDirectory(Path(path), resumed=resumed)


def take_new(base: Path) -> RunDirectory:
    """``base``, else ``base-1``, ``base-2``...: the first that this process creates, or finds empty
    and locks first (two runs started at once get two directories)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(100_000):
        candidate = base if i == 0 else base.with_name(f"{base.name}-{i}")
        created = _make(candidate)
        if not created and not candidate.is_dir():
            continue  # a file of that name
        try:
            lock = RunLock.acquire(candidate)
        except RunDirectoryBusy:
            continue
        if _entries(candidate):  # somebody's run (a finished one holds no lock)
            lock.release()
            continue
        return RunDirectory(candidate, created=created, lock=lock)
    raise UserError(f"{base}: no free run directory name among {base.name}-1 ... -99999")


def take_to_resume(path: Path) -> RunDirectory:
    """``--resume RUN_DIR``: the run directory, locked; it must exist."""
    if not path.is_dir():
        raise UserError(f"--resume: {path} is not a directory (a run directory holds {SPEC_FILE})")
    lock = RunLock.acquire(path)
    return RunDirectory(path, resumed=True, existed_before=_entries(path), lock=lock)


def take_auto(path: Path) -> RunDirectory:
    """``--resume auto``: the spec's run directory (made if missing), locked; continued where it has a
    checkpoint, started fresh where it holds nothing or only a start that never reached one (its
    ``spec.yaml`` or ``train.log``). Refused where it holds a finished run, or files but no run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = _make(path)
    if not path.is_dir():
        raise UserError(f"--resume auto: {path} is a file, not a run directory; set train.output_dir")
    lock = RunLock.acquire(path)
    entries = _entries(path)
    try:
        if (checkpoints_dir(path) / LATEST).is_file():
            return RunDirectory(path, resumed=True, existed_before=entries, lock=lock)
        if (path / FINAL_FILE).is_file():
            raise UserError(
                f"--resume auto: {path} holds a finished run without checkpoints; nothing to continue "
                "(remove it to train again)"
            )
        if entries and not entries & RUN_TRACES:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserError(
                f"--resume auto: {path} holds files but no run ({shown}); give train.output_dir an empty "
                "or new directory"
            )
    except UserError:
        lock.release()
        raise
    return RunDirectory(path, created=created, existed_before=entries, lock=lock)


_TAKERS = {"new": take_new, "resume": take_to_resume, "auto": take_auto}


def _make(path: Path) -> bool:
    """Create ``path``; True when this call created it (False: it exists)."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def _entries(path: Path) -> frozenset[str]:
    """What a directory holds, its lock file aside."""
    return frozenset(p.name for p in path.iterdir() if p.name != LOCK_FILE)


def _close_log_files(path: Path) -> None:
    """Close the run's log file handlers (``train.log``) before their file is removed."""
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == path:
            handler.close()
            log.removeHandler(handler)


@dataclass
class RunLock:
    """An exclusive lock on a directory: ``flock`` on ``DIR/.lock``, whose text names the holder."""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """The lock, or :class:`RunDirectoryBusy` naming its holder. A lock file whose holder is gone
        (the kernel dropped its ``flock``) is taken over, with a log line saying whose it was."""
        path = directory / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = not _flock(fd, path)
            except BaseException:
                os.close(fd)
                raise
            if held:
                holder = _describe(_read_holder(fd))
                os.close(fd)
                raise RunDirectoryBusy(
                    f"{directory} is in use by {holder}; one process writes a run directory at a time "
                    f"(if that process is gone, remove {path})"
                )
            # The holder may have released (and removed) the file between our open and our lock:
            # then we hold a lock on a file that is no longer there; try again.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                log.warning(f"{directory}: took over the lock of {_describe(previous)}, which has ended")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
            return cls(path, fd)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still held: a waiting process then sees a removed file
        os.close(self.fd)


def _flock(fd: int, path: Path) -> bool:
    """Lock ``fd`` without waiting: True if locked, False if another process holds it. On a file
    system without ``flock``, the holder named in the file decides: held while that process lives."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    holder = _read_holder(fd)
    return not holder or not _alive(holder)


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def _alive(holder: dict) -> bool:
    """The holder still runs (only known on this host; a process elsewhere counts as alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True
