"""``cmtkd-graph study``: a study file, real training runs in real processes, resumption, the report."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import cmtkd_graph as cg
from cmtkd_graph.checkpoint import latest_checkpoint, read_trainer_state
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec.io import find_spec_file
from cmtkd_graph.study import (
    PlannedRun,
    StudySpec,
    dry_run,
    load_study,
    persist_carried_over,
    plan,
    run_study,
)
from cmtkd_graph.study.executors import core_shares

from .conftest import run_cli, run_module

# the quickstart (resnet18 W2A2, 4- and 8-bit teachers, 28x28 Fashion-MNIST) at toy length
COMMON = [
    "surgery=[]",
    "taps={teachers: [layer1, layer2, layer3]}",
    "data.train_subset=64",
    "data.eval_subset=64",
    "data.batch_size=32",
    "data.num_workers=0",
    "train.mixed_precision=no",
    "train.channels_last=false",
    "train.progress_bar=false",
    "train.log_every=1",
    "train.epochs=1",
    "train.eval_every=1",
    "optim.schedule={name: constant}",
]
SINGLE = ["method=single", "teachers=[]", "distill={}"]


def kd_row(upstream: str, *extra: str) -> dict:
    """Row kd: plain KD from row ``upstream``'s trained student ({row:...} resolves to its run directory)."""
    weights = f"{{row:{upstream}}}/student.safetensors"
    teacher = f"{{weight_bits: 2, act_bits: 2, trainable: false, weights: '{weights}'}}"
    return {
        "name": "kd",
        "set": ["method=kd", "distill={alpha: 1.0, beta: 0.5, tau: 2.0}", f"teachers=[{teacher}]", *extra],
    }


