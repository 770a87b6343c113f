"""The tracer and the graph passes that rewrite one model: activations, quantization, surgery."""

from __future__ import annotations

import pytest
import torch
import torchvision
from cmtkd_graph.passes.activations import explicit_activations, functional_to_modules
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.outputs import keep_main_output
from cmtkd_graph.passes.quantize import nonnegative_nodes, quantize
from cmtkd_graph.passes.surgery import run_surgery
from cmtkd_graph.passes.tracer import copy_graph_module, qualname, trace
from torch import nn

from cmtkd_graph.quantizers import QuantConv2d, QuantLinear, build_quantizer_family
from cmtkd_graph.quantizers.hwgq import HalfWaveQuantizer

HWGQ = build_quantizer_family("hwgq")
LSQ = build_quantizer_family("lsq")


def rewritten(model: nn.Module, train: bool = True) -> torch.fx.GraphModule:
    return explicit_activations(keep_main_output(trace(model, train=train)))


def quantizer_nodes(gm):
    return [n for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "quantizer"]


# ---------------------------------------------------------------- copying and building on meta


def test_copy_graph_module_copies_modules_and_shares_or_replaces_tensors():
    torch.manual_seed(0)
    gm = quantize(
        rewritten(torchvision.models.mobilenet_v3_small(num_classes=5)), HWGQ, weight_bits=2, act_bits=2
    )
    gm.eval()
    x = torch.randn(2, 3, 64, 64)
    shared = copy_graph_module(gm)
    assert torch.equal(shared(x), gm(x))  # the same computation
    assert [qualname(n) for n in shared.graph.nodes] == [qualname(n) for n in gm.graph.nodes]
    pairs = list(zip(gm.modules(), shared.modules(), strict=True))[1:]  # each GraphModule has its own class
    assert all(a is not b and type(a) is type(b) for a, b in pairs)
    assert all(
        a._forward_hooks is not b._forward_hooks and a._parameters is not b._parameters for a, b in pairs
    )
    assert all(a is b for a, b in zip(gm.parameters(), shared.parameters(), strict=True))
    assert not shared.training and all(not m.training for m in shared.modules())
    handle = shared.get_submodule("classifier.0").register_forward_hook(lambda *_: None)
    assert not gm.get_submodule("classifier.0")._forward_hooks  # a hook on the copy stays on the copy
    handle.remove()
    meta = copy_graph_module(gm, tensors="meta")
    originals = dict(gm.named_parameters())
    for name, p in meta.named_parameters():
        assert p.is_meta and isinstance(p, nn.Parameter) and p.shape == originals[name].shape
    assert all(b.is_meta for b in meta.buffers()) and not any(p.is_meta for p in gm.parameters())
    assert meta(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 5)


def test_a_module_at_two_paths_is_copied_once():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("second", (graph.call_module("first", (x,)),)))
    conv = nn.Conv2d(3, 3, 1)
    gm = torch.fx.GraphModule({"first": conv, "second": conv}, graph)
    copy = copy_graph_module(gm, tensors="meta")
    assert copy.get_submodule("first") is copy.get_submodule("second") is not conv
    assert len(list(copy.parameters())) == 2 and all(p.is_meta for p in copy.parameters())


def test_no_init_on_meta_skips_initialisation_of_meta_tensors_only():
    from cmtkd_graph.models.meta_device import no_init_on_meta

    real = torch.zeros(4, 4)
    meta = torch.empty(4, 4, device="meta")
    with no_init_on_meta():
        assert nn.init.kaiming_normal_(meta) is meta and meta.normal_() is meta
        assert nn.init.trunc_normal_(tensor=meta, std=0.02) is meta  # keyword form
        nn.init.kaiming_normal_(real)
        layer = nn.Linear(3, 2, device="meta")
        torch.manual_seed(0)
        real_layer = nn.Linear(3, 2)
    assert real.abs().sum() > 0 and layer.weight.is_meta  # real tensors still initialise
    torch.manual_seed(0)
    assert torch.equal(real_layer.weight, nn.Linear(3, 2).weight)  # and consume the same random numbers


