"""``cmtkd-graph study --executor slurm`` on a real one-node Slurm: runs concurrently where the
dependencies allow, a run signalled like a preemption checkpoints, is requeued and ends with the same
weights as an uninterrupted run, a restarted study finds its submitted jobs, and bad settings are one
line before anything is submitted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cmtkd_graph.errors import UserError
from cmtkd_graph.study import load_study, plan
from cmtkd_graph.study.executors import make_executor
from cmtkd_graph.study.executors.slurm import _gpus

from .clusters import slurm_cluster
from .test_study import COMMON, SINGLE, kd_row, write_study

pytest.importorskip("submitit", reason="the [slurm] extra (.ci/run installs it)")

# teacher and twin are the same run (same settings, so the same key and weights); twin is preempted
ROWS = [
    {"name": "teacher", "set": SINGLE},
    {"name": "twin", "set": SINGLE},
    kd_row("teacher", "train.max_steps=2"),
]
LONGER = [*COMMON, "data.train_subset=320", "data.batch_size=8"]  # 40 steps: time to signal one


@pytest.fixture(scope="module")
def slurm():
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: munge's socket lives there
    try:
        with slurm_cluster(folder) as env:
            yield env
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _study(tmp_path: Path, env: dict, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "cmtkd_graph", "study", "study.yaml", "--executor", "slurm", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if wait:
        return subprocess.run(
            command, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=900
        )
    log = open(tmp_path / "driver.log", "a")  # noqa: SIM115 (the process holds it)
    return subprocess.Popen(command, cwd=tmp_path, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(what: str, check, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _trained_a_step(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"kind": "train"' in metrics.read_text()


def _job_times(log: Path) -> tuple[list[datetime], datetime]:
    """The starts of a job (one per attempt) and its end, from submitit's log lines."""
    stamps = re.findall(r"submitit INFO \((\S+ \S+)\) - (Starting with|Job completed)", log.read_text())
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")
    starts = [parse(t) for t, what in stamps if what == "Starting with"]
    ends = [parse(t) for t, what in stamps if what == "Job completed"]
    assert starts and len(ends) == 1, log.read_text()[-3000:]
    return starts, ends[0]


