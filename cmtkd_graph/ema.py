"""The exponential moving average of the student's weights (``train.ema``).

torch's own ``AveragedModel`` with ``get_ema_multi_avg_fn(decay)`` and ``use_buffers=True`` (as
torchvision's classification reference keeps its model EMA): after every ``every``-th optimizer step,
each floating-point parameter and buffer (BatchNorm statistics, learned quantizer steps) becomes
``decay x average + (1 - decay) x current``; the first update copies the student; integer and boolean
buffers (BatchNorm's batch count, a quantizer's initialised flag) are copied as they are. An average
that was never updated (fewer steps than ``every``; resumed from a checkpoint without one) starts from
the student when it is first read.

The average lives outside the trained system (no gradient, not in the optimizer, not wrapped by DDP).
Every process updates it from the same parameters, but each process's BatchNorm statistics come from its
own share of the batch: after each update the buffers of process 0's average go to every process, so
all hold the one average that checkpoints save (``ema.safetensors``) and a resumed run continues.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cmtkd_graph.errors import UserError
from cmtkd_graph.safe_files import read_tensors
from cmtkd_graph.spec import EmaSpec

EMA_FILE = "ema.safetensors"
"""The average's state in a checkpoint directory (``n_averaged`` and ``module.<student key>``)."""


class StudentAverage:
    """``AveragedModel`` of the student, updated every ``spec.every`` optimizer steps."""

    def __init__(self, student: nn.Module, spec: EmaSpec):
        self.spec = spec
        self.model = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(spec.decay), use_buffers=True)
        self.model.requires_grad_(False)

    @property
    def student(self) -> nn.Module:
        """The averaged student (the same graph as the student, the averaged tensors)."""
        return self.model.module

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (from 1): fold ``student`` into the average every ``every`` steps."""
        if step % self.spec.every == 0:
            self._fold_in(student)

    @torch.no_grad()
    def start(self, student: nn.Module) -> None:
        """Copy ``student`` into an average that was never updated (before it is evaluated or saved; every
        process calls it at the same point)."""
        if int(self.model.n_averaged) == 0:
            self._fold_in(student)

    def _fold_in(self, student: nn.Module) -> None:
        self.model.update_parameters(student)
        for mine, theirs in zip(self.student.buffers(), student.buffers(), strict=True):
            if not mine.is_floating_point():  # counters and flags: copied, not averaged
                mine.copy_(theirs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.student.buffers():  # process 0's BatchNorm statistics everywhere
                if buffer.is_floating_point():
                    torch.distributed.broadcast(buffer, src=0)

    def student_state(self) -> dict[str, torch.Tensor]:
        """The averaged student's state dict (the student's own key names), on the CPU."""
        return {k: v.detach().cpu().contiguous() for k, v in self.student.state_dict().items()}

    def save(self, directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / EMA_FILE))

    def load(self, directory: Path) -> bool:
        """Continue the average saved in checkpoint ``directory``; False when it holds none (a checkpoint
        of a run without ``train.ema``: the average then starts from the resumed weights)."""
        path = directory / EMA_FILE
        if not path.is_file():
            return False
        state = read_tensors(path, what="the weights' moving average")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{path} does not fit the student ({len(missing)} missing, {len(unexpected)} "
                "unexpected tensors); was the spec changed?"
            )
        return True


__all__ = ["EMA_FILE", "StudentAverage"]
