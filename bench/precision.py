"""Precision and memory format on this CPU: fp32 vs bf16 autocast, contiguous vs channels_last.

One training step (forward, the CMT-KD loss, backward, SGD) of the quickstart system (W2A2 resnet18
student + 4- and 8-bit teachers) and of a plain torchvision resnet18, at the CIFAR stem's resolution.
The ratio tells whether `train.mixed_precision: bf16` / `train.channels_last: true` pay off here.

    python bench/precision.py [--batch 64] [--size 32]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

import cmtkd_graph as cg
from bench.common import best_time, report


def step_fn(model, x, y, *, bf16: bool, system: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = model.losses(out, y)["total"] if system else F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cifar_resnet18() -> torch.nn.Module:
    """torchvision's resnet18 with the CIFAR stem, written eagerly (no cmtkd_graph involved)."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    y = torch.randint(0, 10, (args.batch,))
    spec = cg.load_spec("quickstart", ["surgery=[cifar_stem]", f"data.image_size={args.size}"])
    for label, make, system in [
        ("CMT-KD system (student + 2 teachers)", lambda: cg.build_system(spec), True),
        ("plain eager resnet18, 3x3 stem", cifar_resnet18, False),
    ]:
        rows = []
        for name, channels_last, bf16 in [
            ("fp32", False, False),
            ("fp32 channels_last", True, False),
            ("bf16", False, True),
            ("bf16 channels_last", True, True),
        ]:
            model = make()
            x = torch.randn(args.batch, 3, args.size, args.size)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            rows.append((name, best_time(step_fn(model, x, y, bf16=bf16, system=system), repeat=3)))
        report(f"{label}, batch {args.batch}, {args.size}x{args.size}, one training step", rows, "fp32")


if __name__ == "__main__":
    main()
