"""Per-layer precision rules (``quantizer.rules``): what they select, the order they decide in, what
``validate`` and ``inspect`` show, and the one-line errors of a rule that cannot apply."""

from __future__ import annotations

import typing

import pytest
import torch
import torchvision
from cmtkd_graph.passes import precision
from cmtkd_graph.passes.activations import explicit_activations
from cmtkd_graph.passes.common import META, find_layers
from cmtkd_graph.passes.outputs import keep_main_output
from cmtkd_graph.passes.precision import LayerRule
from cmtkd_graph.passes.quantize import quantize
from cmtkd_graph.passes.tracer import trace
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph.errors import SpecError, UserError
from cmtkd_graph.inspection.output import summary_table
from cmtkd_graph.inspection.summary import spec_summary
from cmtkd_graph.quantizers import QuantConv2d, QuantLinear, build_quantizer_family
from cmtkd_graph.quantizers.attention import QuantMultiheadAttention
from cmtkd_graph.quantizers.lsq import LSQQuantizer
from cmtkd_graph.spec.schema import LayerMatch

HWGQ = build_quantizer_family("hwgq")


def spec_with(arch: str, rules: list[dict], *, teachers: int = 0, kwargs: dict | None = None, **q) -> cg.Spec:
    return cg.Spec.model_validate(
        {
            "name": "rules",
            "method": "cmtkd" if teachers else "single",
            "student": {
                "arch": arch,
                "weight_bits": 2,
                "act_bits": 2,
                "kwargs": {"num_classes": 10, **(kwargs or {})},
            },
            "teachers": [{"weight_bits": 4, "act_bits": 4}] * teachers,
            "data": {"dataset": "cifar10"},
            "quantizer": {"rules": rules, **q},
        }
    )


def layers_of(gm) -> dict[str, dict]:
    return {n.target: n.meta[META] for n in find_layers(gm)}


def input_bits(gm) -> dict[str, int]:
    """Layer name -> the bits of its input quantizer (layers without one are absent)."""
    return {
        n.meta[META]["consumer"]: n.meta[META]["bits"]
        for n in gm.graph.nodes
        if n.meta.get(META, {}).get("role") == "quantizer"
    }


def test_the_spec_vocabulary_is_the_pass_vocabulary():
    fields = LayerMatch.model_fields
    assert typing.get_args(fields["role"].annotation)[0].__args__ == precision.ROLES
    assert typing.get_args(fields["position"].annotation)[0].__args__ == precision.POSITIONS
    assert typing.get_args(fields["network"].annotation)[0].__args__ == precision.NETWORKS


def test_depthwise_convs_of_a_w2a2_mobilenet_v3_stay_at_8_bits():
    spec = spec_with(
        "mobilenet_v3_large", [{"match": {"role": "depthwise_conv"}, "weight_bits": 8, "act_bits": 8}]
    )
    gm = cg.system.build_network(spec.student, spec, device="meta")
    decided, inputs = layers_of(gm), input_bits(gm)
    depthwise = {
        name
        for name, m in gm.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    }
    assert len(depthwise) == 15
    for name in depthwise:
        module = gm.get_submodule(name)
        assert isinstance(module, QuantConv2d) and module.weight_quantizer.bits == 8 and inputs[name] == 8
        assert decided[name]["rule"] == "quantizer.rules[0] (role depthwise_conv)"
        assert "depthwise_conv" in decided[name]["roles"]
    inner = [n for n, info in decided.items() if n not in depthwise and info["position"] == "inner"]
    assert inner and all(gm.get_submodule(n).weight_quantizer.bits == 2 and inputs[n] == 2 for n in inner)
    assert all(decided[n]["rule"] == "network bits" for n in inner)
    first = next(n for n, info in decided.items() if info["position"] == "first")
    assert type(gm.get_submodule(first)) is nn.Conv2d and decided[first]["rule"] == "first-layer rule"


