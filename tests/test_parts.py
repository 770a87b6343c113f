"""The traced parts of detectors and RAFT (``cmtkd_graph.models.parts``): every one of the 14 builders
rewritten by the quantize pass with the first/last-layer rule seeing the whole network; with float bits
the rewritten models compute exactly what torchvision's do (outputs, and the training losses through
their eager code: RetinaNet's ``head.compute_loss``, RAFT's ``update_block.hidden_state_size``); a W2A2
detector and RAFT train (gradients reach the quantized layers of every part)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from cmtkd_graph.passes.activations import explicit_activations
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.graph_pass import finish
from cmtkd_graph.passes.quantize import quantize
from torch import nn

from cmtkd_graph.models.meta_device import no_init_on_meta
from cmtkd_graph.models.parts import model_parts, rewrite_parts
from cmtkd_graph.quantizers import FULL_PRECISION, build_quantizer_family
from cmtkd_graph.quantizers.layers import QuantConv2d, QuantLinear

DETECTORS = torchvision.models.list_models(module=torchvision.models.detection)
FLOW = torchvision.models.list_models(module=torchvision.models.optical_flow)
SMALL = {"min_size": 128, "max_size": 160}  # the detectors' own resize: small images for CPU tests


def _kwargs(name: str) -> dict:
    if name in FLOW:
        return {}
    kwargs = {"weights_backbone": None, "num_classes": 3}
    return {**kwargs, "num_classes": 2, "num_keypoints": 4} if "keypoint" in name else kwargs


def _rewriter(bits: int, positions: dict | None = None):
    family = build_quantizer_family("hwgq", {})
    ends = 8 if bits < FULL_PRECISION else FULL_PRECISION

    def rewrite(gm, part):
        explicit_activations.in_place(gm)
        quantize.in_place(
            gm, family, weight_bits=bits, act_bits=bits, first_layer_bits=ends, last_layer_bits=ends
        )
        if positions is not None:
            for node in gm.graph.nodes:
                info = node.meta.get(META, {})
                if "position" in info and info["position"] != "inner":
                    positions.setdefault(info["position"], set()).add(part.path)
        return finish(gm)

    return rewrite


def _meta_model(name: str) -> nn.Module:
    if name.startswith("ssdlite"):  # its builder runs the backbone on a real tensor to count channels
        return torchvision.models.get_model(name, weights=None, **_kwargs(name)).to("meta")
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), no_init_on_meta():
        return torchvision.models.get_model(name, weights=None, **_kwargs(name)).to("meta")


@pytest.mark.parametrize("name", DETECTORS + FLOW)
def test_every_layer_of_every_detector_and_raft_is_in_a_rewritten_part(name):
    model = _meta_model(name)
    layers = {id(m) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)}
    positions: dict[str, set[str]] = {}
    installed = rewrite_parts(model, _rewriter(2, positions))
    assert list(installed) == [p.path for p in model_parts(model)]
    # no float conv/linear is left anywhere in the model: each became a quantized layer of its part
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    quantized = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    assert len(quantized) == len(layers) > 0
    # the network's ends: its stem(s) first, its predictors last, never a head's own first convolution
    encoders = {"feature_encoder", "context_encoder"} if name in FLOW else {"backbone"}
    assert positions["first"] == encoders
    expected_last = (
        {"update_block", "mask_predictor"} & set(installed)
        if name in FLOW
        else {"head"}
        if "head" in installed
        else {"rpn.head", "roi_heads.box_predictor"} | ({"roi_heads.mask_predictor"} & set(installed))
    )
    assert positions["last"] == expected_last


def _float_pair(name: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **_kwargs(name), **kwargs)
    reference = copy.deepcopy(model)
    rewrite_parts(model, _rewriter(FULL_PRECISION))
    return model, reference


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"])
def test_float_parts_compute_what_torchvision_computes(name):
    model, reference = _float_pair(name, **SMALL)
    images = [torch.rand(3, 150, 128), torch.rand(3, 120, 160)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])} for _ in images
    ]
    losses = []
    for net in (model, reference):
        net.train()
        torch.manual_seed(1)  # the RPN's and the box head's sampling
        losses.append(net(images, targets))
    assert set(losses[0]) == set(losses[1]) and all(
        torch.equal(losses[0][k], losses[1][k]) for k in losses[0]
    )
    model.eval(), reference.eval()
    with torch.no_grad():
        found, expected = model(images), reference(images)
    for a, b in zip(found, expected, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float_raft_parts_compute_what_torchvision_computes():
    model, reference = _float_pair("raft_small")
    first, second = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)
    model.eval(), reference.eval()
    with torch.no_grad():
        flows = model(first, second, num_flow_updates=3)
        expected = reference(first, second, num_flow_updates=3)
    assert len(flows) == 3 and all(torch.equal(a, b) for a, b in zip(flows, expected, strict=True))


def _quantized_grads(model: nn.Module) -> dict[str, bool]:
    """Per part, whether it has quantized layers and every one's weight got a finite gradient."""
    seen = {}
    for part in model_parts(model):
        layers = [
            m for m in model.get_submodule(part.path).modules() if isinstance(m, QuantConv2d | QuantLinear)
        ]
        grads = [m.weight.grad for m in layers]
        seen[part.path] = bool(layers) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    return seen


