"""Joint training with Accelerate: real runs on real images (Debian's Fashion-MNIST), in real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cmtkd_graph as cg
from cmtkd_graph.metrics import read_metrics

from .conftest import cli, launch_two_machines, launch_two_processes, run_cli, run_module

# the quickstart pinned down: resnet18 (ImageNet stem, so 28x28 inputs stay cheap), W2A2 student,
# 4- and 8-bit teachers, taps layer1..3 (layer4 is 1x1 here), constant lr
SMALL = [
    "surgery=[]",
    "taps={teachers: [layer1, layer2, layer3]}",
    "data.train_subset=256",
    "data.eval_subset=128",
    "data.batch_size=32",
    "data.num_workers=0",
    "train.mixed_precision=no",
    "train.channels_last=false",
    "train.progress_bar=false",
    "train.log_every=2",
    "train.eval_every=1",
    "optim.lr=0.01",
    "optim.schedule={name: constant}",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train(tmp_path: Path, *extra: str, run: str = "run", resume: Path | None = None):
    """``cmtkd-graph train quickstart`` with :data:`SMALL` and ``extra``: in this process (pytest's
    imports already paid), or a resumption in a new process, as a restarted job is."""
    args = ["quickstart", *sets(*SMALL, f"train.output_dir={tmp_path / run}", *extra)]
    if resume is not None:
        result = run_module([*args, "--resume", str(resume)], cwd=tmp_path)
    else:
        result = run_cli(tmp_path, "train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / run, result


def train_here(tmp_path: Path, *extra: str, run: str = "run") -> Path:
    """``train`` in this process through the Python API (``cmtkd_graph.train.run``)."""
    from cmtkd_graph.train import run as run_training

    return run_training("quickstart", [*SMALL, f"train.output_dir={tmp_path / run}", *extra])


def test_short_run_learns_and_writes_every_artefact(tmp_path, fashion_mnist, monkeypatch):
    # 48 steps: after 24 the eval accuracy still depends on the seed and on float rounding (8-31 %)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a real local MLflow store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_dir, result = train(
        tmp_path,
        "train.epochs=3",
        "data.train_subset=512",
        "train.tensorboard=true",
        "train.log_with=[mlflow]",
    )
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == 3 * 16 // 2 and len(evals) == 3
    terms = {
        "loss/total",
        "loss/ce_student",
        "loss/ce_teacher",
        "loss/kl_student",
        "loss/kl_teacher",
        "loss/feature",
        "loss/feature/layer1",
        "loss/feature/layer3",
    }
    assert terms <= set(steps[0])
    assert {"lr/student", "lr/teacher0", "lr/teacher1", "lr/importance"} <= set(steps[0])
    assert steps[0]["lr/importance"] == pytest.approx(0.001) and steps[0]["lr/student"] == 0.01
    assert len(steps[0]["importance/layer1"]) == 2 and steps[0]["images_per_s"] > 0
    first = sum(r["loss/total"] for r in steps[:2]) / 2
    last = sum(r["loss/total"] for r in steps[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["accuracy"]["acc1/combined"] > 30  # chance is 10; 36-48 over four seeds
    assert {"acc1/teacher0", "acc5/teacher1", "acc5/student", "acc5/combined"} <= set(final["accuracy"])
    assert (run_dir / "spec.yaml").read_text().startswith("name: quickstart")
    assert (run_dir / "importance.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
    checkpoint = run_dir / "checkpoints" / latest["checkpoint"]
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert latest["step"] == 48
    student = load_file(run_dir / "student.safetensors")
    assert "layer1.0.conv1.weight" in student and "fc.weight" in student  # torchvision names
    assert not any(k.startswith("teachers.") for k in student)
    assert "done: " in result.stderr and "final student" in result.stderr
    _mlflow_holds_what_the_run_logged(store, run_dir, records, final)


def _mlflow_holds_what_the_run_logged(store: str, run_dir: Path, records: list[dict], final: dict) -> None:
    """The MLflow run has the spec as parameters, every scalar of metrics.jsonl at its step, and the
    importance plot and final.json as artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    params = run.data.params
    assert params["optim.lr"] == "0.01" and params["teachers.1.weight_bits"] == "8"
    assert params["student.arch"] == "resnet18" and run.info.run_name == run_dir.name
    steps = [r for r in records if r["kind"] == "train"]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss/total")}
    assert history == {r["step"]: pytest.approx(r["loss/total"]) for r in steps}
    importance = client.get_metric_history(run_id, "importance/layer1/1")
    assert importance[-1].value == pytest.approx(steps[-1]["importance/layer1"][1])
    assert run.data.metrics["acc1/combined"] == pytest.approx(final["accuracy"]["acc1/combined"])
    assert {a.path for a in client.list_artifacts(run_id)} == {"importance.png", "final.json"}