def test_attention_projections_of_a_vit_stay_float_and_inspect_says_which_rule():
    spec = spec_with(
        "vit_b_16",
        [
            {"match": {"role": "attention"}, "float": True},
            {"match": {"role": "patch_embedding"}, "weight_bits": 8},
        ],
        kwargs={"image_size": 32},
        first_layer_bits=4,
    )
    system = cg.build_system(spec, device="meta")
    gm = system.student
    decided, inputs = layers_of(gm), input_bits(gm)
    attention = [n for n, m in gm.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 12
    for name in attention:
        assert not isinstance(gm.get_submodule(name), QuantMultiheadAttention) and name not in inputs
        assert decided[name]["reason"] == "kept full precision by quantizer.rules[0] (role attention)"
    mlp = "encoder.layers.encoder_layer_0.mlp.0"
    assert isinstance(gm.get_submodule(mlp), QuantLinear) and decided[mlp]["rule"] == "network bits"
    # the patch embedding takes the rule's weight bits and, the rule leaving them out, the first-layer
    # rule's input bits
    assert gm.conv_proj.weight_quantizer.bits == 8 and inputs["conv_proj"] == 4
    assert decided["conv_proj"]["roles"] == ["patch_embedding"]
    table = summary_table(system)
    assert "quantizer.rules[0] (role attention): 12 layers at full precision" in table
    assert "quantizer.rules[1] (role patch_embedding): 1 layer at W8A4 (hwgq)" in table
    assert "encoder.layers.encoder_layer_0.self_attention" not in table  # counted, not listed
    assert "precision rules  quantizer.rules[0]: student 12 layers at full precision;" in spec_summary(
        spec, system
    )


def test_the_first_matching_rule_decides_and_selectors_combine():
    gm = rewritten_resnet18()
    rules = [
        LayerRule("r0", name="layer4", type="Conv2d", network="teacher", weight_bits=3),
        LayerRule("r1", name="layer4.*.conv2", weight_bits=5, act_bits=5),  # a glob on the full name
        LayerRule("r2", name="layer4", act_bits=6),  # a dotted prefix: every layer below layer4
        LayerRule("r3", position="last", weight_bits=8, act_bits=8),
        LayerRule("r4", type="Linear", weight_bits=7),  # the classifier: r3 came first
    ]
    quantize.in_place(gm, HWGQ, weight_bits=2, act_bits=2, rules=rules, network="student")
    decided, inputs = layers_of(gm), input_bits(gm)
    assert gm.get_submodule("layer4.0.conv2").weight_quantizer.bits == 5 and inputs["layer4.0.conv2"] == 5
    assert decided["layer4.0.conv2"]["rule"] == "r1 (name layer4.*.conv2)"
    # r2 sets the input bits only; the weight bits are the network's
    assert gm.get_submodule("layer4.0.conv1").weight_quantizer.bits == 2 and inputs["layer4.0.conv1"] == 6
    assert inputs["layer4.0.downsample.0"] == 6 and inputs["layer3.1.conv2"] == 2
    assert gm.fc.weight_quantizer.bits == 8 and decided["fc"]["rule"] == "r3 (position last)"
    assert not any(info["rule"].startswith("r0") for info in decided.values())  # not a teacher
    teacher = rewritten_resnet18()
    quantize.in_place(teacher, HWGQ, weight_bits=4, act_bits=4, rules=rules, network="teacher")
    assert teacher.get_submodule("layer4.0.conv2").weight_quantizer.bits == 3


def rewritten_resnet18():
    return explicit_activations(
        keep_main_output(trace(torchvision.models.resnet18(num_classes=10), train=True))
    )


def test_a_rule_may_change_the_quantizer_family_and_the_network_still_trains():
    spec = spec_with(
        "resnet18",
        [{"match": {"name": "layer4"}, "quantizer": "lsq", "weight_bits": 4, "act_bits": 4}],
        teachers=1,
    )
    system = cg.build_system(spec)
    student = system.student
    conv = student.get_submodule("layer4.1.conv2")
    assert isinstance(conv.weight_quantizer, LSQQuantizer) and conv.weight_quantizer.bits == 4
    assert isinstance(student.get_submodule("layer4.1.conv2.input_quantizer"), LSQQuantizer)
    assert not isinstance(student.get_submodule("layer3.1.conv2").weight_quantizer, LSQQuantizer)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, terms = system(x, y)
    terms["total"].backward()
    assert conv.weight.grad is not None and conv.weight_quantizer.step.grad is not None
    assert "quantizer.rules[0]: student 5 layers at W4A4, teachers 5 layers" in spec_summary(spec, system)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"match": {}, "weight_bits": 8}, "give at least one of type, name, position, role, network"),
        ({"match": {"role": "attention"}, "float": True, "act_bits": 8}, "drop weight_bits, act_bits"),
        ({"match": {"role": "attention"}}, "give what the layers get"),
        ({"match": {"role": "attention"}, "options": {"x": 1}, "weight_bits": 4}, "set quantizer too"),
        ({"match": {"role": "gate"}, "float": True}, "quantizer.rules[0].match.role"),
        ({"match": {"role": "attention"}, "quantizer": "fancy"}, "unknown quantizer"),
        ({"match": {"role": "attention"}, "weight_bits": 9}, "must be 1..8 or 32"),
    ],
)
def test_a_rule_that_says_nothing_clear_is_one_line(tmp_path, rule, message):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "name: x\nmethod: single\nstudent: {arch: resnet18, weight_bits: 2, act_bits: 2}\n"
        f"data: {{dataset: cifar10}}\nquantizer: {{rules: [{rule!r}]}}\n".replace("'", '"')
    )
    with pytest.raises(SpecError) as err:
        cg.load_spec(path)
    assert message in str(err.value) and "quantizer.rules[0]" in str(err.value)


