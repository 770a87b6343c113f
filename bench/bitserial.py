"""Beyond int8: does a bit-serial low-bit convolution beat oneDNN's int8 convolution on this CPU?

    python -m bench.bitserial [--bits W2A2,W1A2,W1A1] [--sizes 32,224] [--batch 1] [--repeat 10]
                              [--march native] [--smoke]

Compiles ``bench/bitserial.cpp`` as a PyTorch operator library (needs a C++ compiler, ``g++`` or
``$CXX``; with ``-march=native`` it uses AVX-512 VPOPCNTDQ where the CPU has it, else scalar popcount;
``--march x86-64-v3`` with ``ONEDNN_MAX_CPU_ISA=AVX2`` shows an AVX2-only CPU's instruction paths),
checks that it computes every layer exactly (against the convolution of the same integers in float64),
then times, per quantized convolution of resnet18 (CIFAR stem at 32x32, ImageNet stem at 224x224), three
kernels on the same uint8 activation codes (what a previous integer layer writes), each with the float
epilogue ``acc * s_x * s_w[c] + bias``, interleaved, back to back (:func:`interleaved_best`):

* bit-serial: the codes packed into bit planes, then AND + popcount over 64 channels per word;
* oneDNN int8 (``torch.ops.onednn.qconv2d_pointwise``, what the inference form runs): uint8 x int8;
* float: ``conv2d`` in float32, channels-last, on the dequantized input (for scale).

Weights are HWGQ's grids (2 bits: odd integers -3..3; 1 bit: +-1), activations unsigned codes. The
totals weight each layer by how often resnet18 has it. ``--smoke``: three small layers (one with a channel
tail), one round.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cmtkd_graph.runtime.precision import machine_line

SOURCE = Path(__file__).with_name("bitserial.cpp")
NB = 16  # output channels per block in the kernel

# resnet18's quantized convolutions: (input channels, output channels, input size / image size, kernel,
# stride, how many). The first convolution and the classifier stay float.
RESNET18_CIFAR = [
    (64, 64, 1, 3, 1, 4),
    (64, 128, 1, 3, 2, 1),
    (64, 128, 1, 1, 2, 1),
    (128, 128, 2, 3, 1, 3),
    (128, 256, 2, 3, 2, 1),
    (128, 256, 2, 1, 2, 1),
    (256, 256, 4, 3, 1, 3),
    (256, 512, 4, 3, 2, 1),
    (256, 512, 4, 1, 2, 1),
    (512, 512, 8, 3, 1, 3),
]  # input size = image size / divisor (the CIFAR stem keeps 32x32 into layer1)
RESNET18_IMAGENET = [(c, n, d * 4, k, s, m) for c, n, d, k, s, m in RESNET18_CIFAR]  # stem: /4
SMOKE = [(64, 64, 4, 3, 1, 1), (96, 40, 5, 3, 2, 1), (64, 128, 4, 1, 2, 1)]  # a channel tail, N % 16 != 0


def cxx() -> str | None:
    """The C++ compiler: ``$CXX``, else g++ or c++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(directory: Path, march: str = "native") -> Path:
    """Compile the kernel into ``directory`` for ``-march=march``; the shared library's path."""
    compiler = cxx()
    if compiler is None:
        sys.exit("error: no C++ compiler found (install g++, or set CXX)")
    root = Path(torch.__file__).parent
    library = directory / "bitserial.so"
    command = [
        compiler, "-O3", f"-march={march}", "-std=c++20", "-shared", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(SOURCE), "-o", str(library), f"-L{root / 'lib'}", "-ltorch", "-ltorch_cpu", "-lc10",
        f"-Wl,-rpath,{root / 'lib'}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: compiling {SOURCE.name} failed:\n{result.stderr[-3000:]}")
    return library


