"""The executors' and trackers' pure parts, without a cluster: the command each node of a Slurm job
runs, the job records that find a local run again, the line that names a missing engine, and the
scalars and parameters trackers receive."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmtkd_graph.errors import UserError
from cmtkd_graph.spec.io import load_spec
from cmtkd_graph.study.executors import LocalExecutor, Submission
from cmtkd_graph.study.executors.base import require
from cmtkd_graph.study.executors.slurm import SlurmTraining
from cmtkd_graph.trackers import check_installed, parameters, scalars


def test_each_node_of_a_multi_node_slurm_job_launches_its_share_of_the_processes():
    training = SlurmTraining(["quickstart", "--resume", "auto"], "/work", processes_per_node=4)
    command = training.command(1, ["gpu-a", "gpu-b"], "1234_5")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    options = dict(zip(command[4:14:2], command[5:14:2], strict=True))
    assert "--multi_gpu" in command and options["--num_machines"] == "2" and options["--machine_rank"] == "1"
    assert options["--main_process_ip"] == "gpu-a" and options["--num_processes"] == "8"
    assert command[-5:] == ["-m", "cmtkd_graph.train", "quickstart", "--resume", "auto"]
    port = options["--main_process_port"]
    assert port == training.command(0, ["gpu-a", "gpu-b"], "1234_5")[11]  # every node agrees
    single = SlurmTraining(["quickstart"], "/work", processes_per_node=1).command(0, ["gpu-a"], "7")
    assert single == [sys.executable, "-m", "cmtkd_graph.train", "quickstart"]


def test_a_local_run_of_an_earlier_study_process_is_found_and_holds_a_slot_while_it_lives(tmp_path):
    run_dir = tmp_path / "runs" / "seed0-abcd1234"
    submission = Submission("toy/single/seed0", run_dir, ())
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(run_dir)])
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes():  # until its exec is complete
        time.sleep(0.05)
    executor = LocalExecutor(1)
    record = {"executor": "local", "host": __import__("socket").gethostname(), "pid": process.pid}
    try:
        job = executor.find(submission, record)
        assert job is not None and executor.poll(job) is None
        assert executor.capacity() == 0  # with --jobs 1 nothing else starts while it trains
        assert executor.find(Submission("toy/single/seed1", tmp_path / "other", ()), record) is None
    finally:
        process.kill()
        process.wait()
    assert executor.find(submission, record) is None
    assert executor.poll(job) == 1  # it ended without its final results
    assert executor.capacity() == 1  # and its slot is free again


def test_a_missing_engine_or_tracker_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(
        UserError, match=r"^--executor slurm needs submitit: pip install 'cmtkd-graph\[slurm\]'$"
    ):
        require("submitit", "slurm", "--executor slurm")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        UserError, match=r"train.log_with: mlflow needs the mlflow package: pip install 'cmtkd"
    ):
        check_installed(["mlflow"])


def test_trackers_get_every_scalar_of_a_metrics_record_and_the_spec_as_parameters():
    record = {"kind": "train", "step": 7, "epoch": 1, "loss/total": 0.5, "importance/layer1": [0.25, 0.75]}
    assert scalars(record) == {"epoch": 1.0, "loss/total": 0.5, "importance/layer1/0": 0.25,
                               "importance/layer1/1": 0.75}  # fmt: skip
    params = parameters(load_spec("quickstart"))
    assert params["teachers.0.weight_bits"] == 4 and params["optim.lr"] == load_spec("quickstart").optim.lr
    assert not any("[" in key for key in params)  # MLflow refuses brackets in names
