"""The objective of each method on a real composed system: terms, weights, and where gradients flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cmtkd_graph as cg
from cmtkd_graph.spec.io import validate_spec

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def build(method: str = "cmtkd", teachers=(4, 8), distill=None, **extra) -> cg.CMTKDSystem:
    data = {
        "name": "t",
        "method": method,
        "student": {"arch": "resnet18", "kwargs": {"num_classes": 10}, "weight_bits": 2, "act_bits": 2},
        "teachers": [t if isinstance(t, dict) else {"weight_bits": t, "act_bits": t} for t in teachers],
        "taps": {"teachers": STAGES},
        "surgery": ["cifar_stem"],  # layer4 is 4x4 at 32x32 (1x1 maps have a constant attention map)
        "distill": distill or {},
        "data": {"dataset": "cifar10"},
        **extra,
    }
    torch.manual_seed(0)
    return cg.build_system(validate_spec(data))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 7, 9])


def importance_grads(system) -> dict[str, torch.Tensor]:
    return {n: system.teachers.get_submodule(f"fusion.{n}").logits.grad for n in [*STAGES, "output"]}


def test_cmtkd_total_is_eq_10_with_every_term(batch):
    x, y = batch
    system = build(distill={"alpha": 0.7, "beta": 0.3, "gamma": 50.0, "tau": 3.0})
    out = system(x)
    terms = system.losses(out, y)
    assert set(terms) == {
        "ce_student",
        "ce_teacher",
        "kl_student",
        "kl_teacher",
        "feature",
        "total",
        *[f"feature/{s}" for s in STAGES],
    }
    expected = 0.7 * (terms["ce_teacher"] + terms["ce_student"]) + 0.3 * (
        terms["kl_teacher"] + terms["kl_student"]
    )
    expected = expected + 50.0 * terms["feature"]
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(terms["ce_student"], F.cross_entropy(out.student_logits, y))
    torch.testing.assert_close(terms["ce_teacher"], F.cross_entropy(out.teacher_logits, y))
    torch.testing.assert_close(terms["feature"], sum(terms[f"feature/{s}"] for s in STAGES))
    # the KL terms distil from the min-logit ensemble of z_T and z_S at tau = 3
    zt, zs = out.teacher_logits, out.student_logits
    z = torch.minimum(zt - zt.gather(1, y[:, None]), zs - zs.gather(1, y[:, None]))
    kl = 9.0 * F.kl_div(F.log_softmax(zs / 3.0, 1), F.softmax(z / 3.0, 1), reduction="batchmean")
    torch.testing.assert_close(terms["kl_student"], kl)


def test_importance_logits_learn_from_the_teacher_ce_and_from_the_feature_term(batch):
    x, y = batch
    system = build()
    out = system(x)
    system.losses(out, y)["ce_teacher"].backward()
    assert all(g is not None and g.abs().sum() > 0 for g in importance_grads(system).values())

    system.zero_grad()
    out = system(x)
    system.losses(out, y)["feature"].backward()
    grads = importance_grads(system)
    assert all(grads[s].abs().sum() > 0 for s in STAGES)  # the shared knowledge is what the student mimics
    assert grads["output"] is None or grads["output"].abs().sum() == 0  # the logits fusion is after the taps


def test_detach_switch_stops_the_feature_term_at_the_teachers(batch):
    x, y = batch
    system = build(distill={"detach_shared": True})
    out = system(x)
    system.losses(out, y)["feature"].backward()
    assert all(g is None or g.abs().sum() == 0 for g in importance_grads(system).values())
    assert all(p.grad is None for p in system.teachers.parameters())
    assert system.student.get_parameter("layer1.0.conv1.weight").grad.abs().sum() > 0


def test_without_mutual_learning_the_kl_terms_are_absent(batch):
    x, y = batch
    system = build(distill={"mutual_learning": False})
    terms = system.losses(system(x), y)
    assert not any(k.startswith("kl") for k in terms) and "feature" in terms
    system = build(distill={"mutual_learning": False, "feature_loss": "none"})
    terms = system.losses(system(x), y)
    assert set(terms) == {"ce_student", "ce_teacher", "total"}
    torch.testing.assert_close(terms["total"], terms["ce_student"] + terms["ce_teacher"])


def test_fitnet_adapters_are_trained_and_not_part_of_the_student(batch):
    x, y = batch
    system = build(distill={"feature_loss": "fitnet"})
    assert sorted(system.adapters) == STAGES
    out = system(x)
    terms = system.losses(out, y)
    assert terms["total"].item() == pytest.approx(
        (
            terms["ce_teacher"]
            + terms["ce_student"]
            + 0.5 * (terms["kl_teacher"] + terms["kl_student"])
            + 1.0 * terms["feature"]
        ).item(),
        rel=1e-6,
    )
    terms["feature"].backward()
    assert system.adapters["layer2"].regressor[0].weight.grad.abs().sum() > 0
    assert not any("adapter" in k or "regressor" in k for k in system.student.state_dict())


def test_single_method_is_the_student_alone(batch):
    x, y = batch
    system = build("single", teachers=())
    assert system.teachers is None and system.importance() == {}
    terms = system.losses(system(x), y)
    assert set(terms) == {"ce_student", "total"}


def test_kd_from_a_teacher_is_hinton_kd(batch):
    x, y = batch
    system = build("kd", teachers=(32,), distill={"tau": 4.0, "beta": 0.9})
    out = system(x)
    terms = system.losses(out, y)
    assert set(terms) == {"ce_student", "ce_teacher", "kd_student", "total"}
    expected = 16.0 * F.kl_div(
        F.log_softmax(out.student_logits / 4, 1), F.softmax(out.teacher_logits / 4, 1), reduction="batchmean"
    )
    torch.testing.assert_close(terms["kd_student"], expected)
    terms["kd_student"].backward()
    assert all(p.grad is None for p in system.teachers.parameters())  # the KD target is detached


def test_average_teacher_distils_the_mean_softmax_of_frozen_teachers(tmp_path, batch):
    from safetensors.torch import save_file

    x, y = batch
    paths = []
    for k, bits in enumerate((4, 8)):
        spec = validate_spec(
            {
                "name": "t",
                "student": {
                    "arch": "resnet18",
                    "kwargs": {"num_classes": 10},
                    "weight_bits": bits,
                    "act_bits": bits,
                },
                "method": "single",
                "surgery": ["cifar_stem"],
                "data": {"dataset": "cifar10"},
            }
        )
        torch.manual_seed(10 + k)
        state = cg.system.build_network(spec.student, spec).state_dict()
        paths.append(tmp_path / f"t{k}.safetensors")
        save_file({n: v.contiguous() for n, v in state.items()}, str(paths[-1]))
    teachers = [
        {"weight_bits": b, "act_bits": b, "trainable": False, "weights": str(p)}
        for b, p in zip((4, 8), paths, strict=True)
    ]
    system = build("average_teacher", teachers=teachers, distill={"tau": 2.0})
    system.train()
    assert not system.teachers.get_submodule("teacher0").training  # frozen teachers stay in eval mode
    out = system(x)
    terms = system.losses(out, y)
    assert set(terms) == {"ce_student", "kd_student", "total"}
    p = (F.softmax(out.each_teacher_logits[0] / 2, 1) + F.softmax(out.each_teacher_logits[1] / 2, 1)) / 2
    expected = 4.0 * F.kl_div(F.log_softmax(out.student_logits / 2, 1), p, reduction="batchmean")
    torch.testing.assert_close(terms["kd_student"], expected)
    # the combined teacher is the average prediction
    torch.testing.assert_close(
        F.softmax(out.teacher_logits, 1),
        (F.softmax(out.each_teacher_logits[0], 1) + F.softmax(out.each_teacher_logits[1], 1)) / 2,
    )
    assert not any(p.requires_grad for p in system.teachers.parameters())