def test_a_w2a2_detector_and_raft_train():
    torch.manual_seed(0)
    detector = torchvision.models.get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, **_kwargs("fasterrcnn"), **SMALL
    )
    rewrite_parts(detector, _rewriter(2))
    detector.train()
    images = [torch.rand(3, 150, 128), torch.rand(3, 120, 160)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([2])} for _ in images
    ]
    losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = _quantized_grads(detector)
    assert set(grads) == {p.path for p in model_parts(detector)} and all(grads.values())

    raft = torchvision.models.get_model("raft_small", weights=None)
    rewrite_parts(raft, _rewriter(2))
    raft.train()
    flows = raft(torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128), num_flow_updates=2)
    torch.stack(flows).abs().mean().backward()
    grads = _quantized_grads(raft)
    assert set(grads) == {"feature_encoder", "context_encoder", "update_block"} and all(grads.values())


def test_detector_backbones_compose_with_shared_knowledge_feeding_every_teacher():
    """Two W4A4 teacher backbones composed at two taps (``combine=None``: their feature maps come out
    as they are, for their eager heads): with equal weights the shared knowledge is each one's own
    feature and every output equals the backbone alone; changing one teacher changes both outputs."""
    from cmtkd_graph.passes.compose import compose_teachers
    from cmtkd_graph.passes.shapes import propagate_shapes
    from cmtkd_graph.passes.taps import resolve_taps
    from cmtkd_graph.passes.tracer import nodes_by_qualname

    torch.manual_seed(0)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    base = torchvision.models.get_model(arch, weights=None, **_kwargs(arch), **SMALL)
    teachers = [copy.deepcopy(base) for _ in range(2)]
    backbones = [rewrite_parts(t, _rewriter(4))["backbone"] for t in teachers]
    for gm in backbones:
        propagate_shapes(gm, (2, 3, 128, 128))
    taps = [resolve_taps(gm, "auto", arch=arch, model=f"teacher{k}") for k, gm in enumerate(backbones)]
    assert [t.node for t in taps[0]][:2] == ["backbone.body.1.add", "backbone.body.3.add"]
    assert "backbone.body.0.0" in nodes_by_qualname(backbones[0])  # the stem, named as in the state dict
    composed = compose_teachers(backbones, [t[:2] for t in taps], combine=None)
    images = torch.rand(2, 3, 128, 128)
    for gm in (*backbones, composed):
        gm.eval()
    with torch.no_grad():
        out = composed(images)
        alone = backbones[0](images)
    assert set(out) == {"each_logits", "shared"} and len(out["each_logits"]) == 2
    for each in out["each_logits"]:
        assert each.keys() == alone.keys() and all(
            torch.allclose(each[k], alone[k], atol=1e-5) for k in alone
        )
    with torch.no_grad():
        for p in backbones[1].parameters():
            p.mul_(1.5)
        changed = composed(images)["each_logits"][0]
    assert not torch.allclose(changed["0"], alone["0"], atol=1e-3)  # teacher1 moved teacher0's map


def test_a_part_keeps_its_eager_interface_through_copies():
    """What torchvision's code asks of a part besides calling it survives FX's deepcopy and the copy
    every pure pass makes: a deep-copied rewritten RetinaNet still trains to torchvision's losses."""
    from cmtkd_graph.passes.tracer import copy_graph_module

    model, reference = _float_pair("retinanet_resnet50_fpn", **SMALL)
    assert callable(copy_graph_module(model.head).compute_loss)
    copied = copy.deepcopy(model)
    images = [torch.rand(3, 150, 128), torch.rand(3, 120, 160)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])} for _ in images
    ]
    found, expected = (net.train()(images, targets) for net in (copied, reference))
    assert all(torch.equal(found[k], expected[k]) for k in expected)

    raft, _ = _float_pair("raft_small")
    assert copy.deepcopy(raft).update_block.hidden_state_size == raft.update_block.hidden_state_size == 96
