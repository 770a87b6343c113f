"""Does ``train.compile: true`` pay, and does it train the same? Real training runs, as users launch them.

Three runs of the quickstart spec (Fashion-MNIST, resnet18 W2A2 student, 4- and 8-bit teachers), each a
fresh ``python -m cmtkd_graph.train`` process, fp32, ``--steps`` optimizer steps, a loss line per step:

* eager, seed 0 and eager, seed 1: the run-to-run noise (another seed: other initial weights and order);
* compiled, seed 0: the same run as the first, with ``train.compile: true``.

Printed: the compiled run's first step (compilation included), steady-state seconds per step (median
after the first 10 steps, data loading included) of each run, and the loss curves: per-step losses at a
few steps, and the mean of the last 20 steps, compiled against eager seed 0 beside seed 1 against seed 0.

    python -m bench.compile_curve [--steps 100] [--batch 64]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cmtkd_graph.metrics import read_metrics
from cmtkd_graph.runtime.precision import machine_line


def train(out: Path, steps: int, batch: int, seed: int, compile_: bool) -> tuple[list[dict], str]:
    settings = [
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.seed={seed}",
        f"train.compile={str(compile_).lower()}",
        f"data.batch_size={batch}",
        "data.eval_subset=256",
        "data.num_workers=0",
        "train.log_every=1",
        "train.mixed_precision=no",
        "train.channels_last=false",
        "train.checkpoints=false",
        "train.progress_bar=false",
    ]
    command = [sys.executable, "-m", "cmtkd_graph.train", "quickstart"]
    for setting in settings:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"training failed: {result.stderr.strip().splitlines()[-1]}")
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return records, (out / "train.log").read_text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(machine_line())
    runs = {}
    logs = {}
    configurations = [("eager s0", 0, False), ("eager s1", 1, False), ("compiled s0", 0, True)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed, compile_ in configurations:
            out = Path(tmp) / name.replace(" ", "_")
            runs[name], logs[name] = train(out, args.steps, args.batch, seed, compile_)
    first = re.search(r"the first step took ([\d.]+) s", logs["compiled s0"])
    print(f"\nquickstart system, fp32, batch {args.batch}, {args.steps} steps per run")
    print(f"  compiled run: first step {first.group(1) if first else '?'} s (compilation included)")
    seconds = {
        name: statistics.median(args.batch / r["images_per_s"] for r in records[10:])
        for name, records in runs.items()
    }
    for name, s in seconds.items():
        ratio = seconds["eager s0"] / s
        print(f"  {name:<12} {s:6.3f} s/step (median after step 10)   x{ratio:4.2f} vs eager s0")
    shown = sorted({1, 10, 25, 50, args.steps} & set(range(1, args.steps + 1)))
    print("  loss at step " + "".join(f"{s:>9}" for s in shown))
    losses = {name: [r["loss/total"] for r in records] for name, records in runs.items()}
    for name, values in losses.items():
        print(f"  {name:<12} " + "".join(f"{values[s - 1]:9.4f}" for s in shown))
    tail = {name: statistics.mean(values[-20:]) for name, values in losses.items()}
    print(
        f"  mean loss of the last 20 steps: eager s0 {tail['eager s0']:.4f}, "
        f"eager s1 {tail['eager s1']:.4f}, compiled s0 {tail['compiled s0']:.4f}; |compiled - eager s0| = "
        f"{abs(tail['compiled s0'] - tail['eager s0']):.4f} vs run-to-run |s1 - s0| = "
        f"{abs(tail['eager s1'] - tail['eager s0']):.4f}"
    )


if __name__ == "__main__":
    main()
