"""A run directory's life (``cmtkd_graph.run_directory``): nothing that existed is removed, one writer at
a time (two real processes), damaged checkpoints are one line and leave the run as it was.

The probes of issue #46 come first as reproductions: each failed before (a deleted directory, mixed
results, a raw traceback) and must now end as described.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import PartialState

from cmtkd_graph import cli
from cmtkd_graph.errors import UserError
from cmtkd_graph.run_directory import LOCK_FILE, RunDirectoryBusy, RunLock, take, take_auto, take_new

from .conftest import run_cli, run_module


def main_lines(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``cmtkd-graph ARGV`` in this process: its exit status and its ``error:`` lines."""
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return status, [line for line in err.splitlines() if line.startswith("error: ")]


def tiny(output_dir: Path, *extra: str) -> list[str]:
    """Arguments of a quickstart run on 64 images writing ``output_dir``."""
    settings = [
        f"train.output_dir={output_dir}",
        "data.train_subset=64",
        "data.eval_subset=16",
        "data.batch_size=32",
        "train.mixed_precision=no",
        "train.channels_last=false",
        "train.progress_bar=false",
        *extra,
    ]
    return ["quickstart"] + [a for s in settings for a in ("--set", s)]


# --- the probes ----------------------------------------------------------------------------------------


def test_resume_auto_never_deletes_a_directory_it_did_not_create(
    tmp_path, capsys, fresh_accelerate, fashion_mnist
):
    """Issue #46, 1: `--resume auto` into a directory holding a user's file, then a failure before the
    first step: the directory and the file survive."""
    v = tmp_path / "v"
    v.mkdir()
    (v / "keep.txt").write_text("x")
    status, errors = main_lines(
        ["train", *tiny(v), "--resume", "auto", "--set", "student.weights=/nope.pt"], capsys
    )
    assert status == 2 and len(errors) == 1 and "holds files but no run (keep.txt)" in errors[0]
    assert (v / "keep.txt").read_text() == "x" and sorted(p.name for p in v.iterdir()) == ["keep.txt"]

    # a directory holding an earlier start that never reached a checkpoint is started again; when the
    # new start fails too, what was there before stays (the user's file and the earlier spec)
    (v / "spec.yaml").write_text("name: earlier\n")
    status, errors = main_lines(
        ["train", *tiny(v), "--resume", "auto", "--set", "student.weights=/nope.pt"], capsys
    )
    assert status == 2 and len(errors) == 1 and "/nope.pt" in errors[0]
    assert sorted(p.name for p in v.iterdir()) == ["keep.txt", "spec.yaml"]


def test_a_failed_fresh_start_removes_only_what_it_made(tmp_path, capsys, fresh_accelerate, fashion_mnist):
    bad_weights = ["--set", "student.weights=/nope.pt"]
    status, errors = main_lines(["train", *tiny(tmp_path / "new"), *bad_weights], capsys)
    assert status == 2 and len(errors) == 1
    assert not (tmp_path / "new").exists()  # created by the run, holding only what it wrote: gone

    empty = tmp_path / "empty"
    empty.mkdir()
    status, _ = main_lines(["train", *tiny(empty), *bad_weights], capsys)
    assert status == 2 and empty.is_dir() and not any(empty.iterdir())  # there before: kept, emptied


@pytest.mark.parametrize(
    "name, problem",
    [("..", "must name one directory"), (".", "must name one directory"), ("../../escaped", "no '/'")],
)
def test_a_name_cannot_leave_its_directory(tmp_path, capsys, name, problem):
    """Issue #46, 5: `--set name=../../escaped` wrote the run outside the working directory."""
    status, errors = main_lines(["validate", "quickstart", "--no-build", "--set", f"name={name}"], capsys)
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: name: ") and problem in errors[0]


def test_a_seed_out_of_range_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    """Issue #46, 6 and 7: `train.seed` outside 0..2^32-1 was a traceback after the run directory was made."""
    for seed in (-1, 2**32):
        status, errors = main_lines(["train", *tiny(tmp_path / "run", f"train.seed={seed}")], capsys)
        assert status == 2 and len(errors) == 1 and "train.seed" in errors[0]
    assert not (tmp_path / "run").exists()


# --- the lock and the choice of a new directory --------------------------------------------------------


