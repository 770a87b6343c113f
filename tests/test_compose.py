"""The collaborative teachers as one graph: taps, fusion nodes, the system, against a plain eager version."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from cmtkd_graph.passes.tracer import qualname
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph.errors import UserError
from cmtkd_graph.quantizers.hwgq import HalfWaveQuantizer, MidRiseWeightQuantizer
from cmtkd_graph.spec.io import validate_spec

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def spec_for(student_bits: int, teacher_bits: list[int], **extra) -> cg.Spec:
    data = {
        "name": "t",
        "student": {
            "arch": "resnet18",
            "kwargs": {"num_classes": 10},
            "weight_bits": student_bits,
            "act_bits": student_bits,
        },
        "teachers": [{"weight_bits": b, "act_bits": b} for b in teacher_bits],
        "taps": {"teachers": STAGES},
        "data": {"dataset": "cifar10", "image_size": 32},
    }
    data.update(extra)
    return validate_spec(data)


# ---------------------------------------------------------------- the eager reference


class EagerQuantConv(nn.Module):
    """conv(quantize_act(x), quantize_weight(W)) written by hand (the paper's quantized layer), for a 2-D
    or a 3-D convolution."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, bits: int):
        super().__init__()
        self.conv, self.act, self.wq = conv, HalfWaveQuantizer(bits), MidRiseWeightQuantizer(bits)

    def forward(self, x):
        c = self.conv
        return c._conv_forward(self.act(x), self.wq(c.weight), c.bias)


def eager_resnet(bits: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    if bits != 32:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Conv2d) and name != "conv1":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, EagerQuantConv(module, bits))
    return model


def eager_stem(m, x):
    return m.maxpool(m.relu(m.bn1(m.conv1(x))))


def eager_head(m, h):
    return m.fc(torch.flatten(m.avgpool(h), 1))


def eager_cmtkd(student, teachers, logits, x):
    """CMT-KD's forward pass written directly from docs/methods.md#shared-knowledge-eq-1."""
    s = eager_stem(student, x)
    student_features = {}
    for stage in STAGES:
        s = getattr(student, stage)(s)
        student_features[stage] = s
    hs = [eager_stem(t, x) for t in teachers]
    shared = {}
    for stage in STAGES:
        fs = [getattr(t, stage)(h) for t, h in zip(teachers, hs, strict=True)]
        w = torch.softmax(logits[stage], 0)
        fused = sum(w[k] * fs[k] for k in range(len(fs)))
        shared[stage] = fused
        hs = [fused] * len(teachers)  # the shared knowledge is every teacher's next input
    zs = [eager_head(t, h) for t, h in zip(teachers, hs, strict=True)]
    w = torch.softmax(logits["output"], 0)
    combined = sum(w[k] * zs[k] for k in range(len(zs)))
    return eager_head(student, s), student_features, combined, zs, shared


def graph_name(eager_name: str) -> str:
    """Eager names have an extra ``.conv`` inside quantized convs (``layer1.0.conv1.conv.weight``)."""
    return eager_name.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")


def networks_of(system) -> list[nn.Module]:
    """The student and each teacher of a composed system, in that order."""
    return [system.student] + [system.teachers.get_submodule(n.label) for n in system.networks[1:]]


def copy_weights(system, student, teachers) -> None:
    """The system's weights into the eager student and teachers."""
    for model, source in zip([student, *teachers], networks_of(system), strict=True):
        state = source.state_dict()
        model.load_state_dict({k: state[graph_name(k)].clone() for k in model.state_dict()})


def assert_same_gradients(system, student, teachers, logits, *, rtol: float) -> int:
    """Every eager parameter's gradient equals its graph twin's, and every importance logit's its eager
    twin's (and is not zero); how many parameter gradients were compared."""
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5)
    checked = 0
    for eager, graph in zip([student, *teachers], networks_of(system), strict=True):
        for name, p in eager.named_parameters():
            if p.grad is not None:
                close(graph.get_parameter(graph_name(name)).grad, p.grad)
                checked += 1
    for name, eager_logits in logits.items():
        grad = system.teachers.get_submodule(f"fusion.{cg.passes.common.fusion_key(name)}").logits.grad
        assert grad.abs().sum() > 0
        close(grad, eager_logits.grad)
    return checked


def load_into_eager(system, student, teachers, logits):
    """Copy the system's weights into the eager models and the eager importance logits."""
    copy_weights(system, student, teachers)
    for name in [*STAGES, "output"]:
        logits[name].data.copy_(system.teachers.get_submodule(f"fusion.{name}").logits.data)


