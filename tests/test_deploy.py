"""After training: eval, export (torch / packed codes / ONNX), the integer reference, predict, load_student.

One real CMT-KD run on real CIFAR-10 JPEGs (W2A2 resnet18 student, 4- and 8-bit teachers, FitNet
adapters so that there is something to leave out of the export) is trained once for the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cmtkd_graph as cg
from cmtkd_graph import cli as cg_cli
from cmtkd_graph.data import build_datasets
from cmtkd_graph.deploy.codes import CODES_FILE, decode_weight, quantized_layers
from cmtkd_graph.deploy.export import export
from cmtkd_graph.deploy.inference import ActivationRequantizer, IntegerWeightConv2d, inference_form
from cmtkd_graph.deploy.integer import FLOAT64_EXACT, integer_conv2d, integer_matmul, integer_student
from cmtkd_graph.deploy.onednn_int8 import (
    OneDNNInt8Conv2d,
    chain_integer_convolutions,
    fits,
    integer_kernels_available,
    rounds_plainly,
    use_integer_kernels,
)
from cmtkd_graph.deploy.packing import pack_codes, packed_bytes, unpack_codes
from cmtkd_graph.deploy.predict import format_predictions, predict
from cmtkd_graph.deploy.student import build_student
from cmtkd_graph.evaluation.run import evaluate_run

from .conftest import launch_two_processes, run_cli

REPO = Path(__file__).resolve().parents[1]

INT8_KERNELS = pytest.mark.skipif(
    not integer_kernels_available(), reason="this PyTorch build has no oneDNN int8 convolution"
)


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_cli(cwd, *args)


def spec_text(
    root: Path, out: Path, *, student: str = "resnet18", quantizer: str = "hwgq", bits: int = 2
) -> str:
    return f"""
name: deploy
method: cmtkd
student: {{arch: resnet18, kwargs: {{num_classes: 10}}, weight_bits: 2, act_bits: 2}}
teachers: [{{weight_bits: 4, act_bits: 4}}, {{weight_bits: 8, act_bits: 8}}]
quantizer: {{name: hwgq}}
surgery: [cifar_stem]
taps: {{teachers: [layer2, layer3]}}
distill: {{feature_loss: fitnet}}
data: {{dataset: imagefolder, root: {root}, image_size: 32, batch_size: 16, num_workers: 0,
       eval_batch_size: 16}}
train: {{max_steps: 3, log_every: 1, output_dir: {out}, progress_bar: false, mixed_precision: "no",
        channels_last: false}}
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cifar10_jpeg) -> Path:
    tmp = tmp_path_factory.mktemp("deploy")
    spec = tmp / "spec.yaml"
    spec.write_text(spec_text(cifar10_jpeg, tmp / "run"))
    result = run_cli(tmp, "train", str(spec))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "student"
    result = cli("export", str(trained_run), "--out", str(out), "--int8-layers", "every")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MiB packed vs" in result.stdout and "BOPs" in result.stdout
    return out