def test_a_meta_build_has_the_structure_of_a_real_one():
    """On meta the float network is traced once and copied for the other networks; the result must be
    what building each network for real gives: same modules, parameter names, shapes and node names."""
    import cmtkd_graph as cg

    spec = cg.load_spec(
        "quickstart",
        ["surgery=[]", "teachers=[{weight_bits: 4, act_bits: 4}, {weight_bits: 8, act_bits: 8}]"],
    )
    real = cg.build_system(spec, load=False)
    meta = cg.build_system(spec, device="meta", load=False)
    assert [(n, p.shape) for n, p in real.named_parameters()] == [
        (n, p.shape) for n, p in meta.named_parameters()
    ]

    def kinds(system):  # every GraphModule has a class of its own: compare those by name
        return [
            (n, type(m).__name__ if isinstance(m, torch.fx.GraphModule) else type(m))
            for n, m in system.named_modules()
        ]

    assert kinds(real) == kinds(meta)
    for a, b in ((real.student, meta.student), (real.teachers, meta.teachers)):
        assert [(qualname(n), n.meta.get(META)) for n in a.graph.nodes] == [
            (qualname(n), n.meta.get(META)) for n in b.graph.nodes
        ]
    assert len({id(p) for p in meta.parameters()}) == len(list(meta.parameters()))  # nothing shared


# ---------------------------------------------------------------- tracing and naming


def test_node_names_follow_torchvision_feature_extraction():
    gm = trace(torchvision.models.resnet18())
    names = [qualname(n) for n in gm.graph.nodes]
    for expected in [
        "conv1",
        "layer1.0.relu",
        "layer1.0.add",
        "layer1.0.relu_1",
        "layer4.1.relu_1",
        "flatten",
        "fc",
    ]:
        assert expected in names
    assert len(names) == len(set(names))
    # torchvision's own naming, for comparison
    from torchvision.models.feature_extraction import get_graph_node_names

    _, tv_names = get_graph_node_names(torchvision.models.resnet18())
    assert set(tv_names) == set(names) - {"output"}


def test_composite_blocks_are_traced_through():
    gm = trace(torchvision.models.mobilenet_v3_small())
    modules = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert "Conv2dNormActivation" not in modules and "InvertedResidual" not in modules
    assert modules.count("Conv2d") == 52  # every real conv is its own node


# ---------------------------------------------------------------- activations


def test_each_relu_call_site_gets_its_own_module():
    gm = rewritten(torchvision.models.resnet18())
    relus = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
    ]
    assert len(relus) == 17  # stem + 2 per BasicBlock
    assert len({n.target for n in relus}) == 17
    assert "layer1.0.relu_1" in {n.target for n in relus}
    assert not any(getattr(m, "inplace", False) for m in gm.modules())


def test_functional_relus_become_modules_named_after_the_node():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    before = trace(model)
    assert any(n.op == "call_function" and n.target is torch.nn.functional.relu for n in before.graph.nodes)
    after = functional_to_modules(before)
    assert not any(
        n.op == "call_function" and n.target is torch.nn.functional.relu for n in after.graph.nodes
    )
    assert isinstance(after.get_submodule("inception3a.branch1.relu"), nn.ReLU)


def test_functional_dropout_follows_the_mode_at_run_time():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.dropout(self.fc(x), p=0.5, training=self.training)

    gm = explicit_activations(trace(Net(), train=True))
    x = torch.ones(4, 8)
    gm.eval()
    assert torch.equal(gm(x), gm.fc(x))  # traced in train mode, yet no dropout in eval
    gm.train()
    assert (gm(x) == 0).any()


@pytest.mark.parametrize("arch", ["resnet18", "googlenet", "densenet121", "efficientnet_b0"])
def test_explicit_activations_keep_outputs_bit_identical(arch):
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, **kwargs).eval()
    gm = rewritten(model, train=False).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), gm(x))


# ---------------------------------------------------------------- quantization


