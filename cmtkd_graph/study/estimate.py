"""``cmtkd-graph study --dry-run``: every run with its status and an estimated time, from a short probe
of its training step (in the precision the run will use, where that is known already)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cmtkd_graph.study.executors import make_executor
from cmtkd_graph.study.plan import STALE, PlannedRun, check_rows, plan
from cmtkd_graph.study.run import job_place, submitted_earlier
from cmtkd_graph.study.spec import StudySpec


def estimate(run: PlannedRun) -> tuple[float, str]:
    """Estimated seconds of a run from a short probe of its training step, and the precision timed."""
    import torch

    from cmtkd_graph.data import build_datasets
    from cmtkd_graph.runtime.budget import evaluation_seconds
    from cmtkd_graph.runtime.precision import known_precision, probe

    spec = run.unresolved_spec()  # weights are not loaded
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = spec.data.batch_size // (spec.train.grad_accum_steps or 1)
    precision = known_precision(spec, device, batch)
    option = (precision.mixed_precision, precision.channels_last) if precision else (None, False)
    seconds = probe(spec, device, batch, [option])
    step = next(iter(seconds.values())) * (spec.train.grad_accum_steps or 1)
    bundle = build_datasets(spec.data)
    steps_per_epoch = math.ceil(len(bundle.train) / spec.data.batch_size)
    steps = min(spec.train.max_steps or math.inf, steps_per_epoch * spec.train.epochs)
    evaluations = math.ceil(spec.train.epochs / spec.train.eval_every)
    eval_seconds = evaluations * evaluation_seconds(step, len(bundle.eval), spec.data.batch_size)
    label = f"{option[0] or 'fp32'}{' channels_last' if option[1] else ''}"
    training = min(steps * step, 60 * (spec.train.max_minutes or math.inf))  # a budgeted run stops on time
    return training + eval_seconds, label if precision else f"{label} (auto decides at start)"


def dry_run(
    study: StudySpec,
    rows: Sequence[str] = (),
    redo: Sequence[str] = (),
    log=print,
    *,
    executor: str | None = None,
    jobs: int | None = None,
) -> float:
    """List where the runs would go, each run with its status (and its job where one was submitted
    already) and estimated time; the estimated total of those to train."""
    check_rows(study)
    engine = make_executor(study, executor, jobs=jobs)
    engine.check()
    log(f"executor {engine.where()}")
    runs = plan(study, rows)
    submitted = {(run.row.name, run.seed): job for run, job in submitted_earlier(engine, runs)}
    estimates: dict[str, tuple[float, str]] = {}
    total = 0.0
    retrained = {name for name in redo if name != STALE}  # rows whose files a dependent must wait for
    for run in runs:
        status = run.status()
        waits_for = sorted(retrained & {upstream.row.name for upstream in run.upstream()})
        if run.row.name in redo or (status == "stale" and STALE in redo):
            status = "new (redo)"
            retrained.add(run.row.name)
        elif waits_for and status not in ("done", "stale"):
            status = f"waits for {', '.join(waits_for)} (--redo)"
        if status in ("done", "stale"):
            commit = ((run.summary() or {}).get("code") or {}).get("commit")
            trained = f"  (commit {commit[:7]})" if commit else ""
            log(f"  {run.row.name:<28} seed {run.seed}  {status}{trained}")
            if status == "stale":
                log(f"      {'; '.join(run.changes())}; trained again with --redo stale")
            continue
        if status == "waits":
            status = f"waits for {', '.join(run.waiting_for())}"
        upstream = [u for u in run.upstream() if u.row.name not in retrained]
        missing = [u.row.name for u in upstream if u.trained_elsewhere()]
        if missing:  # done on another machine: this one has no files to read
            names = ",".join(missing)
            status += (
                f", cannot start: needs the finished run of row(s) {names}, which is not on this machine; "
                f"train it again with --redo {names}"
            )
        if (run.row.name, run.seed) in submitted:
            where = job_place(submitted[run.row.name, run.seed])
            log(f"  {run.row.name:<28} seed {run.seed}  {status}, submitted already: {where}")
            continue
        if run.row.name not in estimates:
            estimates[run.row.name] = estimate(run)
        seconds, precision = estimates[run.row.name]
        total += seconds
        log(f"  {run.row.name:<28} seed {run.seed}  {status:<10} ~{_duration(seconds)}  ({precision})")
        log(f"      {run.shown_command(resolve=False)}")
    log(f"estimated time of the runs to train: {_duration(total)}")
    return total


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