@pytest.mark.parametrize("student_bits, teacher_bits", [(32, [32, 32, 32]), (2, [4, 6, 8])])
def test_composed_system_equals_eager_cmtkd(student_bits, teacher_bits):
    torch.manual_seed(0)
    spec = spec_for(student_bits, teacher_bits, quantizer={"name": "hwgq"})
    system = cg.build_system(spec)
    with torch.no_grad():  # non-trivial importance weights
        for name in [*STAGES, "output"]:
            system.teachers.get_submodule(f"fusion.{name}").logits.copy_(torch.randn(3))
    student = eager_resnet(student_bits)
    teachers = [eager_resnet(b) for b in teacher_bits]
    logits = {name: nn.Parameter(torch.zeros(3)) for name in [*STAGES, "output"]}
    load_into_eager(system, student, teachers, logits)

    x = torch.randn(4, 3, 64, 64)  # layer4 at 2x2: no single-pixel layer (test_quantizers.py has one)
    out = system(x)
    s_logits, s_feats, combined, zs, shared = eager_cmtkd(student, teachers, logits, x)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    close(out.student_logits, s_logits)
    close(out.teacher_logits, combined)
    for k in range(3):
        close(out.each_teacher_logits[k], zs[k])
    for stage in STAGES:
        close(out.shared_features[stage], shared[stage])
        close(out.student_features[stage], s_feats[stage])

    # identical gradients for every parameter, importance logits included
    g = torch.Generator().manual_seed(1)
    weights = {
        name: torch.randn(t.shape, generator=g)
        for name, t in [("s", s_logits), ("c", combined), *[(st, shared[st]) for st in STAGES]]
    }

    def objective(s, c, sh):
        return (
            (s * weights["s"]).sum()
            + (c * weights["c"]).sum()
            + sum((sh[st] * weights[st]).sum() for st in STAGES)
        )

    objective(out.student_logits, out.teacher_logits, out.shared_features).backward()
    objective(s_logits, combined, shared).backward()
    assert set(logits) == {*STAGES, "output"}
    checked = assert_same_gradients(system, student, teachers, logits, rtol=1e-5)
    assert checked == 4 * 62  # resnet18 has 62 parameter tensors


def _input_of(module: nn.Module, fn):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    fn()
    handle.remove()
    return seen["x"]


def test_fusion_feeds_every_teacher_forward():
    torch.manual_seed(0)
    system = cg.build_system(spec_for(2, [4, 6, 8])).eval()
    x = torch.randn(2, 3, 32, 32)
    downstream = system.teachers.get_submodule("teacher0.layer2.0.conv1.input_quantizer")
    skip = system.teachers.get_submodule("teacher0.layer2.0.downsample.0.input_quantizer")
    before = _input_of(downstream, lambda: system(x))
    before_skip = _input_of(skip, lambda: system(x))
    with torch.no_grad():
        system.teachers.get_submodule("teacher1.layer1.1.conv2").weight.mul_(3.0)
    after = _input_of(downstream, lambda: system(x))
    after_skip = _input_of(skip, lambda: system(x))
    assert not torch.equal(before, after)  # teacher 1's change reached teacher 0's next layer...
    assert not torch.equal(before_skip, after_skip)  # ...and its downsample branch
    torch.testing.assert_close(after, system(x).shared_features["layer1"])


def test_one_hot_importance_reproduces_that_teacher_alone():
    torch.manual_seed(0)
    spec = spec_for(2, [4, 6, 8])
    system = cg.build_system(spec).eval()
    with torch.no_grad():
        for name in [*STAGES, "output"]:
            system.teachers.get_submodule(f"fusion.{name}").logits.copy_(
                torch.tensor([-float("inf"), 0.0, -float("inf")])
            )
    alone = cg.system.build_network(spec.resolved_teachers()[1], spec)
    alone.load_state_dict(system.teachers.get_submodule("teacher1").state_dict())
    alone.eval()
    x = torch.randn(2, 3, 32, 32)
    out = system(x)
    assert torch.equal(out.teacher_logits, alone(x))
    assert torch.equal(out.each_teacher_logits[1], alone(x))
    assert not torch.equal(out.each_teacher_logits[0], alone(x))
    assert system.importance()["layer2"].tolist() == [0.0, 1.0, 0.0]


