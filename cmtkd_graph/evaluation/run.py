"""``cmtkd-graph eval RUN_DIR``: evaluate a run again, from its last checkpoint or any other.

The run's own spec (``RUN_DIR/spec.yaml``, with ``--set`` overrides such as ``data.root=...``) builds the
system and the data exactly as training did, so on the run's own data the numbers equal those in its
``final.json``. A checkpoint holds the whole system (student, teachers, fusion): every network is
evaluated. A run without checkpoints has only its final ``student.safetensors``: the student alone is.
Works under ``accelerate launch`` (each image counted once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from cmtkd_graph.deploy.student import (
    SPEC_FILE,
    STUDENT_FILE,
    load_state,
    read_system_state,
    resolve_checkpoint,
)
from cmtkd_graph.ema import EMA_FILE, StudentAverage
from cmtkd_graph.errors import UserError
from cmtkd_graph.evaluation.accuracy import OBJECTS, StudentOnly, evaluate
from cmtkd_graph.registry import TASKS
from cmtkd_graph.runtime.layout import channels_last_module
from cmtkd_graph.safe_files import read_tensors
from cmtkd_graph.spec import EmaSpec
from cmtkd_graph.tasks import task_record

log = logging.getLogger("cmtkd_graph")
SPLITS = ("test", "train")


def evaluate_run(
    run_dir: str | Path,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
) -> dict:
    """Evaluate ``run_dir``; write the result as JSON (main process) and return it."""
    from cmtkd_graph.data import build_datasets
    from cmtkd_graph.data.loaders import build_eval_loader, eval_batch_size
    from cmtkd_graph.runtime.precision import fixed_precision, recorded_precision
    from cmtkd_graph.runtime.process import make_accelerator, set_cpu_threads
    from cmtkd_graph.spec.io import load_spec
    from cmtkd_graph.system import build_system

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / SPEC_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {SPEC_FILE})")
    if split not in SPLITS:
        raise UserError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    spec = load_spec(run_dir / SPEC_FILE, overrides)
    source = _state_source(run_dir, checkpoint)
    # the precision the run trained with, so the numbers match final.json
    precision = recorded_precision(run_dir) or fixed_precision(spec)
    accelerator = make_accelerator(spec, run_dir, precision)
    set_cpu_threads(spec, accelerator)
    system = build_system(spec, load=False)
    if source.name == STUDENT_FILE:
        load_state(system.student, read_tensors(source, what="student"), origin=source)
        model: nn.Module = StudentOnly(system.student)
    else:
        load_state(system, read_system_state(source), origin=source)
        model = system
    if precision.channels_last:
        model = channels_last_module(model)
    with accelerator.main_process_first():
        bundle = build_datasets(spec.data)
    dataset = bundle.eval if split == "test" else bundle.train_eval
    batch = eval_batch_size(spec.data, accelerator.num_processes, accelerator.gradient_accumulation_steps)
    loader = build_eval_loader(bundle, spec.data, dataset, batch_size=batch, seed=spec.train.seed)
    model, loader = accelerator.prepare(model, loader)
    record = {
        "run_dir": str(run_dir),
        "state": str(source),
        "split": split,
        "processes": accelerator.num_processes,
        "task": spec.resolved_task,
        **evaluate(
            model,
            loader,
            accelerator,
            task=task_record(spec.student.arch),
            channels_last=precision.channels_last,
        ),
    }
    if source.is_dir() and (source / EMA_FILE).is_file():  # a checkpoint of a run with train.ema
        saved = StudentAverage(system.student, spec.train.ema or EmaSpec())
        saved.load(source)  # as a resumed run reads it
        average = saved.student
        if precision.channels_last:
            average = channels_last_module(average)
        with accelerator.autocast():  # the precision the prepared system is evaluated in
            alone = evaluate(
                StudentOnly(average.to(accelerator.device)),
                loader,
                accelerator,
                task=task_record(spec.student.arch),
                channels_last=precision.channels_last,
            )
        record.update({k.replace("/student", "/student_ema"): v for k, v in alone.items() if "/student" in k})
    objects = record.pop(OBJECTS, {})
    if accelerator.is_main_process:
        path = Path(out) if out else run_dir / "eval" / f"{_label(source)}-{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if objects:  # detections, as COCO results: <record>-detections/<network>.json
            folder = path.with_name(path.stem + "-detections")
            folder.mkdir(exist_ok=True)
            for name, found in objects.items():
                (folder / f"{name}.json").write_text(json.dumps(found))
            record["detections"] = str(folder)
        path.write_text(json.dumps(record, indent=1))
        record["written"] = str(path)
    return record


def _state_source(run_dir: Path, checkpoint: str | None) -> Path:
    """The checkpoint (or final student file) to evaluate: by default the last checkpoint if the run
    kept any, else its final student."""
    if checkpoint is not None:
        return resolve_checkpoint(run_dir, checkpoint)
    if (run_dir / "checkpoints" / "latest").is_file():
        return resolve_checkpoint(run_dir, "latest")
    if (run_dir / STUDENT_FILE).is_file():
        return run_dir / STUDENT_FILE
    raise UserError(f"{run_dir} has neither a checkpoint nor a final {STUDENT_FILE}: nothing to evaluate")


def _label(source: Path) -> str:
    return "student" if source.name == STUDENT_FILE else source.stem


def table(record: dict, recorded: dict | None = None) -> str:
    """The networks' metrics (the task's: top-1/top-5, mIoU/pixel accuracy); with ``recorded``
    (final.json's), the first of them beside."""
    task = TASKS.get(record.get("task", "classification"))
    titles = task.metric_titles
    keys, first = list(titles), next(iter(titles))
    names = [k.split("/", 1)[1] for k in record if k.startswith(f"{first}/")]
    header = f"{'network':10s} " + " ".join(f"{titles[k]:>12s}" for k in keys)
    if recorded:
        header += f" {'final.json ' + titles[first].removesuffix(' %'):>20s}"
    lines = [
        f"{record['split']} split, {record['samples']} {task.sample_noun}s, state {record['state']}",
        header,
    ]
    for name in names:
        line = f"{name:10s} " + " ".join(f"{record.get(f'{k}/{name}', float('nan')):12.2f}" for k in keys)
        if recorded and f"{first}/{name}" in recorded:
            line += f" {recorded[f'{first}/{name}']:20.2f}"
        lines.append(line)
    if "written" in record:
        lines.append(f"written to {record['written']}")
    return "\n".join(lines)


def recorded_accuracy(run_dir: Path, record: dict) -> dict | None:
    """The accuracies ``final.json`` recorded, when ``record`` evaluated the same state and split."""
    final = run_dir / "final.json"
    if record["split"] != "test" or not final.is_file():
        return None
    summary = json.loads(final.read_text())
    accuracy = summary.get("accuracy")
    if record["state"].endswith(STUDENT_FILE):
        if summary.get("student_weights") == "ema" and accuracy:  # the final student is the average
            accuracy = {
                k.replace("/student_ema", "/student"): v for k, v in accuracy.items() if "/student_ema" in k
            }
        return accuracy
    return accuracy if summary.get("checkpoint") == record["state"] else None
