"""OpenVINO export (``student-openvino.xml`` + ``.bin``): the student on integer kernels, to the trained
student's own rounding.

OpenVINO's CPU plugin runs a convolution whose input and weights are quantized in the graph on its int8
kernels (oneDNN: AVX2, AVX-512 VNNI or AMX, whichever the CPU has) and does what follows in a float
epilogue of the same kernel: per-channel scale, bias, residual addition, ReLU, the next layer's
quantizer. So unlike onnxruntime's ``QLinearConv`` it needs no 8-bit output and no integer bias: the
model is the int8 QDQ graph of ``onnx_int8`` with float outputs and biases (``build_int8_onnx`` without
calibration images), the 2-bit (or 4-bit) saturation is a ``Clip`` on the integers, and nothing is
rounded that the trained student does not round. Real images are still needed, to check that.

The model is compiled with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 OpenVINO would otherwise
run the float layers (first convolution, classifier) in bf16 and move the logits. The manifest records,
per quantized layer, the kernel and precision the compiled model actually runs it with (the runtime
graph's ``primitiveType`` and ``runtimePrecision``), and the top-1 agreement with the trained student.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import openvino as ov
import torch
from torch import Tensor, fx

from cmtkd_graph.deploy.inference import inference_form
from cmtkd_graph.deploy.onnx_int8 import Int8Plan, agreement, build_int8_onnx

INTEGER_PRECISIONS = {"u8", "i8"}
PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def compile_model(path: Path | str, *, threads: int = 0) -> ov.CompiledModel:
    """The model at ``path`` compiled for this machine's CPU (float layers in fp32, see module docstring)."""
    properties = dict(PROPERTIES, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    return ov.Core().compile_model(str(path), "CPU", properties)


def runner(compiled: ov.CompiledModel):
    """``images -> logits`` with one infer request (not thread-safe; one per caller)."""
    request = compiled.create_infer_request()
    return lambda batch: torch.from_numpy(request.infer({0: batch.numpy()})[0].copy())


def kernels(compiled: ov.CompiledModel, layers: list[str]) -> dict[str, tuple[str, str]]:
    """Per layer: the (kernel, precision) the compiled model runs it with. The runtime graph's nodes keep
    the name of the ONNX node they start from, which begins with the layer's name."""
    found: dict[str, tuple[str, str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in {"Convolution", "FullyConnected", "MatMul", "Deconvolution"}:
            continue
        name = op.get_friendly_name()
        for layer in layers:
            if name.startswith(f"{layer}/"):
                found[layer] = (info["primitiveType"].astype(str), info["runtimePrecision"].astype(str))
    return found


def export_openvino(
    student: fx.GraphModule,
    records: list[dict],
    path: Path,
    *,
    check: Tensor,
    source: str,
    uncalibrated: tuple[onnx.ModelProto, Int8Plan] | None = None,
) -> dict:
    """Write ``path`` (and its ``.bin``) from the trained ``student``; add each quantized layer's kernel to
    its manifest record; return the manifest's ``openvino`` section. ``uncalibrated``: the student's
    int8 graph without calibration (``build_int8_onnx(form, shape, None)``) where the caller has it."""
    if uncalibrated is None:
        uncalibrated = build_int8_onnx(inference_form(student), tuple(check.shape[1:]), None)
    onnx_model, plan = uncalibrated
    model = ov.Core().read_model(onnx_model.SerializeToString())
    ov.save_model(model, str(path), compress_to_fp16=False)
    compiled = compile_model(path)
    used = kernels(compiled, list(plan.integer))
    for record in records:
        name = record["name"]
        if name in plan.integer:
            kernel, precision = used.get(name, ("?", "?"))
            record["openvino"] = {
                "kernel": kernel,
                "precision": precision,
                "integer": precision in INTEGER_PRECISIONS,
                "why": plan.integer[name] or "int8 input and weights, float epilogue",
            }
    run = runner(compiled)
    got = torch.cat([run(batch) for batch in check.split(64)]).numpy()
    return {
        "file": path.name,
        "runtime": f"openvino {ov.__version__.split('-')[0]}",
        "check": f"{len(check)} images of {source}",
        "check_images": len(check),
        **agreement(student, check, got),
        "integer_layers": sum(1 for kernel in used.values() if kernel[1] in INTEGER_PRECISIONS),
        "quantized_layers": len(plan.integer),
        "bytes": path.stat().st_size + path.with_suffix(".bin").stat().st_size,
    }


__all__ = ["compile_model", "export_openvino", "kernels", "runner"]
