"""Deployment speed: the low-bit student against its float network, in the same runtime, on this machine.

For each model (resnet18 at 32x32 with the CIFAR stem and at 224x224; mobilenet_v2 at 224x224; HWGQ
W2A2 and LSQ W4A4 students; one W2A2 model per family beyond ResNets: MobileNetV3, EfficientNet, RegNet,
ConvNeXt, at 224x224) and each backend, the student's latency (batch 1) and throughput (batch 64)
against the float network of the same architecture, timed interleaved in one run (best of ``--repeat``
rounds, each round runs every candidate once):

* PyTorch: the float network; the student as training built it (``load_student``: weight quantizers and
  BatchNorm run on every call); its inference form (``load_student(..., inference=True)``: weights
  decoded once, BatchNorm folded) on float kernels and on oneDNN's int8 kernels (the default where
  this PyTorch has them).
* onnxruntime: the float network exported to ONNX; ``student.onnx`` of ``cmtkd-graph export`` (exact
  sub-byte QuantizeLinear/DequantizeLinear); ``student-int8.onnx`` (integer kernels; calibrated on
  ``--images``, so only with them), with how many quantized layers run on integer kernels.
* OpenVINO: the float network in fp32 (and in bf16, OpenVINO's default on CPUs that have it; the
  ratios are against fp32); ``student-openvino.xml`` (integer kernels with a float epilogue; checked
  on ``--images``, so only with them).

Students have random weights unless ``--run DIR`` gives a trained run or export (its model is then
the only one timed); with ``--images ROOT`` (an image folder, e.g. CIFAR-10's ``test/``), every
backend's top-1 agreement with the trained student and its largest logit difference on those images.

    python -m bench.deploy [--models resnet18-32,...] [--backends PyTorch,onnxruntime,OpenVINO]
                           [--repeat 7] [--run DIR --images ROOT] [--smoke]

``--smoke``: one small model at batch 1 and 2, one round (what CI runs, so the script keeps working).
What an AVX2-only CPU's instruction path gives, on a CPU with more: ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 python -m bench.deploy --backends PyTorch`` (oneDNN's int8 kernels then run
``jit_uni_int8:avx2``, without VNNI; the memory system stays this machine's).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import cmtkd_graph as cg
from cmtkd_graph.deploy.predict import image_files, interleaved_times
from cmtkd_graph.deploy.student import SPEC_FILE, STUDENT_FILE, build_student, find_student, load_student
from cmtkd_graph.runtime.precision import machine_line
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec.io import apply_override, dump_spec, validate_spec

CIFAR = ["surgery=[cifar_stem]", "data.image_size=32"]
MODELS = {  # name -> (base spec, overrides)
    "resnet18-32-hwgq-w2a2": ("resnet18", CIFAR),
    "resnet18-224-hwgq-w2a2": ("resnet18", ["surgery=[]", "data.image_size=224"]),
    "mobilenet_v2-224-hwgq-w2a2": (
        "resnet18",
        ["student.arch=mobilenet_v2", "surgery=[]", "data.image_size=224"],
    ),
    "mobilenet_v2-224-lsq-w4a4": (
        "resnet18",
        [
            "student.arch=mobilenet_v2",
            "surgery=[]",
            "data.image_size=224",
            "quantizer.name=lsq",
            "student.weight_bits=4",
            "student.act_bits=4",
        ],
    ),
    # one model per family beyond ResNets (docs/deployment.md#speed)
    **{
        f"{arch}-224-hwgq-w2a2": ("resnet18", [f"student.arch={arch}", "surgery=[]", "data.image_size=224"])
        for arch in ("mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny")
    },
}
BACKENDS = ("PyTorch", "onnxruntime", "OpenVINO")
COMMON = ["student.kwargs={num_classes: 10}", "teachers=[]", "method=single", "distill={}"]
FLOAT = ["student.weight_bits=32", "student.act_bits=32"]


def student_spec(name: str, smoke: bool) -> Spec:
    base, overrides = MODELS[name]
    extra = ["data.image_size=32"] if smoke else []
    return cg.load_spec(base, [*COMMON, *overrides, *extra])


def float_network(spec: Spec) -> torch.nn.Module:
    """The student's architecture in float (same surgery), with BatchNorm statistics like the student's."""
    data = spec.model_dump(mode="json")
    for override in FLOAT:
        apply_override(data, override)
    return build_student(validate_spec(data))


def random_student(spec: Spec) -> torch.nn.Module:
    """The spec's student with random weights, its data-dependent quantizer steps (LSQ) set as training
    sets them, from a first batch (here random images), and BatchNorm as built."""
    student = build_student(spec)
    state = {k: v.clone() for k, v in student.state_dict().items() if "running_" in k or "num_batches" in k}
    with torch.no_grad():
        student.train()(torch.randn(8, *spec.data.input_shape(), generator=torch.Generator().manual_seed(1)))
    student.load_state_dict(state, strict=False)
    return student.eval()


def as_run_dir(spec: Spec, student: torch.nn.Module, directory: Path) -> Path:
    """A directory ``cmtkd-graph export`` and ``load_student`` read: the spec and the student's weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPEC_FILE).write_text(dump_spec(spec))
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(directory / STUDENT_FILE))
    return directory


