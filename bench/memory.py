"""Memory of a CMT-KD training step, with and without ``train.activation_checkpointing``.

For the quickstart's shape (resnet18, ImageNet stem, 28x28) and the paper's (resnet18, CIFAR stem,
32x32, three teachers), each configuration runs in a fresh process (so its peak RSS is its own):

* saved for backward: the bytes of the distinct tensors autograd keeps from forward to backward in one
  step (``torch.autograd.graph.saved_tensors_hooks``): the activation memory, exactly;
* peak RSS: the process's high-water mark (``ru_maxrss``) after the steps, and its growth over the
  process after building the system and its optimizer (weights, gradients, momenta are in the base);
* time per step: best of ``--steps`` after a warm-up step, fp32.

    python -m bench.memory [--batch 64] [--steps 3] [--shapes quickstart,paper] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import cmtkd_graph as cg
from bench.step import SHAPES, system_step
from cmtkd_graph.runtime.precision import machine_line


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(shape: str, checkpointing: bool, batch: int, steps: int) -> dict:
    """One configuration, in this process (the parent runs each in its own)."""
    spec_name, overrides = SHAPES[shape]
    overrides = [*overrides, f"train.activation_checkpointing={str(checkpointing).lower()}"]
    spec = cg.load_spec(spec_name, ["data.num_workers=0", f"data.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    system = cg.build_system(spec, load=False).train()
    x = torch.randn(batch, *spec.data.input_shape())
    y = torch.randint(0, system.num_classes(), (batch,))
    step = system_step(system, x, y)
    with torch.no_grad():
        system(x[:2], y[:2])  # lazily allocated state (LSQ steps) is part of the base, not the step
    base = _rss_mib()

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warm-up, and the step whose saved tensors are counted
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    peak = _rss_mib()
    return {
        "saved_mib": sum(saved.values()) / 2**20,
        "base_mib": base,
        "peak_mib": peak,
        "step_s": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="batch 2, one step, quickstart only (CI)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # shape:checkpointing, run in this process
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.shapes = 2, 1, "quickstart"
    if args.child:
        shape, checkpointing = args.child.split(":")
        print(json.dumps(measure(shape, checkpointing == "on", args.batch, args.steps)))
        return
    print(machine_line())
    print(f"\nmemory of one training step, fp32, batch {args.batch}, each configuration in a fresh process")
    header = "saved for backward   peak RSS (growth over the built system)   s/step"
    print(f"  {'':<40} {header}")
    for shape in args.shapes.split(","):
        rows = {}
        for mode in ("off", "on"):
            command = [sys.executable, "-m", "bench.memory", "--child", f"{shape}:{mode}"]
            command += ["--batch", str(args.batch), "--steps", str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(f"{shape} {mode}: {result.stderr.strip().splitlines()[-1]}")
            rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
            r = rows[mode]
            label = f"{shape}, activation_checkpointing {mode}"
            print(
                f"  {label:<40} {r['saved_mib']:9.0f} MiB        {r['peak_mib']:7.0f} MiB "
                f"(+{r['peak_mib'] - r['base_mib']:5.0f} MiB)                  {r['step_s']:6.2f}"
            )
        off, on = rows["off"], rows["on"]
        print(
            f"  {shape}: checkpointing keeps x{on['saved_mib'] / off['saved_mib']:.2f} of the activations, "
            f"peak RSS x{on['peak_mib'] / off['peak_mib']:.2f}, step time x{on['step_s'] / off['step_s']:.2f}"
        )


if __name__ == "__main__":
    main()
