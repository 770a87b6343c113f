"""Where a study's runs train. An executor starts a run's training command and says when it has ended;
the study (``cmtkd_graph.study.run``) decides which runs are ready, from their dependencies.

``LocalExecutor``: processes on this machine, at most ``jobs`` at once. With more than one job each
process is pinned to its own share of the cores (training's ``cpu_threads: auto`` then uses exactly
that share) and writes its output to a log file beside its run directory.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class LocalJob:
    """One training process started by :class:`LocalExecutor`."""

    process: subprocess.Popen
    share: int
    log_path: Path | None
    log_file: IO | None = field(default=None, repr=False)


class LocalExecutor:
    """Runs training commands as local processes, ``jobs`` at a time."""

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.shares = core_shares(sorted(os.sched_getaffinity(0)), jobs)
        self._free = list(range(jobs))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def start(self, command: Sequence[str], log_path: Path) -> LocalJob:
        """Start ``command``; with one job its output goes to this process's, otherwise to ``log_path``."""
        share = self._free.pop(0)
        if self.jobs == 1:
            return LocalJob(subprocess.Popen(list(command)), share, None)
        cores = self.shares[share]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")  # noqa: SIM115 (closed when the job ends)
        process = subprocess.Popen(
            list(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cores),
        )
        return LocalJob(process, share, log_path, log_file)

    def poll(self, job: LocalJob) -> int | None:
        """The job's exit status once it has ended (its slot is then free again), else None."""
        code = job.process.poll()
        if code is not None and job.share not in self._free:
            self._free.append(job.share)
            if job.log_file is not None:
                job.log_file.close()
        return code


def core_shares(cores: list[int], jobs: int) -> list[list[int]]:
    """``jobs`` disjoint, contiguous shares of ``cores`` as even as possible; with more jobs than cores,
    one core each, in turn."""
    if jobs >= len(cores):
        return [[cores[i % len(cores)]] for i in range(jobs)]
    return [cores[i * len(cores) // jobs : (i + 1) * len(cores) // jobs] for i in range(jobs)]
