"""The CMT-KD training step on this machine: what composition costs, how close to the hardware it runs,
and which precision, memory format and compilation pay.

(a) The composed system (torch.fx graphs, fusion nodes, the method plug-in) against the same CMT-KD
    written by hand in eager PyTorch (``bench/eager_cmtkd.py``) with identical weights: resnet18 with the
    CIFAR stem at 32x32 and AlexNet-BN at 64x64 (the paper's CIFAR models) and vit_b_16 at 32x32 (linear
    layers and self-attention), W2A2 student with 4/6/8-bit HWGQ teachers and the same networks in
    float. Both losses are checked equal before timing; each step is timed best of ``repeat``
    interleaved rounds in each order. Under every row: the copies and
    memory-format conversions of both steps (torch.profiler), and where composed is the slower, the
    operators whose self time differs most.
(b) Roofline: the step's FLOPs (counted from the shapes of its convolutions and matmuls, forward and
    backward, by ``torch.utils.flop_counter``) over its time, beside the rate of a large 3x3 convolution
    measured in the same run: the peak a step of convolutions could reach here.
(c) One step of the composed system in fp32, bf16 autocast, channels_last, both, and ``torch.compile``
    (with the trainer's Inductor options and with Inductor's default layout optimization; compile time
    and graph breaks from ``torch._dynamo.explain``), fp32 with convolutions on 1x1 maps convolved
    instead of computed as the product of their one tap (what training does), and what
    ``train.mixed_precision: auto`` picks, at the quickstart's shape (resnet18, ImageNet stem, 28x28
    Fashion-MNIST) and the paper's (resnet18, CIFAR stem, 32x32, three teachers). Then the share of the
    fp32 step spent in convolutions and matmuls (the ceiling of what compiling the rest can give) and
    the trainer's fused ``optimizer.step()`` against torch's per-tensor loop.

    python -m bench.step [--batch 64] [--repeat 3] [--no-compile] [--only a,b,c] [--shapes quickstart,paper]
                         [--models resnet18,alexnet,vit] [--channels-last] [--smoke]

``--smoke`` runs every part at toy sizes without compile (what CI runs, to keep the script working).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cmtkd_graph as cg
from bench.eager_cmtkd import VIT_KWARGS, EagerCMTKD
from cmtkd_graph.optim import build_optimizer, parameter_groups
from cmtkd_graph.quantizers import QuantConv2d, build_quantizer_family
from cmtkd_graph.runtime import precision as prec
from cmtkd_graph.runtime.precision import machine_line

FLOAT = ["student.weight_bits=32", "student.act_bits=32"]
FLOAT_TEACHERS = "teachers=[{weight_bits: 32, act_bits: 32}, {weight_bits: 32, act_bits: 32}, {weight_bits: 32, act_bits: 32}]"  # noqa: E501
SHAPES = {  # (c): name -> (spec, overrides)
    "quickstart": ("quickstart", []),
    "paper": ("resnet18", ["data.image_size=32"]),
}


def sgd_step(loss_fn, params):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)  # as cmtkd_graph.optim builds it

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def system_step(system, x: torch.Tensor, y: torch.Tensor, *, bf16: bool = False):
    """One training step of the composed system as the trainer runs it: forward and objective in one call
    (under autocast for bf16), backward, SGD."""

    def loss():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return system(x, y)[1]["total"]

    return sgd_step(loss, system.parameters())


def eager_step(eager: EagerCMTKD, x: torch.Tensor, y: torch.Tensor):
    return sgd_step(lambda: eager.loss(x, y), eager.parameters())


# ------------------------------------------------------------------------------------------- (a)
MODELS_A = ("resnet18", "alexnet", "vit")  # (a)'s models


def composed_vs_eager(
    batch: int, repeat: int, smoke: bool, channels_last: bool = False, models: list[str] | tuple = MODELS_A
) -> None:
    layout = ", channels_last" if channels_last else ""
    print(f"\n(a) composed system vs hand-written eager CMT-KD (same weights), one training step{layout}")
    print(f"  {'model':<44} {'composed':>10} {'eager':>10}  composed/eager (goal <= 1.03)")
    vit = [
        "student.arch=vit_b_16",
        f"student.kwargs={{num_classes: 100, {', '.join(f'{k}: {v}' for k, v in VIT_KWARGS.items())}}}",
        "surgery=[]",
        "taps={teachers: auto}",
    ]
    cases = [("resnet18", "resnet18", 32, []), ("alexnet", "alexnet", 64, []), ("vit", "resnet18", 32, vit)]
    cases = [case for case in cases if case[0] in models]
    for arch, spec_name, size, model in [("resnet18", "resnet18", 16, [])] if smoke else cases:
        for quantized in (True,) if smoke else (True, False):
            overrides = ["data.num_workers=0", f"data.image_size={size}", *model]
            if not quantized:
                overrides += [*FLOAT, FLOAT_TEACHERS]
            spec = cg.load_spec(spec_name, overrides)
            torch.manual_seed(0)
            system = cg.build_system(spec)
            d = spec.distill
            eager = EagerCMTKD(
                arch,
                system.num_classes(),
                build_quantizer_family(spec.quantizer.name) if quantized else None,
                spec.student.weight_bits,
                [t.weight_bits for t in spec.teachers],
                alpha=d.alpha,
                beta=d.beta,
                gamma=d.gamma,
                tau=d.tau,
            )
            eager.load_from_system(system)
            x = torch.randn(batch, 3, size, size)
            y = torch.randint(0, system.num_classes(), (batch,))
            if channels_last:
                system, eager = (m.to(memory_format=torch.channels_last) for m in (system, eager))
                x = x.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(1)
            a = system(x, y)[1]["total"]
            torch.manual_seed(1)
            b = eager.loss(x, y)
            assert torch.allclose(a, b, rtol=1e-5), (arch, quantized, a.item(), b.item())
            steps = {"composed": system_step(system, x, y), "eager": eager_step(eager, x, y)}
            times = both_orders(steps, repeat)
            name = "vit_b_16" if arch == "vit" else arch
            label = f"{name} {size}x{size} {'W2A2 + 4/6/8-bit' if quantized else 'float'}, batch {batch}"
            ratio = times["composed"] / times["eager"]
            print(
                f"  {label:<44} {times['composed'] * 1e3:8.0f}ms {times['eager'] * 1e3:8.0f}ms  {ratio:.3f}"
            )
            print_op_differences(steps, explain=ratio > 1.0)


def both_orders(steps: dict, repeat: int) -> dict[str, float]:
    """Best time of each step over ``repeat`` interleaved rounds in one order and as many in the other,
    so that whichever runs second in a round (with the other's memory freshly freed) is not favoured."""
    forward = prec.interleaved_best(steps, repeat)
    backward = prec.interleaved_best(dict(reversed(steps.items())), repeat)
    return {name: min(forward[name], backward[name]) for name in steps}


COPIES = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous", "aten::to")


def print_op_differences(steps: dict, *, explain: bool, top: int = 6) -> None:
    """One step of each under torch.profiler: the copies and memory-format conversions of both, and
    (``explain``: when composed is the slower) the operators whose self time differs most."""
    from torch.profiler import ProfilerActivity, profile

    profiles = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as p:
            step()
        profiles[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in p.key_averages()}
    composed, eager = profiles["composed"], profiles["eager"]
    copies = ", ".join(
        f"{op.removeprefix('aten::')} {composed.get(op, (0, 0))[1]} vs {eager.get(op, (0, 0))[1]}"
        for op in COPIES
    )
    print(f"      copies and conversions (composed vs eager, calls): {copies}")
    if not explain:
        return
    ops = sorted(
        set(composed) | set(eager),
        key=lambda op: -abs(composed.get(op, (0, 0))[0] - eager.get(op, (0, 0))[0]),
    )
    print("      the operators whose self time differs most (ms, calls; composed vs eager):")
    for op in ops[:top]:
        (tc, nc), (te, ne) = composed.get(op, (0.0, 0)), eager.get(op, (0.0, 0))
        print(f"        {op[:44]:<44} {tc:8.1f} ({nc:4d})  {te:8.1f} ({ne:4d})  {tc - te:+8.1f}")


# ------------------------------------------------------------------------------------------- (b)
def conv_peak(dtype: torch.dtype, smoke: bool) -> float:
    """FLOP/s of a large 3x3 convolution (forward), channels_last, in ``dtype``."""
    n, c, hw = (2, 32, 16) if smoke else (32, 256, 28)
    x = torch.randn(n, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    seconds = prec.interleaved_best({"conv": lambda: F.conv2d(x, w, padding=1)}, repeat=5, warmup=2)["conv"]
    return 2 * n * c * c * 9 * hw * hw / seconds


def step_flops(system, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        system(x, y)[1]["total"].backward()
    system.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def roofline(batch: int, repeat: int, smoke: bool) -> None:
    print("\n(b) roofline: the step's FLOPs / its time, against a large 3x3 convolution on this machine")
    peaks = {"fp32": conv_peak(torch.float32, smoke)}
    if prec.cpu_has_fast_bf16() or torch.cuda.is_available():
        peaks["bf16"] = conv_peak(torch.bfloat16, smoke)
    for name, peak in peaks.items():
        print(f"  3x3 conv 256->256, 28x28, batch 32, channels_last, {name}: {peak / 1e9:7.1f} GFLOP/s")
    for shape, (spec_name, overrides) in list(SHAPES.items())[: 1 if smoke else None]:
        spec = cg.load_spec(spec_name, ["data.num_workers=0", *overrides])
        torch.manual_seed(0)
        system = cg.build_system(spec)
        x = torch.randn(batch, *spec.data.input_shape())
        y = torch.randint(0, system.num_classes(), (batch,))
        flops = step_flops(system, x, y)
        seconds = prec.interleaved_best({"step": system_step(system, x, y)}, repeat)["step"]
        rate = flops / seconds
        print(
            f"  {shape} system, fp32, batch {batch}: {flops / 1e9:7.1f} GFLOP per step, {seconds:.2f} s, "
            f"{rate / 1e9:6.1f} GFLOP/s = {rate / peaks['fp32']:.0%} of the conv's rate"
        )


# ------------------------------------------------------------------------------------------- (c)
DENSE_OPS = ("aten::convolution", "aten::convolution_backward", "aten::addmm", "aten::mm")


def dense_share(step) -> float:
    """The fraction of one step's CPU time spent in convolutions and matmuls (torch.profiler). Fusing
    cannot shorten them, so compiling the rest can make the step at most 1 / share times faster."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.cpu_time_total for e in events if e.key in DENSE_OPS) / total


def optimizer_steps(system, spec: cg.Spec, repeat: int) -> dict[str, float]:
    """``optimizer.step()`` as the trainer builds it (fused kernels) against torch's per-tensor loop."""
    for p in system.parameters():
        p.grad = torch.randn_like(p)
    fused = build_optimizer(system, spec)
    loop = torch.optim.SGD(parameter_groups(system, spec), lr=spec.optim.lr, momentum=spec.optim.momentum)
    with torch.no_grad():
        times = prec.interleaved_best({"fused": fused.step, "loop": loop.step}, repeat)
    for p in system.parameters():
        p.grad = None
    return times


def fresh_choice(spec: cg.Spec, batch: int) -> prec.Precision:
    """What ``mixed_precision: auto`` picks on a first run here (probed afresh, not from the cache)."""
    saved = os.environ.get("CMTKD_GRAPH_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CMTKD_GRAPH_CACHE_DIR"] = cache
        try:
            return prec.choose_precision(spec, torch.device("cpu"), batch)
        finally:
            if saved is None:
                os.environ.pop("CMTKD_GRAPH_CACHE_DIR")
            else:
                os.environ["CMTKD_GRAPH_CACHE_DIR"] = saved


CONV_ON_ONE_PIXEL = "fp32, 1x1 maps convolved"


def without_single_pixel_taps(system: torch.nn.Module) -> torch.nn.Module:
    """``system`` with every quantized convolution that meets a single pixel convolving it, as it did
    before training computed those as the product of their one tap (the quickstart's layer4 at 28x28)."""
    for layer in system.modules():
        if isinstance(layer, QuantConv2d):
            layer._single_pixel_tap = lambda x: None  # an instance attribute: this copy only
    return system


def variants_table(batch: int, repeat: int, smoke: bool, compile_too: bool) -> None:
    print("\n(c) one training step of the composed system: precision, memory format, compile")
    for shape, (spec_name, overrides) in list(SHAPES.items())[: 1 if smoke else None]:
        spec = cg.load_spec(spec_name, ["data.num_workers=0", f"data.batch_size={batch}", *overrides])
        torch.manual_seed(0)
        base = cg.build_system(spec)
        x = torch.randn(batch, *spec.data.input_shape())
        y = torch.randint(0, base.num_classes(), (batch,))
        fns = {}
        bf16 = prec.cpu_has_fast_bf16() or torch.cuda.is_available()
        for name, mixed, channels_last in [
            ("fp32", False, False),
            ("fp32 channels_last", False, True),
            ("bf16", True, False),
            ("bf16 channels_last", True, True),
        ]:
            if mixed and not bf16:
                continue
            system = copy.deepcopy(base)
            xs = x
            if channels_last:
                system = system.to(memory_format=torch.channels_last)
                xs = x.contiguous(memory_format=torch.channels_last)
            fns[name] = system_step(system, xs, y, bf16=mixed)
        fns[CONV_ON_ONE_PIXEL] = system_step(without_single_pixel_taps(copy.deepcopy(base)), x, y)
        extra = ""
        if compile_too:
            explained = torch._dynamo.explain(copy.deepcopy(base))(x, y)
            torch._dynamo.reset()
            first = {}
            # the trainer's options for fp32 contiguous, then Inductor's default (layout optimization on)
            trainer_options = prec.Precision("no", channels_last=False, source="spec").compile_options()
            for name, options in [("fp32 compiled", trainer_options), ("fp32 compiled, layout opt.", {})]:
                compiled = copy.deepcopy(base)
                compiled.compile(options=options)
                fns[name] = system_step(compiled, x, y)
                start = time.perf_counter()
                fns[name]()
                first[name] = time.perf_counter() - start
            extra = (
                f"; compile: {first['fp32 compiled']:.0f} s for the first step, {explained.graph_count} "
                f"graph(s), {explained.graph_break_count} graph break(s)"
            )
        times = prec.interleaved_best(fns, repeat)
        chosen = fresh_choice(spec, batch)
        dense = dense_share(fns["fp32"])
        optimizer = optimizer_steps(copy.deepcopy(base), spec, repeat)
        print(f"  {shape} ({spec_name}, {'x'.join(map(str, spec.data.input_shape()))}, batch {batch}){extra}")
        for name, seconds in times.items():
            print(f"    {name:<26} {seconds:7.3f} s/step   x{times['fp32'] / seconds:5.2f} vs fp32")
        print(f"    auto picks: {chosen.label} ({chosen.describe()})")
        print(
            f"    convolutions and matmuls: {dense:.0%} of the fp32 step, so fusing everything else away "
            f"could make it at most x{1 / dense:.2f} faster"
        )
        fused, loop = optimizer["fused"], optimizer["loop"]
        print(
            f"    optimizer.step(): {fused * 1e3:.0f} ms fused (the trainer's) against {loop * 1e3:.0f} ms "
            f"as a per-tensor loop (x{loop / fused:.2f})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", default="a,b,c", help="which parts to run")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, no compile (CI)")
    parser.add_argument("--channels-last", action="store_true", help="(a) in the channels_last layout")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="which shapes (c) times")
    parser.add_argument("--models", default=",".join(MODELS_A), help="which models (a) compares")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS_A)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from {', '.join(MODELS_A)}")
    batch, repeat = (2, 1) if args.smoke else (args.batch, args.repeat)
    print(machine_line())
    for name in set(SHAPES) - set(args.shapes.split(",")):
        del SHAPES[name]
    parts = args.only.split(",")
    if "a" in parts:
        composed_vs_eager(batch, repeat, args.smoke, args.channels_last, args.models.split(","))
    if "b" in parts:
        roofline(batch, repeat, args.smoke)
    if "c" in parts:
        variants_table(batch, repeat, args.smoke, compile_too=not (args.no_compile or args.smoke))


if __name__ == "__main__":
    main()
