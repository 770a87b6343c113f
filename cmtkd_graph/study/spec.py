"""The study file: a base spec, overrides for every row, the rows (each a spec or overrides, run for a
number of seeds) and the table's metrics, validated by these pydantic models (``load_study``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from cmtkd_graph.errors import SpecError, UserError, did_you_mean
from cmtkd_graph.spec import Strict
from cmtkd_graph.spec.io import format_loc, read_yaml_mapping
from cmtkd_graph.spec.schema import Name

ROW_REFERENCE = re.compile(r"\{row:([A-Za-z0-9_.-]+)\}")
NETWORK = re.compile(r"^(student|combined|teachers|teacher\d+)$")


def metric_keys() -> dict[str, str]:
    """Every registered task's metric keys and headings (``acc1``: ``top-1 %``, ``miou``: ``mIoU %``)."""
    from cmtkd_graph.registry import TASKS

    return {key: title for task in TASKS for key, title in TASKS.get(task).metric_titles.items()}


def _check_metric(name: str) -> str:
    key, _, who = name.partition("/")
    if key not in metric_keys() or not NETWORK.match(who):
        raise ValueError(
            f"unknown metric {name!r}: {', '.join(k + '/' for k in metric_keys())} (a task's metric) "
            "followed by student, combined, teachers or teacher<k>"
        )
    return name


class RowSpec(Strict):
    """One row of the table: a spec (the study's base unless given) with overrides, run ``seeds`` times."""

    name: Name = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="identifier (run directories, --rows)")
    label: str | None = Field(None, description="text in the table (default: name)")
    spec: str | None = Field(None, description="spec file or packaged example (default: the study's base)")
    set: list[str] = Field(default_factory=list, description="overrides, after the study's own")
    seeds: int = Field(1, ge=1, description="runs with train.seed = 0, 1, ... seeds-1")
    paper: str | None = Field(None, description="the published result to show beside this row")

    @property
    def title(self) -> str:
        return self.label or self.name


Metric = Annotated[str, AfterValidator(_check_metric)]


class ComparisonSpec(Strict):
    """Rows compared with statistics in the report: each of ``rows`` against ``against``."""

    rows: list[str] | None = Field(None, description="the rows compared (default: every other row)")
    against: str = Field(description="the row they are compared with")
    metrics: list[Metric] | None = Field(
        None, description="default: the study's metrics, the teachers' columns left out"
    )


class ReferenceSpec(Strict):
    """A value drawn across the chart and named under the table, e.g. the ensemble of separately trained
    models against which a combined teacher is read."""

    label: str
    row: str
    metric: Metric


class LocalSettings(Strict):
    """``--executor local``: processes on the machine that runs the study."""

    jobs: int = Field(1, ge=1, description="runs at once, each on its share of the cores (--jobs overrides)")


class SlurmSettings(Strict):
    """``--executor slurm``: one Slurm job per run (job arrays), through submitit."""

    partition: str | None = Field(None, description="default: the cluster's default partition")
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(
        24 * 60, ge=1, description="time limit of a job; at its end the run checkpoints and is requeued"
    )
    nodes: int = Field(1, ge=1, description="nodes per run (one accelerate launch per node)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per run on each of its nodes")
    processes_per_node: int | None = Field(
        None, ge=1, description="training processes per node (default: gpus_per_node, or 1)"
    )
    cpus_per_process: int = Field(1, ge=1, description="CPUs per training process")
    mem_gb: float | None = Field(None, gt=0, description="memory per node (default: the partition's)")
    sbatch: list[str] = Field(
        default_factory=list, description="extra sbatch options, e.g. --constraint=a100, --exclusive"
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before training, e.g. module load cuda"
    )
    signal_delay_s: int = Field(
        120, ge=10, description="SIGUSR1 this long before the time limit: checkpoint, requeue"
    )
    max_requeues: int = Field(3, ge=0, description="requeues after time limits (preemptions are not counted)")
    array_parallelism: int = Field(256, ge=1, description="jobs of one array running at once")
    folder: str | None = Field(
        None, description="submitit's files and the jobs' logs (default: <runs_dir>/slurm)"
    )


