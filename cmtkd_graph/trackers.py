"""Experiment trackers (``train.log_with``: tensorboard, mlflow, wandb, ...) through Accelerate's tracker
API: the same scalars as ``metrics.jsonl``, the resolved spec as parameters, and the run's files
(``importance.png``, ``final.json``) as artifacts where the tracker takes files.

Where a tracker stores its data is its own setting, read from its environment as usual
(``MLFLOW_TRACKING_URI``, ``WANDB_MODE=offline``, ...). A resumed run continues the tracker runs it
started (their ids are kept in ``RUN_DIR/trackers.json``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from cmtkd_graph.errors import UserError
from cmtkd_graph.identity import flatten

# tracker name -> (the module it needs, the extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", None),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", None),
    "aim": ("aim", None),
    "comet_ml": ("comet_ml", None),
    "clearml": ("clearml", None),
    "dvclive": ("dvclive", None),
}
RECORD = "trackers.json"


def trackers(spec) -> list[str]:
    """The trackers a spec asks for (``train.tensorboard: true`` is ``log_with: [tensorboard]``)."""
    names = list(spec.train.log_with)
    if spec.train.tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def check_installed(names: list[str]) -> None:
    """One line per missing tracker package: Accelerate would silently drop the tracker."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'cmtkd-graph[{extra}]'" if extra else f"pip install {module}"
            raise UserError(f"train.log_with: {name} needs the {module} package: {how}")


def parameters(spec) -> dict[str, Any]:
    """The resolved spec as flat parameters (``optim.lr``, ``teachers.0.weight_bits``); values that are
    not numbers, strings or booleans as JSON."""
    flat = flatten(spec.model_dump(mode="json"))
    return {_key(k): v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flat.items()}


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: numbers as they are, lists (importance weights) one
    scalar per element (``importance/layer1/0``); ``kind`` and ``step`` are not values."""
    flat = flatten({k: v for k, v in record.items() if k not in ("kind", "step")})
    out = {}
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_key(key, "/")] = float(value)
    return out


def start(accelerator, spec, run_dir: Path) -> None:
    """Start the trackers on the main process, continuing the tracker runs of an earlier attempt."""
    names = trackers(spec)
    if not names or not accelerator.is_main_process:
        return
    earlier = _read_record(run_dir)
    init_kwargs: dict[str, dict] = {}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {
            "run_name": run_dir.name,
            **({"run_id": earlier["mlflow"]} if "mlflow" in earlier else {}),
        }
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(run_dir), "resume": "allow",
                                **({"id": earlier["wandb"]} if "wandb" in earlier else {})}  # fmt: skip
    try:
        accelerator.init_trackers(spec.name, config=parameters(spec), init_kwargs=init_kwargs)
    except Exception as err:  # a tracker's own setting (its store, its login): one line, not its traceback
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"train.log_with: a tracker could not start: {first[:300]}") from None
    ids = dict(earlier)
    if "mlflow" in names:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if "wandb" in names:
        ids["wandb"] = accelerator.get_tracker("wandb", unwrap=True).id
    (run_dir / RECORD).write_text(json.dumps(ids) + "\n")


def log(accelerator, spec, record: dict) -> None:
    if trackers(spec):
        accelerator.log(scalars(record), step=record["step"])


def finish(accelerator, spec, run_dir: Path) -> None:
    """Hand the run's files to the trackers that take files, then end the tracker runs."""
    names = trackers(spec)
    if not names:
        return
    if accelerator.is_main_process:
        files = [p for p in (run_dir / "importance.png", run_dir / "final.json") if p.is_file()]
        if "mlflow" in names:
            import mlflow

            for path in files:
                mlflow.log_artifact(str(path))
        if "wandb" in names:
            run = accelerator.get_tracker("wandb", unwrap=True)
            for path in files:
                run.save(str(path), base_path=str(run_dir), policy="now")
    accelerator.end_training()


def _key(path: str, separator: str = ".") -> str:
    """A key path as trackers accept it: ``teachers[0].arch`` -> ``teachers.0.arch`` (MLflow allows no
    brackets); list elements of a metric with ``/`` (``importance/layer1/0``)."""
    return path.replace("[", separator).replace("]", "")


def _read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