def test_resume_gives_bit_identical_weights(tmp_path, fashion_mnist, fresh_accelerate):
    """12 steps straight (no loader workers) = 6 steps, stop mid-epoch, resume in a new process, 6 more
    (2 workers). Batches of 16 from 128 images: 8 steps per epoch, so the runs cross an epoch boundary.
    With every random recipe option on (an augmentation policy, random erasing, MixUp or CutMix per
    batch, label smoothing): their random numbers, too, depend on the seed and the sample or batch only;
    and with a moving average of the student's weights, which the resumed run continues."""
    small = (
        "train.epochs=2",
        "data.train_subset=128",
        "data.batch_size=16",
        "data.eval_subset=32",
        "data.augment.policy=trivialaugment_wide",
        "data.augment.random_erasing=0.5",
        "data.augment.mixup_alpha=0.2",
        "data.augment.cutmix_alpha=1.0",
        "distill.label_smoothing=0.1",
        "train.ema={decay: 0.8, every: 2}",
    )
    straight = train_here(tmp_path, *small, "train.max_steps=12", run="straight")
    half = train_here(tmp_path, *small, "train.max_steps=6", "data.num_workers=2", run="half")
    train(
        tmp_path,
        *small,
        "train.max_steps=12",
        "data.num_workers=2",
        "train.keep_checkpoints=3",
        run="half",
        resume=half,
    )

    def final_model(run_dir):
        latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
        return load_file(run_dir / "checkpoints" / latest["checkpoint"] / "model.safetensors")

    a, b = final_model(straight), final_model(half)
    assert a.keys() == b.keys() and len(a) == 370  # student + 2 teachers + fusion logits, with buffers
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    average_a, average_b = (load_file(run / "student.safetensors") for run in (straight, half))
    assert [k for k in average_a if not torch.equal(average_a[k], average_b[k])] == []
    assert average_a["layer1.0.conv1.weight"].shape == a["student.layer1.0.conv1.weight"].shape
    assert not torch.equal(average_a["layer1.0.conv1.weight"], a["student.layer1.0.conv1.weight"])
    final = json.loads((half / "final.json").read_text())
    assert final["student_weights"] == "ema" and {"acc1/student", "acc1/student_ema"} <= set(
        final["accuracy"]
    )
    # eval of the last checkpoint: the trained weights and their average, as training measured them
    table = cli(tmp_path, "eval", str(half))
    record = json.loads(next((half / "eval").glob("*.json")).read_text())
    for name in ("student", "student_ema"):
        assert record[f"acc1/{name}"] == pytest.approx(final["accuracy"][f"acc1/{name}"])
    assert "student_ema" in table
    midway = load_file(half / "checkpoints" / "step-00000006" / "model.safetensors")
    assert any(not torch.equal(a[k], midway[k]) for k in a)  # the second half did train
    steps_a = [r["step"] for r in read_metrics(straight / "metrics.jsonl") if r["kind"] == "train"]
    steps_b = [r["step"] for r in read_metrics(half / "metrics.jsonl") if r["kind"] == "train"]
    assert steps_a == steps_b == [2, 4, 6, 8, 10, 12]


