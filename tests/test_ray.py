"""``cmtkd-graph study --executor ray`` on a real two-node Ray cluster (``ray start --head`` and a
second node on 127.0.0.1): independent runs train at once, a dependent one after its upstream run, a
restarted study finds the running actors instead of starting the runs twice, and an unreachable
cluster or a run larger than any node is one line before anything is submitted."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cmtkd_graph.errors import UserError
from cmtkd_graph.study import load_study, plan
from cmtkd_graph.study.executors import make_executor

from .clusters import RAY_ENV, free_port, ray_cluster
from .test_study import SINGLE, kd_row, write_study

pytest.importorskip("ray", reason="the [ray] extra (.ci/run installs it)")

ROWS = [
    {"name": "single", "set": SINGLE, "seeds": 2},
    kd_row("single", "train.max_steps=2"),
]


@pytest.fixture(scope="module")
def ray_address():
    folder = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's sockets live there
    try:
        with ray_cluster(folder, cpus_per_node=1) as address:
            yield address
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _study(tmp_path: Path, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "cmtkd_graph", "study", "study.yaml", "--executor", "ray", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **RAY_ENV}
    if wait:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = open(tmp_path / "driver.log", "a")  # noqa: SIM115 (the process holds it)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_a_study_runs_on_a_ray_cluster_two_runs_at_once(tmp_path, fashion_mnist, ray_address, monkeypatch):
    write_study(tmp_path, ROWS, executor={"ray": {"address": ray_address, "num_cpus": 1}})
    monkeypatch.chdir(tmp_path)  # the study's paths are relative to where it runs
    study = load_study("study.yaml")
    runs = {f"{r.row.name}/{r.seed}": tmp_path / r.run_dir for r in plan(study)}
    driver = _study(tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not all((runs[f"single/{k}"] / "spec.yaml").is_file() for k in (0, 1)):
            assert time.monotonic() < deadline and driver.poll() is None, (
                tmp_path / "driver.log"
            ).read_text()
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # the study's process dies; the runs' actors go on
        driver.wait()
        again = _study(tmp_path)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for seed in (0, 1):
        assert re.search(rf"single seed {seed} still in Ray actor toy/single/seed{seed}/", again.stdout)
    runs = {f"{r.row.name}/{r.seed}": tmp_path / r.run_dir for r in plan(study)}  # kd's key now known
    started = {name: (d / "spec.yaml").stat().st_mtime for name, d in runs.items()}
    ended = {name: (d / "final.json").stat().st_mtime for name, d in runs.items()}
    assert max(started["single/0"], started["single/1"]) < min(ended["single/0"], ended["single/1"])
    assert started["kd/0"] >= ended["single/0"]  # kd reads single's seed 0
    for d in runs.values():  # each run trained once: one start in its log, never a second submission
        assert (d / "train.log").read_text().count(f" run {d}: ") == 1
    summaries = sorted(p.relative_to(tmp_path / "studies/toy/runs").as_posix()
                       for p in (tmp_path / "studies/toy/runs").rglob("*.json"))  # fmt: skip
    assert summaries == ["kd/seed0.json", "single/seed0.json", "single/seed1.json"]


def test_an_unreachable_cluster_or_a_run_larger_than_any_node_is_one_line(tmp_path, ray_address, monkeypatch):
    nowhere = f"127.0.0.1:{free_port()}"
    write_study(tmp_path, ROWS[:1], executor={"ray": {"address": nowhere}})
    result = _study(tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: executor.ray.address: cannot reach a Ray cluster at '{nowhere}'"
    ), result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "runs").exists()
    study = load_study(
        write_study(tmp_path, ROWS[:1], executor={"ray": {"address": ray_address, "num_gpus": 2}})
    )
    import ray

    try:
        with pytest.raises(
            UserError, match=r"executor.ray: a run asks for CPU 1, GPU 2; the cluster's largest node has"
        ):
            make_executor(study, "ray").check()  # connects this test process to the cluster ...
    finally:
        ray.shutdown()  # ... which must leave before the fixture stops the cluster: Ray ends a driver whose
        # cluster goes away (it took the pytest worker with it)