def test_composed_state_dict_names():
    system = cg.build_system(spec_for(2, [4, 6, 8]), device="meta")
    keys = set(system.state_dict())
    assert "teachers.teacher0.layer1.0.conv1.weight" in keys
    assert "teachers.teacher2.fc.bias" in keys
    assert {f"teachers.fusion.{s}.logits" for s in [*STAGES, "output"]} <= keys
    assert "student.layer1.0.conv1.weight" in keys
    fusion_nodes = [
        n for n in system.teachers.graph.nodes if n.op == "call_module" and n.target.startswith("fusion.")
    ]
    assert [qualname(n) for n in fusion_nodes] == [f"fusion.{s}" for s in [*STAGES, "output"]]
    for node in fusion_nodes[:-1]:
        assert len(node.args) == 3
        users = {u.meta["cmtkd"]["teacher"] for u in node.users if u.op != "output"}
        assert users == {0, 1, 2}


def test_mean_combination_and_importance_report():
    system = cg.build_system(spec_for(2, [4, 8], distill={"combine": "mean"}), device="meta")
    assert set(system.importance()) == set(STAGES)  # the output mean has no learned weights
    system = cg.build_system(spec_for(2, [4, 8]))
    assert set(system.importance()) == {*STAGES, "output"}
    assert system.importance()["layer1"].tolist() == [0.5, 0.5]


def test_heterogeneous_teachers_compose_when_tap_shapes_agree():
    spec = spec_for(
        2,
        [4, 8],
        teachers=[{"weight_bits": 4, "act_bits": 4}, {"arch": "resnet34", "weight_bits": 8, "act_bits": 8}],
    )
    system = cg.build_system(spec)
    out = system(torch.randn(2, 3, 32, 32))
    assert out.teacher_logits.shape == (2, 10)
    assert system.networks[2].taps[3].node == "layer4.2.relu_1"  # resnet34's last block


def test_mismatched_teachers_give_a_clear_error():
    spec = spec_for(
        2,
        [4, 8],
        teachers=[{"weight_bits": 4, "act_bits": 4}, {"arch": "resnet50", "weight_bits": 8, "act_bits": 8}],
    )
    with pytest.raises(UserError) as err:
        cg.build_system(spec, device="meta")
    message = str(err.value)
    assert "tap 'layer1'" in message and "teacher0 (resnet18 W4A4) layer1.1.relu_1 [64, 8, 8]" in message
    assert "teacher1 (resnet50 W8A8) layer1.2.relu_2 [256, 8, 8]" in message


def test_unknown_tap_lists_close_names():
    spec = spec_for(2, [4, 8], taps={"teachers": ["layer1", "layr2.0.relu"]})
    with pytest.raises(
        UserError, match=r"'layr2.0.relu' is neither a node nor a module .*closest: layer2.0.relu"
    ):
        cg.build_system(spec, device="meta")


def test_tap_prefix_exact_and_fx_names_resolve_to_the_same_node():
    gm = cg.system.build_network(spec_for(2, [4]).student, spec_for(2, [4]))
    from cmtkd_graph.passes.taps import resolve_tap

    assert (
        resolve_tap(gm, "layer1") is resolve_tap(gm, "layer1.1.relu_1") is resolve_tap(gm, "layer1_1_relu_1")
    )


def test_student_taps_default_to_the_teachers_and_can_differ():
    spec = spec_for(
        2, [4, 8], taps={"teachers": STAGES, "student": ["layer1.1.relu_1", "layer2", "layer3", "layer4"]}
    )
    system = cg.build_system(spec, device="meta")
    assert [t.name for t in system.networks[0].taps] == STAGES
    spec = spec_for(2, [4, 8], taps={"teachers": STAGES, "student": ["layer1"]})
    with pytest.raises(UserError, match="the student has 1 taps"):
        cg.build_system(spec, device="meta")


def test_build_does_not_touch_the_passes_inputs():
    # passes are pure: the float graph is unchanged after quantization and composition
    from cmtkd_graph.passes.activations import explicit_activations
    from cmtkd_graph.passes.quantize import quantize
    from cmtkd_graph.passes.tracer import trace

    from cmtkd_graph.quantizers import build_quantizer_family

    gm = explicit_activations(trace(torchvision.models.resnet18()))
    before = copy.deepcopy(str(gm.graph)), {n: type(m) for n, m in gm.named_modules()}
    quantize(gm, build_quantizer_family("hwgq"), weight_bits=2, act_bits=2)
    assert (str(gm.graph), {n: type(m) for n, m in gm.named_modules()}) == before


