"""Every torchvision classification model: traced, quantized (W2A2 hwgq; lsq for one builder per
torchvision module), composed (K=2, auto taps).

Structure and shapes are checked on the meta device for all ~80 builders (nothing is allocated, so
vit_h_14 and regnet_y_128gf cost the same as resnet18); a set of small models also runs for real.
Two teachers exercise every part of the composition a third would (`python -m bench.build` times K=3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from cmtkd_graph.passes.common import META

import cmtkd_graph as cg
from cmtkd_graph.inspection import support
from cmtkd_graph.models import model_names

ALL = torchvision.models.list_models(module=torchvision.models)
LSQ_CHECKED = set(
    {torchvision.models.get_model_builder(arch).__module__: arch for arch in reversed(ALL)}.values()
)
"""The first builder of every torchvision module (resnet, densenet, vision_transformer...): where LSQ is
built too (its quantize pass is HWGQ's with another quantizer; one structure per module checks it)."""
PAGE = Path(__file__).resolve().parents[1] / support.PAGE
ROWS = support.read_page(PAGE.read_text()) if PAGE.exists() else {}
REAL = [
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "efficientnet_b0",
    "regnet_x_400mf",
    "googlenet",
    "densenet121",
    "alexnet",
]


def spec_for(arch: str, quantizer: str = "hwgq", teachers: int = 2, size: int | None = None) -> cg.Spec:
    """The spec of ``arch``'s row in docs/models.md (W2A2 student and teachers, auto taps)."""
    return support.support_spec(arch, quantizer=quantizer, teachers=teachers, size=size)


def _quantizer_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "quantizer")


@pytest.mark.parametrize("arch", ALL)
def test_every_model_quantizes_and_composes_with_auto_taps(arch):
    """W2A2 hwgq student + 2 W2A2 teachers fused at the auto taps: forward and backward (meta device)."""
    spec = spec_for(arch)
    system = cg.build_system(spec, device="meta", load=False)
    taps = system.networks[1].taps
    assert len(taps) >= 2, [t.name for t in taps]
    assert _quantizer_count(system.student) > 0
    x = torch.empty(2, *spec.data.input_shape(), device="meta")
    # Eval mode: the graph is the same (traced once, in training mode), and on the meta device
    # BatchNorm's training kernel runs as slow Python decompositions (~60% of the time otherwise).
    system.eval()
    out = system(x)
    assert out.teacher_logits.shape == out.student_logits.shape == (2, 10)
    assert set(out.shared_features) == {t.name for t in taps} == set(out.student_features)
    losses = system.losses(out, torch.zeros(2, dtype=torch.long, device="meta"))
    losses["total"].backward()
    fusion = system.teachers.get_submodule(f"fusion.{cg.passes.common.fusion_key(taps[0].name)}")
    assert fusion.logits.grad is not None and fusion.logits.grad.shape == (2,)
    if arch in LSQ_CHECKED:  # LSQ on the same model (meta: structure and shapes; no data initialisation)
        lsq = cg.system.build_network(spec_for(arch, "lsq").student, spec_for(arch, "lsq"), device="meta")
        assert _quantizer_count(lsq) == _quantizer_count(system.student)
        assert lsq(x).shape == (2, 10)
    # docs/models.md says what this build shows
    row = ROWS[arch]
    assert (row.composes, row.task) == ("yes", "classification")
    assert row.structure() == support.structure(spec, system)


@pytest.mark.parametrize("arch", REAL)
@pytest.mark.parametrize("quantizer", ["hwgq", "lsq"])
def test_small_models_run_for_real(arch, quantizer):
    torch.manual_seed(0)
    spec = spec_for(arch, quantizer, teachers=1, size=96)
    student = cg.system.build_network(spec.student, spec)
    x = torch.randn(4, 3, 96, 96)
    y = student(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    student.eval()
    assert torch.isfinite(student(x)).all()


# ---------------------------------------------------------------- docs/models.md


def test_the_models_page_has_every_builder_and_is_what_the_command_writes():
    """One row per builder of every task, and the page is the command's output for those rows (its
    prose, its headings and its links to the measured figures as the docs hold them now). The rows'
    facts are checked by the sweeps (every builder's structure) and below (the int8 column)."""
    assert set(ROWS) == set(model_names())
    assert {r.arch for r in ROWS.values() if r.task == "classification"} == set(ALL)
    assert support.page(list(ROWS.values()), support.measured_links(PAGE.parent)) == PAGE.read_text()
    # the measured links reach the pages that hold figures: resnet18's studies and deployment speed
    assert "[speed](deployment.md#speed)" in ROWS["convnext_tiny"].measured
    assert "(results.md)" in ROWS["resnet18"].measured


@pytest.mark.parametrize(
    "arch", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf", "vit_b_16", "r3d_18"]
)
def test_the_int8_column_is_what_the_writer_does(arch):
    """The int8 graph of a W2A2 student with random weights, as ``cmtkd-graph models`` builds it: integer
    layers, layers left float and why, or the first operation the writer does not write."""
    assert support.int8_fact(support.support_spec(arch)) == ROWS[arch].int8


def test_models_command_prints_a_row_and_names_an_unknown_builder(capsys):
    """The whole row of one builder, found as the page's are (params of the float model, its input)."""
    from cmtkd_graph.cli import main

    assert main(["models", "squeezenet1_1", "--docs", str(PAGE.parent)]) == 0
    row = ROWS["squeezenet1_1"]
    shown = [f"{h:<22}{c}" for h, c in zip(support.ModelSupport.HEADINGS, row.cells(), strict=True)]
    assert capsys.readouterr().out == "\n".join([*shown, f"{'task':<22}classification", "", ""])
    params = sum(p.numel() for p in torchvision.models.squeezenet1_1(num_classes=10).parameters())
    assert row.params == f"{params / 1e6:.1f}" and row.input == "224x224"
    assert ROWS["vit_b_16"].input == "fixed 224x224" and ROWS["inception_v3"].input == "299x299"
    assert main(["models", "resnet_18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err
