"""Components of a user's own, outside the package: what tests/test_plugins.py loads as a plugin.

One of each kind: a method (logit regression from frozen teachers), a quantizer family (min-max
uniform), a dataset (generated stripes, four orientations) and a surgery pass (drop the first max-pool).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from cmtkd_graph.passes.graph_pass import graph_pass
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from cmtkd_graph.data.in_memory import Splits, in_memory_bundle
from cmtkd_graph.data.record import DatasetRecord, register_dataset
from cmtkd_graph.methods import LogitsLoss, Method, MethodOptions, register_method
from cmtkd_graph.quantizers.base import (
    Quantizer,
    QuantizerFamily,
    register_quantizer,
    twos_complement_grid,
    unsigned_grid,
)
from cmtkd_graph.registry import SURGERIES


# ---------------------------------------------------------------------------- a method
class LogitMatchingOptions(MethodOptions):
    scale: float = 1.0


@register_method("logit_matching")
class LogitMatching(Method):
    """Ba & Caruana's logit regression from the mean of side-by-side, frozen teachers: L = CE_S + beta MSE."""

    summary = "regress the mean teacher logits"
    formula = "alpha CE_S + beta scale mean((z_S - mean_k z_k)^2)"
    arrangement = "side_by_side"
    min_teachers = 1
    frozen_teachers_only = True
    Options = LogitMatchingOptions

    def losses(self, ctx, out, labels):
        target = torch.stack([z.detach() for z in out.each_teacher_logits]).mean(0)
        terms = self.student_ce(out, labels)
        terms["logit_mse"] = self.options.scale * F.mse_loss(out.student_logits.float(), target.float())
        terms["total"] = self.distill.alpha * terms["ce_student"] + self.distill.beta * terms["logit_mse"]
        return terms

    def logits_loss(self):
        return LogitsLoss("logit regression", "each")


# ---------------------------------------------------------------------------- a quantizer family
class MinMaxWeight(Quantizer):
    """Symmetric uniform weights: scale = max|w| / (2^(b-1) - 1), q = round(w / scale)."""

    @property
    def grid(self):
        return twos_complement_grid(self.bits)

    def integers(self, x):
        top = max(2 ** (self.bits - 1) - 1, 1)
        scale = x.abs().max().clamp_min(1e-8) / top
        return torch.round(x / scale).clamp(-top, top), scale

    def quantize(self, x):
        q, scale = self.integers(x.detach())
        return q * scale + (x - x.detach())


class ClipActivation(Quantizer):
    """Uniform on [0, clip] (signed: [-clip, clip)) with a fixed clip; straight-through inside."""

    def __init__(self, bits: int, signed: bool, clip: float):
        super().__init__(bits, signed)
        self.clip = clip

    @property
    def grid(self):
        return twos_complement_grid(self.bits) if self.signed else unsigned_grid(self.bits)

    def integers(self, x):
        scale = torch.tensor(self.clip / (2 ** (self.bits - 1) if self.signed else 2**self.bits - 1))
        low, high = (self.grid.qmin, self.grid.qmax)
        return torch.round(x / scale).clamp(low, high), scale.to(x.device)

    def quantize(self, x):
        q, scale = self.integers(x.detach())
        inside = (q * scale == torch.clamp(x, q.min() * scale, q.max() * scale)).float()
        return q * scale + (x - x.detach()) * inside


class MinMaxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip: float = Field(4.0, gt=0)


@register_quantizer("minmax")
class MinMax(QuantizerFamily):
    Options = MinMaxOptions

    def activation(self, bits, signed):
        return ClipActivation(bits, signed, self.options.clip)

    def weight(self, bits):
        return MinMaxWeight(bits, signed=True)


# ---------------------------------------------------------------------------- a dataset
STRIPES = ["horizontal", "vertical", "diagonal", "antidiagonal"]


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 32x32 RGB images of stripes, class = orientation, random period, phase and colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), np.uint8)
    labels = np.arange(n) % len(STRIPES)
    for i, label in enumerate(labels):
        t = (y, x, x + y, x - y)[label]
        period, phase = rng.integers(4, 9), rng.integers(0, 8)
        on = ((t + phase) // (period // 2)) % 2 == 1
        colour = rng.integers(64, 256, size=3)
        images[i] = np.where(on, colour[:, None, None], 16).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


@register_dataset("stripes")
class Stripes(DatasetRecord):
    summary = "generated stripes, four orientations (a plugin's dataset)"
    native_size = 32
    grey = False
    mean = (0.3, 0.3, 0.3)
    std = (0.3, 0.3, 0.3)
    hflip = False
    how_to_get = "generated: nothing to get"

    @classmethod
    def read(cls, spec):
        return in_memory_bundle(spec, Splits(stripes(64, 0), stripes(32, 1), list(STRIPES)))


# ---------------------------------------------------------------------------- a surgery pass
@SURGERIES.register("drop_first_maxpool")
@graph_pass
def drop_first_maxpool(gm: fx.GraphModule) -> None:
    """Remove the first nn.MaxPool2d (keep small images large through the stem)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_all_unused_submodules()
            return
    raise ValueError("drop_first_maxpool: the model has no nn.MaxPool2d")
