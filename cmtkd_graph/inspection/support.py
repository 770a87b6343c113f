"""What the tool does with each torchvision builder: the rows of ``cmtkd-graph models`` and docs/models.md.

Every fact is found by doing it, with the same code training and export use: a W2A2 HWGQ student and
two W2A2 teachers are built and composed at the ``auto`` taps on the meta device and run forward and
backward (nothing is allocated); the student is then built with real (random) weights, turned into its
inference form and written as the int8 graph both integer exports start from, which says per quantized
layer whether its weights are integers there or why it stays float. Sizes are each builder's own
(224 x 224, 299 for Inception v3, 16 x 224 x 224 clips), or the only size a family runs on.

``python -m pytest tests/test_model_sweep.py`` checks the committed page against these facts.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from cmtkd_graph.errors import first_line
from cmtkd_graph.inspection.graph import meta_forward
from cmtkd_graph.models import family_of
from cmtkd_graph.models.facts import BlocksAtDepth, FixedTaps, StageEnds
from cmtkd_graph.passes.graph_pass import graph_modules
from cmtkd_graph.spec import Spec

if TYPE_CHECKING:
    from cmtkd_graph.system import DistillationSystem

BITS = 2  # the student and both teachers: W2A2 (the paper's lowest setting)
SIZES = {
    "classification": (224, 224),
    "segmentation": (224, 224),
    "video": (16, 224, 224),
    "flow": (128, 128),  # RAFT's least input (cmtkd_graph.tasks.flow.MIN_SIDE)
    "detection": (320, 320),  # the mobile detectors' own (SSD300: its fixed 300)
}
OWN_SIZE = {
    "inception_v3": (299, 299),
    "ssd300_vgg16": (300, 300),
}  # builders whose own input differs from the task's
SLOW_INIT = ("googlenet", "inception_v3")  # scipy's truncated normal init: slow and irrelevant here
PAGE = "docs/models.md"
ROLE_NAMES = {  # how the page names each role a precision rule selects (the classifier: every model's last)
    "depthwise_conv": "depthwise",
    "attention": "attention",
    "se_gate": "SE",
    "patch_embedding": "patch",
}
TAP_RULES = {FixedTaps: "fixed names", BlocksAtDepth: "blocks at depth", StageEnds: "stage ends"}
STRUCTURE = ("family", "taps", "quantized", "roles")  # the fields :func:`structure` finds


def support_spec(arch: str, *, quantizer: str = "hwgq", teachers: int = 2, size: int | None = None) -> Spec:
    """The spec every fact of ``arch``'s row is found with (``size``: a square side instead of its own)."""
    from cmtkd_graph.spec.io import validate_spec
    from cmtkd_graph.tasks import task_of_model

    task = task_of_model(arch)
    shape = input_size(arch) if size is None else (*input_size(arch)[:-2], size, size)
    kwargs: dict = {} if task == "flow" else {"num_classes": 10}
    if arch in SLOW_INIT:
        kwargs["init_weights"] = False
    data: dict = {"dataset": "imagefolder", "image_size": shape[-1]}
    if task == "segmentation":
        data["dataset"] = "fashion_scenes"
    if task == "video":
        data.update(dataset="frame_folders", frames=shape[0])
    if task == "flow":
        data["dataset"] = "fashion_flow"
    if task == "detection":
        data["dataset"] = "fashion_objects"
    return validate_spec(
        {
            "name": arch,
            "student": {"arch": arch, "kwargs": kwargs, "weight_bits": BITS, "act_bits": BITS},
            "teachers": [{"weight_bits": BITS, "act_bits": BITS} for _ in range(teachers)],
            "quantizer": {"name": quantizer},
            "taps": {"teachers": "auto"},
            "data": data,
        }
    )


def input_size(arch: str) -> tuple[int, ...]:
    """The size a row is found at: the family's only size, else the builder's own."""
    from cmtkd_graph.tasks import task_of_model

    fixed = family_of(arch).fixed_input
    return fixed.size if fixed is not None else OWN_SIZE.get(arch, SIZES[task_of_model(arch)])