def test_resume_with_the_device_pipeline_gives_bit_identical_weights(
    tmp_path, fashion_mnist, fresh_accelerate
):
    """data.pipeline: device (images decoded once, batches augmented as a whole): 8 steps straight =
    4 steps, stop mid-epoch, resume in a new process, 4 more; the student alone, to keep it short."""
    single = ("method=single", "teachers=[]", "distill={}", "data.pipeline=device", "train.epochs=2")
    small = (*single, "data.train_subset=96", "data.batch_size=16", "data.eval_subset=32")
    straight = train_here(tmp_path, *small, "train.max_steps=8", run="straight")
    half = train_here(tmp_path, *small, "train.max_steps=4", run="half")
    train(tmp_path, *small, "train.max_steps=8", run="half", resume=half)

    def final_model(run_dir):
        latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
        return load_file(run_dir / "checkpoints" / latest["checkpoint"] / "model.safetensors")

    a, b = final_model(straight), final_model(half)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [r["step"] for r in read_metrics(half / "metrics.jsonl") if r["kind"] == "train"] == [2, 4, 6, 8]


def test_a_run_on_a_time_budget_stops_and_finishes(tmp_path, fashion_mnist, fresh_accelerate):
    """train.max_minutes: the step under way when the budget runs out is the last; then the run is
    evaluated and saved as after max_steps."""
    run_dir = train_here(
        tmp_path, "method=single", "teachers=[]", "distill={}", "train.epochs=5", "train.max_minutes=0.0001"
    )
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] == 1 and "acc1/student" in final["accuracy"]
    assert (run_dir / "student.safetensors").is_file()


def test_a_run_fitted_to_its_budget_ends_its_schedule(tmp_path, fashion_mnist, fresh_accelerate):
    """train.fit_to_budget: of 1000 requested epochs the run trains the few that fit in 12 seconds, with
    the lr drop moved from epoch 500 to the middle of those, and records the fit."""
    schedule = "optim.schedule={name: multistep, milestones: [500], gamma: 0.1}"
    run_dir = train_here(
        tmp_path, "method=single", "teachers=[]", "distill={}", "train.epochs=1000", schedule,
        "train.max_minutes=0.2", "train.fit_to_budget=true", "train.checkpoints=false",
        "train.eval_every=1000", "train.log_every=1",
    )  # fmt: skip
    fit = json.loads((run_dir / "budget.json").read_text())
    epochs = fit["epochs"]
    assert 1 <= epochs < 1000 and fit["requested_epochs"] == 1000 and fit["steps_per_epoch"] == 8
    assert fit["overrides"][:2] == [f"train.epochs={epochs}", f"optim.schedule.milestones=[{epochs / 2:g}]"]
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["train"]["epochs"] == epochs and saved["optim"]["schedule"]["milestones"] == [epochs / 2]
    final = json.loads((run_dir / "final.json").read_text())
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(steps) == final["steps"] <= 8 * epochs  # max_minutes stops it early only if the fit was wrong
    for record in steps:  # the lr drops at half the fitted length (milestone 500 of 1000)
        dropped = record["step"] >= 8 * epochs / 2  # logged after the step: the lr of the next one
        assert record["lr/student"] == pytest.approx(0.001 if dropped else 0.01), record["step"]
    if final["steps"] < 8 * epochs:
        assert final["seconds"] >= 12


