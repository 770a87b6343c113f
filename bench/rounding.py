"""How far does a last-bit difference travel through a quantized network? Why the same seed on two CPUs
trains two different networks (docs/results.md, the note on the retrained rows at the top).

The study's network (resnet18, ImageNet stem, 32x32, batch 64, training mode) in full precision, W8A8
and W2A2: one forward and backward of the same weights on the same batch, once in NCHW and once in
channels_last. The two layouts run different convolution kernels, which round differently in the last
bit, as two CPUs do. Printed per network: the loss of both, the relative difference of each stage's
last convolution's output (||a - b|| / ||a||), the share of that convolution's input codes that differ,
and the relative difference of the whole gradient. A float network keeps the difference at
rounding level; a quantizer turns it into whole steps that the next layers pass on and multiply.

    python -m bench.rounding [--batch 64] [--size 32] [--smoke]
"""

from __future__ import annotations

import argparse
import copy

import torch

import cmtkd_graph as cg
from cmtkd_graph.runtime.precision import machine_line

STAGES = ("layer1", "layer2", "layer3", "layer4")
NETWORKS = {"full precision": 32, "W8A8": 8, "W2A2": 2}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def keep_output(into: dict, key: str):
    """A forward hook that keeps the module's output (detached) as ``into[key]``."""
    return lambda module, inputs, output: into.__setitem__(key, output.detach())


def one_step(system: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict, dict]:
    """Loss, the output of each stage's last convolution and, where it is quantized, its activation codes
    (its input quantizer's output) in one training step; gradients are left on the system."""
    outputs, codes = {}, {}
    hooks = []
    for stage in STAGES:
        conv = system.get_submodule(f"student.{stage}.1.conv2")
        hooks.append(conv.register_forward_hook(keep_output(outputs, stage)))
        quantizer = getattr(conv, "input_quantizer", None)
        if quantizer is not None:
            hooks.append(quantizer.register_forward_hook(keep_output(codes, stage)))
    loss = system(x, y)[1]["total"]
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.item(), outputs, codes


def compare(name: str, bits: int, batch: int, size: int) -> None:
    alone = ["method=single", "teachers=[]", "distill={}", "surgery=[]", "student.kwargs={num_classes: 10}"]
    bits_set = [f"student.weight_bits={bits}", f"student.act_bits={bits}"]
    spec = cg.load_spec("resnet18", ["data.num_workers=0", f"data.image_size={size}", *alone, *bits_set])
    torch.manual_seed(0)
    nchw = cg.build_system(spec).train()
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    loss_a, out_a, codes_a = one_step(nchw, x, y)
    loss_b, out_b, codes_b = one_step(cl, x.contiguous(memory_format=torch.channels_last), y)
    pairs = zip(nchw.parameters(), cl.parameters(), strict=True)
    grads = [(p.grad.flatten(), q.grad.flatten()) for p, q in pairs if p.grad is not None]
    gradient = relative(torch.cat([a for a, _ in grads]), torch.cat([b for _, b in grads]))
    print(f"  {name:<15} loss {loss_a:.6f} vs {loss_b:.6f}   gradient {gradient:.1e}")
    for s in STAGES:
        line = f"    {s}: output {relative(out_a[s], out_b[s]):.1e}"
        if s in codes_a:
            differ = (codes_a[s] != codes_b[s]).float().mean().item()
            line += f", activation codes that differ {differ * 100:5.2f} %"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="batch 4 at 16x16")
    args = parser.parse_args(argv)
    batch, size = (4, 16) if args.smoke else (args.batch, args.size)
    print(machine_line())
    print(f"\none training step of resnet18 ({size}x{size}, batch {batch}), NCHW vs channels_last,", end="")
    print(" same weights and batch")
    for name, bits in NETWORKS.items():
        compare(name, bits, batch, size)


if __name__ == "__main__":
    main()