def test_a_study_runs_on_slurm_and_a_preempted_run_is_requeued_and_continues(
    tmp_path, fashion_mnist, slurm, monkeypatch
):
    slurm_settings = {"time_min": 30, "cpus_per_process": 1, "signal_delay_s": 30}
    write_study(tmp_path, ROWS, set=LONGER, executor={"slurm": slurm_settings})
    driver = _study(tmp_path, slurm, wait=False)
    monkeypatch.chdir(tmp_path)  # the study's paths are relative to where it runs
    try:
        study = load_study("study.yaml")
        teacher, twin = (tmp_path / r.run_dir for r in plan(study, ["teacher", "twin"]))
        record = twin.with_suffix(".job.json")
        _wait_for("the twin's first training step", lambda: record.is_file() and _trained_a_step(twin))
        job_id = json.loads(record.read_text())["job_id"]
        # what Slurm sends before a time limit (--signal) or an administrator's preemption
        subprocess.run(["scancel", "--signal=USR1", job_id], env={**os.environ, **slurm}, check=True)
        driver.send_signal(signal.SIGKILL)  # the study's own process dies too; its jobs go on
        driver.wait()

        # a new study process finds the submitted jobs instead of submitting them again
        dry = _study(tmp_path, slurm, "--dry-run")
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert "executor slurm: default partition, 1 node(s) per run" in dry.stdout
        assert re.search(r"twin +seed 0  \w+, submitted already: Slurm job \d+_\d", dry.stdout), dry.stdout
        again = _study(tmp_path, slurm)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        # it waits for the twin's job (or finds it finished meanwhile, on a fast machine): never a second
        # submission of the teacher or the twin (counted from submitit's files below)
        assert "twin seed 0 submitted" not in again.stdout and "teacher seed 0 submitted" not in again.stdout
        assert (
            re.search(r"twin seed 0 still in Slurm job \d+_\d", again.stdout)
            or (twin / "student.safetensors").is_file()
        ), again.stdout
    finally:
        if driver.poll() is None:
            driver.kill()

    submitted = sorted(p.name for p in (tmp_path / "runs/study-toy/slurm").rglob("*_submitted.pkl"))
    assert len(submitted) == 3, submitted  # teacher and twin in one array, kd later; none twice
    scripts = [p.read_text() for p in (tmp_path / "runs/study-toy/slurm").rglob("*_submission.sh")]
    for script in scripts:  # SIGUSR1 (training's stop signal) 30 s before the time limit
        assert "#SBATCH --signal=USR1@30" in script and "#SBATCH --time=30" in script
        assert "#SBATCH --cpus-per-task=1" in script
    assert sum("#SBATCH --array=0-1%2\n" in script for script in scripts) == 1  # teacher and twin
    twin_log = next((tmp_path / "runs/study-toy/slurm").rglob(f"{job_id}_0_log.out"))
    assert "cmtkd_graph: preempted (training exit status 75); requeued" in twin_log.read_text()
    twin_starts, twin_end = _job_times(twin_log)
    assert len(twin_starts) == 2  # the first attempt and the requeued one
    teacher_job = json.loads(teacher.with_suffix(".job.json").read_text())["job_id"]
    teacher_starts, teacher_end = _job_times(next((tmp_path / "runs").rglob(f"{teacher_job}_0_log.out")))
    assert max(teacher_starts[0], twin_starts[0]) < min(teacher_end, twin_end)  # they ran at once
    kd_job = json.loads((tmp_path / plan(study, ["kd"])[0].run_dir).with_suffix(".job.json").read_text())
    kd_starts, _ = _job_times(next((tmp_path / "runs").rglob(f"{kd_job['job_id']}_0_log.out")))
    assert kd_starts[0] >= teacher_end  # kd reads the teacher's weights

    a, b = load_file(teacher / "student.safetensors"), load_file(twin / "student.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical after requeue
    assert "resumed from" in (twin / "train.log").read_text()
    summaries = sorted(p.parent.name for p in (tmp_path / "studies/toy/runs").rglob("seed0.json"))
    assert summaries == ["kd", "teacher", "twin"]


def test_bad_slurm_settings_are_one_line_before_anything_is_submitted(tmp_path, slurm, monkeypatch):
    cases = [
        ({"partition": "gpu"}, "executor.slurm.partition: no partition 'gpu' (this cluster has: debug)"),
        ({"gpus_per_node": 4}, "executor.slurm.gpus_per_node: 4 GPUs per run and node; the nodes of"),
        ({"cpus_per_process": 512}, "executor.slurm: a run asks for 512 CPUs per node; the nodes of"),
        ({"nodes": 3}, "executor.slurm.nodes: 3 nodes per run; the default partition has 1"),
    ]
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    for settings, message in cases:
        study = load_study(write_study(tmp_path, ROWS[:1], executor={"slurm": settings}))
        with pytest.raises(UserError, match=re.escape(message)):
            make_executor(study, "slurm").check()
    result = _study(tmp_path, slurm)  # the last case, as users see it
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing was submitted
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # Python, no Slurm commands
    with pytest.raises(UserError, match=r"--executor slurm: sbatch is not on the PATH \(run the study on a"):
        make_executor(study, "slurm").check()


def test_gpus_are_read_from_the_nodes_gres():
    assert _gpus("gpu:a100:4(S:0-1),shard:8") == 4 and _gpus("gpu:2") == 2 and _gpus("(null)") == 0


def test_a_machine_without_slurm_skips_the_cluster_tests_and_ci_fails_them(monkeypatch):
    """A user without Slurm, munge or root gets a skip with the reason; CI (CI=true, .ci/run) a failure,
    since there every cluster test must run."""
    from .clusters import missing_requirement

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="sbatch not found"):
        missing_requirement("sbatch not found")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"sbatch not found \(CI runs every cluster test"):
        missing_requirement("sbatch not found")
