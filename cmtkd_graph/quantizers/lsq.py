"""LSQ: learned step size quantization (Esser et al., ICLR 2020), the paper's second quantizer.

One learned step ``step`` per quantizer. Its gradient is scaled by g = 1/sqrt(N * Qp) so the step
learns at a rate comparable to the weights. The step is initialised from the first training batch;
the buffer ``initialized`` records that, so a quantizer loaded from a checkpoint keeps its step.

Two implementations (``quantizer.options.implementation``):

* ``paper`` (default): the LSQ paper: N the weights, or the features of one sample for activations;
  s0 = 2 mean|x| / sqrt(Qp).
* ``lsquantization``: the port the CMT-KD paper names (github.com/hustzxd/LSQuantization, ``lsq.py`` at
  79276d1): N the tensor's elements, the batch included for activations; s0 = max|W| / 2^(b-1) for
  weights and 0.25 max(x) / 2^(b-1) for activations; the step's gradient clamped to [-s, s].

Formulas, sources and the tests that transcribe both: docs/methods.md#lsq.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from torch import nn

from cmtkd_graph.quantizers.base import (
    IntegerGrid,
    Quantizer,
    QuantizerFamily,
    mid_rise_grid,
    register_quantizer,
    twos_complement_grid,
    unsigned_grid,
)


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Forward: round(x). Backward: identity."""
    return torch.round(x.detach()) + (x - x.detach())


def sign_pass(x: torch.Tensor) -> torch.Tensor:
    """Forward: sign(x) with sign(0) = +1 (two levels, never 0). Backward: identity."""
    return torch.where(x.detach() >= 0, 1.0, -1.0) + (x - x.detach())


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """Forward: s (exactly). Backward: gradient times g."""
    scaled = s * g
    return s.detach() + (scaled - scaled.detach())


class _ClampGradient(torch.autograd.Function):
    """Forward: s. Backward: the gradient clamped to [-s, s] (LSQuantization's ``grad_alpha.clamp_``)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s.detach())
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return torch.maximum(torch.minimum(grad, s), -s)


class LSQQuantizer(Quantizer):
    """y = round_pass(clamp(x / s', Qn, Qp)) * s' with s' = grad_scale(step, 1/sqrt(N * Qp)).

    Ranges: signed Qn = -2^(b-1), Qp = 2^(b-1) - 1; unsigned Qn = 0, Qp = 2^b - 1.
    Signed 1-bit is the binary case (the signed formula would give only {-s, 0}): levels {-s, +s},
    y = sign_pass(clamp(x / s', -1, 1)) * s', with Qn = -1, Qp = 1 for the clip and gradient scale.

    ``per_sample``: N counts the features of one sample (activations, x[0].numel()); otherwise all
    elements (weights, and LSQuantization's activations). ``init``: the first step, from the first
    training batch: ``paper`` 2 mean|x| / sqrt(Qp); LSQuantization's ``max_abs`` (weights)
    max|x| / 2^(b-1) and ``quarter_max`` (activations) 0.25 max(x) / 2^(b-1). ``lsquantization``: the
    gradients as LSQuantization computes them: the step's clamped to [-s, s], the input's passed at the
    ends of the range too (the paper's clip passes it strictly inside; they differ only where x / s is
    exactly Qn or Qp).
    """

    def __init__(
        self,
        bits: int,
        signed: bool,
        per_sample: bool,
        init: Literal["paper", "max_abs", "quarter_max"] = "paper",
        lsquantization: bool = False,
    ):
        super().__init__(bits, signed)
        self.per_sample = per_sample
        self.init, self.lsquantization = init, lsquantization
        self.binary = signed and bits == 1
        if self.binary:
            self.qn, self.qp = -1, 1
        elif signed:
            self.qn, self.qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qn, self.qp = 0, 2**bits - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of `initialized`, so training steps do not sync on the buffer; reset on load.
        self._init_checked = False

    @property
    def grid(self) -> IntegerGrid:
        if self.binary:
            return mid_rise_grid(1)
        return twos_complement_grid(self.bits) if self.signed else unsigned_grid(self.bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._init_checked and x.device.type != "meta":
            self._initialize_once(x)
        n = x[0].numel() if self.per_sample else x.numel()
        step = _ClampGradient.apply(self.step) if self.lsquantization else self.step
        s = grad_scale(step, 1.0 / math.sqrt(max(n, 1) * self.qp))
        u = x / s
        if self.lsquantization:
            u = torch.where((u >= self.qn) & (u <= self.qp), u, u.clamp(self.qn, self.qp))
        else:
            u = u.clamp(self.qn, self.qp)
        return (sign_pass(u) if self.binary else round_pass(u)) * s

    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.step.detach().float()
        u = (x / s).clamp_(self.qn, self.qp)  # one allocation: inference runs this per activation
        return (torch.where(u >= 0, 1.0, -1.0) if self.binary else u.round_()), s

    @torch.no_grad()
    def _initialize_once(self, x: torch.Tensor) -> None:
        """The first step, from the first training batch (``init``; averaged over data-parallel ranks)."""
        if not bool(self.initialized):
            x = x.detach()
            if self.init == "max_abs":
                init = x.abs().max() / 2 ** (self.bits - 1)
            elif self.init == "quarter_max":
                init = 0.25 * x.max() / 2 ** (self.bits - 1)
            else:
                init = 2 * x.abs().mean() / math.sqrt(self.qp)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(init, op=dist.ReduceOp.SUM)
                init /= dist.get_world_size()
            # An all-zero first batch would give step 0 and 0/0 = NaN.
            self.step.copy_(init.clamp(min=torch.finfo(torch.float32).eps))
            self.initialized.fill_(True)
        self._init_checked = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._init_checked = False  # look at the loaded `initialized` on the next training step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, Qn={self.qn}, Qp={self.qp}"


class LSQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    implementation: Literal["paper", "lsquantization"] = "paper"
    """paper: the LSQ paper (Esser et al.); lsquantization: the port the CMT-KD paper names
    (hustzxd/LSQuantization at 79276d1)."""


@register_quantizer("lsq")
class LSQ(QuantizerFamily):
    """Learned-step quantizers: one step per weight tensor and per activation input edge."""

    Options = LSQOptions

    def activation(self, bits: int, signed: bool) -> Quantizer:
        if self.options.implementation == "lsquantization":
            return LSQQuantizer(bits, signed, per_sample=False, init="quarter_max", lsquantization=True)
        return LSQQuantizer(bits, signed, per_sample=True)

    def weight(self, bits: int) -> Quantizer:
        if self.options.implementation == "lsquantization":
            return LSQQuantizer(bits, True, per_sample=False, init="max_abs", lsquantization=True)
        return LSQQuantizer(bits, signed=True, per_sample=False)
