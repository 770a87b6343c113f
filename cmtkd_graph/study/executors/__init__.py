"""Where a study's runs train (``cmtkd-graph study --executor local|slurm|ray``). An executor submits
runs and says when each has ended; the study (``cmtkd_graph.study.run``) decides which runs are ready,
from their dependencies, and finds runs submitted by an earlier study process through their job
records. ``local``: processes on this machine; ``slurm``: jobs through submitit; ``ray``: actors on a
Ray cluster. The engines are optional extras (``pip install 'cmtkd-graph[slurm]'``, ``[ray]``)."""

from __future__ import annotations

from collections.abc import Sequence

from cmtkd_graph.study.executors.base import RESUME_AUTO, Executor, Job, Submission, read_record, write_record
from cmtkd_graph.study.executors.local import LocalExecutor, core_shares
from cmtkd_graph.study.spec import StudySpec

EXECUTORS = ("local", "slurm", "ray")


def make_executor(
    study: StudySpec, name: str | None = None, *, jobs: int | None = None, launcher: Sequence[str] = ()
) -> Executor:
    """The executor ``name`` (default: the study file's ``executor.name``) with the study file's
    settings; ``jobs`` overrides ``executor.local.jobs``."""
    settings = study.executor
    name = name or settings.name
    if name == "slurm":
        from cmtkd_graph.study.executors.slurm import SlurmExecutor

        folder = study.path(settings.slurm.folder or f"{study.runs_dir}/slurm")
        return SlurmExecutor(settings.slurm, folder.resolve(), launcher)
    if name == "ray":
        from cmtkd_graph.study.executors.ray_cluster import RayExecutor

        return RayExecutor(settings.ray, launcher)
    return LocalExecutor(jobs or settings.local.jobs, launcher)


__all__ = [
    "EXECUTORS", "RESUME_AUTO", "Executor", "Job", "LocalExecutor", "Submission", "core_shares",
    "make_executor", "read_record", "write_record",
]  # fmt: skip
