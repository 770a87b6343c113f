"""What building costs: every torchvision classifier traced, quantized (W2A2 HWGQ) and composed with
three W2A2 teachers at the auto taps, on the meta device (nothing allocated: vit_h_14 costs what its
graph costs, not its 2.5 GB of weights). This is what `cmtkd-graph summary`/`inspect` and the start of
every run pay; the goal is all 80 builders in under 60 s on 2 cores.

    python -m bench.build [--models resnet18,vit_b_16] [--top 8] [--repeat 2]

Each model's time is the best of ``--repeat`` builds (a shared machine's noise only ever adds time).
"""

from __future__ import annotations

import argparse
import time

import torchvision

import cmtkd_graph as cg
from cmtkd_graph.runtime.precision import machine_line
from cmtkd_graph.spec.io import validate_spec

NATIVE_SIZE = {"inception_v3": 299}  # everything else at 224


def spec_for(arch: str) -> cg.Spec:
    kwargs = {"num_classes": 10}
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy's truncated normal init: slow, and irrelevant on meta
    return validate_spec(
        {
            "name": arch,
            "student": {"arch": arch, "kwargs": kwargs, "weight_bits": 2, "act_bits": 2},
            "teachers": [{"weight_bits": 2, "act_bits": 2} for _ in range(3)],
            "data": {"dataset": "imagefolder", "image_size": NATIVE_SIZE.get(arch, 224)},
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", help="comma-separated builders (default: all classifiers)")
    parser.add_argument("--top", type=int, default=8, help="how many of the slowest to list")
    parser.add_argument("--repeat", type=int, default=2, help="builds per model; the best counts")
    args = parser.parse_args(argv)
    names = (
        args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    )
    print(machine_line())
    cg.build_system(spec_for("resnet18"), device="meta", load=False)  # imports and first-call caches
    seconds: dict[str, float] = {}
    for arch in names:
        spec = spec_for(arch)
        for _ in range(args.repeat):
            start = time.perf_counter()
            cg.build_system(spec, device="meta", load=False)
            seconds[arch] = min(seconds.get(arch, float("inf")), time.perf_counter() - start)
    total = sum(seconds.values())
    print(
        f"built {len(seconds)} systems (student + 3 composed teachers, meta device) in {total:.1f} s "
        f"(best of {args.repeat} per model)"
    )
    print(f"  mean {total / len(seconds):.2f} s, median {sorted(seconds.values())[len(seconds) // 2]:.2f} s")
    for arch, s in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {arch:<24} {s:6.2f} s")


if __name__ == "__main__":
    main()
