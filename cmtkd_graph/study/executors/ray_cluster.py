"""``--executor ray``: each run a Ray actor with the run's resources (``num_cpus``, ``num_gpus``, custom
resources), on an existing cluster (``address``) or a local one started for the study.

The actor is detached and named after the run (``cmtkd_graph`` namespace): it starts the training
command in its node's Python and outlives the study process, so a restarted study finds a running
run by name instead of starting it twice (a Ray task would die with the process that submitted it).
The actor ends once the study has read its exit status."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.study.executors.base import Job, Submission, require, train_command

if TYPE_CHECKING:
    from cmtkd_graph.study.spec import RaySettings


class TrainingProcess:
    """A Ray actor holding one run's training process (its output appended to the run's log file)."""

    def __init__(self, launcher: Sequence[str], train_args: Sequence[str], cwd: str, log_path: str) -> None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            self.process = subprocess.Popen(
                train_command(launcher, train_args), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )

    def poll(self) -> int | None:
        return self.process.poll()


class RayExecutor:
    """Runs as detached Ray actors, with the study file's ``executor.ray``."""

    name = "ray"
    poll_interval = 1.0

    def __init__(self, settings: RaySettings, launcher: Sequence[str] = ()) -> None:
        self.settings = settings
        self.launcher = list(launcher)
        self._actor_class = None

    def check(self) -> None:
        """Before anything is submitted: ray installed, the cluster reachable, and a node of it with
        the resources of one run."""
        ray = require("ray", "ray", "--executor ray")
        s = self.settings
        if not ray.is_initialized():
            _check_reachable(s.address)
            try:
                ray.init(address=s.address, namespace=s.namespace, log_to_driver=False,
                         configure_logging=False, include_dashboard=False)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise UserError(
                    f"executor.ray.address: cannot reach a Ray cluster at {s.address!r} ({first_line(err)})"
                ) from None
        need = {"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            have = ", ".join(f"{k} {largest.get(k, 0):g}" for k in need)
            asked = ", ".join(f"{k} {v:g}" for k, v in need.items())
            raise UserError(f"executor.ray: a run asks for {asked}; the cluster's largest node has {have}")

    def capacity(self) -> int:
        return 1 << 30  # Ray holds what it cannot place yet

    def where(self) -> str:
        s = self.settings
        extra = "".join(f", {k} {v:g}" for k, v in s.resources.items())
        return (
            f"ray: {s.address or 'a local cluster started for the study'}, per run {s.num_cpus:g} CPU(s), "
            f"{s.num_gpus:g} GPU(s){extra}; output in RUN_DIR.log"
        )

    def _actor(self):
        import ray

        if self._actor_class is None:
            self._actor_class = ray.remote(TrainingProcess)
        return self._actor_class

    def submit(self, submissions: Sequence[Submission]) -> list[Job]:
        s = self.settings
        jobs = []
        for sub in submissions:
            name = actor_name(sub)
            actor = self._actor().options(
                name=name, namespace=s.namespace, lifetime="detached", max_restarts=0,
                num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=dict(s.resources),
            ).remote(self.launcher, sub.train_args, os.getcwd(), str(sub.log_path.resolve()))  # fmt: skip
            jobs.append(
                Job(sub, {"executor": "ray", "actor": name, "namespace": s.namespace}, sub.log_path, actor)
            )
        return jobs

    def find(self, submission: Submission, record: dict) -> Job | None:
        """The run's actor, if an earlier study process started it and it is still there."""
        import ray

        if record.get("executor") != "ray":
            return None
        try:
            actor = ray.get_actor(record["actor"], namespace=record.get("namespace", self.settings.namespace))
        except ValueError:
            return None
        return Job(submission, record, submission.log_path, actor)

    def poll(self, job: Job) -> int | None:
        """The training's exit status once it has ended (the actor is then removed); -1 if the actor
        died (its node was lost)."""
        import ray

        try:
            code = ray.get(job.handle.poll.remote(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            return None  # asked again at the next poll
        except ray.exceptions.RayActorError:
            code = -1
        if code is not None:
            ray.kill(job.handle)
        return code


def _check_reachable(address: str | None) -> None:
    """A host:port (or ray://host:port) that does not answer is one line at once (ray.init would
    retry for minutes)."""
    if address is None or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except (OSError, ValueError) as err:
        raise UserError(
            f"executor.ray.address: cannot reach a Ray cluster at {address!r} ({err}); start one with "
            "`ray start --head` or give the head node's host:port"
        ) from None


def actor_name(submission: Submission) -> str:
    """The run's actor: its study, row, seed and run directory name (the key) make it unique."""
    return f"{submission.name}/{submission.run_dir.name}"