def test_resnet18_quantized_layers_and_input_quantizers():
    gm = quantize(rewritten(torchvision.models.resnet18()), HWGQ, weight_bits=2, act_bits=2)
    quant_convs = [name for name, m in gm.named_modules() if isinstance(m, QuantConv2d)]
    assert len(quant_convs) == 19  # 20 convs minus the first
    assert not any(isinstance(m, QuantLinear) for m in gm.modules())
    assert type(gm.conv1) is nn.Conv2d and type(gm.fc) is nn.Linear
    quants = quantizer_nodes(gm)
    assert len(quants) == 19  # one per input edge of a quantized layer
    assert {n.meta[META]["consumer"] for n in quants} == {
        qualname(gm.graph.find_nodes(op="call_module", target=t)[0]) for t in quant_convs
    }
    assert all(
        not n.meta[META]["signed"] for n in quants
    )  # every input comes from a ReLU (or max-pool of one)
    assert all(isinstance(gm.get_submodule(n.target), HalfWaveQuantizer) for n in quants)
    producers = [n.meta[META]["producer"] for n in quants]
    # the 8 first-ReLU call sites each feed one quantizer (conv2), the stem max-pool feeds layer1.0.conv1,
    # the ReLU at the end of blocks 1,3,5 feeds conv1 and the downsample conv of the next stage
    assert sorted(p for p in producers if p.endswith(".relu")) == [
        f"layer{s}.{b}.relu" for s in range(1, 5) for b in range(2)
    ]
    assert producers.count("maxpool") == 1
    assert producers.count("layer1.1.relu_1") == 2 and producers.count("layer2.1.relu_1") == 2
    positions = {
        n.meta[META]["position"] for n in gm.graph.nodes if n.meta.get(META, {}).get("role") == "layer"
    }
    assert positions == {"first", "inner", "last"}


def test_first_and_last_layers_are_found_by_position_not_name():
    # squeezenet's classifier is a conv; alexnet's first layer is features.0
    sq = quantize(rewritten(torchvision.models.squeezenet1_1()), HWGQ, weight_bits=2, act_bits=2)
    assert (
        type(sq.get_submodule("classifier.1")) is nn.Conv2d
        and type(sq.get_submodule("features.0")) is nn.Conv2d
    )
    assert isinstance(sq.get_submodule("features.3.squeeze"), QuantConv2d)
    vit = quantize(rewritten(torchvision.models.vit_b_16(image_size=32)), HWGQ, weight_bits=2, act_bits=2)
    assert type(vit.conv_proj) is nn.Conv2d and type(vit.get_submodule("heads.head")) is nn.Linear
    assert isinstance(vit.get_submodule("encoder.layers.encoder_layer_0.mlp.0"), QuantLinear)


def test_first_and_last_layer_bits_can_quantize_them():
    gm = quantize(
        rewritten(torchvision.models.resnet18()),
        HWGQ,
        weight_bits=2,
        act_bits=2,
        first_layer_bits=8,
        last_layer_bits=8,
    )
    assert isinstance(gm.conv1, QuantConv2d) and isinstance(gm.fc, QuantLinear)
    first = next(n for n in quantizer_nodes(gm) if n.meta[META]["consumer"] == "conv1")
    assert first.meta[META]["bits"] == 8 and first.meta[META]["signed"]  # the normalised image is signed


def test_signedness_follows_the_producer():
    # mobilenet_v2: inputs of the projection convs come after ReLU6 (unsigned); the blocks' outputs
    # (no activation after the projection BN, residual adds) feed the next expansion conv signed
    gm = quantize(rewritten(torchvision.models.mobilenet_v2()), HWGQ, weight_bits=4, act_bits=4)
    by_consumer = {n.meta[META]["consumer"]: n.meta[META]["signed"] for n in quantizer_nodes(gm)}
    assert by_consumer["features.2.conv.0.0"] is True  # after features.1's projection BN
    assert by_consumer["features.2.conv.1.0"] is False  # after ReLU6
    assert by_consumer["features.4.conv.0.0"] is True  # after a residual add
    nonneg = {qualname(n) for n in nonnegative_nodes(gm)}
    assert "features.1.conv.0.2" in nonneg and "features.3.add" not in nonneg


def test_torchvision_state_dict_loads_with_no_missing_torchvision_keys():
    reference = torchvision.models.resnet18()
    for family in (HWGQ, LSQ):
        gm = quantize(rewritten(torchvision.models.resnet18()), family, weight_bits=2, act_bits=2)
        result = gm.load_state_dict(reference.state_dict(), strict=False)
        assert result.unexpected_keys == []
        assert all("quantizer" in k for k in result.missing_keys)
        for key, value in reference.state_dict().items():
            assert torch.equal(gm.state_dict()[key], value)
    lsq = quantize(rewritten(torchvision.models.resnet18()), LSQ, weight_bits=2, act_bits=2)
    keys = set(lsq.state_dict())
    assert {
        "layer1.0.conv1.weight",
        "layer1.0.conv1.weight_quantizer.step",
        "layer1.0.conv1.input_quantizer.step",
        "layer1.0.conv1.input_quantizer.initialized",
    } <= keys


def _same_run(model, gm, x, train: bool):
    model.train(train)
    gm.train(train)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    b = gm(x)
    return a, b