def test_taps_command_lists_nodes_with_shapes_and_marks_auto(capsys):
    from cmtkd_graph.cli import main

    assert main(["taps", "resnet18", "--input-size", "32", "--surgery", "cifar_stem"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "resnet18 at 3x32x32: 66 nodes, * = auto taps"  # 4-D maps (incl. avgpool) and fc
    rows = {line[2:].split()[0]: (line[0], line[2:].split()[1:]) for line in lines[1:-1]}
    marked = [name for name, (mark, _) in rows.items() if mark == "*"]
    assert marked == ["layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"]
    assert rows["layer2.0.conv1"][1] == ["Conv2d", "[128,", "16,", "16]"]
    assert lines[-1] == "auto: layer1, layer2, layer3, layer4"
    assert main(["taps", "alexnet"]) == 0
    out = capsys.readouterr().out
    assert "auto: features.1, features.4, features.11" in out
    assert main(["taps", "resnt18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err


# ---------------------------------------------------------------------------- composition is free
FLOAT_RESNET = [
    "data.image_size=16",
    "student.weight_bits=32",
    "student.act_bits=32",
    "teachers=[" + ", ".join(["{weight_bits: 32, act_bits: 32}"] * 3) + "]",
]


def _allocating_ops(step) -> dict[str, int]:
    """How often each aten op that writes a new feature-sized tensor (2 or more dimensions; not in place,
    not a view) runs in ``step``: the loss's scalars are left out."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            schema = func._schema
            inplace = schema.name.endswith("_") or any(
                a.alias_info and a.alias_info.is_write for a in schema.arguments
            )
            view = any(r.alias_info for r in schema.returns)
            out = func(*args, **(kwargs or {}))
            tensors = out if isinstance(out, tuple | list) else (out,)
            if (
                not inplace
                and not view
                and any(isinstance(o, torch.Tensor) and o.dim() >= 2 for o in tensors)
            ):
                counts[schema.name] += 1
            return out

    with Count():
        step()
    return counts


def test_the_composed_float_system_allocates_no_more_than_cmtkd_written_by_hand():
    """One training step of the composed system (three float resnet18 teachers, a float student) runs
    no allocating op more often than the same CMT-KD written eagerly with torchvision modules: no copies,
    no layout conversions, activations and residual additions in place as torchvision runs them (the
    out-of-place ones were a few per cent of a step on an AVX2-only CPU)."""
    from bench.eager_cmtkd import EagerCMTKD

    spec = cg.load_spec("resnet18", FLOAT_RESNET)
    torch.manual_seed(0)
    system = cg.build_system(spec, load=False)
    d = spec.distill
    eager = EagerCMTKD(
        "resnet18", 100, None, 32, [32, 32, 32], alpha=d.alpha, beta=d.beta, gamma=d.gamma, tau=d.tau
    )
    eager.load_from_system(system)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    composed = _allocating_ops(lambda: system(x, y)[1]["total"].backward())
    by_hand = _allocating_ops(lambda: eager.loss(x, y).backward())
    extra = {op: n - by_hand.get(op, 0) for op, n in composed.items() if n > by_hand.get(op, 0)}
    assert extra == {}, extra
    for op in ("aten::relu", "aten::clone", "aten::_to_copy", "aten::contiguous"):
        assert composed.get(op, 0) == 0, op


def test_in_place_activations_and_additions_change_no_value_or_gradient():
    """The same system with every activation and addition made out-of-place again (what the passes
    produce before the last one) gives bit-identical losses, gradients and BatchNorm statistics, in
    fp32 and under bf16 autocast (where a bf16 feature plus the fp32 shared knowledge cannot be added in
    place and is not)."""
    import operator

    from cmtkd_graph.passes.inplace import INPLACE_ACTIVATIONS, add_into

    spec = cg.load_spec("quickstart", ["taps={teachers: [layer1, layer2]}"])
    torch.manual_seed(0)
    fast = cg.build_system(spec, load=False)
    slow = copy.deepcopy(fast)
    undone = 0
    for gm in (slow.student, slow.teachers):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is add_into:
                node.target, undone = operator.add, undone + 1
            elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), INPLACE_ACTIVATIONS):
                undone += gm.get_submodule(node.target).inplace
                gm.get_submodule(node.target).inplace = False
        gm.recompile()
    assert undone == 3 * (17 + 8)  # three resnet18s: every ReLU and residual addition
    x, y = torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3])
    for bf16 in (False, True):
        results = []
        for system in (fast, slow):
            system.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                terms = system(x, y)[1]
            terms["total"].backward()
            grads = {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}
            results.append(
                (terms["total"].detach(), grads, {k: v.clone() for k, v in system.state_dict().items()})
            )
        (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
        assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a), bf16
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), bf16