def test_a_rule_that_matches_no_layer_is_one_line():
    spec = spec_with("resnet18", [{"match": {"role": "se_gate"}, "float": True}], teachers=1)
    with pytest.raises(
        UserError, match=r"quantizer.rules\[0\]: matches no layer of resnet18 or its teachers "
    ):
        cg.build_system(spec, device="meta")


def test_after_gelu_the_input_quantizer_keeps_negative_values():
    """HWGQ's half-wave grid would clip GELU's negative outputs (down to -0.17) to 0: the quantize pass
    gives the layer after GELU the signed mid-rise grid instead, chosen from the graph (a transformer's
    MLP block: Linear, GELU, Linear)."""
    mlp = nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4)
    )
    gm = quantize(explicit_activations(trace(mlp, train=False)), HWGQ, weight_bits=2, act_bits=2).eval()
    signed = {
        n.meta[META]["consumer"]: n.meta[META]["signed"]
        for n in gm.graph.nodes
        if n.op == "call_module" and n.meta.get(META, {}).get("role") == "quantizer"
    }
    assert signed == {"2": True, "4": False}  # the last layer stays float
    quantizer = gm.get_submodule("2.input_quantizer")
    gelu = nn.functional.gelu(torch.linspace(-3, 3, 601))
    negative = gelu < -0.1
    assert gelu.min() < -0.16 and negative.any()
    levels = quantizer(gelu)
    assert torch.equal(torch.sign(levels[negative]), -torch.ones(int(negative.sum())))
    assert (gm.get_submodule("4.input_quantizer")(gelu) >= 0).all()  # after ReLU: the half-wave grid


def test_a_bad_option_of_a_rules_quantizer_is_named_at_the_rule():
    spec = spec_with("resnet18", [{"match": {"name": "layer4"}, "quantizer": "lsq", "options": {"bogus": 1}}])
    with pytest.raises(SpecError, match=r"^quantizer.rules\[0\].options.bogus: "):
        cg.build_system(spec, device="meta")


def test_a_rule_that_quantizes_a_full_precision_teacher_says_so(caplog):
    """Allowed (as first_layer_bits does), but rarely meant: one warning line per rule and teacher."""
    rules = [{"match": {"type": "Conv2d"}, "act_bits": 4}]
    spec = cg.Spec.model_validate(
        {
            "name": "rules",
            "student": {"arch": "resnet18", "weight_bits": 2, "act_bits": 2, "kwargs": {"num_classes": 10}},
            "teachers": [{"weight_bits": 32, "act_bits": 32}, {"weight_bits": 4, "act_bits": 4}],
            "data": {"dataset": "cifar10"},
            "quantizer": {"rules": rules},
        }
    )
    with caplog.at_level("WARNING", logger="cmtkd_graph"):
        cg.build_system(spec, device="meta")
    warned = [r.getMessage() for r in caplog.records if "full-precision network" in r.getMessage()]
    assert warned == [
        "quantizer.rules[0] quantizes 20 layer(s) of teacher0 (resnet18 WfpAfp, a full-precision network); "
        "add network: student to its match to leave the teacher float"
    ]
    caplog.clear()
    student_only = spec.model_copy(deep=True)
    student_only.quantizer.rules[0].match.network = "student"
    with caplog.at_level("WARNING", logger="cmtkd_graph"):
        cg.build_system(student_only, device="meta")
    assert not [r for r in caplog.records if "full-precision network" in r.getMessage()]
