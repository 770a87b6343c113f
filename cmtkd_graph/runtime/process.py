"""Setting up a process for training or evaluation: the accelerator, CPU threads, logging.

Training (``cmtkd_graph.train``), evaluation (``cmtkd-graph eval``) and the study's estimates start
their processes the same way through this module; what precision they compute in is decided in
``cmtkd_graph.runtime.precision``.

Without CUDA the accelerator is created with ``cpu=True``, so processes started by ``accelerate launch
--multi_gpu --num_processes N`` or ``torchrun`` form one gloo group (``DistributedType.MULTI_CPU``) and
really train data-parallel; a launch whose processes would train independently is an error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from cmtkd_graph.errors import UserError
from cmtkd_graph.runtime.precision import Precision
from cmtkd_graph.spec import Spec
from cmtkd_graph.trackers import check_installed, trackers

log = logging.getLogger("cmtkd_graph")


def make_accelerator(spec: Spec, run_dir: Path, precision: Precision):
    """An Accelerator that is data-parallel on CPU-only machines too (see module docstring), with the
    run's resolved mixed precision."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    check_installed(trackers(spec))
    cpu = not torch.cuda.is_available()
    mixed = precision.mixed_precision
    if mixed == "fp16" and cpu:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 on CPU")
    kwargs: dict = {
        "cpu": cpu,
        "project_config": ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")
        ),
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True),
        "log_with": trackers(spec) or None,
    }
    if mixed is not None:
        kwargs["mixed_precision"] = mixed
    if spec.train.grad_accum_steps is not None:
        kwargs["gradient_accumulation_steps"] = spec.train.grad_accum_steps
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched but the accelerator sees {accelerator.num_processes}; "
            "they would train independently (check the launcher's distributed settings)"
        )
    return accelerator


def distributed_state():
    """accelerate's process group (one gloo group on CPU-only machines), before any Accelerator exists:
    the precision probe runs on the main process and its choice is broadcast to the others."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def end_processes() -> None:
    """Destroy the process group a launched process joined, before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they hold and the
    process dies with "terminate called without an active exception" (SIGABRT, exit -6) after its
    work is done. A no-op in a process that joined no group. Called by the command-line entry
    points on their way out, not by ``run``/``evaluate_run``, whose caller may still need the group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def set_cpu_threads(spec: Spec, state) -> None:
    """Use the machine's cores: ``accelerate launch`` sets OMP_NUM_THREADS=1 for CPU processes.

    ``state`` is an Accelerator or accelerate's PartialState (its device and process count)."""
    choice = spec.train.cpu_threads
    if choice == "env" or state.device.type != "cpu":
        return
    if choice == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes if state.num_processes else 1))
        choice = max(1, len(os.sched_getaffinity(0)) // max(local, 1))
    torch.set_num_threads(choice)


def setup_logging(main: bool) -> None:
    """Messages to stderr (the main process's; other processes only warn)."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


TRAIN_LOG = "train.log"  # in the run directory


def log_to_file(run_dir: Path) -> None:
    file = logging.FileHandler(run_dir / TRAIN_LOG)
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file)
