"""``--executor slurm``: each run a Slurm job submitted through submitit; the runs that become ready
together go as one job array.

Inside the job, :class:`SlurmTraining` starts the training command (one ``accelerate launch`` per node
when a run has several processes or nodes) and waits for it. Before a time limit (``--signal``) or
when the job is signalled (``scancel --signal=USR1``) the training processes checkpoint at their next
step and exit with status 75; submitit then calls :meth:`SlurmTraining.checkpoint`, which waits for
that checkpoint, and requeues the job, whose next start continues it (``--resume auto``). A job that
Slurm preempts with SIGTERM checkpoints the same way; Slurm's own requeue then continues it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmtkd_graph.errors import UserError
from cmtkd_graph.study.executors.base import Job, Submission, require, train_command

if TYPE_CHECKING:
    from cmtkd_graph.study.spec import SlurmSettings

# the signal submitit asks Slurm to send before the time limit, and on which it checkpoints and requeues
PREEMPT_SIGNAL = "USR1"
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
    "PREEMPTED",
    "RESV_DEL_HOLD",
}


class SlurmTraining:
    """The callable a Slurm job runs (pickled by submitit): the training command, on every node."""

    def __init__(
        self, train_args: Sequence[str], cwd: str, processes_per_node: int, launcher: Sequence[str] = ()
    ) -> None:
        self.train_args = list(train_args)
        self.cwd = cwd
        self.processes_per_node = processes_per_node
        self.launcher = list(launcher)
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}

    def command(self, node: int, hostnames: Sequence[str], job_id: str) -> list[str]:
        """One process per node: the plain training command; several: ``accelerate launch`` per node,
        the first node's host the rendezvous."""
        nodes = len(hostnames)
        if nodes * self.processes_per_node == 1 or self.launcher:
            return train_command(self.launcher, self.train_args)
        port = 20000 + int("".join(c for c in job_id if c.isdigit()) or 0) % 20000
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_machines", str(nodes), "--machine_rank", str(node),
            "--main_process_ip", hostnames[0], "--main_process_port", str(port),
            "--num_processes", str(nodes * self.processes_per_node),
            "-m", "cmtkd_graph.train", *self.train_args,
        ]  # fmt: skip

    def __call__(self) -> int:
        """Train; the training command's exit status (0: the run finished)."""
        import submitit

        env = submitit.JobEnvironment()
        command = self.command(env.node, env.hostnames, env.job_id)
        print(f"cmtkd_graph: job {env.job_id} node {env.node}: {' '.join(command)}", flush=True)
        self._process = subprocess.Popen(command, cwd=self.cwd)
        while (code := self._process.poll()) is None:
            time.sleep(0.5)  # not wait(): the signal handler may run meanwhile and poll too
        return code

    def checkpoint(self) -> object:
        """submitit's preemption hook: the training process received the signal too (it checkpoints at
        its next step and exits 75); make sure it did, wait for it, then requeue the same command."""
        from submitit.helpers import DelayedSubmission

        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGUSR1)
            while process.poll() is None:
                time.sleep(0.5)
        code = None if process is None else process.returncode
        print(f"cmtkd_graph: preempted (training exit status {code}); requeued", flush=True)
        return DelayedSubmission(
            SlurmTraining(self.train_args, self.cwd, self.processes_per_node, self.launcher)
        )