class RaySettings(Strict):
    """``--executor ray``: one Ray actor per run, on a cluster."""

    address: str | None = Field(
        None, description="a running cluster (host:port, ray://host:port, auto); default: a local one"
    )
    num_cpus: float = Field(1, gt=0, description="CPUs per run")
    num_gpus: float = Field(
        0, ge=0, description="GPUs per run (one node; accelerate launch as --launcher for several)"
    )
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per run")
    namespace: str = Field("cmtkd_graph", description="where the runs' named actors live")


class ExecutorSettings(Strict):
    """Where the runs train, and each executor's settings (``--executor`` picks one)."""

    name: Literal["local", "slurm", "ray"] = Field(
        "local", description="the executor used without --executor"
    )
    local: LocalSettings = Field(default_factory=LocalSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    ray: RaySettings = Field(default_factory=RaySettings)


class StudySpec(Strict):
    """A study: a base spec, common overrides, the rows and what the table shows."""

    name: Name = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="spec file or packaged example every row starts from")
    set: list[str] = Field(default_factory=list, description="overrides for every row (before the row's)")
    rows: list[RowSpec] = Field(min_length=1)
    metrics: list[Metric] = Field(
        default_factory=lambda: ["acc1/student", "acc5/student", "acc1/combined", "acc1/teachers"],
        min_length=1,
        description="table columns",
    )
    chart: list[Metric] = Field(
        default_factory=lambda: ["acc1/student", "acc1/combined"],
        min_length=1,
        description="the bar chart's metrics, side by side per row",
    )
    comparisons: list[ComparisonSpec] = Field(
        default_factory=list, description="pairs of rows tested against each other in the report"
    )
    references: list[ReferenceSpec] = Field(
        default_factory=list, description="values drawn across the chart (a row's metric)"
    )
    output_dir: str = Field("studies/{name}", description="results.json, results.png and run summaries")
    report: str | None = Field(None, description="the Markdown report (default: <output_dir>/results.md)")
    runs_dir: str = Field("runs/study-{name}", description="the training run directories")
    notes: str = Field("", description="Markdown shown above the table: the setting and why")
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings, description="where runs train")

    @model_validator(mode="after")
    def _check_rows(self) -> StudySpec:
        seen: set[str] = set()
        problems = []
        for i, row in enumerate(self.rows):
            if row.name in seen:
                problems.append(f"rows[{i}].name: {row.name!r} is used twice")
            if row.name == "stale":
                problems.append(f"rows[{i}].name: 'stale' is reserved (--redo stale); choose another name")
            for ref in ROW_REFERENCE.findall(" ".join(row.set)):
                if ref not in seen:
                    problems.append(f"rows[{i}].set: {{row:{ref}}} must name an earlier row")
            seen.add(row.name)
        for i, c in enumerate(self.comparisons):
            named = [(f"rows[{j}]", name) for j, name in enumerate(c.rows or [])] + [("against", c.against)]
            for key, name in named:
                if name not in seen:
                    problems.append(f"comparisons[{i}].{key}: no row {name!r}{did_you_mean(name, seen)}")
        for i, r in enumerate(self.references):
            if r.row not in seen:
                problems.append(f"references[{i}].row: no row {r.row!r}{did_you_mean(r.row, seen)}")
        for key, metrics in [
            ("chart", self.chart),
            *((f"comparisons[{i}].metrics", c.metrics or []) for i, c in enumerate(self.comparisons)),
        ]:
            if any(m.endswith("/teachers") for m in metrics):
                problems.append(f"{key}: name one teacher (acc1/teacher0), not acc1/teachers")
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

    def compared_pairs(self) -> list[tuple[str, str, list[str]]]:
        """(row, against, metrics) of every comparison, ``rows: null`` expanded to every other row."""
        default = [m for m in self.metrics if not m.endswith("/teachers")]
        pairs = []
        for c in self.comparisons:
            rows = c.rows or [r.name for r in self.rows if r.name != c.against]
            pairs += [(row, c.against, c.metrics or default) for row in rows]
        return pairs


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; problems become one line each (``rows[2].seeds: ...``)."""
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
    lines = []
    for e in err.errors():
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        for problem in message.split("\n"):
            named = problem.startswith("rows[")
            lines.append(problem if named else f"{format_loc(e['loc']) or 'study'}: {problem}")
    return list(dict.fromkeys(lines))