def write_study(tmp_path: Path, rows: list[dict], **extra) -> Path:
    study = {"name": "toy", "base": "quickstart", "set": COMMON, "rows": rows, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def write_summary_by_hand(run: PlannedRun, top1: float, **fields) -> dict:
    """A run summary in the present form (the run's key and identity) with the report's fields, for tests
    of the report that train nothing."""
    summary = {
        "seed": run.seed,
        "key": run.key,
        "identity": run.identity,
        "accuracy": {"acc1/student": top1},
        "wall_s": 60.0,
        "images_per_s": 100.0,
        "importance_plot": None,
        "machine": "CPU: test",
        **fields,
    }
    run.summary_path.parent.mkdir(parents=True, exist_ok=True)
    run.summary_path.write_text(json.dumps(summary))
    return summary


def study_cli(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(tmp_path, "study", "study.yaml", *args, timeout=timeout)


def test_study_files_are_validated_with_one_line_per_problem(tmp_path):
    path = write_study(
        tmp_path, [{"name": "a", "seeds": 0}, {"name": "c", "colour": "red"}], metrics=["acc2/x"]
    )
    with pytest.raises(UserError) as err:
        load_study(path)
    assert str(err.value).splitlines() == [
        f"{path}: rows[0].seeds: Input should be greater than or equal to 1",
        f"{path}: rows[1].colour: unknown key",
        f"{path}: metrics[0]: unknown metric 'acc2/x': acc1/, acc5/, map/, ap50/, ap75/, epe/, out1/, out3/, "
        "out5/, miou/, pixacc/ (a task's metric) followed by student, combined, teachers or teacher<k>",
    ]
    rows = [
        {"name": "a", "set": ["teachers[0].weights={row:b}/student.safetensors"]},
        {"name": "a"},
        {"name": "stale"},
    ]
    with pytest.raises(UserError) as err:
        load_study(write_study(tmp_path, rows))
    assert str(err.value).splitlines() == [
        f"{path}: rows[0].set: {{row:b}} must name an earlier row",
        f"{path}: rows[1].name: 'a' is used twice",
        f"{path}: rows[2].name: 'stale' is reserved (--redo stale); choose another name",
    ]
    # each row's spec is validated with its overrides before anything trains
    write_study(tmp_path, [{"name": "ok"}, {"name": "bad", "set": ["train.epoch=2"]}])
    result = study_cli(tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: rows[1] (bad): train.epoch: unknown key; did you mean 'epochs'?\n"
    missing = run_module(["study", "nope.yaml"], cwd=tmp_path, module="cmtkd_graph")
    assert missing.returncode == 2 and "study file 'nope.yaml' not found" in missing.stderr


def test_plan_names_each_run_by_its_settings(tmp_path):
    study = StudySpec.model_validate(
        {
            "name": "s",
            "base": "quickstart",
            "set": ["train.epochs=2"],
            "rows": [{"name": "x", "seeds": 2}, {"name": "y", "set": ["train.epochs=3"]}],
        }
    )
    runs = plan(study)
    assert [(r.row.name, r.seed) for r in runs] == [("x", 0), ("x", 1), ("y", 0)]
    x0, x1, y0 = runs
    assert x0.key != x1.key != y0.key  # the seed and the overrides are part of the key
    assert x0.run_dir == Path("runs/study-s/x") / f"seed0-{x0.key}"
    assert x0.summary_path == Path("studies/s/runs/x/seed0.json")
    assert x0.overrides() == ["train.epochs=2", "train.seed=0", f"train.output_dir={x0.run_dir}"]
    assert y0.overrides()[:2] == ["train.epochs=2", "train.epochs=3"]  # the row's come last
    changed = StudySpec.model_validate({**study.model_dump(), "set": ["train.epochs=4"]})
    assert PlannedRun(changed, changed.rows[0], 0).key != x0.key
    with pytest.raises(UserError, match="no row 'z'"):
        plan(study, ["z"])


def test_study_trains_every_run_then_skips_them_and_reports(tmp_path, fashion_mnist, monkeypatch):
    rows = [
        {"name": "single", "label": "W2A2 alone", "set": SINGLE, "seeds": 2, "paper": "72.9"},
        {"name": "cmtkd", "label": "CMT-KD", "set": ["train.max_steps=2"]},
        kd_row("single"),
    ]
    write_study(tmp_path, rows, report="docs/results.md", output_dir="docs/results")
    dry = study_cli(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert dry.stdout.count(" new ") == 3 and "estimated time of the runs to train:" in dry.stdout
    assert "  kd                           seed 0  waits for single" in dry.stdout  # its key needs single's
    assert "{row:single}/student.safetensors" in dry.stdout  # shown, not resolved: single has not run

    result = study_cli(tmp_path, "--jobs", "2")  # independent runs two at a time
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.chdir(tmp_path)  # the study's paths are relative to where it runs
    _ran_concurrently_where_allowed(tmp_path, load_study(tmp_path / "study.yaml"))
    out = tmp_path / "docs" / "results"
    summaries = {
        p.relative_to(out / "runs").as_posix(): json.loads(p.read_text())
        for p in (out / "runs").rglob("*.json")
    }
    assert sorted(summaries) == [
        "cmtkd/seed0.json",
        "kd/seed0.json",
        "single/seed0.json",
        "single/seed1.json",
    ]
    single0 = summaries["single/seed0.json"]
    assert single0["steps"] == 2 and single0["wall_s"] > 0 and single0["images_per_s"] > 0
    assert "train.seed=0" in single0["command"] and single0["curve"][-1]["epoch"] == 1
    assert summaries["cmtkd/seed0.json"]["importance_plot"] == "seed0-importance.png"
    assert (out / "runs" / "cmtkd" / "seed0-importance.png").stat().st_size > 1000
    kd_command = summaries["kd/seed0.json"]["command"]
    assert (
        f"{plan(load_study(tmp_path / 'study.yaml'), ['single'])[0].run_dir}/student.safetensors"
        in kd_command
    )

    results = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r for r in results["rows"]}
    values = [summaries[f"single/seed{k}.json"]["accuracy"]["acc1/student"] for k in (0, 1)]
    top1 = by_name["single"]["accuracy"]["acc1/student"]
    assert top1["values"] == values and top1["mean"] == pytest.approx(statistics.fmean(values))
    assert top1["std"] == pytest.approx(statistics.stdev(values))
    assert set(by_name["cmtkd"]["accuracy"]) >= {"acc1/combined", "acc1/teacher0", "acc1/teacher1"}
    report = (tmp_path / "docs" / "results.md").read_text()
    assert f"| W2A2 alone | 2/2 | – | {top1['mean']:.2f} ± {top1['std']:.2f} |" in report
    assert "teacher1 top-1" in report and "| 72.9 |" in report
    assert "![student top-1 and combined top-1 per row](results/results.png)" in report
    assert "(results/runs/cmtkd/seed0-importance.png)" in report
    assert (out / "results.png").stat().st_size > 1000

    # hand-written text around the markers survives; finished runs are not trained again
    (tmp_path / "docs" / "results.md").write_text("# Results\nBy hand.\n" + report + "\nDiscussion.\n")
    again = study_cli(tmp_path)
    assert again.returncode == 0 and "seed 0 (" not in again.stdout, again.stdout
    text = (tmp_path / "docs" / "results.md").read_text()
    assert text.startswith("# Results\nBy hand.\n") and text.endswith("\nDiscussion.\n")
    assert text.count("study:start") == 1
    dry = study_cli(tmp_path, "--dry-run")
    assert dry.stdout.count(" done") == 4 and "estimated time of the runs to train: 0 min" in dry.stdout

    # each run records what it is and what trained it; the study's summary too
    commit = _repo_commit()
    kd_run = plan(load_study(tmp_path / "study.yaml"), ["kd"])[0]
    recorded = json.loads((tmp_path / kd_run.run_dir / "identity.json").read_text())
    single_hash = summaries["single/seed0.json"]["outputs"]["student.safetensors"]
    assert recorded["inputs"] == {"teachers[0].weights": {"sha256": single_hash}}
    assert recorded["code"]["commit"] == commit and recorded["code"]["version"] == cg.__version__
    kd = summaries["kd/seed0.json"]
    assert kd["code"]["commit"] == commit and kd["key"] == kd_run.key
    assert kd["identity"]["inputs"]["teachers[0].weights"] == {
        "row": "single",
        "key": summaries["single/seed0.json"]["key"],
        "sha256": single_hash,
    }
    if commit:
        assert f"commit {commit[:7]}" in text
    _stale_runs_are_found_and_retrained(tmp_path, rows)


def _ran_concurrently_where_allowed(tmp_path: Path, study: StudySpec) -> None:
    """Both seeds of row single trained at the same time, each on its own share of the cores with its
    output in RUN_DIR.log; row kd, which reads single's seed 0, started after that run had ended."""
    runs = {f"{r.row.name}/{r.seed}": tmp_path / r.run_dir for r in plan(study)}
    started = {name: (d / "spec.yaml").stat().st_mtime for name, d in runs.items()}
    ended = {name: (d / "final.json").stat().st_mtime for name, d in runs.items()}
    assert max(started["single/0"], started["single/1"]) < min(ended["single/0"], ended["single/1"])
    assert started["kd/0"] >= ended["single/0"]
    threads = len(core_shares(sorted(os.sched_getaffinity(0)), 2)[0])
    for d in runs.values():
        assert f"{threads} CPU thread(s) per process" in d.with_suffix(".log").read_text()


def test_a_failed_run_names_its_log_and_the_runs_that_do_not_need_it_go_on(tmp_path, fashion_mnist):
    rows = [
        {"name": "bad", "set": [*SINGLE, "data.root=missing-data"]},  # valid spec, fails when it starts
        {
            "name": "dep",
            "set": [
                "method=kd",
                "teachers=[{weight_bits: 2, act_bits: 2, weights: '{row:bad}/student.safetensors'}]",
            ],
        },
        {"name": "ok", "set": [*SINGLE, "train.max_steps=1", "data.eval_subset=32"]},
    ]
    path = write_study(tmp_path, rows)
    result = study_cli(tmp_path, "--jobs", "2", "--keep-going")
    assert result.returncode == 1, result.stderr[-2000:]
    bad = plan(load_study(path), ["bad"])[0]
    log = bad.run_dir.with_suffix(".log")
    assert f"toy: bad seed 0 failed (exit status 2); its output: {log}" in result.stdout, result.stdout
    assert "missing-data" in (tmp_path / log).read_text()
    assert "toy: dep seed 0 not trained: row bad is new" in result.stdout
    assert "2 run(s) failed" in result.stdout
    assert (tmp_path / "studies" / "toy" / "runs" / "ok" / "seed0.json").is_file()


def test_concurrent_runs_get_disjoint_shares_of_the_cores():
    assert core_shares([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert core_shares([0, 1, 2], 2) == [[0], [1, 2]]
    assert core_shares([4, 5], 3) == [[4], [5], [4]]  # more jobs than cores: one core each, in turn


def _repo_commit() -> str | None:
    """The checkout's commit, when the tests run from one (the code records it in every run)."""
    repo = Path(cg.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def _stale_runs_are_found_and_retrained(tmp_path: Path, rows: list[dict]) -> None:
    """Editing a row's override, the study's base overrides, or retraining an upstream row marks exactly
    the runs that depend on it stale; they are retrained only with --redo stale."""

    def statuses(rows: list[dict]) -> dict[str, str]:
        study = load_study(write_study(tmp_path, rows, report="docs/results.md", output_dir="docs/results"))
        return {f"{r.row.name}/{r.seed}": r.status() for r in plan(study)}

    done = {"single/0": "done", "single/1": "done", "cmtkd/0": "done", "kd/0": "done"}
    kd_beta = [dict(r, set=[*r["set"], "distill.beta=0.6"]) if r["name"] == "kd" else r for r in rows]
    assert statuses(kd_beta) == {**done, "kd/0": "stale"}
    single_lr = [dict(r, set=[*r["set"], "optim.lr=0.0123"]) if r["name"] == "single" else r for r in rows]
    assert statuses(single_lr) == {
        "single/0": "stale",
        "single/1": "stale",
        "cmtkd/0": "done",
        "kd/0": "stale",
    }
    where = {"report": "docs/results.md", "output_dir": "docs/results"}
    study = load_study(write_study(tmp_path, rows, set=[*COMMON, "data.eval_subset=32"], **where))
    assert {r.status() for r in plan(study)} == {"stale"}
    assert plan(study, ["cmtkd"])[0].changes() == ["data.eval_subset: 64 -> 32"]
    assert statuses(rows) == done

    # the teacher row trained again with other weights: its dependent, and only it, is stale
    summary_file = tmp_path / "docs" / "results" / "runs" / "single" / "seed0.json"
    single0 = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**single0, "outputs": {"student.safetensors": "0" * 64}}))
    assert statuses(rows) == {**done, "kd/0": "stale"}
    kd_run = plan(load_study(tmp_path / "study.yaml"), ["kd"])[0]
    assert kd_run.changes() == ["teachers[0].weights: row single was trained again"]
    dry = study_cli(tmp_path, "--dry-run")
    assert "  kd                           seed 0  stale" in dry.stdout, dry.stdout
    assert "teachers[0].weights: row single was trained again; trained again with --redo stale" in dry.stdout
    report = study_cli(tmp_path, "--report")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "- kd, seed 0: teachers[0].weights: row single was trained again" in page
    again = study_cli(tmp_path)  # stale runs are kept until asked
    assert again.returncode == 0 and "seed 0 (" not in again.stdout, again.stdout
    summary_file.write_text(json.dumps({**single0, "outputs": {"student.safetensors": "1" * 64}}))
    redo = study_cli(tmp_path, "--redo", "stale")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "kd seed 0 (new)" in redo.stdout and "single seed" not in redo.stdout, redo.stdout
    assert statuses(rows) == done
    kd = json.loads((tmp_path / "docs" / "results" / "runs" / "kd" / "seed0.json").read_text())
    assert kd["identity"]["inputs"]["teachers[0].weights"]["sha256"] == "1" * 64


def test_a_field_added_to_the_schema_later_does_not_make_runs_stale(tmp_path, monkeypatch):
    """A summary records every setting of its spec; one without a setting the schema gained later is the
    same run when the spec leaves it at its default, and stale when the spec sets it."""
    monkeypatch.chdir(tmp_path)
    study = StudySpec.model_validate({"name": "s", "base": "quickstart", "rows": [{"name": "x"}]})
    run = plan(study)[0]
    summary = write_summary_by_hand(run, 50.0)
    assert plan(study)[0].status() == "done"
    for missing, status in [("train.max_minutes", "done"), ("train.epochs", "stale")]:
        spec = {k: v for k, v in run.identity["spec"].items() if k != missing}
        older = {**summary, "key": "0" * 8, "identity": {**run.identity, "spec": spec}}
        run.summary_path.write_text(json.dumps(older))
        again = plan(study)[0]
        assert again.status() == status, again.changes()
        assert again.key == ("0" * 8 if status == "done" else run.key)  # a same run keeps its directory
    assert again.changes() == [f'train.epochs: "(unset)" -> {run.identity["spec"]["train.epochs"]}']


def test_summaries_from_before_run_identities_are_carried_over(tmp_path, monkeypatch):
    """A summary keyed by the spec file's name and the overrides (as before) is the present row's run when
    its key matches and its spec file reads as at the commit that added it; it then records that
    commit."""
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load(Path(find_spec_file("quickstart")).read_text())
    Path("mine.yaml").write_text(yaml.safe_dump(spec))
    study = StudySpec.model_validate({"name": "s", "base": "mine.yaml", "rows": [{"name": "x", "seeds": 2}]})
    x0, x1 = plan(study)
    for run in (x0, x1):
        run.summary_path.parent.mkdir(parents=True, exist_ok=True)
        key = run.legacy_key if run.seed == 0 else "0badc0de"
        run.summary_path.write_text(
            json.dumps({"seed": run.seed, "key": key, "accuracy": {"acc1/student": 1.0}})
        )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    x0, x1 = plan(study)
    assert (x0.status(), x1.status()) == ("done", "stale")
    assert x1.changes() == ["trained with other overrides (before run identities)"]
    carried = x0.summary()
    assert carried["code"]["commit"] == commit and carried["carried_over"] == x0.legacy_key
    assert carried["key"] == x0.key and carried["identity"] == x0.identity
    assert persist_carried_over(plan(study)) == 1
    assert json.loads(x0.summary_path.read_text())["identity"] == x0.identity

    x0.summary_path.write_text(json.dumps({"seed": 0, "key": x0.legacy_key, "accuracy": {}}))
    Path("mine.yaml").write_text(yaml.safe_dump({**spec, "train": {**spec["train"], "epochs": 7}}))
    x0 = plan(study)[0]
    assert x0.status() == "stale" and x0.changes() == [f"spec file mine.yaml changed since {commit[:7]}"]


def test_the_dry_run_shows_a_row_waiting_for_a_redone_row_whose_files_are_elsewhere(
    tmp_path, monkeypatch, fashion_mnist
):
    """Rows single and single4 are done (committed summaries) but their run directories are not on this
    machine, as after a checkout: the dry run says that both = average of the two cannot start and names
    the fix; with --redo single, that it waits for single and still needs single4's files (the dry run
    used to stop with an error line even then). The real run stops with the same fix."""
    monkeypatch.chdir(tmp_path)
    teacher = "{{weight_bits: {1}, act_bits: {1}, trainable: false, weights: '{{row:{0}}}/{2}'}}"
    pairs = (("single", 2), ("single4", 4))
    teachers = ", ".join(teacher.format(row, bits, "student.safetensors") for row, bits in pairs)
    both = {"name": "both", "set": ["method=average_teacher", "distill={alpha: 1.0, beta: 0.5, tau: 2.0}",
                                    f"teachers=[{teachers}]"]}  # fmt: skip
    rows = [{"name": "single", "set": SINGLE}, {"name": "single4", "set": [*SINGLE, "student.weight_bits=4"]}]
    study = load_study(write_study(tmp_path, [*rows, both]))
    for run in plan(study, ["single", "single4"]):
        write_summary_by_hand(run, 50.0)

    def dry(*args) -> dict[str, str]:
        lines: list[str] = []
        dry_run(study, *args, log=lines.append)
        return {line.split()[0]: line for line in lines if line.startswith("  ") and " seed 0 " in line}

    fix = "which is not on this machine; train it again with --redo"
    assert (
        f"new, cannot start: needs the finished run of row(s) single,single4, {fix} single,single4"
        in (dry(["both"])["both"])
    )
    lines = dry(["single", "both"], ["single"])
    assert "new (redo)" in lines["single"], lines
    waits = "waits for single (--redo), cannot start: needs the finished run of row(s) single4"
    assert f"{waits}, {fix} single4" in lines["both"], lines
    with pytest.raises(UserError, match="train it again with --redo single"):
        run_study(study, rows=["both"], log=lambda _: None)


def test_an_interrupted_study_resumes_its_run_from_the_checkpoint(tmp_path, fashion_mnist):
    rows = [{"name": "single", "set": [*SINGLE, "data.train_subset=256", "train.epochs=4"]}]
    path = write_study(tmp_path, rows)
    run = plan(load_study(path))[0]
    latest = tmp_path / run.run_dir / "checkpoints" / "latest"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmtkd_graph", "study", "study.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its training process, as a power cut would
    proc.wait()
    assert latest.is_file(), proc.stdout.read().decode()[-2000:]
    assert not (tmp_path / run.run_dir / "final.json").exists()
    seconds_before = read_trainer_state(latest_checkpoint(tmp_path / run.run_dir))["seconds"]
    assert seconds_before > 0
    dry = study_cli(tmp_path, "--dry-run")
    assert " resume " in dry.stdout, dry.stdout

    result = study_cli(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(resume)" in result.stdout
    summary = json.loads((tmp_path / run.summary_path).read_text())
    assert summary["steps"] == 4 * 8  # all four epochs of 256 / 32
    assert [p["epoch"] for p in summary["curve"]] == [1, 2, 3, 4]
    # the trainer's own time, both processes: the killed one's up to its checkpoint, then the resumed one's
    assert summary["wall_s"] > seconds_before


def test_a_run_trained_before_runs_timed_themselves_has_a_time_only_if_every_process_was_timed(tmp_path):
    from cmtkd_graph.study.run import training_seconds

    assert training_seconds(tmp_path, {"seconds": 12.5}) == 12.5
    assert training_seconds(tmp_path, {"seconds": None}) is None  # resumed a checkpoint without the record
    assert training_seconds(tmp_path, {}) is None  # no study timed it
    (tmp_path / "study-time.json").write_text(json.dumps({"wall_s": 37.0, "attempts": 1}))
    (tmp_path / "train.log").write_text("started\nresumed from a\nresumed from b\ndone\n")
    assert training_seconds(tmp_path, {}) is None  # three processes, one of them timed
    (tmp_path / "study-time.json").write_text(json.dumps({"wall_s": 600.0, "attempts": 3}))
    assert training_seconds(tmp_path, {}) == 600.0


def test_rows_trained_on_different_machines_are_marked_in_the_table(tmp_path, monkeypatch):
    """Times and images/s are only comparable on one machine: with two, each row names its own."""
    from cmtkd_graph.study.report import write_report

    monkeypatch.chdir(tmp_path)
    study = StudySpec.model_validate(
        {"name": "s", "base": "quickstart", "rows": [{"name": "x", "seeds": 2}, {"name": "y"}]}
    )
    machines = {("x", 0): "CPU: Intel Xeon", ("x", 1): "CPU: AMD EPYC", ("y", 0): "CPU: AMD EPYC"}
    for run in plan(study):
        write_summary_by_hand(
            run, 50.0 + run.seed, wall_s=600.0 * (run.seed + 1), machine=machines[run.row.name, run.seed]
        )
    text = write_report(study).read_text()
    assert "| Time per run | Images/s | Machine | Paper |" in text
    teachers = "0: W4A4 trained, 1: W8A8 trained"  # the quickstart's, labelling the teacher columns
    assert f"| x | 2/2 | {teachers} | 50.50 ± 0.71 | – | – | 15.0 min | 100 | A, B |  |" in text
    assert f"| y | 1/1 | {teachers} | 50.00 | – | – | 10.0 min | 100 | A |  |" in text
    assert "A: CPU: AMD EPYC; B: CPU: Intel Xeon" in text

    (study.output_path / "runs" / "x" / "seed0.json").unlink()  # one machine left: no column
    text = write_report(study).read_text()
    assert "| Time per run | Images/s | Paper |" in text and "\nMachine: CPU: AMD EPYC\n" in text


def test_the_committed_results_page_is_what_the_study_writes_from_its_run_summaries(tmp_path, monkeypatch):
    """docs/results.md's table and results.json are rewritten from the committed run summaries by the
    committed code and the committed study file, and come out unchanged: every number on the page comes
    from a run made with the study's present settings (a summary with another key would drop out)."""
    from cmtkd_graph.study.report import write_report

    repo = Path(__file__).resolve().parents[1]
    study = load_study(repo / "studies" / "cifar10.yaml")
    committed_page = (repo / study.report_path).read_text()
    committed_json = json.loads((repo / study.output_path / "results.json").read_text())
    summaries = sorted((repo / study.output_path / "runs").glob("*/seed*.json"))
    assert summaries, "no committed run summaries"
    for path in summaries:
        copy = tmp_path / path.relative_to(repo)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    (tmp_path / study.report_path).write_text(committed_page)

    monkeypatch.chdir(tmp_path)
    written = write_report(study)
    assert json.loads((study.output_path / "results.json").read_text()) == committed_json
    assert written.read_text() == committed_page
    finished = sum(len(row["finished"]) for row in committed_json["rows"])
    assert finished == len(summaries)  # no summary left out for a stale key


# ---------------------------------------------------------------------------- statistics
def test_the_t_distribution_is_scipys():
    """The report's t distribution (no scipy at run time) against scipy: the incomplete beta function,
    the tail and the quantile."""
    import random

    from scipy import special, stats

    from cmtkd_graph.study.comparison import regularized_beta, t_quantile, t_sf

    rng = random.Random(0)
    for _ in range(500):
        a, b, x = rng.uniform(0.1, 60), rng.uniform(0.1, 5), rng.random()
        assert regularized_beta(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-12)
    for df in (1, 2, 3.557, 5, 30, 400):
        for t in (0.0, 0.3, 1.0, 2.5, 12.0):
            assert t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-15)
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_welch_and_paired_tests_give_scipys_numbers():
    """The key comparison of docs/results.md: CMT-KD's student against W2A2 alone, three seeds each."""
    from scipy import stats

    from cmtkd_graph.study.comparison import compare

    cmtkd, single = {0: 54.20, 1: 55.37, 2: 55.63}, {0: 51.48, 1: 53.25, 2: 53.50}
    c = compare("cmtkd", "single", "acc1/student", cmtkd, single)
    welch = stats.ttest_ind(list(cmtkd.values()), list(single.values()), equal_var=False)
    paired = stats.ttest_rel(list(cmtkd.values()), list(single.values()))
    interval = welch.confidence_interval(0.95)
    assert c.difference == pytest.approx(2.3233333, abs=1e-6) and c.pairs == 3
    assert (c.welch.t, c.welch.df, c.welch.p) == pytest.approx((welch.statistic, welch.df, welch.pvalue))
    assert (c.welch.low, c.welch.high) == pytest.approx((interval.low, interval.high))
    assert (round(c.welch.low, 2), round(c.welch.high, 2), round(c.welch.p, 3)) == (0.07, 4.58, 0.046)
    assert (c.paired.t, c.paired.p) == pytest.approx((paired.statistic, paired.pvalue))
    assert round(c.paired.p, 3) == 0.007
    one_seed = compare("a", "single", "acc1/student", {0: 56.44}, single)
    assert (
        one_seed.welch is None and one_seed.paired is None and one_seed.difference == pytest.approx(3.6966667)
    )


def test_the_report_tests_the_comparisons_the_study_names(tmp_path, monkeypatch):
    """Seeds pair by train.seed (two shared of three and two), a one-seed row gets no test, and the
    numbers in results.json are the table's."""
    from cmtkd_graph.study.report import write_report

    monkeypatch.chdir(tmp_path)
    study = StudySpec.model_validate(
        {
            "name": "s",
            "base": "quickstart",
            "rows": [{"name": "x", "seeds": 3}, {"name": "y", "seeds": 2}, {"name": "z"}],
            "comparisons": [{"rows": ["x", "z"], "against": "y", "metrics": ["acc1/student"]}],
            "references": [{"label": "y's level", "row": "y", "metric": "acc1/student"}],
        }
    )
    values = {("x", 0): 60.0, ("x", 1): 62.0, ("x", 2): 61.0, ("y", 0): 55.0, ("y", 1): 58.0, ("z", 0): 59.0}
    for run in plan(study):
        write_summary_by_hand(run, values[run.row.name, run.seed])
    text = write_report(study).read_text()
    results = json.loads((study.output_path / "results.json").read_text())
    x_vs_y, z_vs_y = results["comparisons"]
    assert (x_vs_y["a"], x_vs_y["b"], x_vs_y["pairs"]) == ("x", "y", 2)
    assert x_vs_y["difference"] == pytest.approx(61.0 - 56.5)
    assert x_vs_y["paired"]["difference"] == pytest.approx(((60 - 55) + (62 - 58)) / 2)  # seeds 0 and 1
    welch, paired = x_vs_y["welch"], x_vs_y["paired"]
    assert (  # one test in the table: Holm's p is Welch's
        f"| x vs y | student top-1 | 3 vs 2 | +4.50 | [{welch['low']:+.2f}, {welch['high']:+.2f}] "
        f"| {welch['p']:.3f} | {welch['p']:.3f} | {paired['p']:.3f} (2 pairs) |" in text
    )
    assert (
        z_vs_y["welch"] is None
        and "| z vs y | student top-1 | 1 vs 2 | +2.50 | one seed: no test | – | – | – |" in text
    )
    assert "an exact permutation test, which needs none, cannot give a p below 3 vs 2: 0.20." in text
    assert "Reference: y's level: 56.50 (student top-1 of y)." in text
    assert "| x | 3/3 | 0: W4A4 trained, 1: W8A8 trained |" in text  # what the teacher columns hold

    # seed 1 of y trained on another machine: the same seed there is another sample, not a pair
    y1 = next(r for r in plan(study) if (r.row.name, r.seed) == ("y", 1))
    write_summary_by_hand(y1, 58.0, machine="CPU: elsewhere")
    write_report(study)
    x_vs_y = json.loads((study.output_path / "results.json").read_text())["comparisons"][0]
    assert x_vs_y["pairs"] == 1 and x_vs_y["paired"] is None


def test_holms_adjustment_and_the_permutation_floor_hand_computed():
    from cmtkd_graph.study.comparison import holm, smallest_permutation_p

    # sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (never below the one before); at most 1
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert (
        holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
        and holm([0.6]) == [0.6]
        and holm([0.9, 0.8]) == [1.0, 1.0]
    )
    assert smallest_permutation_p(3, 3) == pytest.approx(0.1)  # 2 of C(6, 3) = 20 splits
    assert smallest_permutation_p(3, 2) == pytest.approx(0.2)


def test_comparisons_and_references_must_name_rows():
    rows = [{"name": "single"}, {"name": "cmtkd"}]
    with pytest.raises(Exception) as err:
        StudySpec.model_validate(
            {
                "name": "s",
                "base": "quickstart",
                "rows": rows,
                "comparisons": [{"rows": ["cmtdk"], "against": "single"}],
                "references": [{"label": "l", "row": "singel", "metric": "acc1/student"}],
                "chart": ["acc1/teachers"],
            }
        )
    text = str(err.value)
    assert "comparisons[0].rows[0]: no row 'cmtdk' (did you mean cmtkd?)" in text
    assert "references[0].row: no row 'singel' (did you mean single?)" in text
    assert "chart: name one teacher (acc1/teacher0), not acc1/teachers" in text


def test_the_papers_setting_on_a_gpu_runs_on_a_cpu_in_a_tiny_mode(tmp_path, tiny_cifar100):
    """studies/cifar100_paper.yaml as committed (the paper's Table 2 setting: CIFAR-100, CIFAR stem,
    batch 256, 120 equal epochs, the compute-matched control at 480, the device pipeline), shrunk only in
    size: its dry run prints each row's FLOPs and GPU estimate, and CMT-KD trains, recording its step's
    FLOPs per image (the throughput columns need a GPU's peak, so there are none on a CPU). Its CIFAR-10
    variant validates with the same rows."""
    repo = Path(__file__).resolve().parents[1]
    study = yaml.safe_load((repo / "studies" / "cifar100_paper.yaml").read_text())
    assert "dataset: cifar100" in study["set"][0] and "pipeline: device" in study["set"][0]
    assert [r["name"] for r in study["rows"]] == ["single_w2a2", "cmtkd", "single_w2a2_long"]
    variant = load_study(repo / "studies" / "cifar10_fullscale.yaml")
    assert [r.name for r in variant.rows] == [r["name"] for r in study["rows"]]
    tiny = [
        f"data.root={tiny_cifar100}",
        "data.download=false",
        "data.batch_size=16",
        "data.eval_batch_size=50",
        "data.num_workers=0",
        "train.mixed_precision=no",
        "train.max_steps=2",
    ]
    study.update(output_dir="out", report="out/results.md", runs_dir="runs")
    study["set"] = [*study["set"], *tiny]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    dry = study_cli(tmp_path, "--dry-run", "--rows", "cmtkd,single_w2a2_long")
    assert dry.returncode == 0, dry.stderr[-3000:]
    study["rows"][1]["seeds"] = 1  # train one seed of CMT-KD here
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    estimates = re.findall(
        r"PFLOP: ~\S+ (?:min|h) on an H100 at an assumed 25 % of its bf16 peak", dry.stdout
    )
    assert len(estimates) == 4, dry.stdout  # 3 seeds of CMT-KD, 1 of the control
    result = study_cli(tmp_path, "--rows", "cmtkd")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "runs" / "cmtkd" / "seed0.json").read_text())
    assert summary["steps"] == 2 and summary["channels_last"] is True
    assert summary["train_gflop_per_image"] == pytest.approx(13.4, abs=0.1)  # 4 CIFAR-stem resnet18s
    assert summary["peak_bf16_tflops"] is None
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| CMT-KD (W2A2 student; teachers 4/6/8-bit) | 1/1 |" in report, report
    assert "TFLOP/s" not in report
    assert "rows are the paper's setting; the 480-epoch control is not in the paper" in report


def test_gpu_runs_show_their_tflops_and_share_of_the_peak(tmp_path, monkeypatch):
    from cmtkd_graph.study.report import write_report

    monkeypatch.chdir(tmp_path)
    study = StudySpec.model_validate({"name": "s", "base": "quickstart", "rows": [{"name": "x"}]})
    (run,) = plan(study)
    write_summary_by_hand(
        run,
        70.0,
        wall_s=300.0,
        images_per_s=9000.0,
        machine="GPU: test",
        train_gflop_per_image=13.3,
        peak_bf16_tflops=989.0,
    )
    text = write_report(study).read_text()
    assert "| Time per run | Images/s | TFLOP/s | % of bf16 peak | Paper |" in text
    assert "| 5.0 min | 9000 | 119.7 | 12.1 % |  |" in text  # 9000 x 13.3 GFLOP = 119.7 TFLOP/s of 989
