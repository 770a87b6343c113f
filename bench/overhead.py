"""What collaborative teachers cost: a CMT-KD step relative to training the student alone.

Same student (W2A2 resnet18, CIFAR stem), same batch: `single` vs `cmtkd` with 1, 2 and 3 teachers.
A ratio near K+1 means the fusion nodes, feature and mutual-learning losses add little on top of
running K more networks.

    python bench/overhead.py [--batch 64]
"""

from __future__ import annotations

import argparse

import torch

import cmtkd_graph as cg
from bench.common import best_time, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch,))
    base = ["data.num_workers=0"]
    configs = [("student alone (single)", ["method=single", "teachers=[]", "distill={}"])]
    for k, bits in [(1, "[4]"), (2, "[4, 8]"), (3, "[4, 6, 8]")]:
        teachers = "[" + ", ".join(f"{{weight_bits: {b}, act_bits: {b}}}" for b in eval(bits)) + "]"
        configs.append((f"cmtkd, {k} teacher(s)", [f"teachers={teachers}"]))
    rows = []
    for name, overrides in configs:
        system = cg.build_system(cg.load_spec("resnet18", base + overrides))
        opt = torch.optim.SGD(system.parameters(), lr=1e-3)

        def step(system=system, opt=opt):
            system.losses(system(x), y)["total"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rows.append((name, best_time(step, repeat=6, warmup=3)))
    report(
        f"training step, batch {args.batch}, resnet18 CIFAR-100 (W2A2 student)",
        rows,
        "student alone (single)",
    )


if __name__ == "__main__":
    main()
