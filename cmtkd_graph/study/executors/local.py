"""``--executor local``: runs train as processes on this machine, at most ``jobs`` at once. With more
than one job each process is pinned to its own share of the cores (training's ``cpu_threads: auto``
then uses exactly that share) and writes its output to a log file beside its run directory."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cmtkd_graph.study.executors.base import Job, Submission, train_command


class LocalExecutor:
    """Training processes on this machine, ``jobs`` at a time."""

    name = "local"
    poll_interval = 0.2

    def __init__(self, jobs: int = 1, launcher: Sequence[str] = ()) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.launcher = list(launcher)
        self.shares = core_shares(sorted(os.sched_getaffinity(0)), jobs)
        self._free = list(range(jobs))

    def check(self) -> None:
        """Nothing to check: this machine is here."""

    def capacity(self) -> int:
        return len(self._free)

    def where(self) -> str:
        cores = len(os.sched_getaffinity(0))
        each = f", each on {len(self.shares[0])} of {cores} cores" if self.jobs > 1 else ""
        return f"local: this machine, {self.jobs} run(s) at a time{each}"

    def submit(self, submissions: Sequence[Submission]) -> list[Job]:
        return [self._start(s) for s in submissions]

    def _start(self, submission: Submission) -> Job:
        """With one job the output goes to this process's, otherwise to the run's log file."""
        share = self._free.pop(0)
        command = train_command(self.launcher, submission.train_args)
        if self.jobs == 1:
            process = subprocess.Popen(command)
            return Job(submission, _record(process.pid), None, (process, share, None))
        cores = self.shares[share]
        submission.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(submission.log_path, "w")  # noqa: SIM115 (closed when the job ends)
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )
        return Job(submission, _record(process.pid), submission.log_path, (process, share, log_file))

    def poll(self, job: Job) -> int | None:
        """The job's exit status once it has ended (its slot is then free again), else None. A process
        of an earlier study process (found again) ended well when its run has its final results."""
        if isinstance(job.handle, _Adopted):
            pid, share = job.handle
            if _alive(pid, job.submission.run_dir):
                return None
            self._release(share)
            return 0 if (job.submission.run_dir / "final.json").is_file() else 1
        process, share, log_file = job.handle
        code = process.poll()
        if code is not None and self._release(share) and log_file is not None:
            log_file.close()
        return code

    def _release(self, share: int | None) -> bool:
        """Free ``share`` once (polling an ended job again frees nothing); whether it was freed now."""
        if share is None or share in self._free:
            return False
        self._free.append(share)
        return True

    def find(self, submission: Submission, record: dict) -> Job | None:
        """A training process started by an earlier study process that is still alive on this machine.
        It takes one of this process's slots while it lives (``jobs`` is how many run at once, whoever
        started them), or none if all are taken by others found before it."""
        pid = record.get("pid")
        if record.get("host") != socket.gethostname() or not isinstance(pid, int):
            return None
        if not _alive(pid, submission.run_dir):
            return None
        share = self._free.pop(0) if self._free else None
        log = submission.log_path if submission.log_path.is_file() else None
        return Job(submission, record, log, _Adopted(pid, share))


class _Adopted(NamedTuple):
    """The handle of a job found again: its process and the slot it holds (None: none was free)."""

    pid: int
    share: int | None


def _record(pid: int) -> dict:
    return {"executor": "local", "host": socket.gethostname(), "pid": pid}


def _alive(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is still the process training ``run_dir`` (not a later process with its number)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(run_dir) in command


def core_shares(cores: list[int], jobs: int) -> list[list[int]]:
    """``jobs`` disjoint, contiguous shares of ``cores`` as even as possible; with more jobs than cores,
    one core each, in turn."""
    if jobs >= len(cores):
        return [[cores[i % len(cores)]] for i in range(jobs)]
    return [cores[i * len(cores) // jobs : (i + 1) * len(cores) // jobs] for i in range(jobs)]