def popcount_instruction(march: str) -> str:
    """Which popcount the compiler emits for ``-march=march`` (AVX-512 VPOPCNTDQ or scalar)."""
    macros = subprocess.run(
        [cxx() or "c++", f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
        capture_output=True,
        text=True,
    ).stdout
    return "AVX-512 VPOPCNTDQ" if "__AVX512VPOPCNTDQ__" in macros else "scalar popcount (no VPOPCNTDQ)"


def weight_planes(integers: Tensor, bits: int) -> tuple[Tensor, int, Tensor]:
    """The kernel's weight operands: bit planes [bits, KH*KW, words, NP] of the codes, the gain and the
    per-channel offset with ``integer = gain * code + offset``."""
    n, c, kh, kw = integers.shape
    offset = integers.flatten(1).min(1).values
    spread = (integers - offset.view(-1, 1, 1, 1)).flatten()
    gain = math.gcd(*spread.unique().tolist()) or 1
    codes = (integers - offset.view(-1, 1, 1, 1)) // gain
    assert int(codes.max()) < 2**bits, "the weight integers need more bit planes"
    words, padded = (c + 63) // 64, (n + NB - 1) // NB * NB
    grid = torch.zeros(padded, words * 64, kh, kw, dtype=torch.int64)
    grid[:n, :c] = codes
    grid = grid.permute(2, 3, 1, 0).reshape(kh * kw, words, 64, padded)
    shifts = torch.arange(64, dtype=torch.int64).view(1, 1, 64, 1)
    # a set bit 63 wraps the int64 sum to a negative number: the same 64 bits
    planes = torch.stack([(((grid >> j) & 1) << shifts).sum(2) for j in range(bits)])
    return planes, gain, offset.to(torch.int32)


def hwgq_weights(n: int, c: int, k: int, bits: int, generator: torch.Generator) -> Tensor:
    """HWGQ's weight integers: 2 bits odd -3..3, 1 bit +-1."""
    top = 2**bits - 1
    return torch.randint(0, 2**bits, (n, c, k, k), generator=generator) * 2 - top


def layer_kernels(c, n, size, k, stride, w_bits, a_bits, batch, generator):
    """The three kernels of one layer (closures over its operands) and whether the bit-serial one is exact."""
    pad = k // 2
    codes = torch.randint(0, 2**a_bits, (batch, c, size, size), dtype=torch.uint8, generator=generator)
    codes = codes.contiguous(memory_format=torch.channels_last)
    integers = hwgq_weights(n, c, k, w_bits, generator)
    x_scale, w_scale = 0.25, torch.rand(n, generator=generator) * 0.1 + 0.01
    bias = torch.randn(n, generator=generator)
    planes, gain, offset = weight_planes(integers, w_bits)
    bitserial = torch.ops.cmtkd_bitserial

    def run_bitserial(multiplier: Tensor, with_bias: Tensor | None) -> Tensor:
        packed = bitserial.pack_planes(codes, a_bits, pad)
        return bitserial.conv2d(packed, planes, multiplier, with_bias, offset, gain, n, k, k, stride)

    reference = F.conv2d(codes.double(), integers.double(), stride=stride, padding=pad)
    exact = torch.equal(run_bitserial(torch.ones(n), None).double(), reference)
    multiplier = (x_scale * w_scale).float()
    packed_weight = torch.ops.onednn.qconv_prepack(
        integers.to(torch.int8), w_scale, x_scale, 0, [stride] * 2, [pad] * 2, [1, 1], 1, None
    )
    zero_points = torch.zeros(n, dtype=torch.int64)

    def run_onednn() -> Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            codes, x_scale, 0, packed_weight, w_scale, zero_points, bias, [stride] * 2, [pad] * 2, [1, 1], 1,
            1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    x = (codes.float() * x_scale).contiguous(memory_format=torch.channels_last)
    weight = (integers.float() * w_scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    kernels = {
        "bit-serial": lambda: run_bitserial(multiplier, bias),
        "oneDNN int8": run_onednn,
        "float": lambda: F.conv2d(x, weight, bias, stride=stride, padding=pad),
    }
    agree = torch.allclose(kernels["bit-serial"](), run_onednn(), rtol=1e-5, atol=1e-3)
    return kernels, exact and agree


def interleaved_best(kernels: dict, repeat: int, calls: int = 5) -> dict[str, float]:
    """Seconds per call of each kernel: the best of ``repeat`` rounds, each round timing ``calls``
    back-to-back calls of every kernel in turn (as the layers of a network follow each other: threads
    awake, no pause between calls)."""
    best = dict.fromkeys(kernels, math.inf)
    with torch.inference_mode():
        for _ in range(repeat):
            for name, kernel in kernels.items():
                kernel()
                start = time.perf_counter()
                for _ in range(calls):
                    kernel()
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", default="W2A2,W1A2,W1A1", help="weight and activation bits, e.g. W2A2,W1A1")
    parser.add_argument("--sizes", default="32,224", help="image sizes: 32 (CIFAR stem), 224 (ImageNet stem)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--march", default="native", help="the compiler's -march (x86-64-v3: AVX2 only)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    configs = []
    for item in args.bits.split(","):
        w, _, a = item.upper().removeprefix("W").partition("A")
        if not (w in ("1", "2") and a in ("1", "2")):
            parser.error(f"--bits {item}: the kernel has 1 or 2 bit planes each (W1A1, W1A2, W2A1, W2A2)")
        configs.append((int(w), int(a)))
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s not in (32, 224) for s in sizes):
        parser.error("--sizes: 32 and/or 224")
    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        sys.exit("error: this PyTorch has no oneDNN int8 convolution to compare with (x86 CPUs)")
    print(machine_line())
    print(f"bit-serial kernel compiled with -march={args.march}: {popcount_instruction(args.march)}")
    with tempfile.TemporaryDirectory() as directory:
        torch.ops.load_library(str(build(Path(directory), args.march)))
    generator = torch.Generator().manual_seed(0)
    repeat = 1 if args.smoke else args.repeat
    for size in [32] if args.smoke else sizes:
        layers = SMOKE if args.smoke else (RESNET18_CIFAR if size == 32 else RESNET18_IMAGENET)
        for w_bits, a_bits in configs:
            print(f"\nresnet18 {size}x{size}, W{w_bits}A{a_bits}, batch {args.batch}: us per layer "
                  f"(best of {repeat} rounds); bit-serial / oneDNN int8 / float")  # fmt: skip
            totals = dict.fromkeys(("bit-serial", "oneDNN int8", "float"), 0.0)
            for c, n, divisor, k, stride, count in layers:
                in_size = size // divisor if not args.smoke else divisor
                kernels, exact = layer_kernels(
                    c, n, in_size, k, stride, w_bits, a_bits, args.batch, generator
                )
                if not exact:
                    sys.exit(f"error: the bit-serial kernel is not exact on {c}->{n} {k}x{k}/{stride}")
                best = interleaved_best(kernels, repeat)
                for name, seconds in best.items():
                    totals[name] += count * seconds
                b, o, f = (1e6 * best[name] for name in totals)
                print(
                    f"  {c:>3}->{n:<3} {k}x{k}/{stride} at {in_size:>3}x{in_size:<3} x{count}  exact  "
                    f"{b:8.0f} {o:8.0f} {f:8.0f}   bit-serial x{o / b:4.2f} of int8, x{f / b:5.2f} of float"
                )
            b, o, f = (1e3 * totals[name] for name in totals)
            print(
                f"  all {sum(layer[-1] for layer in layers)} convolutions: bit-serial {b:.2f} ms, "
                f"oneDNN int8 {o:.2f} ms, float {f:.2f} ms: "
                f"bit-serial x{o / b:.2f} of int8, x{f / b:.2f} of float"
            )


if __name__ == "__main__":
    main()