def real_images(spec: cg.Spec, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = build_datasets(spec.data)
    images, labels = zip(*(bundle.eval[i] for i in range(n)), strict=True)
    return torch.stack(images), torch.tensor(labels)


def trained_system(run_dir: Path) -> cg.CMTKDSystem:
    """The system exactly as training left it (from its last checkpoint), in eval mode."""
    spec = cg.load_spec(run_dir / "spec.yaml")
    system = cg.build_system(spec, load=False)
    checkpoint = json.loads((run_dir / "checkpoints" / "latest").read_text())["checkpoint"]
    system.load_state_dict(load_file(str(run_dir / "checkpoints" / checkpoint / "model.safetensors")))
    return system.eval()


# ------------------------------------------------------------------------------------ export + reload
def test_exported_student_reproduces_the_trained_student_bit_exactly(trained_run, exported):
    system = trained_system(trained_run)
    images, _ = real_images(system.spec)
    student = cg.load_student(exported)
    with torch.no_grad():
        expected = system.student(images)["logits"]
        got = student(images)
    assert torch.equal(got, expected)
    # the run directory and its checkpoint load to the same student
    for source in (trained_run, sorted((trained_run / "checkpoints").glob("step-*"))[-1]):
        with torch.no_grad():
            assert torch.equal(cg.load_student(source)(images), expected)
    # the student alone: no teachers, adapters, fusion/importance logits, in the module or the files
    names = [n for n, _ in student.named_modules()] + list(student.state_dict())
    assert not [n for n in names if n.split(".")[0] in {"teachers", "adapters", "fusion", "method_modules"}]
    assert any(k.startswith("adapters.") for k in system.state_dict())  # ... which the run had
    for file in ("student.safetensors", CODES_FILE):
        with safe_open(str(exported / file), "pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "teacher" in k or "adapter" in k or "importance" in k or "fusion" in k]


def test_codes_decode_to_the_trained_fake_quantized_weights(trained_run, exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    tensors = load_file(str(exported / CODES_FILE))
    student = trained_system(trained_run).student
    quantized = [layer for layer in manifest["layers"] if layer["weights"]]
    assert len(quantized) == 19  # resnet18: all convolutions but the first, no fc (first/last stay float)
    for layer in quantized:
        (record,) = layer["weights"]
        q, scale = decode_weight(tensors, record)
        module = student.get_submodule(layer["name"])
        assert torch.equal(q.float() * scale, module.weight_quantizer(module.weight).detach())
        assert (
            record["distinct_codes"] <= 2 ** record["bits"] and q.unique().numel() == record["distinct_codes"]
        )
        assert tensors[f"codes/{record['tensor']}"].numel() == record["packed_bytes"]
        assert record["packed_bytes"] == packed_bytes(int(np.prod(record["shape"])), 2)
        assert sorted(set(q.unique().tolist())) <= [-3, -1, 1, 3]  # HWGQ 2-bit mid-rise: odd integers


def test_manifest_reports_size_and_bops_hand_computed(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    student = build_student(cg.load_spec(exported / "spec.yaml"))
    state = student.state_dict()
    params = sum(v.numel() for k, v in state.items() if "quantizer" not in k and "num_batches" not in k)
    assert manifest["size"]["float_bytes"] == 4 * params
    codes = sum(w["packed_bytes"] for layer in manifest["layers"] for w in layer["weights"])
    latent = sum(int(np.prod(w["shape"])) for layer in manifest["layers"] for w in layer["weights"])
    inputs = sum(len(layer["inputs"]) for layer in manifest["layers"])
    assert manifest["size"]["packed_bytes"] == 4 * (params - latent) + codes + 4 * (19 + inputs)
    # layer1.0.conv1 at 32x32 with the CIFAR stem: 64 x 32 x 32 outputs, 64 x 3 x 3 MACs each, W2A2
    layer = next(r for r in manifest["layers"] if r["name"] == "layer1.0.conv1")
    assert layer["macs"] == 64 * 32 * 32 * 64 * 9 and layer["bops"] == layer["macs"] * 2 * 2
    first = manifest["layers"][0]
    assert first["name"] == "conv1" and first["bops"] == first["macs"] * 32 * 32 == 64 * 32 * 32 * 27 * 1024
    assert manifest["cost"]["bops"] == sum(r["bops"] for r in manifest["layers"])
    assert manifest["cost"]["float_bops"] == 1024 * manifest["cost"]["macs"]


def _cifar_student_spec(arch: str, bits: int, kwargs: str = "", overrides: tuple[str, ...] = ()) -> cg.Spec:
    """The quickstart with ``arch`` (10 classes, more builder ``kwargs`` as ``"key: value, ..."``) as a
    W``bits``A``bits`` student on 32x32 CIFAR-10 images, no surgery, auto taps; then ``overrides``."""
    return cg.load_spec(
        "quickstart",
        [
            f"student.arch={arch}",
            f"student.kwargs={{num_classes: 10{', ' + kwargs if kwargs else ''}}}",
            f"student.weight_bits={bits}",
            f"student.act_bits={bits}",
            "surgery=[]",
            "taps={teachers: auto}",
            "data={dataset: cifar10, image_size: 32}",
            *overrides,
        ],
    )


def test_the_macs_of_self_attention_are_its_four_projections():
    """``nn.MultiheadAttention`` returns (output, weights), which shape propagation does not record: its
    MACs are read from its output's [0] (ViT-B/16 at 32x32: 5 tokens x 4 projections of 768 x 768),
    so that ``export`` writes a ViT student's manifest."""
    from cmtkd_graph.passes.shapes import propagate_shapes

    from cmtkd_graph.deploy.cost import node_macs

    spec = _cifar_student_spec("vit_b_16", 2, "image_size: 32")
    student = cg.system.build_network(spec.student, spec, device="meta")
    propagate_shapes(student, (1, 3, 32, 32))
    node = next(n for n in student.graph.nodes if n.target == "encoder.layers.encoder_layer_0.self_attention")
    assert node.meta.get("val") is None and node_macs(student, node) == 5 * 4 * 768 * 768


def test_integer_reference_equals_the_fake_quantized_student(trained_run, exported):
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec)
    integer = integer_student(exported)
    fake = cg.load_student(exported)
    assert sum(type(m).__name__ == "IntegerLayer" for m in integer.modules()) == 19
    with torch.no_grad():
        expected = fake(images)
        got = integer(images)
    assert_agrees_but_at_boundaries(got.numpy(), expected.numpy())
    assert_layers_equal_within_float_rounding(integer, fake, images)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert "int64 accumulation" in manifest["layers"][1]["integer"]


def assert_layers_equal_within_float_rounding(integer, fake, images: torch.Tensor) -> None:
    """Each integer layer, given what the fake-quantized layer's input quantizer received, computes the
    fake-quantized layer's output within float rounding."""
    inputs = {}
    for name, module in fake.named_modules():
        if name.endswith(".input_quantizer"):
            layer = name.removesuffix(".input_quantizer")
            module.register_forward_hook(lambda m, a, out, layer=layer: inputs.__setitem__(layer, a[0]))
    with torch.no_grad():
        fake(images)
        checked = 0
        for name, module in integer.named_modules():
            if type(module).__name__ == "IntegerLayer":
                x = inputs[name]
                reference = fake.get_submodule(name)
                expected = reference(reference.input_quantizer(x))
                torch.testing.assert_close(
                    module(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
                )
                checked += 1
    assert checked > 0


def test_onnx_matches_pytorch_on_real_images_with_low_bit_qdq(exported):
    import onnx
    import onnxruntime as ort

    manifest = json.loads((exported / "manifest.json").read_text())
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec)
    session = ort.InferenceSession(str(exported / "student.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = cg.load_student(exported)(images).numpy()
    assert_agrees_but_at_boundaries(got, expected)
    model = onnx.load(str(exported / "student.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") >= 19 and ops.count("QuantizeLinear") >= 1
    inner = next(r for r in manifest["layers"] if r["name"] == "layer1.0.conv1")["onnx"]
    # 2-bit activations 0..3 fit UINT2 (opset 25); 2-bit mid-rise weights -3..3 need INT4
    assert inner["inputs"][0]["type"] in {"UINT2", "UINT4", "UINT8"} and inner["inputs"][0]["why"]
    assert (
        inner["weights"][0]["type"] in {"INT4", "INT8"} and "odd integers -3..3" in inner["weights"][0]["why"]
    )
    assert manifest["onnx"]["top1_agreement"] >= 0.75 and manifest["onnx"]["images_within_tolerance"] >= 6
    assert manifest["onnx"]["check_source"] == "the run's evaluation data (imagefolder)"  # 8 real images


def assert_agrees_but_at_boundaries(got: np.ndarray, expected: np.ndarray) -> None:
    """onnxruntime (or the integer reference) against PyTorch, as docs/deployment.md#how-exact states it:
    logits within 1e-3 x max |logit| for the images where no activation sits within float rounding of a level
    boundary. Such an activation can take the neighbouring level (the two sum convolutions in different
    orders), so a few images may differ more; most must not, and their predicted classes must agree."""
    tolerance = 1e-3 * max(1.0, np.abs(expected).max())
    within = (np.abs(got - expected).max(axis=1) <= tolerance).mean()
    assert within >= 0.75, f"only {within:.0%} of the images within {tolerance:.3g}"
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("quantizer", ["hwgq", "lsq", "dorefa", "pact"])
def test_codes_are_exact_for_every_family_at_1_2_4_8_bits(quantizer, tmp_path):
    torch.manual_seed(0)
    for bits in (1, 2, 4, 8):
        spec = cg.load_spec(
            "quickstart",
            [f"quantizer.name={quantizer}", f"student.weight_bits={bits}", f"student.act_bits={bits}"],
        )
        student = build_student(spec)
        student.train()(torch.randn(4, 3, 28, 28))  # LSQ steps start from data
        student.eval()
        for layer in quantized_layers(student):
            for w in layer.weights:
                module = student.get_submodule(w.quantizer.rpartition(".")[0])
                expected = module.get_submodule(w.quantizer.rpartition(".")[2])(w_latent(module, w.tensor))
                assert torch.equal(w.decode(), expected.detach()), (quantizer, bits, w.tensor)
                assert w.distinct_codes <= 2**bits
                packed = pack_codes(w.codes, bits)
                assert packed.numel() == w.packed_bytes == packed_bytes(w.codes.numel(), bits)
                assert torch.equal(unpack_codes(packed, bits, w.codes.numel()), w.codes.reshape(-1))


def w_latent(module: torch.nn.Module, tensor: str) -> torch.Tensor:
    return module.get_parameter(tensor.rpartition(".")[2])


@pytest.mark.parametrize("quantizer", ["lsq", "dorefa", "pact"])
def test_integer_reference_and_onnx_for_the_other_families(quantizer, trained_run, tmp_path):
    """The run's weights with another family's quantizers (its checkpoint loads: same parameter names)."""
    pytest.importorskip("onnxruntime")
    spec = cg.load_spec(trained_run / "spec.yaml", [f"quantizer.name={quantizer}"])
    student = build_student(spec)
    state = load_file(str(trained_run / "student.safetensors"))
    student.load_state_dict({k: v for k, v in state.items() if "quantizer" not in k}, strict=False)
    student.train()(real_images(spec, 8)[0])  # LSQ: steps from real data; BN statistics move a little
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(cg.dump_spec(spec))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run / "student.safetensors"))
    manifest = export(run, tmp_path / "out", formats=("torch", "codes", "onnx"))  # what is checked here
    images, _ = real_images(spec)
    fake, integer = cg.load_student(tmp_path / "out"), integer_student(tmp_path / "out")
    with torch.no_grad():
        expected, got = fake(images), integer(images)
    assert_agrees_but_at_boundaries(got.numpy(), expected.numpy())
    assert_layers_equal_within_float_rounding(integer, fake, images)
    assert manifest["onnx"]["images_within_tolerance"] >= 6


def test_the_torchscript_tracer_writes_the_quantizers_as_torch_export_does(tmp_path):
    """The TorchScript path (detectors: ``torch.export`` does not trace their box logic) writes every
    quantizer with the symbolic functions' Q/DQ nodes at opset 20, 8-bit types behind a Clip where the
    other path uses 2-bit ones: on a W2A2 MobileNetV3 (signed mid-rise activations after Hardswish,
    unsigned after ReLU, signed mid-rise weights) its logits are the ``torch.export`` file's, bit for bit."""
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from cmtkd_graph.deploy.onnx_export import export_onnx

    overrides = ["student.arch=mobilenet_v3_small", "student.weight_bits=2", "student.act_bits=2"]
    spec = cg.load_spec("quickstart", [*overrides, "data.image_size=32", "taps.teachers=auto"])
    torch.manual_seed(0)
    student = build_student(spec)
    layers = quantized_layers(student)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    logits, ops = {}, {}
    for tracer in ("torch.export", "torchscript"):
        path = tmp_path / f"{tracer}.onnx"
        section = export_onnx(
            student, layers, [{} for _ in layers], path, input_shape=spec.data.input_shape(), tracer=tracer
        )
        assert section["tracer"] == tracer and (section["opset"] == 20) == (tracer == "torchscript")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits[tracer],) = session.run(None, {"images": x})
        ops[tracer] = [n.op_type for n in onnx.load(str(path)).graph.node]
    np.testing.assert_array_equal(logits["torchscript"], logits["torch.export"])
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert ops["torchscript"].count(op) == ops["torch.export"].count(op) > 40
    assert ops["torchscript"].count("Clip") >= ops["torchscript"].count("QuantizeLinear")  # INT8 for 2 bits


def test_onnx_export_of_mobilenet_v2(tmp_path, cifar10_jpeg):
    """Another family: depthwise convolutions, ReLU6, a 4-bit LSQ student (signed and unsigned grids)."""
    pytest.importorskip("onnxruntime")
    spec = cg.load_spec(
        "quickstart",
        [
            "student.arch=mobilenet_v2",
            "quantizer.name=lsq",
            "student.weight_bits=4",
            "student.act_bits=4",
            "data.dataset=imagefolder",
            f"data.root={cifar10_jpeg}",
            "data.image_size=32",
            "taps.teachers=auto",
        ],
    )
    student = build_student(spec)
    images, _ = real_images(spec)
    student.train()(images)
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(cg.dump_spec(spec))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run / "student.safetensors"))
    manifest = export(run, tmp_path / "out", int8_layers="every")
    assert manifest["onnx"]["images_within_tolerance"] >= 6
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"), providers=["CPUExecutionProvider"])
    fake, integer = cg.load_student(tmp_path / "out"), integer_student(tmp_path / "out")
    with torch.no_grad():
        expected = fake(images).numpy()
        got_int = integer(images).numpy()
    (got,) = session.run(None, {"images": images.numpy()})
    assert_agrees_but_at_boundaries(got, expected)
    assert_agrees_but_at_boundaries(got_int, expected)
    assert_layers_equal_within_float_rounding(integer, fake, images)
    # int8: signed 4-bit inputs as uint8 with a zero point, ReLU6 left to the quantizer where its bound is
    # above the top level: every quantized layer (depthwise included) on QLinearConv
    int8 = manifest["onnx_int8"]
    assert int8["integer_layers"] == int8["quantized_layers"] == 51, int8
    session = ort.InferenceSession(
        str(tmp_path / "out" / "student-int8.onnx"), providers=["CPUExecutionProvider"]
    )
    (got_int8,) = session.run(None, {"images": images.numpy()})
    assert (got_int8.argmax(1) == expected.argmax(1)).mean() >= 0.9


# ------------------------------------------------------------------------------------ eval and predict
def test_eval_reproduces_final_json(trained_run, tmp_path, fresh_accelerate):
    result = cli("eval", str(trained_run), "--out", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    final = json.loads((trained_run / "final.json").read_text())
    assert {k: v for k, v in record.items() if k.startswith("acc")} == final["accuracy"]
    assert {"acc1/student", "acc1/combined", "acc1/teacher0", "acc1/teacher1"} <= set(record)
    assert record["samples"] == 100 and "final.json top-1" in result.stdout
    train = evaluate_run(trained_run, split="train", out=tmp_path / "train.json")
    assert train["samples"] == 200 and train["split"] == "train"


def test_eval_under_accelerate_launch_counts_each_image_once(trained_run, tmp_path):
    out = tmp_path / "eval2.json"
    result = launch_two_processes(
        ["cmtkd_graph", "eval", str(trained_run), "--out", str(out), "--set", "data.eval_batch_size=7"],
        cwd=tmp_path,
        port=29561,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    final = json.loads((trained_run / "final.json").read_text())
    assert record["processes"] == 2 and record["samples"] == 100
    assert {k: v for k, v in record.items() if k.startswith("acc")} == final["accuracy"]


def test_eval_command_destroys_the_process_group_it_ran_in(trained_run, tmp_path):
    # left to interpreter exit, gloo's threads can abort a launched process after its work is done
    # ("terminate called without an active exception", exit -6): the entry point tears the group down
    script = f"""
import torch.distributed as dist
from cmtkd_graph.cli import main
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
status = main(["eval", "{trained_run}", "--out", "{tmp_path / "eval.json"}"])
print("status", status, "group left", dist.is_initialized())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status 0 group left False" in result.stdout, result.stdout[-2000:]


def test_predict_names_classes_with_every_backend(exported, cifar10_jpeg):
    images = sorted((cifar10_jpeg / "test").glob("*/*.jpg"))[:3]
    outputs = [
        predict(exported, images, top=2, backend=b)
        for b in ("torch", "integer", "onnx", "inference", "onnx-int8", "openvino")
    ]
    result = cli("predict", str(exported), *map(str, images), "--top", "2", "--json", "--backend", "torch")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == json.loads(json.dumps(outputs[0], default=str))
    # auto: the fastest usable backend here, named with the times it compared
    result = cli("predict", str(exported), *map(str, images))
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = re.fullmatch(r"backend: (\S+) \(fastest here for one image: (.*)\)\n", result.stderr)
    assert chosen and chosen[1] in {"inference", "onnx", "onnx-int8", "openvino"}, result.stderr
    assert {"inference", "onnx", "openvino"} <= set(re.findall(r"([\w-]+) \d+\.\d ms", chosen[2]))
    classes = sorted(p.name for p in (cifar10_jpeg / "test").iterdir())
    for r in outputs[0]:
        assert len(r["predictions"]) == 2 and r["predictions"][0]["class"] in classes
        assert 0 < r["predictions"][1]["probability"] <= r["predictions"][0]["probability"] <= 1
    assert [r["predictions"][0]["class"] for r in outputs[0]] == [
        r["predictions"][0]["class"] for r in outputs[1]
    ]
    for other in outputs[2:]:
        assert [r["predictions"][0]["index"] for r in outputs[0]] == [
            r["predictions"][0]["index"] for r in other
        ]
    assert format_predictions(outputs[0]).startswith(f"{images[0]}: ")
    missing = cli("predict", str(exported), "no-such-image.jpg")
    assert (
        missing.returncode == 2 and missing.stderr.strip() == "error: no-such-image.jpg: no such image file"
    )


def test_a_runtime_that_is_not_installed_is_one_line_naming_what_to_install(exported, cifar10_jpeg):
    image = str(sorted((cifar10_jpeg / "test").glob("*/*.jpg"))[0])
    missing = (("openvino", "openvino", "openvino"), ("onnx-int8", "onnxruntime", "export"))
    for backend, package, extra in missing:
        code = (
            f"import sys; sys.modules[{package!r}] = None\n"  # `import` of it now raises ImportError
            "from cmtkd_graph.cli import main\n"
            f"sys.exit(main(['predict', {str(exported)!r}, {image!r}, '--backend', {backend!r}]))\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2 and result.stderr == (
            f"error: --backend {backend} needs {package}: pip install 'cmtkd-graph[{extra}]'\n"
        ), result.stderr
    # auto leaves it out and says why
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from cmtkd_graph.cli import main\n"
        f"sys.exit(main(['predict', {str(exported)!r}, {image!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "openvino: openvino is not installed" in result.stderr, result.stderr


def test_export_without_onnx_writes_the_other_formats_and_says_what_to_install(trained_run, tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = None\n"  # `import onnx` now raises ImportError
        "from cmtkd_graph.cli import main\n"
        f"sys.exit(main(['export', {str(trained_run)!r}, '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = [line for line in result.stdout.splitlines() if "onnx skipped" in line]
    assert len(skipped) == 1 and "pip install 'cmtkd-graph[export]'" in skipped[0]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "student.safetensors",
        CODES_FILE,
        "manifest.json",
    }
    assert not (tmp_path / "out" / "student.onnx").exists()


def cli_here(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """``cmtkd-graph ARGV`` in this process: exit status, stdout and its ``error:`` lines (no traceback)."""
    status = cg_cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    return status, out, [line for line in err.splitlines() if line.startswith("error: ")]


def test_a_new_export_replaces_the_previous_one_whole(trained_run, exported, tmp_path, cifar10_jpeg, capsys):
    """Issue #46, 3: `export --format torch` over a full export left the old ONNX/OpenVINO files, which
    `predict --backend onnx` then served."""
    out = tmp_path / "student"
    shutil.copytree(exported, out)  # an earlier, complete export
    status, _, _ = cli_here(["export", str(trained_run), "--out", str(out), "--format", "torch"], capsys)
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["sha256"], "manifest.json"])
    assert not (out / "student.onnx").exists() and not (out / "student-openvino.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    image = str(sorted((cifar10_jpeg / "test").glob("*/*.jpg"))[0])
    status, _, errors = cli_here(["predict", str(out), image, "--backend", "onnx"], capsys)
    assert status == 2 and errors == [f"error: {out}: no student.onnx; export with --format onnx first"]


def test_a_changed_file_of_an_export_is_refused_by_predict_and_load_student(
    exported, tmp_path, cifar10_jpeg, capsys
):
    image = str(sorted((cifar10_jpeg / "test").glob("*/*.jpg"))[0])
    for name, backend in (
        ("student.onnx", "onnx"),
        ("student-openvino.bin", "openvino"),
        ("codes.safetensors", "integer"),
    ):
        out = tmp_path / name
        shutil.copytree(exported, out)
        with open(out / name, "ab") as f:
            f.write(b"\0")
        status, _, errors = cli_here(["predict", str(out), image, "--backend", backend], capsys)
        assert status == 2 and len(errors) == 1, errors
        assert errors[0].startswith(
            f"error: {out / name}: its content differs from what manifest.json recorded"
        )
        if backend != "integer":  # auto does not serve it either
            status, _, errors = cli_here(["predict", str(out), image], capsys)
            assert status == 2 and "its content differs" in errors[0]
    changed = tmp_path / "changed"
    shutil.copytree(exported, changed)
    state = load_file(changed / "student.safetensors")
    next(iter(state.values())).add_(1)
    save_file(state, changed / "student.safetensors")
    with pytest.raises(cg.UserError, match=r"student\.safetensors: its content differs"):
        cg.load_student(changed)


def test_a_damaged_model_file_in_an_export_without_hashes_is_one_line(
    exported, tmp_path, cifar10_jpeg, capsys
):
    """Issue #46, 6: a corrupt .onnx or OpenVINO file was a raw traceback (exports written before the
    manifest recorded hashes are still read)."""
    out = tmp_path / "old"
    shutil.copytree(exported, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "student.onnx").write_bytes(b"not a model")
    (out / "student-openvino.xml").write_text("<net")
    image = str(sorted((cifar10_jpeg / "test").glob("*/*.jpg"))[0])
    for backend, runtime in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        status, _, errors = cli_here(["predict", str(out), image, "--backend", backend], capsys)
        assert status == 2 and len(errors) == 1 and f"{runtime} cannot load it" in errors[0], errors


def test_export_refuses_a_directory_that_is_not_an_export_unless_forced(trained_run, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["export", str(trained_run), "--out", str(out), "--format", "torch"]
    status, _, errors = cli_here(argv, capsys)
    assert (
        status == 2
        and len(errors) == 1
        and "not an export (notes.txt)" in errors[0]
        and "--force" in errors[0]
    )
    assert (out / "notes.txt").read_text() == "mine"
    status, _, errors = cli_here([*argv, "--force"], capsys)
    assert status == 0 and not (out / "notes.txt").exists() and (out / "manifest.json").is_file()
    status, _, errors = cli_here(
        ["export", str(trained_run), "--out", str(trained_run.parent), "--force"], capsys
    )
    assert (
        status == 2 and "contains the source directory" in errors[0] and (trained_run / "spec.yaml").is_file()
    )


def test_a_png_decompression_bomb_is_one_line(exported, tmp_path, capsys):
    """Issue #46, 6: PIL's DecompressionBombError is not an OSError and was a raw traceback. The file
    declares 30000 x 30000 pixels in a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    status, _, errors = cli_here(["predict", str(exported), str(bomb), "--backend", "torch"], capsys)
    assert status == 2 and errors == [
        f"error: {bomb}: not a readable image (DecompressionBombError: Image size (900000000 pixels) exceeds "
        "limit of 178956970 pixels, could be decompression bomb DOS attack.)"
    ]


def test_integer_conv_matches_float_conv_hand_checked():
    q_a = torch.tensor([[[[0.0, 1.0, 2.0], [3.0, 0.0, 1.0], [2.0, 3.0, 0.0]]]])  # 1x1x3x3 codes
    q_w = torch.tensor([[[[1, -1], [-3, 3]]]], dtype=torch.int64)
    got = integer_conv2d(q_a, q_w, (2, 2), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    # top-left window: 0*1 + 1*(-1) + 3*(-3) + 0*3 = -10
    assert got.dtype == torch.int64 and got[0, 0, 0, 0].item() == -10
    assert torch.equal(got.float(), torch.nn.functional.conv2d(q_a, q_w.float()))
    depthwise = torch.randint(-3, 4, (4, 1, 3, 3))
    x = torch.randint(0, 4, (2, 4, 5, 5)).float()
    got = integer_conv2d(x, depthwise, (3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=4)
    assert torch.equal(
        got.float(), torch.nn.functional.conv2d(x, depthwise.float(), stride=2, padding=1, groups=4)
    )


def test_integer_matmul_is_exact_in_both_of_its_paths():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 4608), generator=g)
    b = torch.randint(-127, 128, (4608, 5), generator=g)

    def exact(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
        columns = y.t().tolist()
        return [[sum(p * q for p, q in zip(row, col, strict=True)) for col in columns] for row in x.tolist()]

    got = integer_matmul(a.float(), b)  # float64 path: 4608 x 255 x 127 < 2^53
    assert got.dtype == torch.int64 and got.tolist() == exact(a, b)
    # sums near 2^55 (positive weights, so they do not cancel): the int64 path, where float64 rounds
    big, positive = a * 2**30 + 1, b.abs() + 1
    assert 4608 * big.abs().max().item() * positive.max().item() >= FLOAT64_EXACT
    assert integer_matmul(big, positive).tolist() == exact(big, positive)
    assert torch.matmul(big.double(), positive.double()).to(torch.int64).tolist() != exact(big, positive)


def test_packing_is_little_endian_four_two_bit_codes_to_a_byte():
    packed = pack_codes(torch.tensor([1, 0, 3, 2, 3], dtype=torch.uint8), 2)
    assert packed.tolist() == [0b10110001, 0b00000011]
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == (1001 * bits + 7) // 8
        assert torch.equal(unpack_codes(packed, bits, 1001), codes)


# ------------------------------------------------------------------------------------ inference form
def test_inference_form_agrees_with_the_trained_student_on_real_images(trained_run, exported):
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec, n=100)
    student = cg.load_student(exported)
    form = cg.load_student(exported, inference=True, integer_kernels=False)
    # weights decoded once, BatchNorm folded: no quantizer with a latent weight, no BN left
    modules = dict(form.named_modules())
    assert sum(isinstance(m, IntegerWeightConv2d) for m in modules.values()) == 19
    assert not [n for n, m in modules.items() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not [n for n in modules if n.endswith("weight_quantizer")]
    assert all(not p.requires_grad for p in form.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is left as it was
    with torch.no_grad():
        expected = student(images)
        got = form(images)
    assert_agrees_but_at_boundaries(got.numpy(), expected.numpy())
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement


@INT8_KERNELS
def test_the_default_inference_form_runs_oneDNN_int8_kernels_and_agrees_on_real_images(exported):
    """The default inference form on this CPU: all 19 quantized convolutions on oneDNN's int8 kernel,
    the 8 that follow a block's first convolution reading the uint8 codes it writes; its logits are
    the float form's on real images (but at level boundaries), its top-1 the trained student's."""
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec, n=100)
    student = cg.load_student(exported)
    form = cg.load_student(exported, inference=True)
    floating = cg.load_student(exported, inference=True, integer_kernels=False)
    layers = {n: m for n, m in form.named_modules() if isinstance(m, OneDNNInt8Conv2d)}
    assert len(layers) == 19
    assert sorted(n for n, m in layers.items() if m.reads_codes) == [
        f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)
    ]
    with torch.no_grad():
        expected, reference, got = student(images), floating(images), form(images)
    assert_agrees_but_at_boundaries(got.numpy(), reference.numpy())
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement


def test_folded_batchnorm_equals_conv_then_batchnorm_hand_computed():
    """conv (integer weights 1 and -3, scale 0.5) then BN (gamma 2, beta 1, mean 3, var 3, eps 1):
    folded, scale 0.5 * 2 / 2 = 0.5 and bias 1 + (0 - 3) * 1 = -2; the codes do not change."""
    from torch import fx, nn

    from cmtkd_graph.deploy.inference import fold_batchnorm
    from cmtkd_graph.quantizers.base import mid_rise_grid

    conv = IntegerWeightConv2d(1, 1, 1, bias=False)
    conv._set_integer_weight(torch.tensor([[[[1]]]]), torch.tensor([0.5]), mid_rise_grid(2))
    bn = nn.BatchNorm2d(1, eps=1.0).eval()
    bn.weight.data.fill_(2.0)
    bn.bias.data.fill_(1.0)
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(3.0)

    class Tracer(fx.Tracer):  # the integer-weight conv is one node, as in a student's graph
        def is_leaf_module(self, m, name):
            return isinstance(m, IntegerWeightConv2d) or super().is_leaf_module(m, name)

    root = _ConvBN(conv, bn)
    model = fx.GraphModule(root, Tracer().trace(root))
    x = torch.tensor([[[[4.0, -2.0]]]])
    expected = model(x)  # (0.5 * 4 - 3) * 2 / 2 + 1 = 0; (0.5 * -2 - 3) + 1 = -3
    assert torch.equal(expected, torch.tensor([[[[0.0, -3.0]]]]))
    assert fold_batchnorm(model) == ["bn"]
    model.recompile()
    folded = model.get_submodule("conv")
    assert torch.equal(folded.scale, torch.tensor([0.5])) and folded.bias.item() == -2.0
    assert torch.equal(folded.integers, torch.tensor([[[[1]]]], dtype=torch.int32))
    assert torch.equal(model(x), expected)
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class _ConvBN(torch.nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x))


def test_batchnorm_with_another_reader_of_its_convolution_is_not_folded():
    from torch import fx, nn

    from cmtkd_graph.deploy.inference import fold_batchnorm

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2).eval()

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = fx.symbolic_trace(TwoReaders().eval())
    assert fold_batchnorm(model) == []