@dataclass(frozen=True)
class ModelSupport:
    """One builder's row: what the page shows (``composes`` and ``int8``: the result, or the first line of
    why not)."""

    arch: str
    task: str  # shown as the page's section, not as a column
    family: str
    input: str  # "224x224", or "fixed 224x224" for a family that runs on no other size
    params: str  # millions, of the float model
    composes: str  # "yes": quantized, composed with two teachers, forward and backward; else why not
    taps: str  # "4 (fixed names)": how many auto taps and by which rule
    quantized: str  # W2A2 layers of the student (layers kept float: the first and last)
    roles: str  # what precision rules can select by role: "15 depthwise, 16 SE"
    int8: str  # "52 of 62 integer; 10 mid-rise input", or the first operation it does not write
    measured: str = "-"  # links to the pages with its measured speed and accuracy (filled by :func:`page`)

    HEADINGS: ClassVar[tuple[str, ...]] = (
        "builder",
        "family",
        "input",
        "params (M)",
        "quantized + composed",
        "auto taps",
        "W2A2 layers (float)",
        "roles",
        "int8 graph",
        "measured",
    )

    def structure(self) -> dict[str, str]:
        """The fields :func:`structure` finds from a built system."""
        return {k: getattr(self, k) for k in STRUCTURE}

    def cells(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "task")


def structure(spec: Spec, system: DistillationSystem) -> dict[str, str]:
    """The row's fields that the composed ``system`` (built from ``spec``, on any device) shows."""
    from cmtkd_graph.passes.common import META

    arch = spec.student.arch
    family = family_of(arch)
    how = TAP_RULES[type(family.auto_taps)]
    nodes = [n for gm in graph_modules(system.student) for n in gm.graph.nodes]  # RAFT: of every part
    layers = [n.meta[META] for n in nodes if n.meta.get(META, {}).get("role") == "layer"]
    low = [m for m in layers if m["weight_bits"] == BITS]
    roles = Counter(r for m in layers for r in m["roles"] if r != "classifier")
    return {
        "family": family.name,
        "taps": f"{len(system.networks[1].taps)} ({how})",
        "quantized": f"{len(low)} ({len(layers) - len(low)})",
        "roles": ", ".join(f"{roles[r]} {name}" for r, name in ROLE_NAMES.items() if roles[r]) or "-",
    }


def compose_check(spec: Spec) -> DistillationSystem:
    """Build the composed system on the meta device and run forward and backward; returns it."""
    import cmtkd_graph as cg

    system = cg.build_system(spec, device="meta", load=False)
    meta_forward(system).backward()
    return system


PARTS_EXPORT = (
    "Detection and optical flow export the torch, codes and Q/DQ ONNX formats, the ONNX for one image (one "
    "pair) per run (detectors traced by torch's TorchScript tracer, box logic included, at opset 20 with "
    "8-bit types; RAFT by `torch.export`, its updates unrolled); neither writes the int8 formats, whose "
    "writers take one traced graph, while these networks run torchvision's eager code between their "
    "rewritten parts"
)


def int8_fact(spec: Spec) -> str:
    """How many of the student's quantized layers the int8 graph writes with integer weights, or the
    first operation it does not write."""
    from cmtkd_graph.deploy.inference import inference_form
    from cmtkd_graph.deploy.onnx_int8 import UnwrittenOperation, build_int8_onnx
    from cmtkd_graph.deploy.student import build_student
    from cmtkd_graph.errors import UserError
    from cmtkd_graph.registry import TASKS

    task = TASKS.get(spec.resolved_task)
    if "export" in task.missing_verbs:
        return f"no: {spec.resolved_task} export not in this version yet"
    if task.system_builder is not None:
        return "no: torch, codes and Q/DQ ONNX formats only (eager code between the parts)"
    torch.manual_seed(0)
    with torch.no_grad():
        try:
            form = inference_form(build_student(spec))
            _, plan = build_int8_onnx(form, spec.data.input_shape(), None)
        except UnwrittenOperation as err:
            return f"no: {err.what}"
        except UserError as err:
            return f"no: {first_line(err)}"
    integer = sum(why == "" for why in plan.integer.values())
    why = Counter(_short(why) for why in plan.integer.values() if why)
    float_layers = [f"{n} {w}" for w, n in sorted(why.items())]
    return "; ".join([f"{integer} of {len(plan.integer)} integer", *float_layers])