def test_resume_at_an_epoch_boundary_keeps_an_epoch_stepped_schedule(
    tmp_path, fashion_mnist, fresh_accelerate
):
    """The lr drop of a per-epoch schedule is in the checkpoint: 1 epoch + resume = 2 epochs straight."""
    schedule = "optim.schedule={name: multistep, milestones: [1], gamma: 0.1, step_every: epoch}"
    small = ("data.train_subset=64", "data.batch_size=16", "data.eval_subset=16", schedule)  # 4 steps/epoch
    straight = train_here(tmp_path, "train.epochs=2", *small, run="straight")
    first = train_here(tmp_path, "train.epochs=1", *small, run="first")
    train(tmp_path, "train.epochs=2", *small, run="first", resume=first)

    def last_checkpoint(run_dir: Path) -> dict:
        latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
        return load_file(run_dir / "checkpoints" / latest["checkpoint"] / "model.safetensors")

    a, b = last_checkpoint(straight), last_checkpoint(first)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for run_dir in (straight, first):
        lrs = [r["lr/student"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
        assert lrs == [0.01, 0.01, pytest.approx(0.001), pytest.approx(0.001)]  # logged every 2 steps


def test_two_cpu_processes_train_one_model(tmp_path, fashion_mnist):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: one gloo data-parallel job."""
    run_dir = tmp_path / "ddp"
    extra = ["train.epochs=1", "data.train_subset=128", "data.eval_subset=64", f"train.output_dir={run_dir}"]
    extra += ["train.activation_checkpointing=true"]  # recomputed teacher segments under DDP
    extra += ["train.ema={decay: 0.5}"]  # each process's BatchNorm statistics differ; the average's do not
    args = ["cmtkd_graph.train", "quickstart", *sets(*SMALL, *extra)]
    result = launch_two_processes(args, cwd=tmp_path, port=29517)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((run_dir / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # identical parameters and buffers
    assert ranks[0]["average_sha256"] == ranks[1]["average_sha256"]
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["samples"] == 64  # gathered once, no padded duplicates
    train_lines = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4]  # batch 32 = 2 processes x 16: 4 steps/epoch
    assert "MULTI_CPU" in result.stderr
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["data"]["eval_batch_size"] == 16  # the per-process training batch, recorded


def test_sigterm_stops_two_processes_with_a_checkpoint_and_resume_auto_finishes_bit_identically(
    tmp_path, fashion_mnist
):
    """What a scheduler does to a preempted job: SIGTERM to every process of a 2-process `accelerate launch`
    mid-epoch. Both processes stop at the same step and one checkpoint is written there; the same command
    with `--resume auto`, run again, continues and ends with the weights of an uninterrupted run."""
    import os
    import time

    from .conftest import two_process_command

    single = ("method=single", "teachers=[]", "distill={}", "train.epochs=2", "train.log_every=1")
    small = (*SMALL, *single, "data.eval_subset=32")

    def command(run_dir: Path, *extra: str) -> list[str]:
        args = ["cmtkd_graph.train", "quickstart", *sets(*small, f"train.output_dir={run_dir}"), *extra]
        return two_process_command(args, port=29531)

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    straight = subprocess.run(
        command(tmp_path / "straight"), cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(stopped, "--resume", "auto"),
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = stopped / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(read_metrics(metrics)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both workers, as Slurm signals a job step
    _, stderr = proc.communicate(timeout=300)
    assert stderr.count("preempted: SIGTERM: stopped at step") == 1, stderr[-3000:]  # said once, by rank 0
    assert proc.returncode != 0  # the launcher, signalled itself, fails after its workers stopped
    latest = json.loads((stopped / "checkpoints" / "latest").read_text())
    assert 3 <= latest["step"] < 16 and latest["batches_in_epoch"] % 8 != 0  # mid-epoch
    assert not (stopped / "final.json").exists()

    resumed = subprocess.run(
        command(stopped, "--resume", "auto"), cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final_model(run_dir):
        pointer = json.loads((run_dir / "checkpoints" / "latest").read_text())
        return load_file(run_dir / "checkpoints" / pointer["checkpoint"] / "model.safetensors")

    a, b = final_model(tmp_path / "straight"), final_model(stopped)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((stopped / "final.json").read_text())["steps"] == 16


def test_a_signalled_training_process_exits_with_the_preempted_status(tmp_path, fashion_mnist):
    """One process, SIGUSR1 (what `sbatch --signal` sends before a time limit): a checkpoint, one line,
    exit status 75."""
    import os
    import time

    run_dir = tmp_path / "run"
    single = ("method=single", "teachers=[]", "distill={}", "train.epochs=4", "train.log_every=1")
    args = ["quickstart", *sets(*SMALL, *single, f"train.output_dir={run_dir}"), "--resume", "auto"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmtkd_graph.train", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and not (metrics.is_file() and len(read_metrics(metrics)) >= 2)
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    assert "preempted: SIGUSR1: stopped at step" in stderr
    assert json.loads((run_dir / "checkpoints" / "latest").read_text())["step"] >= 2


def test_resume_auto_starts_fresh_where_there_is_nothing_to_continue(
    tmp_path, fashion_mnist, fresh_accelerate
):
    """`--resume auto` on an empty or unstarted run directory trains from scratch, in that directory."""
    from cmtkd_graph.train import run as run_training

    target = tmp_path / "auto"
    target.mkdir()
    (target / "train.log").write_text("a start that died before its first checkpoint\n")
    single = ("method=single", "teachers=[]", "distill={}", "train.max_steps=2", f"train.output_dir={target}")
    run_dir = run_training("quickstart", [*SMALL, *single], resume="auto")
    assert run_dir == target and json.loads((target / "final.json").read_text())["steps"] == 2


def test_two_machines_train_one_model_with_the_precision_auto_chose(
    tmp_path, fashion_mnist, fresh_accelerate
):
    """A multi-node launch (two `accelerate launch --num_machines 2 --machine_rank i` commands, both nodes
    on this machine): one process per node, one gloo group, one model. `mixed_precision: auto` is timed on
    the main process, shared with the other, recorded, and reused by `eval`."""
    from cmtkd_graph.evaluation.run import evaluate_run

    run_dir = tmp_path / "nodes"
    extra = ["data.train_subset=128", "data.eval_subset=64", "train.max_steps=4", "train.cpu_threads=1"]
    extra += ["train.mixed_precision=auto", "train.channels_last=false"]
    args = ["cmtkd_graph.train", "quickstart", *sets(*SMALL, *extra, f"train.output_dir={run_dir}")]
    results = launch_two_machines(args, cwd=tmp_path, port=29533)
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    ranks = [json.loads((run_dir / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in ranks)
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    assert "2 process(es), DistributedType.MULTI_CPU" in results[0].stderr
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [2, 4]
    record = json.loads((run_dir / "precision.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    assert final["precision"] == record and record["mixed_precision"] in ("no", "bf16")
    assert record["source"] in ("probe", "only candidate") and "precision auto: timing" in results[0].stderr
    assert f"precision: mixed precision {record['mixed_precision']}" in (run_dir / "train.log").read_text()
    again = evaluate_run(run_dir)  # one process here: the recorded precision, the same numbers
    assert {k: v for k, v in again.items() if k.startswith("acc")} == final["accuracy"]


def test_a_non_finite_loss_stops_with_a_clear_message(tmp_path, fashion_mnist):
    result = run_cli(
        tmp_path,
        "train",
        "quickstart",
        *sets(*SMALL, "optim.lr=1e30", "train.epochs=2", f"train.output_dir={tmp_path / 'nan'}"),
    )
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "the loss is not finite (ce_student=" in line
    assert "total=nan" in line and "Last good checkpoint: " in line and "Traceback" not in result.stderr


KILLER = """
import os, signal, sys
import accelerate
original = accelerate.Accelerator.save_state
calls = {"n": 0}
def save_state(self, output_dir=None, **kw):
    calls["n"] += 1
    result = original(self, output_dir, **kw)
    if calls["n"] == 2:  # the second checkpoint: its files are written, the directory is not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return result
accelerate.Accelerator.save_state = save_state
from cmtkd_graph.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_killing_the_process_while_it_writes_a_checkpoint_keeps_the_last_one(tmp_path, fashion_mnist):
    run_dir = tmp_path / "killed"
    small = ("train.epochs=3", "data.train_subset=64", "data.batch_size=16", "data.eval_subset=16")  # 4 steps
    args = ["quickstart", *sets(*SMALL, *small, f"train.output_dir={run_dir}")]
    result = subprocess.run(
        [sys.executable, "-c", KILLER, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-00000008", "latest", "step-00000004"]
    assert json.loads((checkpoints / "latest").read_text())["checkpoint"] == "step-00000004"
    # the run resumes from the previous checkpoint and finishes
    _, result = train(tmp_path, *small, run="killed", resume=run_dir)
    assert "resumed from" in result.stderr and "step 4" in result.stderr
    assert json.loads((checkpoints / "latest").read_text())["step"] == 12
    assert not (checkpoints / ".tmp-step-00000008").exists()


def test_resume_errors_are_clear(tmp_path):
    result = run_module(["--resume", str(tmp_path / "nothing")], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: --resume: {tmp_path / 'nothing' / 'spec.yaml'} not found (is "
        f"{tmp_path / 'nothing'} a run directory?)"
    )


def test_train_entry_points_agree(tmp_path):
    arguments = []
    for module, prefix in (("cmtkd_graph.train", []), ("cmtkd_graph", ["train"])):
        result = run_module([*prefix, "--help"], cwd=tmp_path, module=module)
        assert result.returncode == 0 and "--resume" in result.stdout
        arguments.append(result.stdout.split("positional arguments:", 1)[1])
    assert arguments[0] == arguments[1]  # same arguments, same help: one definition serves both
    script = Path(sys.executable).with_name("cmtkd-graph")
    result = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, fashion_mnist):
    """batch 32 = 2 micro-batches of 16: 8 optimizer steps per 256-image epoch, lr stepped per step."""
    run_dir, _ = train(
        tmp_path,
        "train.epochs=1",
        "train.grad_accum_steps=2",
        "train.checkpoints=false",
        "optim.schedule={name: cosine}",
        run="accum",
    )
    lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    lrs = [r["lr/student"] for r in lines]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert not (run_dir / "checkpoints").exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_run_directory(tmp_path):
    """Missing data, twice: no runs/NAME, runs/NAME-1... left behind, one clear line each time."""
    out = tmp_path / "runs" / "quickstart"
    for _ in range(2):
        missing = sets(f"data.root={tmp_path / 'no-data'}", f"train.output_dir={out}")
        result = run_cli(tmp_path, "train", "quickstart", *missing)
        assert result.returncode == 2 and "data.root" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_validate_runs_the_dataset_checks_that_training_runs(tmp_path):
    result = run_cli(
        tmp_path, "validate", "quickstart", "--set", "data.dataset=cifar10", "--set", "data.grey_to_rgb=none"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: data.grey_to_rgb: none is for fashion_mnist only; cifar10 images are RGB"
    )


def test_no_import_cycles_between_the_command_line_training_and_inspection_modules():
    """cli -> train and inspection.output -> inspection.graph only (one direction each), checked by what
    each module imports at its top level and inside its functions."""
    import ast

    root = Path(__file__).resolve().parents[1] / "cmtkd_graph"

    def imports(module: str) -> set[str]:
        tree = ast.parse((root / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "cmtkd_graph.cli" not in imports("train")
    assert "cmtkd_graph.inspection.output" not in imports("inspection/graph")
    assert "cmtkd_graph.train" in imports("cli")
    assert "cmtkd_graph.inspection.graph" in imports("inspection/output")


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_the_training_step_reads_nothing_back_from_the_device(
    tmp_path, fashion_mnist, fresh_accelerate, monkeypatch
):
    """Between metrics lines a step makes no host read of a tensor (each would wait for a GPU's queued
    work): the finite check and the stop check read host values or wait for the next metrics line. The
    reads are counted from the project's own code (the data pipeline's host-side work aside)."""
    from cmtkd_graph.train import run

    reads: list[str] = []
    package = str(Path(cg.__file__).parent)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package) and "/data/" not in caller:
                reads.append(f"{name} {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return read

    def steps(n: int) -> list[str]:
        reads.clear()
        with monkeypatch.context() as patch:
            for name in SYNCS:
                patch.setattr(torch.Tensor, name, counting(name))
            run(
                "quickstart",
                [
                    *SMALL,
                    "train.log_every=100",
                    f"train.max_steps={n}",
                    "train.checkpoints=false",
                    f"train.output_dir={tmp_path / str(n)}",
                ],
            )
        return list(reads)

    few, more = steps(2), steps(5)
    from collections import Counter

    assert len(more) == len(few), Counter(more) - Counter(few)  # the reads that grow with the steps
