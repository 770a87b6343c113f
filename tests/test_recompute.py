"""Activation checkpointing of the teachers (``passes.recompute``, ``train.activation_checkpointing``)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.recompute import RECOMPUTE, checkpoint_segments

import cmtkd_graph as cg

QUICK = ["surgery=[]", "taps={teachers: [layer1, layer2, layer3]}", "train.mixed_precision=no"]


def systems(name: str, overrides: list[str]) -> tuple[cg.CMTKDSystem, cg.CMTKDSystem]:
    """The same system (same weights) built without and with activation checkpointing."""
    spec = cg.load_spec(name, overrides)
    torch.manual_seed(0)
    plain = cg.build_system(spec)
    torch.manual_seed(0)
    recomputed = cg.build_system(cg.load_spec(name, [*overrides, "train.activation_checkpointing=true"]))
    return plain, recomputed


def step(system: cg.CMTKDSystem, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward + objective + backward in training mode; returns the loss and the bytes kept for backward."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    system.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, terms = system(x, y)
    terms["total"].backward()
    return terms["total"].detach(), sum(kept.values())


def assert_same_training(plain, recomputed, x, y) -> tuple[int, int]:
    loss_a, kept_a = step(plain, x, y)
    loss_b, kept_b = step(recomputed, x, y)
    assert torch.equal(loss_a, loss_b)
    a, b = dict(plain.named_parameters()), dict(recomputed.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        ga, gb = a[name].grad, b[name].grad
        assert (ga is None) == (gb is None), name
        assert ga is None or torch.equal(ga, gb), name
    # recomputation did not move BatchNorm statistics a second time
    buffers_a, buffers_b = dict(plain.named_buffers()), dict(recomputed.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    assert all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
    return kept_a, kept_b


def test_cmtkd_with_recomputed_teacher_segments_trains_bit_identically_with_less_kept_memory():
    plain, recomputed = systems("quickstart", QUICK)
    assert plain.state_dict().keys() == recomputed.state_dict().keys()  # checkpoints load either way
    x, y = torch.randn(8, 3, 28, 28), torch.randint(0, 10, (8,))
    kept_plain, kept_recomputed = assert_same_training(plain, recomputed, x, y)
    assert kept_recomputed < 0.6 * kept_plain  # two teachers of three networks stop keeping theirs
    calls = [n for n in recomputed.teachers.graph.nodes if n.meta.get(META, {}).get("role") == "recompute"]
    assert [n.meta[META]["segment"] for n in calls] == [
        f"teacher{k}_segment{s}"
        for s in range(4)
        for k in range(2)  # 3 taps: 4 segments per teacher
    ]
    left = [n for n in recomputed.teachers.graph.nodes if "teacher" in n.meta.get(META, {})]
    assert left and all(n.target is operator.getitem for n in left)  # a segment's outputs, nothing computed


def test_dropout_in_a_recomputed_segment_replays_its_random_numbers():
    """mobilenet_v3_small's classifier has dropout: the recomputed head must drop the same units."""
    overrides = ["student.arch=mobilenet_v3_small", "surgery=[]", "taps.teachers=auto"]
    plain, recomputed = systems("quickstart", [*overrides, "train.mixed_precision=no"])
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    torch.manual_seed(1)
    loss_a, _ = step(plain, x, y)
    torch.manual_seed(1)
    loss_b, _ = step(recomputed, x, y)
    assert torch.equal(loss_a, loss_b)
    grads = zip(plain.teachers.parameters(), recomputed.teachers.parameters(), strict=True)
    assert all(torch.equal(a.grad, b.grad) for a, b in grads if a.grad is not None)


def test_side_by_side_teachers_are_one_segment_each(tmp_path):
    """CTKD: a scratch teacher that trains and a frozen expert (from a checkpoint file), side by side."""
    from safetensors.torch import save_file

    expert = tmp_path / "expert.safetensors"
    spec = cg.load_spec("quickstart", QUICK)
    torch.manual_seed(3)
    float_model = spec.student.model_copy(update={"weight_bits": 32, "act_bits": 32})
    save_file(cg.system.build_network(float_model, spec).state_dict(), str(expert))
    overrides = [
        *QUICK,
        "method=ctkd",
        "teachers=[{weight_bits: 32, act_bits: 32}, "
        f"{{weight_bits: 32, act_bits: 32, trainable: false, weights: {expert}}}]",
    ]
    plain, recomputed = systems("quickstart", overrides)
    x, y = torch.randn(8, 3, 28, 28), torch.randint(0, 10, (8,))
    assert_same_training(plain, recomputed, x, y)
    names = sorted(name for name, _ in recomputed.teachers.get_submodule(RECOMPUTE).named_children())
    assert names == ["teacher0_segment0", "teacher1_segment0"]


def test_recomputation_is_off_without_gradients_and_in_copies():
    _, recomputed = systems("quickstart", QUICK)
    x = torch.randn(4, 3, 28, 28)
    recomputed.eval()
    with torch.no_grad():
        expected = recomputed(x).teacher_logits
    twin = copy.deepcopy(recomputed)  # the precision probe copies systems
    for p in twin.parameters():
        p.data.add_(1.0)
    with torch.no_grad():
        assert torch.equal(recomputed(x).teacher_logits, expected)  # the copy owns its own modules
        assert not torch.equal(twin(x).teacher_logits, expected)


def test_a_graph_without_teacher_nodes_is_left_alone():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not hasattr(checkpoint_segments(gm), RECOMPUTE)


@pytest.mark.parametrize("flag", ["true", "false"])
def test_the_meta_build_shows_the_plain_graph(flag):
    spec = cg.load_spec("quickstart", [*QUICK, f"train.activation_checkpointing={flag}"])
    system = cg.build_system(spec, device="meta", load=False)
    assert not hasattr(system.teachers, RECOMPUTE)
