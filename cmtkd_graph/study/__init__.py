"""A study: rows of experiments (a spec plus overrides) times seeds, trained through the normal training
command (independent runs concurrently with ``--jobs``) and summarised into one results table.

``cmtkd-graph study STUDY.yaml`` is resumable at any point, across days and machines:

- each (row, seed) trains in its own process, ``python -m cmtkd_graph.train SPEC --set ...`` (or the
  ``--launcher`` given, e.g. ``accelerate launch --multi_gpu --num_processes 2``), into
  ``<runs_dir>/<row>/seed<k>-<key>``; ``<key>`` hashes the run's identity (its resolved spec's content,
  its weights' content, the version), so a run whose settings change is stale instead of resumed;
- a finished run leaves a small summary, ``<output_dir>/runs/<row>/seed<k>.json`` (final accuracies,
  the curve of evaluations, wall time, images/s, the command, the machine) meant to be committed:
  a run whose summary holds its key is never trained again, even where its run directory is gone;
- an interrupted run resumes from its last checkpoint (``--resume``); one stopped before its first
  checkpoint starts again.

A row may use another row's result in its overrides: ``{row:NAME}`` is the run directory of seed 0 of
row ``NAME`` (an earlier row), e.g. ``teachers[0].weights={row:single_w8a8}/student.safetensors``.
Paths are relative to the directory the command runs in, as in specs.

The rooms: ``spec`` (the study file), ``plan`` (runs, identities, keys, statuses, stale runs), ``run``
(the dependency-ordered training and summaries), ``executor`` (where runs train),
``estimate`` (``--dry-run``), ``report`` (results.json, the Markdown table, the chart).
"""

from cmtkd_graph.study.estimate import dry_run, estimate
from cmtkd_graph.study.plan import PlannedRun, check_rows, persist_carried_over, plan
from cmtkd_graph.study.report import write_report
from cmtkd_graph.study.run import run_study, training_curve, write_summary
from cmtkd_graph.study.spec import RowSpec, StudySpec, load_study

__all__ = [
    "PlannedRun",
    "RowSpec",
    "StudySpec",
    "check_rows",
    "dry_run",
    "estimate",
    "load_study",
    "persist_carried_over",
    "plan",
    "run_study",
    "training_curve",
    "write_report",
    "write_summary",
]
