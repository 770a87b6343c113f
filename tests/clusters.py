"""Real clusters for the executor tests, started once per test session: a one-node Slurm (munged,
slurmctld and slurmd from Debian's slurm-wlm and munge, as root, all files in a temporary directory)
and a two-node Ray cluster on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SLURM_CONF = """\
ClusterName=cmtkdtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's next start (default 120 s)
AuthInfo=socket={dir}/munge.socket,cred_expire=5
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing_requirement(reason: str) -> None:
    """What the machine lacks for a cluster test: a skip with the reason on a user's machine, a failure
    under CI (``CI=true``, set by .ci/run), where every cluster test must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI runs every cluster test; see .ci/run)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")


@contextmanager
def slurm_cluster(folder: Path) -> Iterator[dict]:
    """A one-node Slurm on this machine; yields the environment its commands need (SLURM_CONF)."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None]
    if missing:
        missing_requirement(
            f"{', '.join(missing)} not found: apt-get install -y slurm-wlm munge (see .ci/run)"
        )
    if os.geteuid() != 0:
        missing_requirement("the Slurm test cluster starts slurmd as root (as CI runs the tests)")
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    folder.chmod(0o700)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host, dir=folder, cpus=os.cpu_count(), ctld_port=free_port(), d_port=free_port()
        )
    )
    env = {"SLURM_CONF": str(conf)}
    full_env = {**os.environ, **env}
    subprocess.run(
        ["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
         f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/seed"],
        check=True,
    )  # fmt: skip
    try:
        subprocess.run(["slurmctld", "-i"], env=full_env, check=True)
        subprocess.run(["slurmd", "-N", host], env=full_env, check=True)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=full_env, capture_output=True, text=True)
            return out.stdout.strip() == "idle"

        _wait_for("the Slurm node", node_idle)
        yield env
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _kill(folder / pid_file)


def _kill(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


# a test cluster on 127.0.0.1 without Ray's token authentication (its nodes and the study share none)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@contextmanager
def ray_cluster(folder: Path, cpus_per_node: int = 1) -> Iterator[str]:
    """A head node and a second node on 127.0.0.1 (``ray start``); yields the head's address. ``folder``
    must be short: Ray's sockets live in it."""
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": str(folder)}
    common = ["--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
              "--disable-usage-stats"]  # fmt: skip
    try:
        subprocess.run(
            [*ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
             f"--temp-dir={folder}", "--min-worker-port", "30000", "--max-worker-port", "30999", *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*ray, "start", "--address", address, "--min-worker-port", "31000", "--max-worker-port", "31999",
             *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        yield address
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