class _Stem(torch.nn.Module):
    """A float stem with two max poolings, the second reading the first's output through a convolution."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(3, 2, 1)
        self.conv2, self.pool2 = torch.nn.Conv2d(8, 8, 1), torch.nn.MaxPool2d(2)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        return self.pool2(self.conv2(y)), y


def test_a_pool_in_channels_last_pools_a_channels_last_copy_with_the_same_values():
    from torch import fx

    from cmtkd_graph.deploy.inference import pool_in_channels_last

    form = fx.symbolic_trace(_Stem().eval())
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = form(x)
    pool_in_channels_last(form, ["pool"])
    copies = [n for n in form.graph.nodes if n.op == "call_method" and n.target == "contiguous"]
    assert len(copies) == 1 and copies[0].kwargs == {"memory_format": torch.channels_last}
    assert list(copies[0].users) == [next(n for n in form.graph.nodes if n.target == "pool")]
    with torch.no_grad():
        after = form(x)
    assert after[1].is_contiguous(memory_format=torch.channels_last)  # the pool's output: channels-last
    assert not before[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(before[1], after[1])  # a maximum is exact in any layout
    # the convolution after it may sum in another order on a channels-last input: float rounding only
    torch.testing.assert_close(before[0], after[0], rtol=1e-5, atol=1e-6)


def test_which_pools_are_faster_in_channels_last_is_measured_without_changing_the_form():
    from torch import fx

    from cmtkd_graph.deploy.inference import pools_faster_in_channels_last

    form = fx.symbolic_trace(_Stem().eval())
    code = form.code
    faster = pools_faster_in_channels_last(form, torch.randn(1, 3, 64, 64), repeat=2)
    assert set(faster) <= {"pool", "pool2"}  # the answer is this machine's; the form is not touched
    assert form.code == code
    assert not any(m._forward_pre_hooks for m in form.modules())  # the hooks that saw the inputs are gone


@INT8_KERNELS
def test_the_int8_form_of_resnet18_at_224_computes_the_same_logits_with_its_pool_in_channels_last():
    """load_student applies the measured choice; either way the int8 form's logits are the same bit for
    bit (the pool's reader is a requantizer, whose codes the int8 kernels read channels-last anyway)."""
    from cmtkd_graph.passes.graph_pass import finish

    from cmtkd_graph.deploy.inference import inference_form, max_pools, pool_in_channels_last

    spec = cg.load_spec("resnet18", ["surgery=[]", "data.image_size=224", "teachers=[]", "method=single",
                                     "distill={}", "student.kwargs={num_classes: 10}"])  # fmt: skip
    form = inference_form(build_student(spec))
    use_integer_kernels(form)
    chain_integer_convolutions(form)
    finish(form)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = form(x)
        pool_in_channels_last(form, [n.target for n in max_pools(form)])
        after = form(x)
    assert [n.target for n in max_pools(form)] == ["maxpool"]
    assert "contiguous(memory_format = torch.channels_last)" in form.code
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------ oneDNN int8 in PyTorch
def _requantizers() -> dict[str, ActivationRequantizer]:
    from cmtkd_graph.quantizers.hwgq import HalfWaveQuantizer, SignedMidRiseQuantizer
    from cmtkd_graph.quantizers.lsq import LSQQuantizer

    lsq = LSQQuantizer(4, signed=True, per_sample=True)
    lsq.step.data.fill_(0.21)
    return {
        "hwgq unsigned 2-bit": ActivationRequantizer(HalfWaveQuantizer(2)),
        "hwgq mid-rise 2-bit": ActivationRequantizer(SignedMidRiseQuantizer(2)),
        "lsq signed 4-bit": ActivationRequantizer(lsq),
    }


def _integer_conv(
    c_in: int, c_out: int, groups: int, stride: int, seed: int, kernel: int = 3
) -> IntegerWeightConv2d:
    from cmtkd_graph.quantizers.base import mid_rise_grid

    g = torch.Generator().manual_seed(seed)
    conv = IntegerWeightConv2d(
        c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=True
    )
    integers = 2 * torch.randint(0, 4, conv.weight.shape, generator=g) - 3  # odd -3..3
    scale = 0.01 + 0.05 * torch.rand(c_out, generator=g)
    scale[::3] *= -1  # a BatchNorm with negative gamma folds into a negative scale
    conv._set_integer_weight(integers, scale, mid_rise_grid(2))
    conv.bias = torch.nn.Parameter(torch.randn(c_out, generator=g), requires_grad=False)
    return conv.eval()


@pytest.mark.parametrize("name", ["hwgq unsigned 2-bit", "hwgq mid-rise 2-bit", "lsq signed 4-bit"])
def test_codes_in_one_pass_equal_the_requantizers_codes_where_they_are_used(name):
    """torch.quantize_per_tensor + a clamp of the bytes replaces the requantizer's five float passes for
    unit-step grids (unsigned, LSQ), not for HWGQ's mid-rise grid (step 2); where it is used its codes
    equal the requantizer's on NCHW and channels-last input, and come out channels-last."""
    from cmtkd_graph.deploy.onednn_int8 import one_pass_codes, quantizes_in_one_pass

    requantizer = _requantizers()[name]
    assert quantizes_in_one_pass(requantizer) == (name != "hwgq mid-rise 2-bit")
    if name == "hwgq mid-rise 2-bit":
        return
    grid, s = requantizer.grid, float(requantizer.step)
    x = 3 * s * torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(0))
    q, _ = requantizer.quantizer.integers(x.clone())
    for layout in (torch.contiguous_format, torch.channels_last):
        codes = one_pass_codes(x.contiguous(memory_format=layout), s, -grid.qmin, grid.qmax - grid.qmin)
        assert codes.dtype == torch.uint8 and codes.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(codes.long(), (q - grid.qmin).long())
        assert int(codes.max()) == grid.qmax - grid.qmin and int(codes.min()) == 0  # both ends saturate