class SlurmExecutor:
    """Runs as Slurm jobs (job arrays) through submitit, with the study file's ``executor.slurm``."""

    name = "slurm"
    poll_interval = 2.0

    def __init__(self, settings: SlurmSettings, folder: Path, launcher: Sequence[str] = ()) -> None:
        self.settings = settings
        self.folder = folder
        self.launcher = list(launcher)
        self._states: tuple[float, dict[str, str]] = (0.0, {})

    @property
    def processes_per_node(self) -> int:
        s = self.settings
        return s.processes_per_node or max(s.gpus_per_node, 1)

    def check(self) -> None:
        """Before anything is submitted: submitit installed, Slurm's commands on the PATH, the
        partition known, and a node of it large enough for one run."""
        require("submitit", "slurm", "--executor slurm")
        for tool in ("sbatch", "squeue", "sinfo", "scontrol"):
            if shutil.which(tool) is None:
                raise UserError(
                    f"--executor slurm: {tool} is not on the PATH (run the study on a Slurm login node)"
                )
        nodes = _sinfo(["-h", "-o", "%P|%c|%G|%D"])
        partitions = {line.split("|")[0].rstrip("*"): line for line in nodes}
        s = self.settings
        if s.partition is not None and s.partition not in partitions:
            known = ", ".join(sorted(partitions)) or "none"
            raise UserError(
                f"executor.slurm.partition: no partition {s.partition!r} (this cluster has: {known})"
            )
        chosen = [
            line for line in nodes if s.partition is None or line.split("|")[0].rstrip("*") == s.partition
        ]
        if s.partition is None:
            chosen = [line for line in nodes if line.split("|")[0].endswith("*")] or chosen
        cpus = max((int(line.split("|")[1].rstrip("+")) for line in chosen), default=0)
        gpus = max((_gpus(line.split("|")[2]) for line in chosen), default=0)
        count = sum(int(line.split("|")[3]) for line in chosen)
        where = f"partition {s.partition}" if s.partition else "the default partition"
        if s.gpus_per_node > gpus:
            raise UserError(
                f"executor.slurm.gpus_per_node: {s.gpus_per_node} GPUs per run and node; the nodes of "
                f"{where} have {gpus}"
            )
        need_cpus = s.cpus_per_process * self.processes_per_node
        if need_cpus > cpus:
            raise UserError(
                f"executor.slurm: a run asks for {need_cpus} CPUs per node; the nodes of {where} have {cpus}"
            )
        if s.nodes > count:
            raise UserError(f"executor.slurm.nodes: {s.nodes} nodes per run; {where} has {count}")

    def capacity(self) -> int:
        return 1 << 30  # Slurm queues what it cannot run yet

    def where(self) -> str:
        s = self.settings
        gpus = f" x {s.gpus_per_node} GPU(s)" if s.gpus_per_node else ""
        return (
            f"slurm: {s.partition or 'default partition'}, {s.nodes} node(s){gpus} per run, "
            f"{self.processes_per_node} process(es) per node with {s.cpus_per_process} CPU(s) each, "
            f"{s.time_min} min per job (requeued on preemption); logs in {self.folder}"
        )

    def _executor(self):
        import submitit
        from submitit.slurm.slurm import SlurmJobEnvironment

        s = self.settings
        # submitit reads its preemption signal when imported: here (already done) and in the job (from
        # the environment sbatch passes on); training checkpoints on SIGUSR1, not on submitit's USR2
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL
        SlurmJobEnvironment.USR_SIG = PREEMPT_SIGNAL
        executor = submitit.SlurmExecutor(folder=str(self.folder / "%j"), max_num_timeout=s.max_requeues)
        extra = {}
        for line in s.sbatch:
            key, _, value = line.removeprefix("--").partition("=")
            extra[key] = value if value else True
        executor.update_parameters(
            time=s.time_min,
            nodes=s.nodes,
            ntasks_per_node=1,  # one task per node; it starts that node's processes
            cpus_per_task=s.cpus_per_process * self.processes_per_node,
            signal_delay_s=s.signal_delay_s,
            array_parallelism=s.array_parallelism,
            setup=list(s.setup),
            stderr_to_stdout=True,
            **{k: v for k, v in {
                "partition": s.partition, "account": s.account, "qos": s.qos,
                "gpus_per_node": s.gpus_per_node or None, "mem": f"{s.mem_gb}G" if s.mem_gb else None,
            }.items() if v is not None},
            **({"additional_parameters": extra} if extra else {}),
        )  # fmt: skip
        return executor

    def submit(self, submissions: Sequence[Submission]) -> list[Job]:
        """One job array for the runs that became ready together."""
        if not submissions:
            return []
        executor = self._executor()
        executor.update_parameters(
            job_name=submissions[0].name
            if len(submissions) == 1
            else f"{submissions[0].name.split('/')[0]}[{len(submissions)}]"
        )
        cwd = os.getcwd()
        submitted = []
        with executor.batch():
            for s in submissions:
                training = SlurmTraining(s.train_args, cwd, self.processes_per_node, self.launcher)
                submitted.append(executor.submit(training))
        return [
            Job(s, {"executor": "slurm", "job_id": j.job_id, "folder": str(j.paths.folder)},
                Path(j.paths.stdout), j)
            for s, j in zip(submissions, submitted, strict=True)
        ]  # fmt: skip

    def find(self, submission: Submission, record: dict) -> Job | None:
        """A job submitted by an earlier study process that Slurm still runs or holds in its queue."""
        if record.get("executor") != "slurm" or "job_id" not in record:
            return None
        if self._state(record["job_id"], fresh=True) not in ACTIVE:
            return None
        import submitit

        job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])
        return Job(submission, record, Path(job.paths.stdout), job)

    def poll(self, job: Job) -> int | None:
        """The training's exit status from the job's result once the job has left the queue; a job that
        ended without one (cancelled, killed, node failure) has status -1."""
        if self._state(job.record["job_id"]) in ACTIVE:
            return None
        result = job.handle.paths.result_pickle
        if not result.is_file():
            if self._state(job.record["job_id"], fresh=True) in ACTIVE:  # e.g. requeued meanwhile
                return None
            return -1
        outcome, value = _load_result(result)
        return value if outcome == "success" and isinstance(value, int) else 1

    def _state(self, job_id: str, *, fresh: bool = False) -> str | None:
        """A job's state from squeue (one call per poll interval for all jobs); None once it has left."""
        when, states = self._states
        if fresh or time.monotonic() - when > self.poll_interval / 2:
            lines = subprocess.run(
                ["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=60
            ).stdout.splitlines()
            states = dict(line.split(maxsplit=1) for line in lines if " " in line)
            self._states = (time.monotonic(), states)
        return states.get(job_id)


def _sinfo(args: list[str]) -> list[str]:
    done = subprocess.run(["sinfo", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise UserError(
            f"--executor slurm: sinfo failed ({done.stderr.strip() or done.returncode}); is Slurm up?"
        )
    return [line for line in done.stdout.splitlines() if line.strip()]


def _gpus(gres: str) -> int:
    """GPUs in a node's GRES string, e.g. ``gpu:a100:4(S:0-1),shard:8`` -> 4."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _load_result(path: Path) -> tuple[str, object]:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)
