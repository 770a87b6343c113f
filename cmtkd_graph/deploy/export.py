"""``cmtkd-graph export RUN_DIR --out DIR``: the student alone, in the formats a user takes further.

* ``torch``: ``student.safetensors`` + ``spec.yaml``; ``cmtkd_graph.load_student(DIR)`` rebuilds it.
* ``codes``: ``codes.safetensors``, the integer codes of every quantized layer packed to their
  bit-width with their scales (``deploy.codes``); ``deploy.integer`` runs them on integers.
* ``onnx``: ``student.onnx`` with QuantizeLinear/DequantizeLinear pairs (``deploy.onnx_export``).
* ``onnx-int8``: ``student-int8.onnx``, the form onnxruntime runs on integer kernels
  (``deploy.onnx_int8``), calibrated and checked on real images (the run's evaluation data, or
  ``images``: an image folder).
* ``openvino``: ``student-openvino.xml``/``.bin``, the form OpenVINO runs on integer kernels with the
  trained student's own rounding (``deploy.openvino_export``), checked on the same real images.

``manifest.json`` describes them all: per layer the bits, codes used, packed size, MACs and BOPs, how
the integer reference and the ONNX graph compute it; for the model the packed against the float size
and the BOPs against the float network's.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx

from cmtkd_graph.deploy import cost
from cmtkd_graph.deploy.codes import (
    CODES_FILE,
    QuantizedLayer,
    codes_tensors,
    quantized_layers,
)
from cmtkd_graph.deploy.integer import accumulator_bits, integer_arithmetic
from cmtkd_graph.deploy.student import (
    MANIFEST_FILE,
    SPEC_FILE,
    STUDENT_FILE,
    build_student,
    find_student,
    load_state,
)
from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.identity import file_sha256
from cmtkd_graph.passes.graph_pass import network_graphs
from cmtkd_graph.passes.shapes import propagate_call_shapes, propagate_shapes
from cmtkd_graph.spec import Spec
from cmtkd_graph.spec.io import dump_spec

log = logging.getLogger("cmtkd_graph")

FORMATS = ("torch", "codes", "onnx", "onnx-int8", "openvino")
ONNX_FILE = "student.onnx"
ONNX_INT8_FILE = "student-int8.onnx"
OPENVINO_FILE = "student-openvino.xml"
CALIBRATION_IMAGES = 256  # and as many again to check the agreement
MANIFEST_VERSION = 2  # 2: the SHA-256 of every file
EXPORT_FORMAT = "cmtkd_graph export"


def export(
    source: str | Path,
    out: str | Path,
    *,
    formats: tuple[str, ...] = FORMATS,
    checkpoint: str | None = None,
    images: str | Path | None = None,
    force: bool = False,
    int8_layers: str = "fastest",
) -> dict:
    """Write the student of ``source`` (a run, checkpoint or export directory) into ``out``; return the
    manifest. Formats whose optional packages are missing are skipped with a note in it; so are the
    integer formats (``onnx-int8``, ``openvino``) among all formats when no real images are at hand for
    their check (``images``, else the run's evaluation data). Asked for alone, either is an error.

    The export is complete or absent: it is written into a temporary directory beside ``out`` that
    then replaces ``out``, so no file of an earlier export survives into it. ``out`` may be new, empty
    or an earlier export; anything else is replaced only with ``force``. The manifest records the
    SHA-256 of every file, which ``predict`` and ``load_student`` check before they read one.
    ``int8_layers``: which layers of ``student-int8.onnx`` run on integer kernels: ``fastest`` (timed on
    this machine, ``deploy.int8_choice``) or ``every`` layer that can."""
    found = find_student(source, checkpoint=checkpoint)
    out = Path(os.path.abspath(Path(out).expanduser()))
    _check_destination(out, Path(os.path.abspath(Path(source).expanduser())), force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _unique_sibling(out, "export")
    try:
        manifest = _write(found, staging, formats, images, int8_layers)
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write(
    found, out: Path, formats: tuple[str, ...], images: str | Path | None, int8_layers: str = "fastest"
) -> dict:
    """Every file of the export, written into the (new, empty) directory ``out``."""
    student = build_student(found.spec)
    load_state(student, found.state, origin=found.origin)
    calls = example_shapes(student, found.spec.data.input_shape())
    layers = quantized_layers(student)
    manifest = _manifest(found, student, layers, calls)
    required = formats != FORMATS

    (out / SPEC_FILE).write_text(dump_spec(found.spec))
    # torch: the state dict as training saved it; codes: a complete integer description
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(out / STUDENT_FILE))
    manifest["files"]["torch"] = STUDENT_FILE
    if "codes" in formats:
        save_file(codes_tensors(student, layers), str(out / CODES_FILE))
        manifest["files"]["codes"] = CODES_FILE
    if "onnx" in formats:
        manifest["onnx"] = _onnx(
            student, layers, manifest, out / ONNX_FILE, found.spec, images, required=required
        )
        if manifest["onnx"].get("file"):
            manifest["files"]["onnx"] = ONNX_FILE
    real = functools.cache(lambda: calibration_images(found.spec, images))
    int8 = _Int8Graphs(student, found.spec, int8_layers)
    for name, file, write in (
        ("onnx-int8", ONNX_INT8_FILE, _onnx_int8),
        ("openvino", OPENVINO_FILE, _openvino),
    ):
        if name in formats:
            section = _integer_format(name, write, int8, manifest, out / file, real, required=required)
            manifest[name.replace("-", "_")] = section
            if section.get("file"):
                manifest["files"][name] = file
    if found.run_dir is not None and (found.run_dir / "importance.png").is_file():
        shutil.copy(found.run_dir / "importance.png", out / "importance.png")
    manifest["sha256"] = {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def example_shapes(
    student: torch.nn.Module, input_shape: tuple[int, ...]
) -> dict[fx.GraphModule, int] | None:
    """Every node's shape for one sample (what MACs are counted on): propagated on the meta device for a
    network that traces whole (None); a network rewritten part by part (detectors, RAFT) runs once on a
    grey example of ``input_shape``, its box logic and loops as they are: how many times each part ran."""
    if isinstance(student, fx.GraphModule):
        propagate_shapes(student, (1, *input_shape))
        return None
    example = torch.full((1, *input_shape), 0.5)
    return propagate_call_shapes(student, lambda: student(example))


def _not_from_parts(name: str, spec: Spec) -> str:
    """Why this version does not write the ``name`` format for networks rewritten part by part."""
    return (
        f"not for {spec.resolved_task} students in this version: they run torchvision's eager code between "
        f"their rewritten parts, and the {name} writer takes one traced graph; the torch, codes and Q/DQ "
        "ONNX formats hold the student"
    )


def _check_destination(out: Path, source: Path, *, force: bool) -> None:
    """``out`` may be replaced by the export: it is new, empty or an earlier export (or ``force``), and
    holds neither the source nor the working directory."""
    real = out.resolve()
    for inside, what in (
        (source.resolve(), "the source directory"),
        (Path.cwd().resolve(), "the working directory"),
    ):
        if inside == real or real in inside.parents:
            raise UserError(f"--out: {out} is or contains {what}; export into a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or force or _is_export(out):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(
        f"--out: {out} holds files that are not an export ({shown}); choose a new directory, or add "
        "--force to replace it and everything in it"
    )


def _is_export(directory: Path) -> bool:
    try:
        return json.loads((directory / MANIFEST_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _unique_sibling(out: Path, role: str) -> Path:
    """A new, empty, hidden directory beside ``out`` (the same file system, so renames are atomic)."""
    while True:
        candidate = out.with_name(f".{out.name}.{role}-{uuid.uuid4().hex[:12]}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _replace(out: Path, staging: Path) -> None:
    """Put the complete export ``staging`` in the place of ``out`` (whatever ``out`` held goes)."""
    old = None
    if out.exists() and any(out.iterdir()):
        old = _unique_sibling(out, "old")
        os.replace(out, old / out.name)
    os.replace(staging, out)  # onto nothing, or onto an empty directory
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _onnx(
    student: torch.nn.Module,
    layers: list[QuantizedLayer],
    manifest: dict,
    path: Path,
    spec: Spec,
    images: str | Path | None,
    *,
    required: bool,
) -> dict:
    try:
        from cmtkd_graph.deploy.onnx_export import CHECK_IMAGES, export_onnx
    except ImportError as err:
        missing = getattr(err, "name", None) or "onnx"
        return {
            "file": None,
            "skipped": f"{missing} is not installed; `pip install 'cmtkd-graph[export]'` "
            "(onnx, onnxscript, onnxruntime) adds the ONNX export",
        }
    check_images, source = _onnx_check_images(spec, images, CHECK_IMAGES)
    try:
        from cmtkd_graph.registry import TASKS

        task = TASKS.get(spec.resolved_task)
        section = export_onnx(
            student,
            layers,
            manifest["layers"],
            path,
            input_shape=spec.data.input_shape(),
            tracer=task.onnx_tracer,
            answers=task.onnx_answers,
            check_images=check_images,
            check_source=source,
        )
        return section if check_images is not None else {**section, "why_random": source}
    except RuntimeError as err:  # torch.onnx.OnnxExporterError, and the TorchScript tracer's own errors
        # e.g. torch 2.5's exporter cannot translate BatchNorm with today's onnxscript: the other
        # formats are still written; the tested pair is in constraints.txt
        problem = (
            f"torch {torch.__version__}'s ONNX exporter failed ({first_line(err)}); the ONNX export is "
            "tested with the versions in constraints.txt"
        )
        if required:
            raise UserError(f"onnx export: {problem}") from None
        return {"file": None, "skipped": problem}
    except UserError as err:  # e.g. onnxruntime loads the file at none of the opsets
        if required:
            raise
        return {"file": None, "skipped": re.sub(r"(?i)^onnx export: ", "", str(err))}


EXTRAS = {"onnx-int8": "export", "openvino": "openvino"}  # format -> the extra that installs it


class _Int8Graphs:
    """What both integer writers start from, built once for the two of them: the student's inference
    form and its int8 graph without calibration (OpenVINO's model). Building that graph is also the
    check that every operation can be written, before any image (or clip) is read; a failure is kept,
    so an unwritable student is tried once, not once per format."""

    def __init__(self, student: torch.nn.Module, spec: Spec, layers: str = "fastest") -> None:
        self.student, self.spec, self.input_shape = student, spec, spec.data.input_shape()
        self.layers = layers  # onnxruntime's integer layers: "fastest" (timed) or "every"
        self._built: tuple | None = None
        self._error: Exception | None = None

    def uncalibrated(self) -> tuple[fx.GraphModule, object, object]:
        """(inference form, ONNX model, plan); raises the writer's UserError (or an ImportError)."""
        if not isinstance(self.student, fx.GraphModule):  # rewritten part by part
            raise UserError(_not_from_parts("int8", self.spec))
        if self._error is not None:
            raise self._error
        if self._built is None:
            try:
                from cmtkd_graph.deploy.inference import inference_form
                from cmtkd_graph.deploy.onnx_int8 import build_int8_onnx

                form = inference_form(self.student)
                self._built = (form, *build_int8_onnx(form, self.input_shape, None))
            except (ImportError, UserError) as err:
                self._error = err
                raise
        return self._built


def _integer_format(
    name: str, write, int8: _Int8Graphs, manifest: dict, path: Path, real, *, required: bool
) -> dict:
    """An integer format's manifest section: written and checked on real images (``real()``), or why
    not (asked for alone, the reason is an error). The writer's own reason comes first."""
    try:
        int8.uncalibrated()
        return write(int8, manifest, path, real)
    except ImportError as err:
        problem = f"{err.name or 'a package'} is not installed: pip install 'cmtkd-graph[{EXTRAS[name]}]'"
    except UserError as err:
        problem = str(err)
    if required:
        raise UserError(f"{name} export: {problem}") from None
    return {"file": None, "skipped": problem}


def _onnx_int8(int8: _Int8Graphs, manifest: dict, path: Path, real) -> dict:
    from cmtkd_graph.deploy.onnx_int8 import export_int8_onnx

    images, source = real()  # every other image calibrates, the rest check: both spread over the set
    form, _, _ = int8.uncalibrated()
    return export_int8_onnx(
        int8.student,
        manifest["layers"],
        path,
        calibration=images[0::2],
        check=images[1::2],
        source=source,
        form=form,
        layers=int8.layers,
    )


def _openvino(int8: _Int8Graphs, manifest: dict, path: Path, real) -> dict:
    from cmtkd_graph.deploy.openvino_export import export_openvino

    images, source = real()
    _, model, plan = int8.uncalibrated()
    return export_openvino(
        int8.student, manifest["layers"], path, check=images, source=source, uncalibrated=(model, plan)
    )


def _onnx_check_images(spec: Spec, folder: str | Path | None, count: int) -> tuple[torch.Tensor | None, str]:
    """Real images for the ONNX file's check (``count``, spread over ``folder`` or the run's evaluation
    data) and where they come from; else None and why there are none of the student's input shape (the
    check then runs on random images, the manifest's ``why_random``: it compares two runtimes, it needs
    no labels)."""
    try:
        images, source = calibration_images(spec, folder, count=count)
    except UserError as err:
        return None, f"no real images: {err}"
    if tuple(images.shape[1:]) != spec.data.input_shape():
        return None, f"{source} are not samples of the student's input shape {spec.data.input_shape()}"
    return images, source


def calibration_images(
    spec: Spec, folder: str | Path | None, *, count: int = 2 * CALIBRATION_IMAGES
) -> tuple[torch.Tensor, str]:
    """Real images for the integer exports: ``folder`` (an image folder), else the run's evaluation
    data; up to ``count``, spread over the set (folders are sorted by class)."""
    wanted = count
    if folder is not None:
        from cmtkd_graph.deploy.predict import image_files, read_images

        root = Path(folder).expanduser()
        files = image_files(root)
        if len(files) < 2:
            raise UserError(f"--images: {root} holds fewer than 2 images (.jpg/.jpeg/.png)")
        picked = [files[int(i)] for i in torch.linspace(0, len(files) - 1, min(wanted, len(files)))]
        return read_images(picked, spec), f"{root}"
    from cmtkd_graph.data import build_datasets

    try:
        dataset = build_datasets(spec.data).eval
    except UserError as err:
        raise UserError(
            f"it is checked on real images and the run's data cannot be read ({err}); "
            "give --images IMAGE_FOLDER"
        ) from None
    indices = torch.linspace(0, len(dataset) - 1, min(wanted, len(dataset))).long().unique().tolist()
    if len(indices) < 2:
        raise UserError("the run's evaluation data has fewer than 2 images; give --images IMAGE_FOLDER")
    return torch.stack([dataset[i][0] for i in indices]), f"the run's evaluation data ({spec.data.dataset})"


def _manifest(
    found, student: torch.nn.Module, layers: list[QuantizedLayer], calls: dict[fx.GraphModule, int] | None
) -> dict:
    spec = found.spec
    records = [_layer_record(student, layer, calls) for layer in layers]
    float_bytes, packed_bytes = _sizes(student, layers)
    macs = sum(r["macs"] for r in records)
    student_bops = sum(r["bops"] for r in records)
    float_bops = sum(cost.bops(r["macs"], cost.FLOAT_BITS, cost.FLOAT_BITS) for r in records)
    classes, colours = _labels(found.run_dir)
    return {
        "format": EXPORT_FORMAT,
        "version": MANIFEST_VERSION,
        "source": str(found.origin),
        "model": {
            "arch": spec.student.arch,
            "weight_bits": spec.student.weight_bits,
            "act_bits": spec.student.act_bits,
            "quantizer": spec.quantizer.name,
            "first_layer_bits": spec.quantizer.first_layer_bits,
            "last_layer_bits": spec.quantizer.last_layer_bits,
            "input_shape": list(spec.data.input_shape()),
            "sample": _noun(spec),
            "classes": classes,
            **({"colours": colours} if colours else {}),
        },
        "files": {},
        "size": {
            "float_bytes": float_bytes,
            "packed_bytes": packed_bytes,
            "float_mib": round(cost.megabytes(float_bytes), 3),
            "packed_mib": round(cost.megabytes(packed_bytes), 3),
            "compression": round(float_bytes / packed_bytes, 2),
        },
        "cost": {
            "macs": macs,
            "bops": student_bops,
            "float_bops": float_bops,
            "bops_reduction": round(float_bops / max(student_bops, 1), 2),
            "note": f"per {_noun(spec)}; conv/linear/attention-projection MACs x weight bits x activation "
            "bits" + ("" if calls is None else f"; {_parts_note(student, calls)}"),
        },
        "layers": records,
    }


def _parts_note(student: torch.nn.Module, calls: dict[fx.GraphModule, int]) -> str:
    """How a network rewritten part by part was counted: its parts' calls on the example image."""
    ran = ", ".join(f"{prefix[:-1]} x{calls[gm]}" for prefix, gm in network_graphs(student) if gm in calls)
    return (
        "counted on one grey example, every part on the rows it ran on (a detector's RoI heads: one per "
        f"proposal) times its calls ({ran})"
    )


def _noun(spec: Spec) -> str:
    from cmtkd_graph.registry import TASKS

    return TASKS.get(spec.resolved_task).sample_noun


def _layer_record(
    student: torch.nn.Module, layer: QuantizedLayer, calls: dict[fx.GraphModule, int] | None
) -> dict:
    if layer.graph is None:
        macs = sum(cost.node_macs(student, node) for node in layer.nodes)
    else:  # a part, which may run on many rows (proposals) and many times (RAFT's updates) per image
        runs = calls.get(layer.graph, 0) if calls else 0
        macs = runs and runs * sum(
            cost.node_macs(layer.graph, node, per_sample=False) for node in layer.nodes
        )
    record = {
        "name": layer.name,
        "type": type(layer.module).__name__,
        "position": layer.position,
        "calls": len(layer.nodes),
        "weight_bits": layer.weight_bits,
        "act_bits": layer.act_bits,
        "macs": macs,
        "bops": cost.bops(macs, layer.weight_bits, layer.act_bits),
        "weights": [
            {
                "tensor": w.tensor,
                "quantizer": w.quantizer,
                "family": w.family,
                "shape": list(w.shape),
                "bits": w.grid.bits,
                "grid": _grid(w.grid),
                "scale": "per-channel" if w.scale.dim() > 0 else "per-tensor",
                "distinct_codes": w.distinct_codes,
                "packed_bytes": w.packed_bytes,
                "float_bytes": cost.float_bytes(w.codes.numel()),
            }
            for w in layer.weights
        ],
        "inputs": [
            {
                "quantizer": a.quantizer,
                "family": a.family,
                "bits": a.grid.bits,
                "signed": a.signed,
                "grid": _grid(a.grid),
                "scale": float(a.scale),
            }
            for a in layer.inputs
        ],
    }
    record["integer"] = _integer_note(layer, record)
    return record


def _grid(grid) -> dict:
    return {"step": grid.step, "offset": grid.offset, "qmin": grid.qmin, "qmax": grid.qmax}


def _integer_note(layer: QuantizedLayer, record: dict) -> str:
    """How the integer reference computes this layer."""
    if integer_arithmetic(layer.module, record):
        (weight,) = layer.weights
        a = layer.module.input_quantizer.grid
        bits = accumulator_bits(weight.integers(), max(abs(a.qmin), abs(a.qmax)))
        w = weight.grid
        return (
            f"integer: weights {w.qmin}..{w.qmax} x activations {a.qmin}..{a.qmax}, "
            f"int64 accumulation ({bits} bits needed), scales applied once"
        )
    if layer.weights:
        return (
            "float with decoded weights (its input is not quantized, or it is not a single conv/linear call)"
        )
    return "float (full precision)"


def _sizes(student: torch.nn.Module, layers: list[QuantizedLayer]) -> tuple[int, int]:
    """(float32 bytes of the model, bytes with packed codes): tensors inference needs."""
    quantizer_state = tuple(
        f"{q}."
        for layer in layers
        for q in [w.quantizer for w in layer.weights] + [a.quantizer for a in layer.inputs]
    )
    needed = {
        k: v
        for k, v in student.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith(quantizer_state)
    }
    float_total = sum(cost.float_bytes(v.numel()) for v in needed.values())
    packed = float_total
    for layer in layers:
        for w in layer.weights:
            packed += w.packed_bytes + cost.float_bytes(w.scale.numel()) - cost.float_bytes(w.codes.numel())
        packed += cost.float_bytes(len(layer.inputs))  # one float32 scale per activation quantizer
    return float_total, packed


def _labels(run_dir: Path | None) -> tuple[list[str] | None, list | None]:
    """The class names and (segmentation datasets that declare them) colours the run recorded."""
    final = run_dir / "final.json" if run_dir is not None else None
    if final is None or not final.is_file():
        return None, None
    recorded = json.loads(final.read_text())
    return recorded.get("classes"), recorded.get("colours")


def summary(manifest: dict, out: Path) -> str:
    """What ``cmtkd-graph export`` prints."""
    m, size, c = manifest["model"], manifest["size"], manifest["cost"]
    lines = [
        f"exported {m['arch']} W{m['weight_bits']}A{m['act_bits']} ({m['quantizer']}) to {out}",
        f"  size: {size['packed_mib']:.2f} MiB packed vs {size['float_mib']:.2f} MiB float32 "
        f"({size['compression']:.1f}x smaller)",
        f"  cost per {m.get('sample', 'image')}: {cost.human_bops(c['bops'])}BOPs vs "
        f"{cost.human_bops(c['float_bops'])}BOPs float "
        f"({c['bops_reduction']:.1f}x fewer), {cost.human_bops(c['macs'])}MACs",
    ]
    quantized = [layer for layer in manifest["layers"] if layer["weights"]]
    lines.append(f"  {len(quantized)} of {len(manifest['layers'])} layers quantized; files:")
    for fmt, name in manifest["files"].items():
        lines.append(f"    {fmt:9s} {out / name}")
    for name, runtime in (("onnx-int8", "onnxruntime"), ("openvino", "OpenVINO")):
        section = manifest.get(name.replace("-", "_"))
        if section and section.get("skipped"):
            lines.append(f"  {name} skipped: {section['skipped']}")
        elif section:
            lines.append(
                f"  {name}: {section['integer_layers']} of {section['quantized_layers']} quantized layers on "
                f"{runtime}'s integer kernels; {section['why']}"
            )
            choice = section.get("layer_choice", {})
            if choice.get("float"):
                lines.append(
                    f"    kept float where that timed faster here: {', '.join(choice['float'])} (x"
                    f"{1 / choice['relative_time']:.2f} the speed with every layer integer that can be)"
                )
    onnx = manifest.get("onnx")
    if onnx and onnx.get("skipped"):
        lines.append(f"  onnx skipped: {onnx['skipped']}")
    elif onnx:
        answers = onnx["answers"]
        agreement = {
            "logits": lambda: f"top-1 agreement {100 * onnx['top1_agreement']:.0f}%, largest difference",
            "flow": lambda: f"mean end-point difference {onnx['mean_end_point_difference']:.2g} px, largest",
            "detections": lambda: (
                f"{100 * onnx['detection_agreement']:.0f}% of the detections (PyTorch "
                f"{onnx['detections'][0]}, onnxruntime {onnx['detections'][1]}) found by both (same class, "
                "box IoU >= 0.5), largest difference of those"
            ),
        }[answers]()
        within = f"{onnx['tolerance']:.2g}" + (" x each output's largest" if answers == "detections" else "")
        noun = {"logits": "logits", "flow": "flows", "detections": "detections"}[answers]
        lines.append(
            f"  onnx: opset {onnx['opset']}, onnxruntime {onnx['runtime']}: "
            f"{onnx['images_within_tolerance']}/{onnx['check_images']} check images "
            f"({onnx.get('check_source', 'random images')}) within "
            f"{within} of PyTorch's {noun}, {agreement} {onnx['max_abs_diff']:.2g}"
            + ("; one sample per run" if onnx.get("batch") == 1 else "")
        )
        lines += [f"  onnx: {why}" for why in onnx.get("newer_opsets", [])]
    lines.append(f"  manifest: {out / MANIFEST_FILE}")
    return "\n".join(lines)
