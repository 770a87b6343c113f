"""``train.fit_to_budget``: a run on a time budget that still ends its schedule.

``train.max_minutes`` alone stops a run wherever the budget runs out: with the paper's schedule (lr 0.1
until epoch 50 of 120) a 5-minute run stops at the high learning rate and is evaluated there, a number
that says little about the method. With ``fit_to_budget`` the run first times its training step (the
precision probe's timing: the median step of the spec's own system, objective and optimizer on random
inputs of its batch), then trains as many whole epochs as the budget holds, ``train.epochs`` at most, with the
schedule's warm-up and milestones scaled in proportion: the same schedule, compressed. A method's own
epoch settings follow where they derive from ``train.epochs`` (AMTML-KD's phases).

The fit is made once, on the main process, recorded in ``RUN_DIR/budget.json`` and applied as overrides
of the spec; a resumed run re-applies the recorded overrides instead of timing again, so it continues the
same schedule. ``train.max_minutes`` still stops the run if the estimate was wrong: the timing is the
step's compute on random inputs, so a run whose loader cannot keep up (images decoded on a few CPU
cores) or a machine busy with other work takes longer than planned.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmtkd_graph.spec import Spec

RUN_FILE = "budget.json"
# The share of the budget a fitted run plans to use: loading, logging and checkpoints add to the timed
# step (the median of TIMED_STEPS after a warm-up).
PLANNED_SHARE = 0.9
TIMED_STEPS = 7
# evaluation is a forward pass of every network: about a third of a training step per image
EVAL_COST = 1 / 3


@dataclass
class BudgetFit:
    """The outcome of fitting a run to its time budget (what ``budget.json`` holds)."""

    minutes: float
    requested_epochs: int
    epochs: int
    seconds_per_step: float
    steps_per_epoch: int
    eval_seconds: float
    overrides: list[str] = field(default_factory=list)

    def describe(self) -> str:
        fits = "all" if self.epochs == self.requested_epochs else f"{self.epochs}"
        line = (
            f"train.fit_to_budget: {self.steps_per_epoch} steps of {self.seconds_per_step:.3g} s per epoch "
            f"(timed) and {self.eval_seconds:.3g} s per evaluation: {fits} of {self.requested_epochs} "
            f"epochs fit in {self.minutes:g} min"
        )
        line += f"; training with {', '.join(self.overrides)}" if self.overrides else ""
        one_epoch = run_seconds(1, self.steps_per_epoch, self.seconds_per_step, self.eval_seconds, 1)
        if self.epochs == 1 and one_epoch > PLANNED_SHARE * 60 * self.minutes:
            line += " (not even one fits: max_minutes stops the run within its first epoch)"
        return line


def run_seconds(
    epochs: int, steps_per_epoch: int, seconds_per_step: float, eval_seconds: float, eval_every: int
) -> float:
    """Planned seconds of ``epochs``: their steps and the evaluations (every ``eval_every`` epochs and
    after the last)."""
    return epochs * steps_per_epoch * seconds_per_step + math.ceil(epochs / eval_every) * eval_seconds


def evaluation_seconds(seconds_per_step: float, eval_images: float, images_per_step: int) -> float:
    """Planned seconds of one evaluation: a forward pass of every network, ``EVAL_COST`` of a training
    step per image."""
    return EVAL_COST * seconds_per_step * eval_images / images_per_step


def fitted_epochs(
    minutes: float,
    requested_epochs: int,
    seconds_per_step: float,
    steps_per_epoch: int,
    eval_seconds: float,
    eval_every: int,
) -> int:
    """The most whole epochs, at least 1 and at most ``requested_epochs``, whose steps and evaluations
    (:func:`run_seconds`) take at most ``PLANNED_SHARE`` of the budget."""
    budget = PLANNED_SHARE * 60 * minutes
    epochs = requested_epochs
    while (
        epochs > 1
        and run_seconds(epochs, steps_per_epoch, seconds_per_step, eval_seconds, eval_every) > budget
    ):
        epochs -= 1
    return epochs


def schedule_overrides(spec: Spec, epochs: int) -> list[str]:
    """The spec overrides that train ``epochs`` instead of ``train.epochs`` with the same schedule:
    warm-up and milestones scaled by epochs / train.epochs (none if the length stays)."""
    requested = spec.train.epochs
    if epochs == requested:
        return []
    scale = epochs / requested
    schedule = spec.optim.schedule
    overrides = [f"train.epochs={epochs}"]
    if schedule.warmup_epochs:
        overrides.append(f"optim.schedule.warmup_epochs={round(schedule.warmup_epochs * scale, 4):g}")
    if schedule.milestones:
        milestones = ", ".join(f"{round(m * scale, 4):g}" for m in schedule.milestones)
        overrides.append(f"optim.schedule.milestones=[{milestones}]")
    return overrides


def steps_per_epoch(spec: Spec, train_images: int) -> int:
    """Optimizer steps in an epoch of ``train_images`` (the loader drops the last partial batch)."""
    return max(train_images // spec.data.batch_size, 1)


def fit_to_budget(spec: Spec, device: torch.device, precision, bundle, processes: int) -> BudgetFit:
    """Time a training step of ``spec`` in ``precision`` and fit the run's length to
    ``train.max_minutes``."""
    from cmtkd_graph.runtime.precision import probe

    t = spec.train
    accum = t.grad_accum_steps or 1
    per_process = max(spec.data.batch_size // (processes * accum), 1)
    option = (precision.mixed_precision, precision.channels_last)
    timed = probe(spec, device, per_process, [option], repeat=TIMED_STEPS, summary=statistics.median)
    step = next(iter(timed.values())) * accum
    per_epoch = steps_per_epoch(spec, len(bundle.train))
    eval_seconds = evaluation_seconds(step, len(bundle.eval) / processes, per_process * accum)
    epochs = fitted_epochs(t.max_minutes, t.epochs, step, per_epoch, eval_seconds, t.eval_every)
    return BudgetFit(
        minutes=t.max_minutes,
        requested_epochs=t.epochs,
        epochs=epochs,
        seconds_per_step=round(step, 6),
        steps_per_epoch=per_epoch,
        eval_seconds=round(eval_seconds, 3),
        overrides=schedule_overrides(spec, epochs),
    )


def recorded_fit(run_dir: Path) -> BudgetFit | None:
    """The fit a run made at its start (``budget.json``), if it made one."""
    path = Path(run_dir) / RUN_FILE
    return BudgetFit(**json.loads(path.read_text())) if path.is_file() else None


def write_record(run_dir: Path, fit: BudgetFit) -> None:
    (Path(run_dir) / RUN_FILE).write_text(json.dumps(asdict(fit), indent=1) + "\n")
