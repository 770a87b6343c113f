"""Planning a study: every (row, seed) as a :class:`PlannedRun`, with its identity (what it trains, from
what), the key of that identity, its run directory, its committed summary and its status (done, stale,
finished, resume, new, waits)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from cmtkd_graph.checkpoint import LATEST, checkpoints_dir
from cmtkd_graph.errors import SpecError, UserError, did_you_mean
from cmtkd_graph.identity import (
    NOT_CONTENT,
    REVISION,
    digest,
    flatten,
    git,
    input_sources,
    source_identity,
    spec_content,
)
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec.io import find_spec_file, load_spec, read_spec_file
from cmtkd_graph.study.spec import ROW_REFERENCE, RowSpec, StudySpec
from cmtkd_graph.version import __version__

TRAIN_MODULE = ("-m", "cmtkd_graph.train")
ROW_PLACEHOLDER = "<row:{}>"  # {row:NAME} in a spec whose upstream files need not exist yet
STALE = "stale"  # --redo stale: every stale run
PLACEHOLDER = re.compile(r"^<row:([A-Za-z0-9_.-]+)>/?(.*)$")


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

    def upstream(self) -> list[PlannedRun]:
        """The runs whose files this one reads (seed 0 of each row named by ``{row:NAME}``)."""
        names = dict.fromkeys(ROW_REFERENCE.findall(" ".join(self.raw_overrides)))
        return [PlannedRun(self.study, self.study.row(name), 0) for name in names]

    @functools.cached_property
    def identity(self) -> dict | None:
        """What the run is: its resolved spec's content (``{row:NAME}`` as a placeholder), the identity of
        each weights source (an upstream row's key and the hash of its file) and the project's version;
        None while an upstream run has no current result."""
        spec = self._spec
        inputs = {}
        for field, source in input_sources(spec).items():
            match = PLACEHOLDER.match(source)
            if match is None:
                inputs[field] = source_identity(source)
                continue
            upstream = PlannedRun(self.study, self.study.row(match.group(1)), 0)
            if upstream.status() != "done":
                return None
            outputs = upstream.summary().get("outputs") or {}
            inputs[field] = {
                "row": upstream.row.name,
                "key": upstream.key,
                "sha256": outputs.get(match.group(2)),
            }
        return {"spec": spec_content(spec), "inputs": inputs, "version": __version__}

    @functools.cached_property
    def _spec(self) -> Spec:
        return self.unresolved_spec()

    @property
    def key(self) -> str | None:
        """8 hex digits of the identity's hash (the recorded key of a summary that describes the same run);
        None while the identity is not known."""
        if self.identity is None:
            return None
        recorded = self.summary()
        if recorded and recorded.get("identity") and not self.changes():
            return recorded["key"]
        return self._present_key

    @functools.cached_property
    def _present_key(self) -> str:
        """The key of the present identity (known)."""
        return digest(self.identity)[:8]

    @property
    def legacy_key(self) -> str:
        """The key of summaries written before runs had identities: the spec file's name and the
        unresolved overrides."""
        text = json.dumps([self.spec_file, self.raw_overrides])
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<row>/seed<k>-<key>``; ``KEY`` stands for a key not known yet (``waits``)."""
        return self.study.path(self.study.runs_dir) / self.row.name / f"seed{self.seed}-{self.key or 'KEY'}"

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
        """The run's spec with every ``{row:NAME}`` replaced by the placeholder ``<row:NAME>``: everything
        about the run but the files of other rows, which need not exist yet (checks, estimates, keys)."""
        placeholder = lambda m: ROW_PLACEHOLDER.format(m.group(1))
        return load_spec(self.spec_file, [ROW_REFERENCE.sub(placeholder, o) for o in self.raw_overrides])

    def reference(self, row_name: str) -> Path:
        """The run directory of seed 0 of row ``row_name``, which must have finished on this machine."""
        target = PlannedRun(self.study, self.study.row(row_name), 0)
        if target.key is None or not (target.run_dir / "final.json").is_file():
            fix = (
                f"train it again with --redo {row_name}"
                if target.trained_elsewhere()
                else f"train row {row_name} first"
            )
            raise UserError(
                f"row {self.row.name}: needs the finished run of row {row_name} in {target.run_dir}, which "
                f"is not on this machine; {fix}"
            )
        return target.run_dir

    def trained_elsewhere(self) -> bool:
        """Whether the run is done (a committed summary) but its run directory, its weights, is not on
        this machine (trained on another)."""
        return self.status() == "done" and not (self.run_dir / "final.json").is_file()

    def train_args(self, *, resolve: bool = True) -> list[str]:
        """The arguments of ``python -m cmtkd_graph.train`` for this run."""
        return [self.spec_file, *[a for o in self.overrides(resolve=resolve) for a in ("--set", o)]]

    def shown_command(self, *, resolve: bool = True) -> str:
        """The command as a user types it to reproduce this run."""
        return shlex.join(["python", *TRAIN_MODULE, *self.train_args(resolve=resolve)])

    def summary(self) -> dict | None:
        """The committed summary of this run, current or stale (see :meth:`status`); one written before
        runs had identities is carried over (:func:`carry_over`)."""
        return self._summary

    @functools.cached_property
    def _summary(self) -> dict | None:
        if not self.summary_path.is_file():
            return None
        data = json.loads(self.summary_path.read_text())
        return data if "identity" in data else carry_over(self, data)

    def discard_summary(self) -> None:
        """Delete the committed summary (``--redo``); the run is then planned as if it had none."""
        self.summary_path.unlink(missing_ok=True)
        for cached in ("_summary", "_changes"):
            self.__dict__.pop(cached, None)

    def status(self) -> Literal["done", "stale", "finished", "resume", "new", "waits"]:
        """done: summarised with the present identity; stale: summarised, but the spec, an input or the
        version changed since (retrained only with ``--redo stale``); finished: trained, not yet
        summarised; resume: has a checkpoint; new; waits: an upstream row has no current result."""
        if self.summary() is not None:
            return "stale" if self.changes() else "done"
        if self.key is None:
            return "waits"
        if (self.run_dir / "final.json").is_file():
            return "finished"
        if (checkpoints_dir(self.run_dir) / LATEST).is_file():
            return "resume"
        return "new"

    def waiting_for(self) -> dict[str, str]:
        """The upstream rows without a current result, with their status."""
        statuses = {u.row.name: u.status() for u in self.upstream()}
        return {name: status for name, status in statuses.items() if status != "done"}

    def changes(self) -> list[str]:
        """What differs between the run its summary describes and the run the study asks for now, in
        words; empty when they are the same run (or there is no summary).

        A setting the summary does not record and the spec leaves at its default is a field added to
        the schema after the run was trained, not a change: a new field's default keeps the old
        behaviour (docs/studies.md#run-identity-and-stale-runs)."""
        return self._changes

    @functools.cached_property
    def _changes(self) -> list[str]:
        summary = self.summary()
        if summary is None:
            return []
        if self.identity is None:
            return [f"row {name} is {status}" for name, status in self.waiting_for().items()]
        recorded = summary.get("identity")
        if recorded is None:
            return [summary.get("stale", "trained with other settings")]
        if summary.get("key") == self._present_key:
            return []
        explicit = set(flatten(self._spec.model_dump(mode="json", exclude_defaults=True)))
        now = self.identity["spec"]
        new_keys = set(now) - set(recorded["spec"])
        added = {k for k in new_keys if not (_set_in(k, explicit) or k.startswith(REVISION))}
        # a key since counted as not content (NOT_CONTENT) is no change
        old_spec = {k: v for k, v in recorded["spec"].items() if not k.startswith(NOT_CONTENT)}
        reasons = [
            f"{k.removeprefix(REVISION)} computes otherwise: revision {old_spec.get(k, 1)} -> {now.get(k, 1)}"
            for k in sorted(set(now) | set(old_spec))
            if k.startswith(REVISION) and old_spec.get(k, 1) != now.get(k, 1)
        ]
        reasons += _changed_settings(
            {k: v for k, v in old_spec.items() if not k.startswith(REVISION)},
            {k: v for k, v in now.items() if k not in added and not k.startswith(REVISION)},
        )
        for field in sorted(set(recorded["inputs"]) | set(self.identity["inputs"])):
            old, new = recorded["inputs"].get(field), self.identity["inputs"].get(field)
            if old == new:
                continue
            if old is None or new is None:
                reasons.append(f"{field}: {'added' if old is None else 'removed'}")
            elif old.get("row") and old.get("row") == new.get("row") and old["key"] == new["key"]:
                reasons.append(f"{field}: row {new['row']} was trained again")
            else:
                what = "the plugin's code" if field.startswith("plugins[") else "the weights"
                reasons.append(f"{field}: {what} changed")
        if recorded["version"] != self.identity["version"]:
            reasons.append(f"project version {recorded['version']} -> {self.identity['version']}")
        return reasons


def _set_in(key: str, explicit: set[str]) -> bool:
    """Whether the spec sets ``key`` (or a mapping or list that holds it) to other than its default."""
    return any(
        key == e or key.startswith((f"{e}.", f"{e}[")) or e.startswith((f"{key}.", f"{key}["))
        for e in explicit
    )


def _changed_settings(old: dict, new: dict, shown: int = 3) -> list[str]:
    changed = [
        f"{k}: {json.dumps(old.get(k, '(unset)'))} -> {json.dumps(new.get(k, '(unset)'))}"
        for k in sorted(set(old) | set(new))
        if old.get(k, "(unset)") != new.get(k, "(unset)")
    ]
    return changed[:shown] + ([f"and {len(changed) - shown} more settings"] if len(changed) > shown else [])


def carry_over(run: PlannedRun, summary: dict) -> dict:
    """A summary from before run identities, in the present form: when its key is that of the row's
    present overrides and the spec file reads the same as at the commit that added the summary, it gets
    the run's present identity and records that commit; otherwise it is stale."""
    if summary.get("key") != run.legacy_key:
        return {**summary, "identity": None, "stale": "trained with other overrides (before run identities)"}
    commit = _added_in(run.summary_path)
    then = _spec_file_at(run.spec_file, commit) if commit else None
    if then is not None and then != read_spec_file(run.spec_file):
        return {**summary, "identity": None, "stale": f"spec file {run.spec_file} changed since {commit[:7]}"}
    if run.identity is None:
        return {**summary, "identity": None}
    code = {"version": __version__, "commit": commit, "dirty": False if commit else None}
    return {
        **summary,
        "key": run._present_key,
        "identity": run.identity,
        "code": code,
        "carried_over": summary["key"],
    }


def _added_in(path: Path) -> str | None:
    """The commit that last added ``path`` to git, if it is in a repository."""
    found = git(path.parent, "log", "--diff-filter=A", "-n", "1", "--format=%H", "--", path.name)
    return found or None


def _spec_file_at(spec_file: str, commit: str) -> dict | None:
    """The spec file's content at ``commit`` (None where git does not know it)."""
    path = find_spec_file(spec_file).resolve()
    text = git(path.parent, "show", f"{commit}:./{path.name}")
    return yaml.safe_load(text) if text else None


def persist_carried_over(runs: Sequence[PlannedRun]) -> int:
    """Write carried-over summaries back in the present form; how many were written."""
    written = 0
    for run in runs:
        summary = run.summary()
        if summary is not None and summary.get("carried_over") and summary.get("identity"):
            on_disk = json.loads(run.summary_path.read_text())
            if "identity" not in on_disk:
                run.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
                written += 1
    return written


def check_metrics(study: StudySpec) -> None:
    """Every row reports at least one of the study's metrics: a row of another task (segmentation: mIoU)
    under the default top-1 columns would leave its cells empty; one line per such row."""
    from cmtkd_graph.registry import TASKS

    keys = {m.split("/")[0] for m in study.metrics}
    problems = []
    for row in study.rows:
        try:
            task = PlannedRun(study, row, 0).unresolved_spec().resolved_task
        except UserError:
            continue  # reported where the row is planned or trained, as before
        own = TASKS.get(task).metric_titles
        if not keys & set(own):
            problems.append(
                f"rows ({row.name}): a {task} run reports {', '.join(own)}; the study's metrics name none of "
                f"them: set metrics: [{', '.join(f'{k}/student' for k in own)}, ...]"
            )
    if problems:
        raise UserError(problems)


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
