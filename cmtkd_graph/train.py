"""Joint training: ``accelerate launch -m cmtkd_graph.train SPEC [--set k=v ...] [--resume RUN_DIR]``.

Also ``python -m cmtkd_graph.train ...`` and ``cmtkd-graph train ...``. One CPU, one GPU, several
GPUs, or several CPU processes (the process set-up, the same for evaluation, is in
``cmtkd_graph.runtime``): ``run`` prepares the run directory, :class:`Trainer` is the loop.

A run writes ``RUN_DIR/``: ``spec.yaml`` (resolved), ``identity.json`` (the spec's content hash, its weights
files' hashes, the code's version and git commit), ``metrics.jsonl``, ``train.log``,
``importance.png``, ``checkpoints/`` (crash-safe, ``--resume`` continues from the last one),
``student.safetensors`` (the final student, torchvision parameter names) and ``final.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cmtkd_graph import run_directory, trackers
from cmtkd_graph.checkpoint import (
    RESUMED,
    check_checkpoint,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from cmtkd_graph.cli_common import EXIT_PREEMPTED, EXIT_USER_ERROR, add_train_args, user_error_lines
from cmtkd_graph.data.bundle import DataBundle
from cmtkd_graph.data.device import DeviceBatches
from cmtkd_graph.data.loaders import eval_batch_size
from cmtkd_graph.ema import StudentAverage
from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.evaluation.accuracy import OBJECTS, StudentOnly, eval_line, evaluate
from cmtkd_graph.identity import write_identity
from cmtkd_graph.metrics import MetricsLog, plot_importance, read_metrics
from cmtkd_graph.runtime.budget import BudgetFit, fit_to_budget, recorded_fit
from cmtkd_graph.runtime.budget import write_record as write_budget_record
from cmtkd_graph.runtime.layout import channels_last_module, channels_last_tensor
from cmtkd_graph.runtime.precision import Precision, recorded_precision, resolve_precision
from cmtkd_graph.runtime.precision import write_record as write_precision_record
from cmtkd_graph.runtime.process import (
    distributed_state,
    end_processes,
    log_to_file,
    make_accelerator,
    set_cpu_threads,
    setup_logging,
)
from cmtkd_graph.safe_files import refused_global
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec.io import apply_overrides, dump_spec, load_spec, validate_spec
from cmtkd_graph.tasks import task_record

log = logging.getLogger("cmtkd_graph")


def run(spec_path: str | Spec | None, overrides: Sequence[str] = (), *, resume: str | None = None) -> Path:
    """Train as the spec says; returns the run directory.

    ``spec_path``: a spec file, a packaged example's name, or a :class:`Spec`. ``resume``: a run
    directory to continue from its last checkpoint, or ``"auto"``: the spec's own run directory,
    continued where it has a checkpoint and started fresh in it otherwise (what a scheduler that
    requeues a preempted job runs every time). The run directory is locked while training and
    cleaned up as ``cmtkd_graph.run_directory`` says. SIGTERM or SIGUSR1 stops training at the next
    optimizer step with a checkpoint and raises :class:`Preempted`.
    """
    from accelerate.utils import set_seed

    if spec_path is None and resume in (None, AUTO):
        raise UserError(
            "a spec is required (a YAML file or a packaged example such as quickstart)"
            if resume is None
            else "--resume auto: give the spec too (its train.output_dir is the run directory)"
        )
    given = _load(spec_path, overrides) if spec_path is not None else None
    if resume in (None, AUTO):
        mode, target = ("new" if resume is None else "auto"), Path(given.run_dir)
    else:
        mode, target = "resume", Path(resume)
        if given is None and not (target / "spec.yaml").is_file():
            raise UserError(f"--resume: {target / 'spec.yaml'} not found (is {target} a run directory?)")

    state = distributed_state()
    setup_logging(state.is_main_process)
    directory = run_directory.take(state, target, mode)
    run_dir, main, trainer = directory.path, state.is_main_process, None
    try:
        source = spec_path if spec_path is not None else run_dir / "spec.yaml"
        spec = given if given is not None else _load(source, overrides)
        checkpoint = latest_checkpoint(run_dir) if directory.resumed else None
        if checkpoint is not None:
            check_checkpoint(checkpoint, state.process_index)
        recorded = recorded_precision(run_dir) if directory.resumed else None
        recorded_length = recorded_fit(run_dir) if directory.resumed else None

        from cmtkd_graph.data import build_datasets

        set_cpu_threads(spec, state)
        with state.main_process_first():  # missing data is reported before any probing
            bundle = build_datasets(spec.data)
        precision = resolve_precision(spec, state, recorded=recorded)
        length = None
        if spec.train.fit_to_budget:
            length = _fit_length(spec, state, precision, bundle, recorded_length, resumed=directory.resumed)
            spec = _load(source, [*overrides, *length.overrides])
        accelerator = make_accelerator(spec, run_dir, precision)
        if spec.data.eval_batch_size is None:  # recorded in spec.yaml: what evaluation used
            size = eval_batch_size(
                spec.data, accelerator.num_processes, accelerator.gradient_accumulation_steps
            )
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"eval_batch_size": size})})
        if main:
            (run_dir / "spec.yaml").write_text(dump_spec(spec))
            write_identity(run_dir, spec, resumed=directory.resumed)
            write_precision_record(run_dir, precision)
            if length is not None:
                write_budget_record(run_dir, length)
            log_to_file(run_dir)
        accelerator.wait_for_everyone()
        log.info(
            f"run {run_dir}: {accelerator.num_processes} process(es), {accelerator.distributed_type}, "
            f"device {accelerator.device}, {torch.get_num_threads()} CPU thread(s) per process"
        )
        log.info(f"precision: {precision.describe()}")
        if length is not None:
            log.info(length.describe())
        set_seed(spec.train.seed)
        with stop_signals() as stop:
            trainer = Trainer(spec, accelerator, run_dir, checkpoint, precision, bundle, stop=stop)
            return trainer.fit()
    except BaseException:
        if main and (trainer is None or trainer.state["step"] == 0):
            directory.remove_failed_start()  # a fresh start only; nothing that was there before
        raise
    finally:
        directory.release()


def _load(source: str | Path | Spec, overrides: Sequence[str]) -> Spec:
    """The spec from a file or packaged example, or a :class:`Spec` given as it is, with ``overrides``."""
    if isinstance(source, Spec):
        if not overrides:
            return source
        return validate_spec(apply_overrides(source.model_dump(mode="json"), overrides))
    return load_spec(source, overrides)


def _fit_length(
    spec: Spec, state, precision: Precision, bundle: DataBundle, recorded: BudgetFit | None, *, resumed: bool
) -> BudgetFit:
    """train.fit_to_budget: the run's length, timed on the main process and shared with every process;
    a resumed run keeps the length it was fitted to at its start."""
    from accelerate.utils import broadcast_object_list

    if recorded is not None:
        return recorded
    if resumed:
        raise UserError(
            "train.fit_to_budget: this run started without it (no budget.json), and a run's length cannot "
            "change halfway; resume it without train.fit_to_budget"
        )
    fit: list[BudgetFit | None] = [None]
    if state.is_main_process:
        fit = [fit_to_budget(spec, state.device, precision, bundle, state.num_processes)]
    if state.num_processes > 1:
        broadcast_object_list(fit)
    return fit[0]


AUTO = "auto"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped at a step because the process was asked to (SIGTERM, SIGUSR1), after writing a
    checkpoint there."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"{signal_name}: stopped at step {step}; checkpoint {checkpoint}; continue with --resume auto "
            "(or --resume RUN_DIR)"
        )


def host_group(accelerator):
    """The process group for host values (the stop flags): None for one process or where the default
    group is gloo already (CPU runs); else a gloo group beside the accelerator's (NCCL's), so that
    agreeing on a flag never waits for the device's queued work."""
    if accelerator.num_processes == 1:
        return None
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


