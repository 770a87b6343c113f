"""Planning a study: every (row, seed) as a :class:`PlannedRun`, with its run directory, the key of its
settings, its committed summary and its status (done, finished, resume, new)."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmtkd_graph.checkpoint import LATEST, checkpoints_dir
from cmtkd_graph.errors import SpecError, UserError, did_you_mean
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec.io import load_spec
from cmtkd_graph.study.spec import ROW_REFERENCE, RowSpec, StudySpec

TRAIN_MODULE = ("-m", "cmtkd_graph.train")


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

    def unresolved_spec(self) -> Spec:
        """The run's spec with every ``{row:NAME}`` replaced by a placeholder path: everything about the
        run but the files of other rows, which need not exist yet (checks, estimates, the report)."""
        return load_spec(self.spec_file, [ROW_REFERENCE.sub(r"row-\1", o) for o in self.raw_overrides])

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
    problems = []
    for i, row in enumerate(study.rows):
        run = PlannedRun(study, row, 0)
        try:
            run.unresolved_spec()
        except UserError as err:
            problems += [f"rows[{i}] ({row.name}): {line}" for line in err.problems]
    if problems:
        raise SpecError(problems)