def test_new_runs_take_the_first_free_name_and_skip_one_in_use(tmp_path):
    base = tmp_path / "runs" / "x"
    first = take_new(base)
    assert first.path == base and first.created and (base / LOCK_FILE).is_file()
    second = take_new(base)  # x is locked (a run starting there), though still empty
    assert second.path == tmp_path / "runs" / "x-1"
    first.release()
    second.release()
    (base / "spec.yaml").write_text("a finished run's\n")
    third = take_new(base)  # x holds a run, x-1 is empty and free again: taken, not made
    assert third.path == tmp_path / "runs" / "x-1" and not third.created
    third.release()


def test_a_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from cmtkd_graph.run_directory import RunLock; "
            f"RunLock.acquire(Path({str(tmp_path)!r})); print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=f"in use by pid {holder.pid} on "):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays with its holder's name
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="cmtkd_graph"):
        lock = RunLock.acquire(tmp_path)
    assert f"took over the lock of pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_resume_auto_refuses_a_finished_run_and_continues_a_checkpointed_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "final.json").write_text("{}")
    with pytest.raises(UserError, match="holds a finished run without checkpoints"):
        take_auto(run)
    assert not (run / LOCK_FILE).exists()  # the refusal released the lock
    (run / "checkpoints" / "latest").write_text('{"checkpoint": "step-00000001"}')
    taken = take_auto(run)
    assert taken.resumed and not taken.created
    taken.remove_failed_start()  # a resumed run removes nothing
    assert (run / "final.json").is_file() and (run / "checkpoints" / "latest").is_file()


def test_take_resolves_the_path_it_reports(tmp_path, monkeypatch, fresh_accelerate):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    taken = take(PartialState(cpu=True), Path("a/../b"), "new")
    assert taken.path == tmp_path / "b"
    taken.remove_failed_start()
    assert not (tmp_path / "b").exists()


# --- two real processes on one run directory -----------------------------------------------------------


def test_two_processes_on_one_run_directory_one_trains_the_other_is_told_who(tmp_path, fashion_mnist):
    """Issue #46, 2: two `--resume auto` runs of one directory mixed their files. Now the second is
    refused in one line naming the first, which is then stopped (SIGTERM, a checkpoint) and continued
    by the second: one run, resumed once."""
    run = tmp_path / "run"
    long = ["train.epochs=200", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000"]
    args = [*tiny(run, *long), "--resume", "auto"]
    first = subprocess.Popen(
        [sys.executable, "-m", "cmtkd_graph.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.5)
        second = run_module(args, cwd=tmp_path)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
        assert f"{run} is in use by pid {first.pid} on " in errors[0]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 75, err[-3000:]  # preempted, with a checkpoint
    assert not (run / LOCK_FILE).exists()
    steps = json.loads((run / "checkpoints" / "latest").read_text())["step"]

    resumed = run_module([*args, "--set", f"train.max_steps={steps + 1}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "train.log").read_text().count("resumed from") == 1
    assert json.loads((run / "final.json").read_text())["steps"] == steps + 1


# --- damaged checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, fashion_mnist) -> Path:
    """A finished tiny run with its checkpoint (one step), to damage copies of."""
    tmp = tmp_path_factory.mktemp("checkpointed")
    result = run_cli(tmp, "train", *tiny(tmp / "run", "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json", "latest"])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_changes_nothing(
    checkpointed_run, tmp_path, capsys, fresh_accelerate, damaged
):
    """Issue #46, 6: a cut model.safetensors or trainer_state.json was a raw traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    checkpoint = run / "checkpoints" / "step-00000001"
    _cut(run / "checkpoints" / "latest" if damaged == "latest" else checkpoint / damaged)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    status, errors = main_lines(["train", "--resume", str(run), "--set", "train.max_steps=2"], capsys)
    assert status == 2 and len(errors) == 1 and damaged in errors[0] and "damaged" in errors[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing half-made


def test_resume_with_unreadable_random_states_says_it_is_not_bit_identical(
    checkpointed_run, tmp_path, capsys, fresh_accelerate
):
    """Issue #46, 7: accelerate skipped a cut random_states_0.pkl silently."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    _cut(run / "checkpoints" / "step-00000001" / "random_states_0.pkl")
    status = cli.main(["train", "--resume", str(run), "--set", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert status == 0, err[-3000:]
    warning = [line for line in err.splitlines() if "random_states_0.pkl cannot be read" in line]
    assert len(warning) == 1 and "not bit-identical" in warning[0]