@contextlib.contextmanager
def stop_signals():
    """While training: SIGTERM and SIGUSR1 (what Slurm sends before it kills or requeues a job) only
    record that the run must stop; the training loop then stops at its next step with a checkpoint.
    The previous handlers come back afterwards. Outside the main thread (no signals there) nothing is
    installed."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum, frame):
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Trainer:
    """The training loop; one instance per process."""

    def __init__(
        self,
        spec: Spec,
        accelerator,
        run_dir: Path,
        checkpoint: Path | None,
        precision: Precision,
        bundle: DataBundle,
        stop: list[str] | None = None,
    ):
        from cmtkd_graph.data import build_loaders
        from cmtkd_graph.data.mixing import batch_mixing
        from cmtkd_graph.optim import build_optimizer, build_scheduler
        from cmtkd_graph.system import build_system

        self.spec, self.acc, self.run_dir = spec, accelerator, run_dir
        self.task = task_record(spec.student.arch)
        self.stop = stop if stop is not None else []  # the stop signals received (stop_signals)
        self.precision = precision
        self.channels_last = precision.channels_last
        t = spec.train
        world, accum = accelerator.num_processes, accelerator.gradient_accumulation_steps
        if spec.data.batch_size % (world * accum):
            raise UserError(
                f"data.batch_size: {spec.data.batch_size} is not divisible by {world} process(es) x "
                f"{accum} accumulation step(s)"
            )
        per_process = spec.data.batch_size // (world * accum)
        self.bundle = bundle
        train_loader, eval_loader = build_loaders(
            self.bundle,
            spec.data,
            train_batch_size=per_process,
            eval_batch_size=eval_batch_size(spec.data, world, accum),
            seed=t.seed,
            device=accelerator.device,
            rank=accelerator.process_index,
            processes=world,
        )
        system = build_system(spec)
        self._check_classes(system, self.bundle.num_classes)
        self.mixing = batch_mixing(
            spec.data.augment, self.bundle.num_classes, seed=t.seed, rank=accelerator.process_index
        )
        if self.channels_last:
            system = channels_last_module(system)
        # the student's moving average: a copy made before compilation, on the training device
        self.average = StudentAverage(system.student, t.ema) if t.ema is not None else None
        if self.average is not None:
            self.average.model.to(accelerator.device)
        if t.compile:
            system.compile(options=precision.compile_options())
        optimizer = build_optimizer(system, spec)
        self.model, self.optimizer, self.train_loader, self.eval_loader = accelerator.prepare(
            system, optimizer, train_loader, eval_loader
        )
        self.system = accelerator.unwrap_model(self.model)
        self.steps_per_epoch = max(len(self.train_loader) // accum, 1)
        # The scheduler's state goes into trainer_state.json, not into accelerate's custom-object pickle,
        # which `load_state` would unpickle without restriction.
        self.scheduler = build_scheduler(optimizer, spec, self.steps_per_epoch)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        # seconds: training time of the earlier processes of this run (None: resumed from a checkpoint
        # written before runs recorded it)
        self.state = {"epoch": 0, "batches_in_epoch": 0, "step": 0, "seconds": 0.0}
        self.compile_reported = False
        self.last_checkpoint: Path | None = None
        # The step of the first non-finite loss (0: none), kept on the device and read only where a run
        # writes or reports (_check_finite): no host sync per step.
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.host_group = host_group(accelerator)
        if checkpoint is not None:
            _load_state(accelerator, checkpoint)
            if self.average is not None and not self.average.load(checkpoint):
                log.warning(
                    f"train.ema: {checkpoint} holds no moving average (trained without train.ema); the "
                    "average starts from the resumed weights"
                )
                self.average.start(self.system.student)
            self.state = {"seconds": None, **read_trainer_state(checkpoint)}
            self._restore_scheduler(self.state.pop("scheduler", None))
            self.last_checkpoint = checkpoint
            self.metrics.truncate_after(self.state["step"])
            log.info(f"{RESUMED} {checkpoint} at step {self.state['step']}, epoch {self.state['epoch'] + 1}")
        trackers.start(accelerator, spec, run_dir)
        teachers = spec.resolved_teachers()
        several_archs = any(t.arch != spec.student.arch for t in teachers)
        self.teacher_labels = [
            f"{t.arch} {t.bits_label}" if several_archs else t.bits_label for t in teachers
        ]

    def _restore_scheduler(self, saved: dict | None) -> None:
        if saved is not None:
            self.scheduler.load_state_dict(saved)
            return
        # A checkpoint from before the scheduler state was saved here: LambdaLR depends only on its count.
        per_iteration = self.spec.optim.schedule.step_every == "iteration"
        for _ in range(self.state["step"] if per_iteration else self.state["epoch"]):
            self.scheduler.step()

    def _check_classes(self, system, num_classes: int) -> None:
        """The student's logits (known from shape propagation) must match the dataset's classes."""
        outputs = system.num_classes()
        if outputs is not None and outputs != num_classes:
            raise UserError(
                f"student.kwargs: the model outputs {outputs} classes but {self.spec.data.dataset} has "
                f"{num_classes}; set student.kwargs.num_classes: {num_classes}"
            )

    # ------------------------------------------------------------------ loop
    def fit(self) -> Path:
        t = self.spec.train
        self.started = time.perf_counter()
        stop = False
        final_eval: dict = {}
        while self.state["epoch"] < t.epochs and not stop:
            epoch = self.state["epoch"]
            stop = self._train_epoch(epoch)
            epoch_done = self.state["batches_in_epoch"] == 0
            last = (epoch_done and self.state["epoch"] >= t.epochs) or stop
            if last or (epoch_done and self.state["epoch"] % t.eval_every == 0):
                self._check_finite()
                final_eval = self.evaluate()
            if self.spec.optim.schedule.step_every == "epoch" and epoch_done:
                self.scheduler.step()  # before the checkpoint, so a resumed run starts at the next lr
            if t.checkpoints and (last or (epoch_done and self.state["epoch"] % t.checkpoint_every == 0)):
                self._check_finite()
                self._start_average()
                self.last_checkpoint = save_checkpoint(
                    self.acc, self.run_dir, self._state_to_save(), t.keep_checkpoints, self._write_average
                )
        self._check_finite()
        if not final_eval:
            final_eval = self.evaluate()
        self._finish(final_eval)
        return self.run_dir

    def _train_epoch(self, epoch: int) -> bool:
        """Train (the rest of) one epoch; True when ``max_steps`` or ``max_minutes`` was reached."""
        from tqdm.auto import tqdm

        acc, t = self.acc, self.spec.train
        self.model.train()
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        done = self.state["batches_in_epoch"]
        if done and isinstance(loader, DeviceBatches):
            loader = loader.skip_first_batches(done)
        elif done:
            loader = acc.skip_first_batches(self.train_loader, done)
        bar = tqdm(
            total=len(self.train_loader),
            initial=done,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not (acc.is_main_process and t.progress_bar),
            dynamic_ncols=True,
            leave=False,
        )
        window: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        window_batches, window_images, window_start = 0, 0, time.perf_counter()
        step_start = time.perf_counter()
        for images, labels in loader:
            if self.mixing is not None:  # soft labels [B, classes] from here on
                images, labels = self.mixing(
                    images, labels, epoch=epoch, batch=self.state["batches_in_epoch"]
                )
            if self.channels_last:
                images = channels_last_tensor(images)
            self.system.epoch.fill_(self.state["step"] / self.steps_per_epoch)  # as the lr schedule sees it
            with acc.accumulate(self.model):
                out, terms = self.model(images, labels)
                self._note_nonfinite(terms)
                acc.backward(terms["total"])
                if acc.sync_gradients and self.spec.optim.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), self.spec.optim.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for name, value in terms.items():
                window[name] = window.get(name, 0.0) + value.detach().float()
            for name, value in out.stats.items():
                stats[name] = stats.get(name, 0.0) + value.detach().float()
            window_batches += 1
            window_images += images.shape[0] * acc.num_processes
            self.state["batches_in_epoch"] += 1
            bar.update(1)
            if not acc.sync_gradients:
                continue
            self.state["step"] += 1
            if self.average is not None:
                self.average.update(self.system.student, self.state["step"])
            if t.compile and not self.compile_reported:
                self.compile_reported = True
                log.info(
                    f"train.compile: the first step took {time.perf_counter() - step_start:.1f} s "
                    "(compilation included)"
                )
            if self.spec.optim.schedule.step_every == "iteration":
                self.scheduler.step()
            step = self.state["step"]
            asked_to_stop, out_of_time = self._stop_flags()
            if asked_to_stop:
                bar.close()
                self._stop_here({name: value / window_batches for name, value in window.items()})
            reached_max = (t.max_steps is not None and step >= t.max_steps) or out_of_time
            if step % t.log_every == 0 or reached_max:
                self._check_finite({name: value / window_batches for name, value in window.items()})
                elapsed = time.perf_counter() - window_start
                record = self._train_record(window, stats, window_batches, window_images / max(elapsed, 1e-9))
                bar.set_postfix(loss=f"{record['loss/total']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                window, stats, window_batches, window_images = {}, {}, 0, 0
                window_start = time.perf_counter()
            if reached_max:
                bar.close()
                return True
        bar.close()
        self.state["epoch"] += 1
        self.state["batches_in_epoch"] = 0
        return False

    def _stop_flags(self) -> tuple[bool, bool]:
        """(a stop signal reached any process, ``train.max_minutes`` have passed on the main process's
        clock): every process stops at the same step. Host values only: one process reads its own;
        several sum theirs over a CPU (gloo) group, which does not wait for the accelerator."""
        asked = bool(self.stop)
        minutes = self.spec.train.max_minutes
        over = minutes is not None and time.perf_counter() - self.started >= 60 * minutes
        if self.acc.num_processes == 1:
            return asked, over
        import torch.distributed as dist

        flags = torch.tensor([float(asked), float(over and self.acc.is_main_process)])
        dist.all_reduce(flags, group=self.host_group)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _stop_here(self, means: dict[str, torch.Tensor]) -> None:
        """Checkpoint the step just taken (mid-epoch: resume continues from the next batch) and stop."""
        self._check_finite(means)
        self._start_average()
        checkpoint = save_checkpoint(
            self.acc,
            self.run_dir,
            self._state_to_save(),
            self.spec.train.keep_checkpoints,
            self._write_average,
        )
        name = self.stop[0] if self.stop else "a stop signal (on another process)"
        log.info(f"{name}: stopping at step {self.state['step']} with checkpoint {checkpoint}")
        raise Preempted(name, self.state["step"], checkpoint)

    def _seconds(self) -> float | None:
        """Training time of the whole run so far (this process since ``fit`` began, plus the earlier
        processes'): what a run costs, without the waits between its processes."""
        before = self.state["seconds"]
        return None if before is None else round(before + time.perf_counter() - self.started, 1)

    def _start_average(self) -> None:
        """An average never updated yet (fewer steps than ``train.ema.every``) starts from the student;
        every process calls this before the average is evaluated or saved."""
        if self.average is not None:
            self.average.start(self.system.student)

    def _write_average(self, directory: Path) -> None:
        if self.average is not None:
            self.average.save(directory)

    def _state_to_save(self) -> dict:
        return {**self.state, "seconds": self._seconds(), "scheduler": self.scheduler.state_dict()}

    def _note_nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        """Remember (on the device, no sync) the step of the first micro-batch whose loss is not finite."""
        bad = ~torch.isfinite(terms["total"].detach())
        first = bad & (self.first_nonfinite == 0)
        self.first_nonfinite = torch.where(first, self.state["step"] + 1, self.first_nonfinite)

    def _check_finite(self, means: dict[str, torch.Tensor] | None = None) -> None:
        """Stop with one line if any process has seen a non-finite loss. Called where the run writes or
        reports (a metrics line, an evaluation, a checkpoint, the student), so that no checkpoint, metric
        or result is written from weights that a non-finite step has reached; every process calls it at
        the same step. ``means``: the loss terms' means since the last metrics line, for the message."""
        first = self.first_nonfinite
        if self.acc.num_processes > 1:  # the earliest step of any process: max of (big - step)
            import torch.distributed as dist

            big = 1 << 62
            first = torch.where(first > 0, big - first, 0)
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
            first = torch.where(first > 0, big - first, 0)
        step = int(first)
        if step == 0:
            return
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in (means or {}).items() if "/" not in k)
        where = self.last_checkpoint or "none was written yet"
        raise UserError(
            f"step {step}: the loss is not finite{f' ({values})' if values else ''} on at least one process; "
            f"training stopped at step {self.state['step']}. Last good checkpoint: {where}"
        )

    def _train_record(self, window: dict, stats: dict, batches: int, images_per_s: float) -> dict:
        """One ``metrics.jsonl`` line: the window's mean loss terms and method statistics (e.g. AMTML-KD's
        mean instance weights, as ``importance/instance``), averaged over processes."""
        acc = self.acc
        names = sorted(window)
        stacked = torch.stack([window[n] / batches for n in names])
        stacked = acc.reduce(stacked, reduction="mean") if acc.num_processes > 1 else stacked
        method_stats = {n: v / batches for n, v in sorted(stats.items())}
        if acc.num_processes > 1:
            method_stats = {n: acc.reduce(v, reduction="mean") for n, v in method_stats.items()}
        record = {
            "kind": "train",
            "step": self.state["step"],
            "epoch": self.state["epoch"] + 1,
            "epoch_float": self.state["step"] / self.steps_per_epoch,
            **{f"loss/{n}": float(v) for n, v in zip(names, stacked.tolist(), strict=True)},
            **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
            **{f"importance/{tap}": w.tolist() for tap, w in self.system.importance().items()},
            **{f"importance/{n}": v.tolist() for n, v in method_stats.items()},
            "images_per_s": images_per_s,
        }
        self.metrics.write(record)
        trackers.log(acc, self.spec, record)
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Top-1/top-5 of the student, each teacher and the combined teacher on the evaluation split."""
        acc = self.acc
        record = {
            "kind": "eval",
            "step": self.state["step"],
            "epoch": self.state["epoch"],
            **evaluate(self.model, self.eval_loader, acc, task=self.task, channels_last=self.channels_last),
        }
        record.pop(OBJECTS, None)  # detections: `cmtkd-graph eval` writes them
        if self.average is not None:
            self._start_average()
            record.update(self._evaluate_average())
        self.model.train()
        self.metrics.write(record)
        trackers.log(acc, self.spec, record)
        if acc.is_main_process:
            log.info(eval_line(record, self.task))
            if self.system.teachers is not None:  # fusion importance, or a method's instance weights
                plot_importance(
                    read_metrics(self.run_dir / "metrics.jsonl"),
                    self.run_dir / "importance.png",
                    self.teacher_labels,
                )
        return record

    def _evaluate_average(self) -> dict:
        """The moving average's metrics, as ``<metric>/student_ema`` (under the run's autocast, as the
        prepared system is evaluated)."""
        with self.acc.autocast():
            alone = evaluate(
                StudentOnly(self.average.student),
                self.eval_loader,
                self.acc,
                task=self.task,
                channels_last=self.channels_last,
            )
        return {k.replace("/student", "/student_ema"): v for k, v in alone.items() if "/student" in k}

    def _finish(self, final_eval: dict) -> None:
        from safetensors.torch import save_file

        acc = self.acc
        self._start_average()
        acc.wait_for_everyone()
        self._write_rank_report()
        if acc.is_main_process:
            averaged = self.average is not None and self.spec.train.ema.student
            student = (
                self.average.student_state()
                if averaged
                else {k: v.detach().cpu().contiguous() for k, v in self.system.student.state_dict().items()}
            )
            save_file(student, str(self.run_dir / "student.safetensors"))
            summary = {
                "run_dir": str(self.run_dir),
                "steps": self.state["step"],
                "processes": acc.num_processes,
                "accuracy": {
                    k: v for k, v in final_eval.items() if k.split("/")[0] in self.task.metric_titles
                },
                "importance": {
                    **{tap: w.tolist() for tap, w in self.system.importance().items()},
                    **{k.split("/", 1)[1]: v for k, v in final_eval.items() if k.startswith("importance/")},
                },
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "student_weights": "ema" if averaged else "trained",
                "seconds": self._seconds(),
                "precision": self.precision.to_json(),
                "classes": self.bundle.classes,
                **({"colours": self.bundle.colours} if self.bundle.colours else {}),
            }
            (self.run_dir / "final.json").write_text(json.dumps(summary, indent=1))
            plot = self.run_dir / "importance.png"
            log.info(f"done: {self.run_dir}")
            log.info("  " + eval_line(final_eval, self.task))
            log.info(f"  final student: {self.run_dir / 'student.safetensors'}")
            if plot.exists():
                log.info(f"  importance plot: {plot}")
            log.info(f"  metrics: {self.run_dir / 'metrics.jsonl'}")
        trackers.finish(acc, self.spec, self.run_dir)

    def _write_rank_report(self) -> None:
        """``RUN_DIR/ranks/rank-<i>.json``: what each process saw (world size, a checksum of its weights),
        so a data-parallel run can be checked to be one training, not N independent ones."""
        report = {
            "rank": self.acc.process_index,
            "world_size": self.acc.num_processes,
            "distributed_type": str(self.acc.distributed_type),
            "steps": self.state["step"],
            "state_sha256": _state_sha256(self.system.state_dict()),
        }
        if self.average is not None:
            report["average_sha256"] = _state_sha256(self.average.model.state_dict())
        ranks = self.run_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)  # a node without the shared run directory writes its own
        (ranks / f"rank-{self.acc.process_index}.json").write_text(json.dumps(report, indent=1))


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_state(accelerator, checkpoint: Path) -> None:
    """``accelerator.load_state`` (tensors via safetensors or ``weights_only`` loads), with a refused or
    damaged file reported in one line."""
    import pickle

    from safetensors import SafetensorError

    try:
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as err:
        raise UserError(
            f"--resume: {checkpoint} holds a file with objects other than tensors, which could run code "
            f"when loaded; refused ({refused_global(err)})"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as err:
        raise UserError(f"--resume: {checkpoint} could not be loaded ({first_line(err)})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmtkd_graph.train", description=__doc__.splitlines()[0])
    add_train_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args.spec, args.overrides, resume=args.resume)
        end_processes()
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            for line in user_error_lines(err):
                print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preempted: {stopped}", file=sys.stderr)
        end_processes()
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