@pytest.mark.parametrize(
    "arch, kwargs, size",
    [
        ("resnet18", {}, 64),
        ("mobilenet_v3_small", {}, 64),
        ("efficientnet_b0", {}, 64),
        ("vit_b_16", {"image_size": 32}, 32),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_all_32_bit_rewrite_is_bit_identical(arch, kwargs, size, train):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, **kwargs)
    gm = quantize(rewritten(model, train=True), HWGQ, weight_bits=32, act_bits=32)
    assert not quantizer_nodes(gm)
    x = torch.randn(2, 3, size, size)
    a, b = _same_run(model, gm, x, train)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- surgery


def test_cifar_stem_keeps_resolution_and_removes_the_maxpool():
    gm = run_surgery(rewritten(torchvision.models.resnet18()), "cifar_stem")
    assert gm.conv1.kernel_size == (3, 3) and gm.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in gm.modules())
    from cmtkd_graph.passes.shapes import propagate_shapes

    shapes = {qualname(n): tuple(s) for n, s in propagate_shapes(gm, (1, 3, 32, 32)).items()}
    assert shapes["layer1.1.relu_1"] == (1, 64, 32, 32) and shapes["layer4.1.relu_1"] == (1, 512, 4, 4)


def test_bn_after_every_layer_builds_alexnet_bn():
    gm = run_surgery(rewritten(torchvision.models.alexnet()), "bn_after_every_layer")
    bns = {
        n.target: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and "_bn" in n.target
    }
    assert sorted(bns) == [
        "classifier.1_bn",
        "classifier.4_bn",
        "features.0_bn",
        "features.10_bn",
        "features.3_bn",
        "features.6_bn",
        "features.8_bn",
    ]  # 5 convs + 2 hidden FCs; not the classifier output
    assert isinstance(bns["features.0_bn"], nn.BatchNorm2d) and bns["features.0_bn"].num_features == 64
    assert isinstance(bns["classifier.1_bn"], nn.BatchNorm1d) and bns["classifier.1_bn"].num_features == 4096
    order = [qualname(n) for n in gm.graph.nodes]
    assert order.index("features.0") + 1 == order.index("features.0_bn") == order.index("features.1") - 1
    assert gm(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    with_last = run_surgery(
        rewritten(torchvision.models.alexnet()), "bn_after_every_layer", {"include_last": True}
    )
    assert isinstance(with_last.get_submodule("classifier.6_bn"), nn.BatchNorm1d)


def test_grey_input_sums_the_rgb_filters():
    model = torchvision.models.resnet18().eval()
    gm = run_surgery(rewritten(model, train=False), "grey_input").eval()
    assert gm.conv1.in_channels == 1
    grey = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(gm(grey), model(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_bad_surgery_options_are_user_errors():
    from cmtkd_graph.errors import UserError

    with pytest.raises(UserError, match="surgery cifar_stem: bad options"):
        run_surgery(rewritten(torchvision.models.resnet18()), "cifar_stem", {"kernel": 3})
    with pytest.raises(UserError, match="no max-pool"):
        run_surgery(rewritten(torchvision.models.mobilenet_v2()), "cifar_stem")


def test_stack_teachers_runs_each_teacher_unchanged_and_exposes_the_asked_nodes():
    from cmtkd_graph.passes.stack import stack_teachers
    from cmtkd_graph.passes.taps import Tap

    torch.manual_seed(0)
    teachers = [rewritten(torchvision.models.resnet18(num_classes=10)).eval() for _ in range(2)]
    for t in teachers:
        keep_main_output.in_place(t)
        t.recompile()
    exposed = [{"a": Tap("a", "layer1.1.relu_1", None)}, {"b": Tap("b", "layer2.1.relu_1", None)}]
    stacked = stack_teachers(teachers, exposed).eval()
    assert sorted(n for n, _ in stacked.named_children()) == ["teacher0", "teacher1"]
    assert "teacher1.layer1.0.conv1.weight" in stacked.state_dict()
    x = torch.randn(2, 3, 64, 64)
    out = stacked(x)
    for k, t in enumerate(teachers):
        assert torch.equal(out["each_logits"][k], t(x))
    assert out["features"]["a"].shape == (2, 64, 16, 16) and out["features"]["b"].shape == (2, 128, 8, 8)


@pytest.mark.parametrize(
    "arch, expected",
    [("resnet18", "layer4.1.relu_1"), ("mobilenet_v2", "features.18.2"), ("vgg11", "features.20")],
)
def test_last_feature_map_is_the_map_before_global_pooling(arch, expected):
    from cmtkd_graph.passes.shapes import propagate_shapes
    from cmtkd_graph.passes.taps import last_feature_map

    gm = rewritten(getattr(torchvision.models, arch)(num_classes=10))
    keep_main_output.in_place(gm)
    propagate_shapes(gm, (2, 3, 64, 64))
    assert last_feature_map(gm) == expected


# ---------------------------------------------------------------------------- in place where safe
class _Block(nn.Module):
    """BN -> ReLU (safe), a tensor read twice -> ReLU (unsafe), sigmoid -> ReLU (sigmoid's backward
    needs its output: unsafe), BN + x (safe) and BN-read-twice + x (unsafe)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.safe, self.shared, self.after_sigmoid, self.final = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        a = self.safe(self.bn1(self.conv(x)))
        b = self.bn2(a)
        c = self.shared(b) * b.mean()
        d = self.after_sigmoid(torch.sigmoid(c))
        e = self.bn3(d) + x
        f = b + e
        return self.final(f) + b


def test_inplace_where_safe_touches_only_what_nobody_else_reads():
    import operator

    from cmtkd_graph.passes.activations import explicit_activations
    from cmtkd_graph.passes.inplace import add_into, inplace_where_safe

    torch.manual_seed(0)
    before = explicit_activations(trace(_Block()))
    after = inplace_where_safe(before)
    inplace = {name: m.inplace for name, m in after.named_modules() if isinstance(m, nn.ReLU)}
    assert inplace == {"safe": True, "shared": False, "after_sigmoid": False, "final": True}
    adds = [
        n.target
        for n in after.graph.nodes
        if n.op == "call_function" and n.target in (operator.add, add_into)
    ]
    # bn3 + x: in place; b (read again) + e and final(f) + b (ReLU keeps its output for backward): not
    assert adds == [add_into, operator.add, operator.add]
    assert not any(m.inplace for m in before.modules() if isinstance(m, nn.ReLU))  # the pure pass copied
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y1 = before(x)
    y1.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    y2 = after(x)
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(g1, x.grad)


def test_add_into_adds_in_place_only_what_its_first_operand_can_hold():
    from cmtkd_graph.passes.inplace import add_into

    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert add_into(a, b) is a and torch.equal(a, torch.full((2, 3), 3.0))
    low = torch.ones(2, 3, dtype=torch.bfloat16)
    out = add_into(low, b)  # bf16 + fp32 (autocast's feature plus the fp32 shared knowledge)
    assert (
        out is not low
        and out.dtype == torch.float32
        and torch.equal(low, torch.ones(2, 3, dtype=torch.bfloat16))
    )
    row = torch.ones(1, 3)
    assert add_into(row, b).shape == (2, 3) and torch.equal(
        row, torch.ones(1, 3)
    )  # broadcasting: a new tensor


def test_sharing_a_first_layer_ties_one_parameter_and_says_so():
    """passes/share.py: the target's first conv computes with the source's weight (one Parameter, so one
    gradient from both networks); networks whose first layers differ share nothing and say why."""
    import torch
    from cmtkd_graph.passes.share import share_first_layer_in_place
    from cmtkd_graph.passes.tracer import trace
    from torchvision.models import mobilenet_v2, resnet18

    student, teacher = trace(resnet18(num_classes=10)), trace(resnet18(num_classes=10))
    line = share_first_layer_in_place(student, teacher, ("student", "teacher"))
    assert line == "first layer shared: the teacher's conv1 computes with the student's conv1 weight"
    assert teacher.conv1.weight is student.conv1.weight
    assert sum(p is student.conv1.weight for p in [*student.parameters(), *teacher.parameters()]) == 2
    x = torch.randn(2, 3, 32, 32)
    (student(x).sum() + teacher(x).sum()).backward()
    alone = trace(resnet18(num_classes=10))
    alone.load_state_dict(student.state_dict())
    alone(x).sum().backward()
    assert not torch.allclose(student.conv1.weight.grad, alone.conv1.weight.grad)  # both networks' terms

    other = trace(mobilenet_v2(num_classes=10))
    line = share_first_layer_in_place(student, other, ("student", "teacher"))
    assert line.startswith(
        "first layer not shared: the student's conv1 weight [64, 3, 7, 7] and the teacher's"
    )
    assert (
        other.get_submodule(line.split("teacher's ")[1].split(" weight")[0]).weight
        is not student.conv1.weight
    )
