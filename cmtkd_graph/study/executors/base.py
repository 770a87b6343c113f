"""What every executor shares: a :class:`Submission` (one run to train), the :class:`Job` it became, and
the job record beside the run directory (``RUN_DIR.job.json``) through which a restarted study finds
its submitted runs again instead of submitting them twice."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cmtkd_graph.errors import UserError
from cmtkd_graph.study.plan import TRAIN_MODULE

RESUME_AUTO = ("--resume", "auto")  # starts, resumes, and continues after a requeue


@dataclass(frozen=True)
class Submission:
    """One run to train: ``train_args`` follow ``python -m cmtkd_graph.train`` (or the launcher) and
    end in ``--resume auto``, so the same command starts, resumes and, after a requeue, continues."""

    name: str  # study/row/seedK: the job's name on the cluster
    run_dir: Path
    train_args: tuple[str, ...]

    @property
    def log_path(self) -> Path:
        return self.run_dir.with_suffix(".log")

    @property
    def record_path(self) -> Path:
        return self.run_dir.with_suffix(".job.json")


@dataclass
class Job:
    """A submitted run: the executor's handle and the record that finds it again after a restart."""

    submission: Submission
    record: dict
    log_path: Path | None
    handle: Any = field(default=None, repr=False)


class Executor(Protocol):
    """Where runs train. ``submit`` starts runs (a batch at once: a Slurm job array), ``poll`` says when
    one has ended and with what exit status, ``find`` recognises a job submitted by an earlier study
    process that has not ended yet."""

    name: str
    poll_interval: float  # seconds between polls of the running jobs

    def check(self) -> None: ...

    def capacity(self) -> int: ...

    def submit(self, submissions: Sequence[Submission]) -> list[Job]: ...

    def poll(self, job: Job) -> int | None: ...

    def find(self, submission: Submission, record: dict) -> Job | None: ...

    def where(self) -> str: ...


def train_command(launcher: Sequence[str], train_args: Sequence[str]) -> list[str]:
    """The training command on the machine that runs it (its own Python)."""
    return [*(launcher or [sys.executable, *TRAIN_MODULE]), *train_args]


def write_record(job: Job) -> None:
    job.submission.record_path.parent.mkdir(parents=True, exist_ok=True)
    job.submission.record_path.write_text(json.dumps(job.record) + "\n")


def read_record(submission: Submission) -> dict | None:
    try:
        return json.loads(submission.record_path.read_text())
    except (OSError, ValueError):
        return None


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional engine, or one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs {module}: pip install 'cmtkd-graph[{extra}]'") from None
