"""Every torchvision classification model: traced, quantized (W2A2 hwgq and lsq), composed (K=2, auto taps).

Structure and shapes are checked on the meta device for all ~80 builders (nothing is allocated, so
vit_h_14 and regnet_y_128gf cost the same as resnet18); a set of small models also runs for real.
Two teachers exercise every part of the composition a third would (`python -m bench.build` times K=3).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from cmtkd_graph.passes.common import META

import cmtkd_graph as cg
from cmtkd_graph.spec.io import validate_spec

ALL = torchvision.models.list_models(module=torchvision.models)
INPUT = {"inception_v3": 299}  # needs >= 75; everything else at its ImageNet size
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
    kwargs = {"num_classes": 10}
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy-based truncated normal init is slow and irrelevant here
    return validate_spec(
        {
            "name": arch,
            "student": {"arch": arch, "kwargs": kwargs, "weight_bits": 2, "act_bits": 2},
            "teachers": [{"weight_bits": 2, "act_bits": 2} for _ in range(teachers)],
            "quantizer": {"name": quantizer},
            "data": {"dataset": "imagefolder", "image_size": size or INPUT.get(arch, 224)},
        }
    )


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
    # LSQ on the same model (meta: structure and shapes; its data initialisation is skipped there)
    lsq = cg.system.build_network(spec_for(arch, "lsq").student, spec_for(arch, "lsq"), device="meta")
    assert _quantizer_count(lsq) == _quantizer_count(system.student)
    assert lsq(x).shape == (2, 10)


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