def _short(why: str) -> str:
    if "mid-rise" in why:
        return "mid-rise input"
    if "attention" in why:
        return "attention in float"
    return "weights over int8" if "int8" in why else why


def support_row(arch: str, *, int8: bool = True) -> ModelSupport:
    """``arch``'s row (``int8=False``: without building real weights; that column then says so)."""
    from cmtkd_graph.system import instantiate

    spec = support_spec(arch)
    fixed = family_of(arch).fixed_input is not None
    params = sum(p.numel() for p in instantiate(spec.student, "meta").parameters())
    base = {
        "arch": arch,
        "task": spec.resolved_task,
        "family": family_of(arch).name,
        "input": ("fixed " if fixed else "") + "x".join(map(str, input_size(arch))),
        "params": f"{params / 1e6:.1f}",
    }
    try:
        system = compose_check(spec)
    except Exception as err:  # the row says what failed
        failed = dict.fromkeys((*STRUCTURE[1:], "int8"), "-")
        return ModelSupport(**base, composes=f"no: {first_line(err)}", **failed)
    facts = structure(spec, system)
    del system
    return ModelSupport(**{**base, **facts}, composes="yes", int8=int8_fact(spec) if int8 else "not checked")


def table(rows: list[ModelSupport]) -> str:
    """A Markdown table of ``rows``."""
    head = ModelSupport.HEADINGS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def read_page(text: str) -> dict[str, ModelSupport]:
    """The rows of a page :func:`page` wrote, by builder."""
    rows, task = {}, ""
    columns = len(ModelSupport.HEADINGS)
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            task = next((t for t, shown in TASK_TITLES.items() if shown == title), title.lower())
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == columns and cells[0] != "builder" and not cells[0].startswith("-"):
            rows[cells[0]] = ModelSupport(cells[0], task, *cells[1:])
    return rows


def measured_links(docs: Path) -> dict[str, str]:
    """Per builder, links to the pages of ``docs`` that hold its measured figures: the deployment speed
    tables (a row whose model starts with the builder's name) and each study report whose base spec
    trains it (``docs/<study>/results.json``). The figures stay on those pages."""
    import json

    links: dict[str, list[str]] = {}
    deployment = docs / "deployment.md"
    if deployment.exists():
        speed = deployment.read_text().split("\n## Speed", 1)[-1].split("\n## Beyond", 1)[0]
        for line in speed.splitlines():
            arch = re.match(r"\| ([a-z0-9_]+)[ |,]", line)
            if arch:
                links.setdefault(arch.group(1), []).append("[speed](deployment.md#speed)")
    for report in sorted(docs.glob("*/results.json")):
        study = json.loads(report.read_text())
        trained = [row for row in study["rows"] if row.get("finished")]  # a row not run measures nothing
        for arch in {_trained_arch(row["command"], study["base"]) for row in trained}:
            links.setdefault(arch, []).append(f"[{study['study']}]({report.parent.name}.md)")
    return {arch: ", ".join(dict.fromkeys(found)) for arch, found in links.items()}


def _trained_arch(command: str, base: str) -> str:
    """The student a study row's command trains: its ``--set student.arch=``, else its spec's."""
    import shlex

    from cmtkd_graph.spec.io import load_spec

    words = shlex.split(command)
    spec = words[words.index("cmtkd_graph.train") + 1] if "cmtkd_graph.train" in words else base
    for word in reversed(words):
        if word.startswith("student.arch="):
            return word.removeprefix("student.arch=")
    return load_spec(spec).student.arch


TASK_TITLES = {
    "classification": "Classification",
    "segmentation": "Segmentation",
    "video": "Video",
    "flow": "Optical flow",
    "detection": "Detection",
}


def page(rows: list[ModelSupport], measured: dict[str, str]) -> str:
    """docs/models.md: the introduction and one table per task."""
    import torchvision

    rows = [replace(r, measured=measured.get(r.arch, "-")) for r in rows]
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    parts = [INTRO.format(**{k: v.split("+")[0] for k, v in versions.items()}), task_table()]
    for task, title in TASK_TITLES.items():
        mine = [r for r in rows if r.task == task]
        if mine:
            parts.append(f"## {title}\n\n{table(mine)}\n")
    return "\n".join(parts)