@INT8_KERNELS
@pytest.mark.parametrize("requantizer", ["hwgq unsigned 2-bit", "hwgq mid-rise 2-bit", "lsq signed 4-bit"])
@pytest.mark.parametrize(("groups", "stride"), [(1, 1), (16, 2)])
def test_int8_convolution_computes_the_requantizer_then_the_convolution(requantizer, groups, stride):
    """oneDNN's uint8 x int8 kernel with a float32 epilogue against the float inference form's two
    modules: the same levels (zero points for signed grids, negative scales, depthwise, stride)."""
    quantize = _requantizers()[requantizer]
    conv = _integer_conv(16, 16, groups, stride, seed=groups)
    x = 2 * torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = conv(quantize(x))
        layer = OneDNNInt8Conv2d(quantize, conv)
        codes = layer.codes(x)
        got = layer(x)
    q, _ = quantize.quantizer.integers(x)
    assert codes.dtype == torch.uint8 and torch.equal(codes.float(), q - quantize.grid.qmin)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def _chain(requantize_in, conv_in, requantize_out, conv_out) -> torch.fx.GraphModule:
    from torch import fx, nn

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.q1, self.conv1, self.relu, self.q2, self.conv2 = (
                requantize_in,
                conv_in,
                nn.ReLU(),
                requantize_out,
                conv_out,
            )

        def forward(self, x):
            return self.conv2(self.q2(self.relu(self.conv1(self.q1(x)))))

    class Tracer(fx.Tracer):  # the inference form's modules are nodes, as in a student's graph
        def is_leaf_module(self, m, name):
            leaf = isinstance(m, IntegerWeightConv2d | ActivationRequantizer)
            return leaf or super().is_leaf_module(m, name)

    root = Chain().eval()
    return fx.GraphModule(root, Tracer().trace(root))