def torch_candidates(run: Path, spec: Spec) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The float network (as torchvision runs it, and in channels-last, which can be faster on CPUs), the
    student as trained, its inference form on float kernels and (where this PyTorch has oneDNN's int8
    convolution) on integer kernels, ``load_student(..., inference=True)``."""
    from cmtkd_graph.deploy.onednn_int8 import OneDNNInt8Conv2d, integer_kernels_available

    float_cl = float_network(spec).eval().to(memory_format=torch.channels_last)
    candidates = {
        "float": float_network(spec).eval(),
        "float, channels_last": lambda x: float_cl(x.contiguous(memory_format=torch.channels_last)),
        "student": load_student(run),
        "inference form, float kernels": load_student(run, inference=True, integer_kernels=False),
    }
    if integer_kernels_available():
        form = load_student(run, inference=True, integer_kernels=True)
        layers = [m for m in form.modules() if isinstance(m, OneDNNInt8Conv2d)]
        chained = sum(m.reads_codes for m in layers)
        print(
            f"  inference form: {len(layers)} quantized convolutions on oneDNN's int8 kernels, {chained} of "
            "them reading the uint8 codes the previous kernel wrote"
        )
        candidates["inference form"] = form
    return candidates


def exported(run: Path, spec: Spec, work: Path, images: str | None) -> tuple[Path, dict, Path | None]:
    """``cmtkd-graph export`` of the student (the integer formats only with real images to check them
    on) and the float network in ONNX; (export directory, manifest, float.onnx or None without ONNX)."""
    from cmtkd_graph.deploy.export import FORMATS, export

    formats = FORMATS if images else ("torch", "onnx")
    manifest = export(run, work / "export", formats=formats, images=images)
    try:
        import onnx  # noqa: F401
    except ImportError:
        return work / "export", manifest, None
    float_file = work / "float.onnx"
    sample = torch.randn(2, *spec.data.input_shape())  # batch 1 would be specialised (ConvNeXt: refused)
    torch.onnx.export(
        float_network(spec).eval(),
        (sample,),
        str(float_file),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        input_names=["images"],
        output_names=["logits"],
        verbose=False,
    )
    return work / "export", manifest, float_file


def onnx_candidates(export_dir: Path, manifest: dict, float_file: Path | None) -> dict[str, Callable]:
    """The float network, ``student.onnx`` and ``student-int8.onnx`` in onnxruntime."""
    try:
        import onnxruntime  # noqa: F401

        from cmtkd_graph.deploy import onnx_int8
    except ImportError:
        print("  onnxruntime: not installed (pip install 'cmtkd-graph[export]'), skipped")
        return {}
    if float_file is None:
        return {}

    def session(path: Path):
        s = onnx_int8.session(path, threads=torch.get_num_threads())
        return lambda x: torch.from_numpy(s.run(None, {"images": x.numpy()})[0])

    candidates = {"float": session(float_file), "student.onnx": session(export_dir / "student.onnx")}
    int8 = manifest.get("onnx_int8") or {}
    if int8.get("file"):
        print(
            f"  student-int8.onnx: {int8['integer_layers']} of {int8['quantized_layers']} quantized layers "
            f"on integer kernels in onnxruntime's optimized graph; {int8['why']}"
        )
        choice = int8.get("layer_choice", {})
        for variant in choice.get("variants", []):  # the export's own timing (deploy/int8_choice.py)
            kept = ", ".join(variant["float"]) or "none"
            mark = "  <- written" if variant["float"] == choice["float"] else ""
            times = " / ".join(f"{ms:.2f}" for ms in variant["ms"])
            print(f"    export timed, float: {kept}: {times} ms at batch {choice['batch_sizes']}{mark}")
        candidates["student-int8.onnx"] = session(export_dir / "student-int8.onnx")
    return candidates


def openvino_candidates(export_dir: Path, manifest: dict, float_file: Path | None) -> dict[str, Callable]:
    """The float network (fp32, and bf16 where OpenVINO would pick it by default on this CPU) and
    ``student-openvino.xml`` in OpenVINO."""
    section = manifest.get("openvino") or {}
    if not section.get("file") or float_file is None:
        why = section.get("skipped", "needs --images (the export checks it on them)")
        print(f"  OpenVINO: {why}; skipped")
        return {}
    import openvino as ov

    from cmtkd_graph.deploy.openvino_export import compile_model, runner

    threads = torch.get_num_threads()
    candidates = {"float": runner(compile_model(float_file, threads=threads))}
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        properties = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads}
        candidates["float bf16"] = runner(ov.Core().compile_model(str(float_file), "CPU", properties))
    print(
        f"  student-openvino.xml: {section['integer_layers']} of {section['quantized_layers']} quantized "
        f"layers on integer kernels in OpenVINO's compiled model; {section['why']}"
    )
    candidates["student-openvino.xml"] = runner(compile_model(export_dir / section["file"], threads=threads))
    return candidates


def agreement(candidates: dict, reference: torch.Tensor, images: torch.Tensor) -> dict[str, str]:
    out = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            got = in_batches(fn, images)
            top1 = (got.argmax(1) == reference.argmax(1)).float().mean().item()
            largest = (got - reference).abs().max().item()
            out[name] = f"top-1 agreement {100 * top1:.1f}%, largest logit difference {largest:.3g}"
    return out


def in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int = 250
) -> torch.Tensor:
    return torch.cat([fn(batch) for batch in images.split(size)])


def real_images(spec: Spec, root: str, limit: int) -> torch.Tensor:
    from cmtkd_graph.deploy.predict import read_images

    files = image_files(Path(root))
    step = max(1, len(files) // limit)  # spread over the classes of a sorted folder
    return read_images(files[::step][:limit], spec)


def bench_model(name: str, run: Path, spec: Spec, args, work: Path) -> None:
    print(f"\n{name}: input {'x'.join(map(str, spec.data.input_shape()))}")
    backends = {"PyTorch": torch_candidates(run, spec)} if "PyTorch" in args.backends else {}
    if {"onnxruntime", "OpenVINO"} & set(args.backends):
        export_dir, manifest, float_file = exported(run, spec, work, args.images)
        if "onnxruntime" in args.backends:
            backends["onnxruntime"] = onnx_candidates(export_dir, manifest, float_file)
        if "OpenVINO" in args.backends:
            backends["OpenVINO"] = openvino_candidates(export_dir, manifest, float_file)
    batches = (1, 2) if args.smoke else (1, 64)
    for backend, candidates in backends.items():
        if not candidates:
            continue
        for batch in batches:
            x = torch.randn(batch, *spec.data.input_shape(), generator=torch.Generator().manual_seed(0))
            times = interleaved_times(candidates, x, args.repeat)
            base = times["float"]
            cells = ", ".join(
                f"{k} {1e3 * t:.1f} ms (x{base / t:.2f})" for k, t in times.items() if k != "float"
            )
            print(f"  {backend:11s} batch {batch:3d}: float {1e3 * base:.1f} ms; {cells}")
        if args.images:
            images = real_images(spec, args.images, args.limit)
            with torch.inference_mode():
                reference = in_batches(load_student(run), images)
            for k, line in agreement(
                {k: v for k, v in candidates.items() if not k.startswith("float")}, reference, images
            ).items():
                print(f"  {backend:11s} {k} on {len(images)} real images: {line}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--backends",
        type=lambda text: text.split(","),
        default=list(BACKENDS),
        help=f"some of {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--run", help="a trained run or export directory: time and check its student")
    parser.add_argument("--images", help="an image folder (e.g. data/cifar10/test) for the agreement")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many real images")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: {', '.join(sorted(unknown))} not among {', '.join(BACKENDS)}")
    if args.smoke:
        args.repeat = 1
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.run:
            spec = find_student(args.run).spec
            bench_model(f"{spec.student.arch} from {args.run}", Path(args.run), spec, args, work)
            return
        names = ["resnet18-32-hwgq-w2a2"] if args.smoke else args.models.split(",")
        for name in names:
            torch.manual_seed(0)
            spec = student_spec(name, args.smoke)
            run = as_run_dir(spec, random_student(spec), work / name / "run")
            bench_model(name, run, spec, args, work / name)


if __name__ == "__main__":
    main()
