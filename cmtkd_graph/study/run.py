"""Running a study: every run not yet done trains in its own process through the normal training
command, as soon as the rows it reads have their results and an executor slot is free; a finished run
leaves its summary, and the report is rewritten after each."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from cmtkd_graph.checkpoint import RESUMED
from cmtkd_graph.identity import code_identity, file_sha256, read_identity
from cmtkd_graph.metrics import read_metrics
from cmtkd_graph.runtime.budget import recorded_fit
from cmtkd_graph.runtime.precision import machine_line
from cmtkd_graph.runtime.process import TRAIN_LOG
from cmtkd_graph.runtime.throughput import bf16_peak_tflops, train_flops_per_image
from cmtkd_graph.study.executors import (
    RESUME_AUTO,
    Executor,
    Job,
    Submission,
    make_executor,
    read_record,
    write_record,
)
from cmtkd_graph.study.plan import (
    STALE,
    PlannedRun,
    check_rows,
    persist_carried_over,
    plan,
)
from cmtkd_graph.study.report import write_report
from cmtkd_graph.study.spec import StudySpec

STUDY_TIME = "study-time.json"  # in a run directory trained before runs timed themselves: the wall time
# of the training commands a study process saw end, summed
OUTPUT = "student.safetensors"  # the file other rows read ({row:NAME}/student.safetensors), hashed


def run_study(
    study: StudySpec,
    *,
    rows: Sequence[str] = (),
    redo: Sequence[str] = (),
    launcher: Sequence[str] = (),
    keep_going: bool = False,
    jobs: int | None = None,
    executor: str | None = None,
    log=print,
) -> int:
    """Train every run not yet done where ``executor`` says (default: the study file's), writing the
    report after each; the number of runs that failed or could not start.

    A run starts once the rows it reads (``{row:NAME}``) have a current result; runs that do not depend
    on each other train concurrently (locally ``jobs`` at a time). Runs that an earlier study process
    submitted and that still train are found again, not submitted twice. ``redo``: rows to train
    again, or ``stale``: every run whose spec, inputs or version changed since it was summarised
    (upstream rows first, so their dependents then read the new weights). After a failure the runs
    already started finish; without ``keep_going`` no new one starts."""
    check_rows(study)
    engine = make_executor(study, executor, jobs=jobs, launcher=launcher)
    engine.check()  # bad settings, an unreachable cluster: one line before anything is submitted
    persist_carried_over(plan(study))
    redo_rows = [name for name in redo if name != STALE]
    plan(study, redo_rows, "--redo")  # checks the names
    queue = plan(study, rows)
    stale = {(r.row.name, r.seed) for r in queue if r.status() == "stale"} if STALE in redo else set()
    for run in queue:
        if (run.row.name in redo_rows and run.status() != "new") or (run.row.name, run.seed) in stale:
            _discard(run)
    queue = plan(study, rows)  # statuses afresh after the discards
    running: list[tuple[PlannedRun, Job]] = []
    for run, job in submitted_earlier(engine, queue):
        log(f"study {study.name}: {run.row.name} seed {run.seed} still in {job_place(job)}: {run.run_dir}")
        running.append((run, job))
        queue = [r for r in queue if r is not run]
    failed, stopping, changed = 0, False, True
    while (queue and not stopping) or running:
        ready: list[PlannedRun] = []
        for run in list(queue) if changed else []:  # statuses change only when a run ends
            if stopping or len(ready) >= engine.capacity():
                break
            run = PlannedRun(study, run.row, run.seed)  # its identity may have changed with an upstream run
            status = run.status()
            if status == "waits":
                pending = {r.row.name for r in [*queue, *ready]} | {r.row.name for r, _ in running}
                if pending & set(run.waiting_for()):
                    continue  # its upstream run is still to come
                why = ", ".join(f"row {name} is {st}" for name, st in run.waiting_for().items())
                log(f"study {study.name}: {run.row.name} seed {run.seed} not trained: {why}")
                failed += 1
            elif status == "finished":
                _finish(study, run)
            elif status not in ("done", "stale"):
                log(f"study {study.name}: {run.row.name} seed {run.seed} ({status}): {run.run_dir}")
                if status == "new":
                    shutil.rmtree(run.run_dir, ignore_errors=True)  # a start that never reached a checkpoint
                ready.append(run)
            queue = [r for r in queue if (r.row.name, r.seed) != (run.row.name, run.seed)]
        for run, job in zip(ready, engine.submit([submission(run) for run in ready]), strict=True):
            write_record(job)
            if engine.name != "local":
                log(f"study {study.name}: {run.row.name} seed {run.seed} submitted ({job_place(job)})")
            running.append((run, job))
        ended = [(run, job, code) for run, job in running if (code := engine.poll(job)) is not None]
        changed = bool(ended) or not running
        for run, job, code in ended:
            running = [entry for entry in running if entry[1] is not job]
            if code == 0:
                _finish(study, run)
                continue
            failed += 1
            output = f"; its output: {job.log_path}" if job.log_path else ""
            log(f"study {study.name}: {run.row.name} seed {run.seed} failed (exit status {code}){output}")
            stopping = stopping or not keep_going
        if running and not ended:
            time.sleep(engine.poll_interval)
    write_report(study)
    return failed


def submission(run: PlannedRun, *, resolve: bool = True) -> Submission:
    """What an executor needs of a run: the same command starts, resumes and continues it after a
    requeue (``--resume auto``). ``resolve=False``: ``{row:NAME}`` left unresolved (finding a submitted
    job needs its name and directory only, not the files of the rows it reads)."""
    args = (*run.train_args(resolve=resolve), *RESUME_AUTO)
    return Submission(f"{run.study.name}/{run.row.name}/seed{run.seed}", run.run_dir, args)


def submitted_earlier(engine: Executor, runs: Sequence[PlannedRun]) -> list[tuple[PlannedRun, Job]]:
    """Runs not yet finished whose job, submitted by an earlier study process, still trains or waits."""
    found = []
    for run in runs:
        if run.key is None or run.status() not in ("new", "resume"):
            continue
        sub = submission(run, resolve=False)
        record = read_record(sub)
        if record and record.get("executor") == engine.name and (job := engine.find(sub, record)):
            found.append((run, job))
    return found


def job_place(job: Job) -> str:
    """Where a submitted run trains, in words."""
    record = job.record
    if record.get("executor") == "slurm":
        return f"Slurm job {record['job_id']}"
    if record.get("executor") == "ray":
        return f"Ray actor {record['actor']}"
    return f"process {record.get('pid')}"


def _finish(study: StudySpec, run: PlannedRun) -> None:
    write_summary(run)
    write_report(study)


def _discard(run: PlannedRun) -> None:
    """--redo: forget a run's summary and its run directory."""
    run.discard_summary()
    if run.key is not None:
        shutil.rmtree(run.run_dir, ignore_errors=True)


def training_seconds(run_dir: Path, final: dict) -> float | None:
    """What a finished run cost: the trainer's own time (``seconds`` in final.json: every process of
    the run, without the waits between them or in a queue; None when one process resumed a checkpoint
    written before runs recorded it). A run trained before that has the time its study processes saw
    its training commands take, if they saw every one of them (one per start or resumption in its log)."""
    if "seconds" in final:
        return final["seconds"]
    timing, log_file = run_dir / STUDY_TIME, run_dir / TRAIN_LOG
    if not timing.is_file():
        return None
    record = json.loads(timing.read_text())
    processes = 1 + (log_file.read_text().count(RESUMED) if log_file.is_file() else 0)
    return record["wall_s"] if record["attempts"] >= processes else None


def fitted_length(run_dir: Path, steps: int) -> dict | None:
    """A run fitted to its time budget (train.fit_to_budget): its fit and the epochs it trained (fewer
    than fitted where max_minutes stopped it); None for a run of fixed length."""
    fit = recorded_fit(run_dir)
    if fit is None:
        return None
    return {**asdict(fit), "epochs_trained": round(steps / fit.steps_per_epoch, 2)}


def write_summary(run: PlannedRun) -> dict:
    """The committed record of a finished run (and a copy of its importance plot, if any)."""
    final = json.loads((run.run_dir / "final.json").read_text())
    records = read_metrics(run.run_dir / "metrics.jsonl")
    speeds = sorted(r["images_per_s"] for r in records if r.get("kind") == "train")
    plot = None
    if (run.run_dir / "importance.png").is_file():
        plot = run.summary_path.with_name(f"seed{run.seed}-importance.png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.run_dir / "importance.png", plot)
    summary = {
        "row": run.row.name,
        "seed": run.seed,
        "key": run.key,
        "identity": run.identity,
        "code": _code(run),
        "outputs": {OUTPUT: file_sha256(run.run_dir / OUTPUT)},
        "command": run.shown_command(),
        "accuracy": _output_student_accuracy(final),
        "steps": final["steps"],
        "budget": fitted_length(run.run_dir, final["steps"]),
        "processes": final["processes"],
        "precision": final["precision"]["mixed_precision"] or "accelerate config",
        "channels_last": final["precision"]["channels_last"],
        "wall_s": training_seconds(run.run_dir, final),
        "images_per_s": speeds[len(speeds) // 2] if speeds else None,  # median over the logging windows
        "curve": training_curve(records),
        "importance": final["importance"],
        "importance_plot": plot.name if plot else None,
        "machine": machine_line(),
        "train_gflop_per_image": _gflop(train_flops_per_image(run.unresolved_spec())),
        "peak_bf16_tflops": bf16_peak_tflops(),
        "date": time.strftime("%Y-%m-%d"),
    }
    run.summary_path.parent.mkdir(parents=True, exist_ok=True)
    run.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _code(run: PlannedRun) -> dict:
    """The code that trained the run, from its run directory (the present code for runs trained before
    training recorded it)."""
    recorded = read_identity(run.run_dir)
    if recorded is None:
        return code_identity()
    return {
        **recorded["code"],
        **({"resumed_with": recorded["resumed_with"]} if "resumed_with" in recorded else {}),
    }


def _metric(key: str, value: object) -> bool:
    """An evaluation record's task metric (``acc1/student``, ``miou/teacher0``; not the per-class lists)."""
    from cmtkd_graph.study.spec import metric_keys

    return key.split("/")[0] in metric_keys() and isinstance(value, int | float)


def training_curve(records: list[dict]) -> list[dict]:
    """Per evaluation: the epoch, its accuracies and the mean training loss terms since the last one."""
    curve, losses = [], {}
    for r in records:
        if r.get("kind") == "train":
            for k, v in r.items():
                if k.startswith("loss/"):
                    losses.setdefault(k, []).append(v)
        elif r.get("kind") == "eval":
            point = {"epoch": r["epoch"], **{k: round(v, 2) for k, v in r.items() if _metric(k, v)}}
            point.update({k: round(sum(v) / len(v), 4) for k, v in losses.items()})
            curve.append(point)
            losses = {}
    return curve


def _output_student_accuracy(final: dict) -> dict:
    """``final.json``'s accuracies, ``student`` being the run's output student: with ``train.ema``'s
    average as the final student, its metrics are ``student`` here and the trained weights'
    ``student_trained`` (so the table, and rows reading ``{row:...}/student.safetensors``, describe the
    same weights)."""
    accuracy = final["accuracy"]
    if final.get("student_weights") != "ema":
        return accuracy
    renamed = {"student": "student_trained", "student_ema": "student"}
    out = {}
    for key, value in accuracy.items():
        metric, _, name = key.partition("/")
        out[f"{metric}/{renamed.get(name, name)}"] = value
    return out


def _gflop(flops: float | None) -> float | None:
    """FLOPs in GFLOP, 3 decimals (None: not counted for this system)."""
    return None if flops is None else round(flops / 1e9, 3)