def task_table() -> str:
    """What works for each task's builders (the verbs a task does not have yet say so in one line), and
    how the builders of ``list_models()`` add up."""
    import torchvision

    from cmtkd_graph.models.builders import QUANTIZED_PREFIX
    from cmtkd_graph.registry import TASKS

    lines = [
        "## By task\n",
        "| task | builders | validate, train, study, eval | inspect | export | predict |",
        "|---|---|---|---|---|---|",
    ]
    covered = 0
    for task, title in TASK_TITLES.items():
        record = TASKS.get(task)
        covered += len(record.model_names())
        verbs = ["no" if verb in record.missing_verbs else "yes" for verb in ("inspect", "export", "predict")]
        if record.system_builder is not None and verbs[1] == "yes":  # rewritten part by part
            verbs[1] = "torch, codes, onnx"
        lines.append(f"| {title} | {len(record.model_names())} | yes | {' | '.join(verbs)} |")
    every = torchvision.models.list_models()
    others = [name for name in every if not any(name in TASKS.get(t).model_names() for t in TASK_TITLES)]
    quantized = all(name.startswith(QUANTIZED_PREFIX) for name in others)
    kind = "torch.ao's 8-bit eager-mode classifiers (`quantized_*`)" if quantized else ", ".join(others)
    lines.append(
        f"\nThese are {covered} of the {len(every)} builders of torchvision's `list_models()`; the other "
        f"{len(others)} are {kind}, which `validate` refuses in one line naming their float builder (a row "
        "above; the tool quantizes it itself, at any bits). Where a verb is not there yet it says so in one "
        "line (exit 2); the exports of each row's student: its int8 column and "
        f"[deployment.md](deployment.md). {PARTS_EXPORT}.\n"
    )
    return "\n".join(lines)


INTRO = """# Models

What cmtkd_graph does with every torchvision builder of the tasks it trains, found by doing it with the
code training and export use (`cmtkd_graph/inspection/support.py`; torch {torch}, torchvision
{torchvision}). Written by `cmtkd-graph models --markdown > docs/models.md` (a few minutes); a test
checks every row against what the code does now. `cmtkd-graph models ARCH` prints one builder's row.

Each row: a W2A2 HWGQ student and two W2A2 teachers, `taps: {{teachers: auto}}`, at the builder's own
input size (its family's only size where it has one: `fixed`).

* **quantized + composed**: the student and both teachers traced and quantized, the teachers composed
  into one graph with fusion at the auto taps, and the whole system run forward and backward (on the
  meta device: shapes, not values); `yes`, or the first line of what fails. A model that passes here
  trains: the training loop runs the same system. Detectors run their layers there (the backbones,
  composed, and every head); their box logic between the layers needs values, which the tests give
  them for real ([tasks.md](tasks.md#detection)).
* **auto taps**: how many taps `auto` chooses and by which rule (`cmtkd_graph/models/facts.py`:
  the family's fixed module names, blocks at fractions of its depth, or the end of every stage found
  from the graph). `cmtkd-graph taps ARCH` lists them.
* **W2A2 layers (float)**: the student's quantized convolution, linear and attention layers, and in
  brackets those kept in full precision (the first and last layers, `quantizer.first_layer_bits` /
  `last_layer_bits`).
* **roles**: the layers a [precision rule](methods.md#precision-rules) can select by role (`depthwise_conv`,
  `attention`, `se_gate`, `patch_embedding`; `classifier` is the last layer of every model).
* **int8 graph**: the student's inference form written as the int8 graph that `export`'s
  `student-int8.onnx` and `student-openvino.xml` are made from (random weights; the decision does not
  depend on them): how many quantized layers have integer weights and an 8-bit input there (the rest:
  HWGQ's signed 2-bit mid-rise grid, read where a convolution pads it, has no 8-bit form; self-attention
  is written with float matrix products); or `no:` and
  the first operation the writer does not write, in which case `export --format all` writes the other
  formats and says so in the manifest. Whether the runtime then runs a layer on an integer kernel, and
  how fast, is measured per export ([Deployment](deployment.md)). Every student exports to safetensors
  and packed integer codes; the exact Q/DQ `student.onnx` is written where torch's ONNX exporter
  handles the model (the manifest says when it does not).
* **measured**: the pages with the builder's measured figures: deployment speed on a named CPU, and the
  studies that trained it (accuracy, with its machine).
"""
