"""``cmtkd-graph study --dry-run``: every run with its status and an estimated time, from a short probe
of its training step (in the precision the run will use, where that is known already), and the FLOPs
it will compute with what they take on a GPU: measured where the dry run runs on one, else at an
assumed share of an H100's bf16 peak (said as such)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cmtkd_graph.study.executors import make_executor
from cmtkd_graph.study.plan import STALE, PlannedRun, check_rows, plan
from cmtkd_graph.study.run import job_place, submitted_earlier
from cmtkd_graph.study.spec import StudySpec

ASSUMED_GPU = "H100"
ASSUMED_SHARE_OF_PEAK = 0.25
"""What a CMT-KD step reaches of a GPU's dense bf16 peak, assumed for estimates made without a GPU (small
convolutions and the quantizers' elementwise work keep it far below the peak); a GPU's own dry run
measures instead."""


def estimate(run: PlannedRun) -> tuple[float, str]:
    """Estimated seconds of a run from a short probe of its training step, and the precision timed (with
    the run's FLOPs and, without a GPU here, their time on an assumed GPU)."""
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
    label = label if precision else f"{label} (auto decides at start)"
    return training + eval_seconds, f"{label}; {_flops_text(spec, steps, step, device)}"


def _flops_text(spec, steps: int, step: float, device) -> str:
    """The run's training FLOPs and what they take on a GPU: this one's measured rate, or an assumed one."""
    from cmtkd_graph.runtime.throughput import BF16_PEAK_TFLOPS, bf16_peak_tflops, train_flops_per_image

    per_image = train_flops_per_image(spec)
    if per_image is None:
        return "FLOPs not counted (its step needs values: a detector's box logic)"
    total = per_image * spec.data.batch_size * steps
    text = f"{total / 1e15:.1f} PFLOP"
    if device.type == "cuda":
        peak = bf16_peak_tflops()
        reached = total / max(steps * step, 1e-9) / 1e12
        share = f", {100 * reached / peak:.0f} % of its bf16 peak" if peak else ""
        return f"{text}, measured here: {reached:.0f} TFLOP/s{share}"
    rate = ASSUMED_SHARE_OF_PEAK * BF16_PEAK_TFLOPS[ASSUMED_GPU] * 1e12
    return (
        f"{text}: ~{_duration(total / rate)} on an {ASSUMED_GPU} at an assumed "
        f"{100 * ASSUMED_SHARE_OF_PEAK:.0f} % of its bf16 peak (no GPU here to measure it)"
    )


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
