"""The benchmarks keep working: each runs in its smoke mode (toy sizes; timings are not checked)."""

from __future__ import annotations

import importlib
import re
import subprocess

from .conftest import REPO, in_this_process, run_module


def bench(name: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m bench.NAME ARGS``, run in this process. The step, memory and deploy benches' smoke
    runs start processes of their own: they profile, probe and measure their own process (the step
    bench once took down a pytest worker that had run other tests in-process)."""
    main = importlib.import_module(f"bench.{name}").main
    status, out, err = in_this_process(REPO, lambda: main(list(args)))
    return subprocess.CompletedProcess(["python", "-m", f"bench.{name}", *args], status, out, err)


def test_step_bench_smoke(tmp_path):
    result = run_module(
        ["--smoke"], cwd=REPO, module="bench.step", env={"CMTKD_GRAPH_CACHE_DIR": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("CPU: ")
    # (a) ran after checking that the composed and the hand-written losses are equal
    assert re.search(r"resnet18 16x16 W2A2 \+ 4/6/8-bit, batch 2 +\d+ms +\d+ms +\d\.\d{3}", out), out
    assert re.search(r"fp32: +\d+\.\d GFLOP/s", out) and "of the conv's rate" in out
    assert re.search(r"fp32 channels_last +\d\.\d{3} s/step", out) and "auto picks: " in out
    assert not list(tmp_path.iterdir())  # the fresh probe used a cache of its own


def test_build_bench_on_one_model():
    result = bench("build", "--models", "alexnet", "--repeat", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"built 1 systems \(student \+ 3 composed teachers, meta device\) in \d", result.stdout)


def test_memory_bench_smoke():
    result = run_module(["--smoke"], cwd=REPO, module="bench.memory")
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("off", "on"):
        assert re.search(rf"quickstart, activation_checkpointing {mode} +\d+ MiB +\d+ MiB", result.stdout)
    assert re.search(r"checkpointing keeps x0\.\d\d of the activations", result.stdout), result.stdout


def test_deploy_bench_smoke(cifar10_jpeg):
    result = run_module(
        ["--smoke", "--images", str(cifar10_jpeg / "test"), "--limit", "20"], cwd=REPO, module="bench.deploy"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("CPU: ")
    for backend in ("PyTorch", "onnxruntime", "OpenVINO"):
        assert re.search(rf"{backend} +batch +1: float \d+\.\d ms; ", out), out
    assert re.search(r"inference form \d+\.\d ms \(x\d+\.\d\d\)", out)
    assert re.search(r"inference form, float kernels \d+\.\d ms \(x\d+\.\d\d\)", out)
    assert "inference form: 19 quantized convolutions on oneDNN's int8 kernels, 8 of them" in out, out
    assert re.search(r"student\.onnx \d+\.\d ms \(x\d+\.\d\d\)", out)
    assert re.search(r"student-int8\.onnx \d+\.\d ms \(x\d+\.\d\d\)", out), out
    assert re.search(r"student-int8\.onnx: 19 of 19 quantized layers on integer kernels", out), out
    assert re.search(r"student-openvino\.xml \d+\.\d ms \(x\d+\.\d\d\)", out), out
    assert re.search(r"student-openvino\.xml: 19 of 19 quantized layers on integer kernels", out), out
    # each backend against the trained student on real images
    assert re.search(r"inference form on 20 real images: top-1 agreement \d+\.\d%", out), out


def test_deploy_bench_times_only_the_backends_asked_for():
    result = bench("deploy", "--smoke", "--backends", "PyTorch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"PyTorch +batch +1: float \d+\.\d ms; ", result.stdout), result.stdout
    assert "onnxruntime" not in result.stdout and "OpenVINO" not in result.stdout, result.stdout
    wrong = bench("deploy", "--smoke", "--backends", "PyTorch,tensorrt")
    assert wrong.returncode == 2 and "--backends: tensorrt not among" in wrong.stderr, wrong.stderr[-2000:]


def test_bitserial_bench_is_exact_on_every_kernel_variant():
    """W2A2, W1A2 and W1A1 on a 64-channel layer, a channel tail (96 = 64 + 32) with 40 output channels
    at stride 2, and a 1x1 stride-2 layer: the bench exits with an error unless the bit-serial kernel
    equals the float64 convolution of the same integers and oneDNN's int8 layer with the same epilogue."""
    result = bench("bitserial", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("CPU: ") and "bit-serial kernel compiled with -march=native: " in out
    for bits in ("W2A2", "W1A2", "W1A1"):
        assert f"resnet18 32x32, {bits}, batch 1" in out, out
    assert len(re.findall(r" exact +\d+ +\d+ +\d+ +bit-serial x\d+\.\d\d of int8", out)) == 9, out
    assert len(re.findall(r"all 3 convolutions: bit-serial \d+\.\d\d ms, oneDNN int8 \d+\.\d\d ms", out)) == 3
    wrong = bench("bitserial", "--smoke", "--bits", "W4A4")
    assert wrong.returncode == 2 and "1 or 2 bit planes each" in wrong.stderr, wrong.stderr[-2000:]


def test_rounding_bench_compares_the_two_layouts_of_each_network():
    """Float, W8A8 and W2A2 resnet18 in NCHW and channels_last: a loss, a gradient difference and four
    stages each; the float network's stages agree to rounding, and only the quantized ones have codes."""
    result = bench("rounding", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("CPU: ")
    for name in ("full precision", "W8A8", "W2A2"):
        assert re.search(rf"  {name} +loss \d\.\d{{6}} vs \d\.\d{{6}} +gradient \d\.\de[+-]\d\d", out), out
    float_part = out.split("  full precision")[1].split("  W8A8")[0]
    differences = [float(d) for d in re.findall(r"layer\d: output (\S+?)\n", float_part)]
    assert len(differences) == 4 and max(differences) < 1e-4, float_part
    assert len(re.findall(r"activation codes that differ +\d+\.\d\d %", out)) == 8, out


def test_the_eager_vit_cmtkd_is_the_composed_system():
    """bench.step's ViT row compares like with like: the hand-written eager CMT-KD of vit_b_16 (signed
    input quantizers after layer norm and GELU, quantized self-attention, taps after blocks 3, 6, 9 and
    12) gives the composed system's loss and every student gradient exactly, W2A2 with a W4A4 teacher."""
    import torch

    import cmtkd_graph as cg
    from bench.eager_cmtkd import VIT_KWARGS, EagerCMTKD
    from cmtkd_graph.quantizers import build_quantizer_family

    kwargs = ", ".join(f"{k}: {v}" for k, v in VIT_KWARGS.items())
    spec = cg.load_spec(
        "resnet18",
        [
            "student.arch=vit_b_16",
            f"student.kwargs={{num_classes: 10, {kwargs}}}",
            "surgery=[]",
            "taps={teachers: auto}",
            "teachers=[{weight_bits: 4, act_bits: 4}]",
            "data.image_size=32",
        ],
    )
    torch.manual_seed(0)
    system = cg.build_system(spec)
    d = spec.distill
    weights = {"alpha": d.alpha, "beta": d.beta, "gamma": d.gamma, "tau": d.tau}
    eager = EagerCMTKD("vit", 10, build_quantizer_family("hwgq"), 2, [4], **weights)
    eager.load_from_system(system)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    composed, by_hand = system(x, y)[1]["total"], eager.loss(x, y)
    assert composed.item() == by_hand.item()
    (composed + by_hand).backward()
    theirs = dict(eager.student.model.named_parameters())
    mine = {k: p for k, p in system.student.named_parameters() if p.grad is not None}
    assert len(mine) == len(theirs) == 152  # every parameter of the student
    assert all(torch.equal(p.grad, theirs[k].grad) for k, p in mine.items())