@INT8_KERNELS
def test_chained_int8_convolutions_hand_the_next_layer_its_codes():
    """conv -> ReLU -> requantizer -> conv: the first kernel writes the second's uint8 codes (ReLU,
    clamp and rounding in its epilogue), the ReLU node goes, the logits stay the float form's."""
    quantizers = _requantizers()
    model = _chain(
        quantizers["hwgq mid-rise 2-bit"],
        _integer_conv(16, 16, 1, 1, 0),
        quantizers["hwgq unsigned 2-bit"],
        _integer_conv(16, 8, 1, 2, 1),
    )
    x = 2 * torch.randn(4, 16, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        assert use_integer_kernels(model) == {}
        assert chain_integer_convolutions(model) == 1
        model.recompile()
        writer = model.get_submodule("conv1")
        written = writer(x)
        got = model(x)
    assert [n.target for n in model.graph.nodes if n.op == "call_module"] == ["conv1", "conv2"]
    assert written.dtype == torch.uint8 and written.max() <= 3
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_what_does_not_fit_int8_kernels_stays_float_and_says_why():
    from cmtkd_graph.quantizers.base import mid_rise_grid, unsigned_grid

    assert fits(unsigned_grid(2), torch.tensor([-3, 3])) is None
    assert fits(unsigned_grid(4), torch.tensor([127])) is None  # 2 x 15 x 127 = 3810
    assert fits(mid_rise_grid(8), torch.tensor([1])) == "activation codes 0..510 do not fit uint8"
    assert fits(unsigned_grid(2), torch.tensor([-128])) == "weight integers up to 128 do not fit int8"
    assert fits(unsigned_grid(8), torch.tensor([127])) == (  # 2 x 255 x 127 = 64770
        "activation codes 0..255 times weights up to 127 could overflow int16 pairs"
    )


def test_only_requantizers_that_round_plainly_take_codes_from_a_kernels_epilogue():
    from cmtkd_graph.quantizers.hwgq import HalfWaveQuantizer
    from cmtkd_graph.quantizers.lsq import LSQQuantizer

    quantizers = _requantizers()
    assert rounds_plainly(quantizers["hwgq unsigned 2-bit"])
    assert rounds_plainly(quantizers["lsq signed 4-bit"])
    assert rounds_plainly(ActivationRequantizer(LSQQuantizer(2, signed=False, per_sample=True)))
    assert not rounds_plainly(quantizers["hwgq mid-rise 2-bit"])  # odd integers: no zero level
    assert not rounds_plainly(ActivationRequantizer(HalfWaveQuantizer(2, caffe_rounding=True)))


# ------------------------------------------------------------------------------------ int8 ONNX
def _inference_form_graph(root: torch.nn.Module) -> torch.fx.GraphModule:
    """A hand-built model traced as the inference form is: its requantizers and integer layers whole."""

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            leaf = isinstance(m, IntegerWeightConv2d | ActivationRequantizer)
            return leaf or super().is_leaf_module(m, name)

    return torch.fx.GraphModule(root, Tracer().trace(root))


def _int8_onnx_run(form, x: torch.Tensor, tmp_path: Path, *, calibrated: bool):
    """``form``'s int8 ONNX (float epilogue, or calibrated on ``x``), its plan, onnxruntime's logits on
    ``x`` and the graph onnxruntime optimized it into."""
    import onnx

    from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx, session

    model, plan = build_int8_onnx(form, tuple(x.shape[1:]), x if calibrated else None)
    path = tmp_path / ("int8.onnx" if calibrated else "exact.onnx")
    path.write_bytes(model.SerializeToString())
    optimized = path.with_suffix(".optimized.onnx")
    logits = session(path, optimized=optimized).run(None, {"images": x.numpy()})[0]
    return model, plan, logits, onnx.load(str(optimized))


def test_int8_onnx_keeps_float_the_kinds_of_layer_that_time_faster_float(tmp_path):
    """``student-int8.onnx`` of a W2A2 MobileNetV3: its layers by kind (squeeze-excitation gates on 1x1
    maps, depthwise, pointwise, the classifier); a kind kept float runs on onnxruntime's float kernels
    with the reason in the plan; the export times each variant and writes one no variant beat by more
    than the margin, whose integer layers are the rest."""
    import onnx

    from cmtkd_graph.deploy.int8_choice import EVERY, MARGIN, layer_kinds
    from cmtkd_graph.deploy.onnx_int8 import (
        INT8_KERNELS,
        KEPT_FLOAT,
        build_int8_onnx,
        export_int8_onnx,
        kernels,
        session,
        tensor_shapes,
    )

    spec = _cifar_student_spec("mobilenet_v3_small", 2, overrides=("data.image_size=64",))
    torch.manual_seed(0)
    student = build_student(spec)
    form = inference_form(student)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _, plan, _, optimized = _int8_onnx_run(form, x, tmp_path, calibrated=True)
    kinds = layer_kinds(form, plan.integer, tensor_shapes(form, (3, 64, 64)))
    counts = {kind: len(names) for kind, names in kinds.items()}
    assert counts == {"on 1x1 maps": 18, "depthwise": 2, "pointwise": 22, "linear": 1}
    assert {"features.1.block.1.fc1", "features.1.block.1.fc2"} <= set(kinds["on 1x1 maps"])  # an SE gate
    assert kinds["depthwise"] == ["features.2.block.1.0", "features.3.block.1.0"]  # others: mid-rise inputs
    assert kinds["linear"] == ["classifier.0"]
    integer = [name for names in kinds.values() for name in names]
    assert all(kernel in INT8_KERNELS for kernel in kernels(optimized, integer).values())

    keep = frozenset(kinds["depthwise"] + kinds["on 1x1 maps"])
    model, kept_plan = build_int8_onnx(form, (3, 64, 64), x, keep_float=keep)
    assert {name for name, why in kept_plan.integer.items() if why == KEPT_FLOAT} == keep
    (tmp_path / "kept.onnx").write_bytes(model.SerializeToString())
    session(tmp_path / "kept.onnx", optimized=tmp_path / "kept.optimized.onnx")
    used = kernels(onnx.load(str(tmp_path / "kept.optimized.onnx")), integer)
    # (and so are the layers that write their inputs: no QuantizeLinear after them to fuse with)
    assert not any(used.get(name) in INT8_KERNELS for name in keep), used

    section = export_int8_onnx(
        student, [], tmp_path / "student-int8.onnx", calibration=x, check=x, source="x"
    )
    choice = section["layer_choice"]
    assert choice["chosen_by"] == "timing on this machine" and choice["batch_sizes"] == [1, 8]
    variants = choice["variants"]
    assert variants[0]["float"] == [] and variants[-1]["float"] in ([EVERY], list(kinds))
    assert [v["float"][-1] for v in variants[1 : len(kinds) + 1]] == list(kinds)  # one kind more at a time
    score = {str(v["float"]): np.mean(np.divide(v["ms"], variants[0]["ms"])) for v in variants}
    best = score[str(choice["float"])]
    assert best == pytest.approx(choice["relative_time"], abs=1e-3)
    assert all(best <= other / (1 - MARGIN) + 1e-3 for other in score.values()), score
    kept = sum(
        len(names) for kind, names in kinds.items() if EVERY in choice["float"] or kind in choice["float"]
    )
    assert section["integer_layers"] <= len(integer) - kept
    assert kept or section["integer_layers"] == len(integer)


def test_int8_onnx_refuses_what_it_does_not_write_in_one_line():
    """A number operand (``x * 0.5``) and an average pooling whose ceil_mode window runs over its padding
    (OpenVINO divides it otherwise than torch) are refused with the operation named, so that
    ``export --format all`` skips the int8 files with the reason instead of failing."""
    from torch import nn

    from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx

    class Scaled(nn.Module):
        def forward(self, x):
            return torch.flatten(x * 0.5, 1)

    pool = nn.Sequential(nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.Flatten())
    for root, problem in (
        (Scaled(), r"mul \(Mul with a number operand\)"),
        (pool, r"0 .*ceil_mode over padding"),
    ):
        with pytest.raises(cg.UserError, match=r"^int8 ONNX export: " + problem):
            build_int8_onnx(_inference_form_graph(root.eval()), (3, 10, 10), None)


def test_int8_onnx_writes_unfolded_batch_norm_functional_and_adaptive_pooling(tmp_path):
    """What DenseNet, Inception v3, AlexNet and VGG add: a BatchNorm that reads a concatenation (the
    inference form cannot fold it into a convolution), ``F.avg_pool2d`` / ``F.max_pool2d`` called with
    keyword arguments, and adaptive average poolings whose windows are all equal (to its own size: nothing;
    to a divisor: a fixed pooling). onnxruntime's logits equal PyTorch's; an adaptive pooling with
    windows of different sizes and a max pooling returning indices are refused in one line."""
    import torch.nn.functional as F
    from torch import nn

    from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx

    class Pools(nn.Module):
        def __init__(self, to: tuple[int, int] = (4, 4)):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.norm = nn.BatchNorm2d(8)
            self.norm.running_mean.uniform_(-1, 1), self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.data.uniform_(0.5, 2), self.norm.bias.data.uniform_(-1, 1)
            self.same, self.smaller = nn.AdaptiveAvgPool2d((8, 8)), nn.AdaptiveAvgPool2d(to)
            self.fc = nn.Linear(8 * to[0] * to[1], 5)

        def forward(self, x):
            x = self.norm(torch.cat([self.a(x), self.b(x)], 1))
            x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
            x = F.max_pool2d(x, 3, stride=2, padding=1)  # 16 -> 8
            x = F.adaptive_avg_pool2d(self.same(x), (8, None))
            return self.fc(torch.flatten(self.smaller(x), 1))

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    root = Pools().eval()
    _, _, got, optimized = _int8_onnx_run(_inference_form_graph(root), x, tmp_path, calibrated=False)
    with torch.no_grad():
        expected = root(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    ops = {n.op_type for n in optimized.graph.node}
    assert "AveragePool" in ops and "MaxPool" in ops and not ops & {"GlobalAveragePool"}

    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x):
            return self.pool(x)[0]

    for model, problem in (
        (Pools((3, 3)), r"8, 8\] to \[3, 3\]: windows vary"),
        (Pools((16, 16)), r"8, 8\] up to \[16, 16\]"),
        (Indices(), "a max pooling returning its indices"),
    ):
        with pytest.raises(cg.UserError, match=problem):
            build_int8_onnx(_inference_form_graph(model.eval()), (3, 16, 16), None)


def test_int8_onnx_writes_mid_rise_levels_shifted_into_the_bias_of_a_padding_free_convolution(tmp_path):
    """HWGQ's mid-rise activations (odd multiples of s, no zero level) have no uint8 form, but minus s
    they are multiples of 2s: read by a 1x1 convolution, the export writes them so and adds
    s * sum(w) to its bias. Without calibration (float epilogue) onnxruntime's logits equal the
    inference form's; with it, onnxruntime runs the convolution on QLinearConv."""
    from torch import nn

    from cmtkd_graph.deploy.onnx_int8 import kernels
    from cmtkd_graph.quantizers.hwgq import SignedMidRiseQuantizer

    class MidRiseThen1x1(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.conv = (
                ActivationRequantizer(SignedMidRiseQuantizer(2)),
                _integer_conv(16, 8, 1, 1, 3, 1),
            )

        def forward(self, x):
            return torch.flatten(self.conv(self.q(x)), 1)

    root = MidRiseThen1x1().eval()
    form = _inference_form_graph(root)
    x = 2 * torch.randn(8, 16, 5, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = form(x).numpy()
    exact, plan, got, _ = _int8_onnx_run(form, x, tmp_path, calibrated=False)
    assert plan.integer == {"conv": ""}
    assert [n.op_type for n in exact.graph.node][:3] == ["Sub", "QuantizeLinear", "Clip"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)

    _, _, got, optimized = _int8_onnx_run(form, x, tmp_path, calibrated=True)
    assert kernels(optimized, ["conv"]) == {"conv": "QLinearConv"}
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()  # 8-bit output steps


def test_int8_onnx_puts_the_mid_rise_shift_into_the_bias_of_the_layer_that_writes_it(tmp_path):
    """Where an integer layer's only reader is such a shifted requantizer, the layer's bias subtracts s
    (no Sub between them), so that onnxruntime fuses the layer with its QuantizeLinear: both
    convolutions on QLinearConv; logits equal to the inference form's in the float epilogue."""
    import onnx
    from torch import nn

    from cmtkd_graph.deploy.onnx_int8 import kernels
    from cmtkd_graph.quantizers.hwgq import SignedMidRiseQuantizer

    class ConvMidRise1x1(nn.Module):
        def __init__(self):
            super().__init__()
            self.q0, self.conv0 = _requantizers()["hwgq unsigned 2-bit"], _integer_conv(16, 16, 1, 1, 5)
            self.q, self.conv = (
                ActivationRequantizer(SignedMidRiseQuantizer(2)),
                _integer_conv(16, 8, 1, 1, 3, 1),
            )

        def forward(self, x):
            return torch.flatten(self.conv(self.q(self.conv0(self.q0(x)))), 1)

    root = ConvMidRise1x1().eval()
    form = _inference_form_graph(root)
    x = torch.randn(8, 16, 5, 5, generator=torch.Generator().manual_seed(6)).abs()
    with torch.no_grad():
        expected = form(x).numpy()
    exact, plan, got, _ = _int8_onnx_run(form, x, tmp_path, calibrated=False)
    assert plan.integer == {"conv0": "", "conv": ""}
    assert "Sub" not in {n.op_type for n in exact.graph.node}
    bias = next(i for i in exact.graph.initializer if i.name == "conv0.bias")
    shifted = onnx.numpy_helper.to_array(bias) - root.conv0.bias.detach().numpy()
    np.testing.assert_allclose(shifted, -float(root.q.step), rtol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    _, _, got, optimized = _int8_onnx_run(form, x, tmp_path, calibrated=True)
    found = kernels(optimized, ["conv0", "conv"])
    assert found == {"conv0": "QLinearConv", "conv": "QLinearConv"}, found
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


@pytest.mark.parametrize(
    "arch, integer",  # the onnxruntime kernels of the W2A2 student's quantized layers that are integer
    [
        ("mobilenet_v3_small", {"QLinearConv": 42, "QGemm": 1}),
        ("efficientnet_b0", {"QLinearConv": 64}),
        ("regnet_y_400mf", {"QLinearConv": 84}),
        ("mnasnet0_5", {"QLinearConv": 51}),
        ("convnext_tiny", {"QLinearConv": 3, "MatMulIntegerToFloat": 36}),
        ("shufflenet_v2_x0_5", {"QLinearConv": 53}),
    ],
)
def test_int8_onnx_writes_the_mobile_families(arch, integer, tmp_path):
    """Hardswish, SiLU, GELU, layer norm (ConvNeXt's, and its LayerNorm2d: a permute around
    ``F.layer_norm``), permutes, a linear layer on [B, H, W, C], ShuffleNet's channel shuffle (``x.size()``,
    ``view``, ``transpose``, ``contiguous``) and ``chunk``, the squeeze-excitation gates (sigmoid,
    hardsigmoid, mul), a parameter multiplied in (ConvNeXt's layer scale), stochastic depth (an identity
    at inference), ``x.flatten(start_dim=1)`` and ``x.mean([2, 3])`` are written: a float student's logits
    equal PyTorch's to float rounding; a W2A2 student's layers run on integer kernels where their input
    grid has an 8-bit form (HWGQ's signed mid-rise grid read through padding has none)."""
    from collections import Counter

    from cmtkd_graph.deploy.onnx_int8 import INT8_KERNELS, kernels

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bits in (32, 2):
        torch.manual_seed(0)
        student = build_student(_cifar_student_spec(arch, bits))
        form = inference_form(student)
        _, plan, got, optimized = _int8_onnx_run(form, x, tmp_path, calibrated=bits < 32)
        if bits == 32:
            with torch.no_grad():
                expected = student(x).numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        else:
            used = kernels(optimized, list(plan.integer))
            assert Counter(k for k in used.values() if k in INT8_KERNELS) == integer
            assert all(why == "" or "mid-rise" in why for why in plan.integer.values())


def test_int8_onnx_writes_a_vision_transformer(tmp_path):
    """ViT: the batch read from ``x.shape`` (its reshape and the class token's ``expand``), the position
    embedding, self-attention (``nn.MultiheadAttention``, or the quantized twin with its decoded weights
    and its output projection's input quantizer) as matrix products and a softmax, ``x[:, 0]``, its
    input-size assertions dropped. A float ViT's logits equal PyTorch's to float rounding; a W2A2 one
    runs its 24 MLP linear layers on integer kernels and its 12 attention blocks in float."""
    from collections import Counter

    from cmtkd_graph.deploy.onnx_int8 import ATTENTION_IN_FLOAT, INT8_KERNELS, kernels

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    float_mlp = "quantizer.rules=[{match: {name: 'encoder.layers.*.mlp'}, float: true}]"
    for bits, rules in ((32, ()), (2, (float_mlp,)), (2, ())):
        torch.manual_seed(0)
        student = build_student(_cifar_student_spec("vit_b_16", bits, "image_size: 32", rules))
        torch.nn.init.normal_(student.get_parameter("heads.head.weight"), std=0.05)  # torchvision's: zeros
        form = inference_form(student)
        _, plan, got, optimized = _int8_onnx_run(form, x, tmp_path, calibrated=bits < 32 and not rules)
        if bits == 32 or rules:
            # float; or W2A2 attention without the MLP's quantizers after GELU (docs/deployment.md: GELU's
            # tail sits on HWGQ's decision boundary at 0, where float GELUs differ in sign): the
            # decoded weights, the input and output projections' quantizers, exactly
            with torch.no_grad():
                expected = form(x).numpy()
            largest = np.abs(expected).max()
            assert largest > 0.1
            if bits == 32:
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * largest)
            else:  # float rounding can move one of ~10^6 quantizer inputs across a level boundary
                off = np.abs(got - expected).max(axis=1) / largest
                assert np.median(off) <= 1e-5 and off.max() < 0.1, off  # here: 1 image of 8, by 2 %
            assert list(plan.integer.values()).count(ATTENTION_IN_FLOAT) == (12 if bits == 2 else 0)
        else:
            attention = [name for name, why in plan.integer.items() if why == ATTENTION_IN_FLOAT]
            assert len(attention) == 12 and all(name.endswith("self_attention") for name in attention)
            used = kernels(optimized, list(plan.integer))
            assert Counter(k for k in used.values() if k in INT8_KERNELS) == {"MatMulIntegerToFloat": 24}


def test_int8_onnx_runs_every_quantized_convolution_on_integer_kernels(exported):
    """onnxruntime's optimized graph (not the intent) puts all 19 quantized convolutions of the W2A2
    resnet18 on QLinearConv, and the model agrees with the trained student on real images."""
    import onnx
    import onnxruntime as ort

    manifest = json.loads((exported / "manifest.json").read_text())
    int8 = manifest["onnx_int8"]
    assert manifest["files"]["onnx-int8"] == "student-int8.onnx" and int8["integer_layers"] == 19
    quantized = [r for r in manifest["layers"] if "onnx_int8" in r]
    assert len(quantized) == 19 and {r["onnx_int8"]["kernel"] for r in quantized} == {"QLinearConv"}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(exported.parent / "optimized.onnx")
    ort.InferenceSession(str(exported / "student-int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(exported.parent / "optimized.onnx")).graph.node]
    # the only float convolution left is the full-precision first layer
    assert ops.count("QLinearConv") == 19 and sum(op in {"Conv", "FusedConv"} for op in ops) <= 1, ops
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec, n=100)
    session = ort.InferenceSession(str(exported / "student-int8.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = cg.load_student(exported)(images).numpy()
    agreement = (got.argmax(1) == expected.argmax(1)).mean()
    assert agreement >= 0.95, agreement
    assert int8["check_images"] == 50 and int8["usable"] == (int8["top1_agreement"] >= 0.99)
    assert f"{100 * int8['top1_agreement']:.1f}%" in int8["why"]


def test_integer_exports_without_real_images_are_one_line_naming_the_fix(trained_run, tmp_path, cifar10_jpeg):
    moved = tmp_path / "run"  # the run, its data gone
    shutil.copytree(trained_run, moved)
    spec = (moved / "spec.yaml").read_text().replace(str(cifar10_jpeg), "/nonexistent/cifar10")
    (moved / "spec.yaml").write_text(spec)
    for fmt in ("onnx-int8", "openvino"):
        result = cli("export", str(moved), "--out", str(tmp_path / fmt), "--format", fmt)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {fmt} export: it is checked on real images")
        assert result.stderr.strip().endswith("give --images IMAGE_FOLDER")
    # among all formats, the others are written and the manifest says why the integer ones are not
    result = cli("export", str(moved), "--out", str(tmp_path / "all"))
    assert result.returncode == 0 and "onnx-int8 skipped: it is checked on real images" in result.stdout
    assert "openvino skipped: it is checked on real images" in result.stdout
    # the Q/DQ ONNX compares two runtimes: without real images, on random ones, saying why
    onnx = json.loads((tmp_path / "all" / "manifest.json").read_text())["onnx"]
    assert (onnx["check_images"], onnx["check_source"]) == (8, "random images")
    assert onnx["why_random"].startswith("no real images: ") and "/nonexistent/cifar10" in onnx["why_random"]
    assert "8 check images (random images) within" in result.stdout
    # an image folder instead of the run's data
    result = cli(
        "export", str(moved), "--out", str(tmp_path / "given"), "--format", "onnx-int8",
        "--images", str(cifar10_jpeg / "test"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert manifest["onnx_int8"]["calibration"] == f"50 images of {cifar10_jpeg / 'test'}"
    assert (tmp_path / "given" / "student-int8.onnx").is_file() and "onnx" not in manifest["files"]
    # --calibration: the option's earlier name
    from cmtkd_graph.cli import build_parser

    earlier = build_parser().parse_args(["export", "RUN", "--out", "OUT", "--calibration", "FOLDER"])
    assert earlier.images == "FOLDER"


# ------------------------------------------------------------------------------------ OpenVINO
def test_openvino_runs_every_quantized_convolution_on_integer_kernels_with_the_students_rounding(exported):
    """The compiled model's runtime graph (not the intent) runs all 19 quantized convolutions in 8-bit
    integers, and the float epilogue keeps the trained student's logits: top-1 agreement on real images,
    logits within float rounding."""
    from cmtkd_graph.deploy.openvino_export import compile_model, kernels, runner

    manifest = json.loads((exported / "manifest.json").read_text())
    section = manifest["openvino"]
    assert manifest["files"]["openvino"] == "student-openvino.xml" and section["integer_layers"] == 19
    quantized = [r for r in manifest["layers"] if "openvino" in r]
    assert len(quantized) == 19 and {r["openvino"]["precision"] for r in quantized} <= {"u8", "i8"}
    compiled = compile_model(exported / "student-openvino.xml")
    used = kernels(compiled, [r["name"] for r in quantized])
    assert {precision for _, precision in used.values()} <= {"u8", "i8"} and len(used) == 19, used
    spec = cg.load_spec(exported / "spec.yaml")
    images, _ = real_images(spec, n=100)
    got = runner(compiled)(images)
    with torch.no_grad():
        expected = cg.load_student(exported)(images)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert section["check_images"] == 100 and section["usable"] == (section["top1_agreement"] >= 0.99)
