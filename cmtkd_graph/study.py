"""A study: rows of experiments (a spec plus overrides) times seeds, trained one after another through
the normal training command and summarised into one results table (``cmtkd_graph.study_report``).

``cmtkd-graph study STUDY.yaml`` is resumable at any point, across days and machines:

- each (row, seed) trains in its own process, ``python -m cmtkd_graph.train SPEC --set ...`` (or the
  ``--launcher`` given, e.g. ``accelerate launch --multi_gpu --num_processes 2``), into
  ``<runs_dir>/<row>/seed<k>-<key>``; ``<key>`` hashes the row's spec file, overrides and seed, so a row
  whose settings change trains anew instead of resuming an older run;
- a finished run leaves a small summary, ``<output_dir>/runs/<row>/seed<k>.json`` (final accuracies,
  the curve of evaluations, wall time, images/s, the command, the machine) meant to be committed:
  a run whose summary holds its key is never trained again, even where its run directory is gone;
- an interrupted run resumes from its last checkpoint (``--resume``); one stopped before its first
  checkpoint starts again.

A row may use another row's result in its overrides: ``{row:NAME}`` is the run directory of seed 0 of
row ``NAME`` (an earlier row), e.g. ``teachers[0].weights={row:single_w8a8}/student.safetensors``.
Paths are relative to the directory the command runs in, as in specs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from cmtkd_graph.errors import SpecError, UserError
from cmtkd_graph.spec import Strict

ROW_REFERENCE = re.compile(r"\{row:([A-Za-z0-9_.-]+)\}")
METRIC = re.compile(r"^acc[15]/(student|combined|teachers|teacher\d+)$")
TRAIN_MODULE = ("-m", "cmtkd_graph.train")
STUDY_TIME = "study-time.json"  # in a run directory: wall time of the training commands, summed


def _check_metric(name: str) -> str:
    if not METRIC.match(name):
        raise ValueError(
            f"unknown metric {name!r}: acc1/ or acc5/ followed by student, combined, teachers or teacher<k>"
        )
    return name


class RowSpec(Strict):
    """One row of the table: a spec (the study's base unless given) with overrides, run ``seeds`` times."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="identifier (run directories, --rows)")
    label: str | None = Field(None, description="text in the table (default: name)")
    spec: str | None = Field(None, description="spec file or packaged example (default: the study's base)")
    set: list[str] = Field(default_factory=list, description="overrides, after the study's own")
    seeds: int = Field(1, ge=1, description="runs with train.seed = 0, 1, ... seeds-1")
    paper: str | None = Field(None, description="the published result to show beside this row")

    @property
    def title(self) -> str:
        return self.label or self.name


class StudySpec(Strict):
    """A study: a base spec, common overrides, the rows and what the table shows."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="spec file or packaged example every row starts from")
    set: list[str] = Field(default_factory=list, description="overrides for every row (before the row's)")
    rows: list[RowSpec] = Field(min_length=1)
    metrics: list[Annotated[str, AfterValidator(_check_metric)]] = Field(
        default_factory=lambda: ["acc1/student", "acc5/student", "acc1/combined", "acc1/teachers"],
        min_length=1,
        description="table columns; the first is the bar chart's",
    )
    output_dir: str = Field("studies/{name}", description="results.json, results.png and run summaries")
    report: str | None = Field(None, description="the Markdown report (default: <output_dir>/results.md)")
    runs_dir: str = Field("runs/study-{name}", description="the training run directories")
    notes: str = Field("", description="Markdown shown above the table: the setting and why")

    @model_validator(mode="after")
    def _check_rows(self) -> StudySpec:
        seen: set[str] = set()
        problems = []
        for i, row in enumerate(self.rows):
            if row.name in seen:
                problems.append(f"rows[{i}].name: {row.name!r} is used twice")
            for ref in ROW_REFERENCE.findall(" ".join(row.set)):
                if ref not in seen:
                    problems.append(f"rows[{i}].set: {{row:{ref}}} must name an earlier row")
            seen.add(row.name)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def path(self, template: str) -> Path:
        return Path(template.replace("{name}", self.name))

    @property
    def output_path(self) -> Path:
        return self.path(self.output_dir)

    @property
    def report_path(self) -> Path:
        return self.path(self.report) if self.report else self.output_path / "results.md"

    def row(self, name: str) -> RowSpec:
        return next(r for r in self.rows if r.name == name)


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; problems become one line each (``rows[2].seeds: ...``)."""
    from cmtkd_graph.spec_io import read_yaml_mapping

    file = Path(path)
    if not file.is_file():
        raise UserError(f"study file {str(path)!r} not found")
    data = read_yaml_mapping(file, "a study")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError([f"{file}: {line}" for line in _error_lines(err)]) from None


def _error_lines(err: ValidationError) -> list[str]:
    """``key.path: message`` per problem; the row checks already name their key path."""
    from cmtkd_graph.spec_io import format_loc

    lines = []
    for e in err.errors():
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        for problem in message.split("\n"):
            named = problem.startswith("rows[")
            lines.append(problem if named else f"{format_loc(e['loc']) or 'study'}: {problem}")
    return list(dict.fromkeys(lines))


# ------------------------------------------------------------------------------------------ planning
@dataclass
class PlannedRun:
    """One (row, seed) of a study and where its files go."""

    study: StudySpec
    row: RowSpec
    seed: int

    @property
    def spec_file(self) -> str:
        return self.row.spec or self.study.base

    @property
    def raw_overrides(self) -> list[str]:
        """The study's and the row's overrides and the seed, ``{row:NAME}`` not yet resolved."""
        return [*self.study.set, *self.row.set, f"train.seed={self.seed}"]

    @property
    def key(self) -> str:
        text = json.dumps([self.spec_file, self.raw_overrides])
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        return self.study.path(self.study.runs_dir) / self.row.name / f"seed{self.seed}-{self.key}"

    @property
    def summary_path(self) -> Path:
        return self.study.output_path / "runs" / self.row.name / f"seed{self.seed}.json"

    def overrides(self, *, resolve: bool = True) -> list[str]:
        """The overrides passed to training: ``{row:NAME}`` resolved (unless not ``resolve``), the run
        directory fixed."""
        overrides = self.raw_overrides
        if resolve:
            overrides = [ROW_REFERENCE.sub(lambda m: str(self.reference(m.group(1))), o) for o in overrides]
        return [*overrides, f"train.output_dir={self.run_dir}"]

    def reference(self, row_name: str) -> Path:
        """The run directory of seed 0 of row ``row_name``, which must have finished on this machine."""
        target = PlannedRun(self.study, self.study.row(row_name), 0)
        if not (target.run_dir / "final.json").is_file():
            fix = (
                f"train it again with --redo {row_name}"
                if target.summary()
                else f"train row {row_name} first"
            )
            raise UserError(
                f"row {self.row.name}: needs the finished run of row {row_name} in {target.run_dir}, which "
                f"is not on this machine; {fix}"
            )
        return target.run_dir

    def train_args(self, *, resolve: bool = True) -> list[str]:
        """The arguments of ``python -m cmtkd_graph.train`` for this run."""
        return [self.spec_file, *[a for o in self.overrides(resolve=resolve) for a in ("--set", o)]]

    def shown_command(self, *, resolve: bool = True) -> str:
        """The command as a user types it to reproduce this run."""
        return shlex.join(["python", *TRAIN_MODULE, *self.train_args(resolve=resolve)])

    def summary(self) -> dict | None:
        """The committed summary of this run, if it was made with the row's present settings."""
        if not self.summary_path.is_file():
            return None
        data = json.loads(self.summary_path.read_text())
        return data if data.get("key") == self.key else None

    def status(self) -> Literal["done", "finished", "resume", "new"]:
        """done: summarised; finished: trained, not yet summarised; resume: has a checkpoint; new."""
        from cmtkd_graph.checkpoint import LATEST, checkpoints_dir

        if self.summary() is not None:
            return "done"
        if (self.run_dir / "final.json").is_file():
            return "finished"
        if (checkpoints_dir(self.run_dir) / LATEST).is_file():
            return "resume"
        return "new"


def plan(study: StudySpec, rows: Sequence[str] = (), option: str = "--rows") -> list[PlannedRun]:
    """Every (row, seed) in order; ``rows`` limits it to those rows (an unknown name is an error about
    the command-line ``option`` that gave it)."""
    from cmtkd_graph.errors import did_you_mean

    names = [r.name for r in study.rows]
    for name in rows:
        if name not in names:
            raise UserError(f"{option}: no row {name!r} in study {study.name}{did_you_mean(name, names)}")
    return [
        PlannedRun(study, row, seed)
        for row in study.rows
        if not rows or row.name in rows
        for seed in range(row.seeds)
    ]


def check_rows(study: StudySpec) -> None:
    """Validate every row's spec with its overrides now, not hours into the study."""
    from cmtkd_graph.spec_io import load_spec

    problems = []
    for i, row in enumerate(study.rows):
        run = PlannedRun(study, row, 0)
        try:
            load_spec(run.spec_file, [ROW_REFERENCE.sub("row-" + r"\1", o) for o in run.raw_overrides])
        except UserError as err:
            problems += [f"rows[{i}] ({row.name}): {line}" for line in err.problems]
    if problems:
        raise SpecError(problems)


# ------------------------------------------------------------------------------------------- running
def run_study(
    study: StudySpec,
    *,
    rows: Sequence[str] = (),
    redo: Sequence[str] = (),
    launcher: Sequence[str] = (),
    keep_going: bool = False,
    log=print,
) -> int:
    """Train every run not yet done, writing the report after each; the number of failed runs."""
    from cmtkd_graph.study_report import write_report

    check_rows(study)
    runs = plan(study, rows)
    plan(study, redo, "--redo")  # checks the names
    failed = 0
    for run in runs:
        if run.row.name in redo and run.status() != "new":
            _discard(run)
        status = run.status()
        if status == "done":
            continue
        log(f"study {study.name}: {run.row.name} seed {run.seed} ({status}): {run.run_dir}")
        if status != "finished":
            code = _train(run, launcher, resume=status == "resume")
            if code != 0:
                failed += 1
                log(f"study {study.name}: {run.row.name} seed {run.seed} failed (exit status {code})")
                if not keep_going:
                    break
                continue
        write_summary(run)
        write_report(study)
    write_report(study)
    return failed


def _discard(run: PlannedRun) -> None:
    """--redo: forget a run's summary and its run directory."""
    run.summary_path.unlink(missing_ok=True)
    shutil.rmtree(run.run_dir, ignore_errors=True)


def _train(run: PlannedRun, launcher: Sequence[str], *, resume: bool) -> int:
    """Train (or resume) one run in its own process; the wall time adds up in the run directory."""
    start = list(launcher) or [sys.executable, *TRAIN_MODULE]
    if resume:
        command = [*start, "--resume", str(run.run_dir)]
    else:
        shutil.rmtree(run.run_dir, ignore_errors=True)  # a start that never reached a checkpoint
        command = [*start, *run.train_args()]
    started = time.perf_counter()
    code = subprocess.run(command).returncode
    elapsed = time.perf_counter() - started
    if run.run_dir.is_dir():
        record = run.run_dir / STUDY_TIME
        previous = json.loads(record.read_text()) if record.is_file() else {"wall_s": 0.0, "attempts": 0}
        total = {"wall_s": previous["wall_s"] + elapsed, "attempts": previous["attempts"] + 1}
        record.write_text(json.dumps(total))
    return code


def write_summary(run: PlannedRun) -> dict:
    """The committed record of a finished run (and a copy of its importance plot, if any)."""
    from cmtkd_graph.metrics import read_metrics
    from cmtkd_graph.precision import machine_line

    final = json.loads((run.run_dir / "final.json").read_text())
    records = read_metrics(run.run_dir / "metrics.jsonl")
    timing = run.run_dir / STUDY_TIME
    wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
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
        "command": run.shown_command(),
        "accuracy": final["accuracy"],
        "steps": final["steps"],
        "processes": final["processes"],
        "precision": final["precision"]["mixed_precision"] or "accelerate config",
        "channels_last": final["precision"]["channels_last"],
        "wall_s": wall,
        "images_per_s": speeds[len(speeds) // 2] if speeds else None,  # median over the logging windows
        "curve": training_curve(records),
        "importance": final["importance"],
        "importance_plot": plot.name if plot else None,
        "machine": machine_line(),
        "date": time.strftime("%Y-%m-%d"),
    }
    run.summary_path.parent.mkdir(parents=True, exist_ok=True)
    run.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def training_curve(records: list[dict]) -> list[dict]:
    """Per evaluation: the epoch, its accuracies and the mean training loss terms since the last one."""
    curve, losses = [], {}
    for r in records:
        if r.get("kind") == "train":
            for k, v in r.items():
                if k.startswith("loss/"):
                    losses.setdefault(k, []).append(v)
        elif r.get("kind") == "eval":
            point = {"epoch": r["epoch"], **{k: round(v, 2) for k, v in r.items() if k.startswith("acc")}}
            point.update({k: round(sum(v) / len(v), 4) for k, v in losses.items()})
            curve.append(point)
            losses = {}
    return curve


# ------------------------------------------------------------------------------------------ dry run
def estimate(run: PlannedRun) -> tuple[float, str]:
    """Estimated seconds of a run from a short probe of its training step, and the precision timed."""
    import torch

    from cmtkd_graph.data import build_datasets
    from cmtkd_graph.precision import cached_choice, choose_precision, is_auto, probe
    from cmtkd_graph.spec_io import load_spec

    overrides = [ROW_REFERENCE.sub(r"row-\1", o) for o in run.raw_overrides]  # weights are not loaded
    spec = load_spec(run.spec_file, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = spec.data.batch_size // (spec.train.grad_accum_steps or 1)
    precision = cached_choice(spec, device, batch) if is_auto(spec) else choose_precision(spec, device, batch)
    option = (precision.mixed_precision, precision.channels_last) if precision else (None, False)
    seconds = probe(spec, device, batch, [option])
    step = next(iter(seconds.values())) * (spec.train.grad_accum_steps or 1)
    bundle = build_datasets(spec.data)
    steps_per_epoch = math.ceil(len(bundle.train) / spec.data.batch_size)
    steps = min(spec.train.max_steps or math.inf, steps_per_epoch * spec.train.epochs)
    evaluations = math.ceil(spec.train.epochs / spec.train.eval_every)
    eval_seconds = evaluations * len(bundle.eval) * step / spec.data.batch_size / 3  # forward only
    label = f"{option[0] or 'fp32'}{' channels_last' if option[1] else ''}"
    return steps * step + eval_seconds, label if precision else f"{label} (auto decides at start)"


def dry_run(study: StudySpec, rows: Sequence[str] = (), redo: Sequence[str] = (), log=print) -> float:
    """List the runs, each with its status and estimated time; the estimated total of those to train."""
    check_rows(study)
    runs = plan(study, rows)
    estimates: dict[str, tuple[float, str]] = {}
    total = 0.0
    for run in runs:
        status = "new (redo)" if run.row.name in redo else run.status()
        if status == "done":
            log(f"  {run.row.name:<28} seed {run.seed}  done")
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
