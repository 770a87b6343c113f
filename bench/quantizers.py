"""Quantizer cost: the fused clipped STE (cmtkd_graph.quantizers.ste) against the textbook STE.

The textbook form ``levels + where(inside, x - x.detach(), 0)`` launches about ten full-size kernels
per call; the fused autograd Function does clamp, one comparison, and in-place rounding, and a single
multiply in backward. Reports forward+backward time of a W2A2 HWGQ activation quantizer on a resnet18
layer1-sized activation, and the cost of a quantizer relative to the 3x3 convolution it feeds.

    python bench/quantizers.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import best_time, report
from cmtkd_graph.quantizers.hwgq import HALF_WAVE_STEP, HalfWaveQuantizer


def textbook_half_wave(x: torch.Tensor, bits: int) -> torch.Tensor:
    step = HALF_WAVE_STEP[bits]
    top = (2**bits - 1) * step
    levels = torch.round(x.detach().clamp(0.0, top) / step) * step
    return levels + torch.where((x >= 0) & (x <= top), x - x.detach(), 0.0)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 64, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    weight = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    fused = HalfWaveQuantizer(2)
    assert torch.equal(fused(x), textbook_half_wave(x, 2))

    def run(fn):
        return lambda: fn().backward(grad)

    rows = [
        ("textbook STE", best_time(run(lambda: textbook_half_wave(x, 2)))),
        ("fused STE", best_time(run(lambda: fused(x)))),
        ("3x3 conv 64->64", best_time(run(lambda: F.conv2d(x, weight, padding=1)))),
    ]
    report(
        "HWGQ activation quantizer, forward + backward, [128, 64, 32, 32] fp32, channels_last",
        rows,
        "textbook STE",
    )


if __name__ == "__main__":
    main()
