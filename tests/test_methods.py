"""The method registry and the two other multi-teacher systems (AMTML-KD, CTKD), each against an eager
implementation written here with plain torchvision models; a plug-in method trained end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

import cmtkd_graph as cg
from cmtkd_graph.inspection import system_graph
from cmtkd_graph.metrics import read_metrics
from cmtkd_graph.optim import build_optimizer, build_scheduler
from cmtkd_graph.spec.io import validate_spec

from .conftest import launch_two_processes

STAGES = ["layer1", "layer2", "layer3", "layer4"]


# ---------------------------------------------------------------------------- eager references
def eager_resnet(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain torchvision ResNet with the CIFAR stem (3x3 stride-1 conv1, no max-pool)."""
    model = getattr(torchvision.models, arch)(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.load_state_dict(state)
    return model


def eager_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the four stage outputs."""
    feats = []
    h = model.relu(model.bn1(model.conv1(x)))
    for stage in STAGES:
        h = getattr(model, stage)(h)
        feats.append(h)
    return model.fc(torch.flatten(model.avgpool(h), 1)), feats


def at(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (at(t) - at(s)).pow(2).mean()


def kl(target_probs: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    return tau**2 * (target_probs * (target_probs.log() - F.log_softmax(logits / tau, 1))).sum(1).mean()


def checkpoint(tmp_path: Path, arch: str, seed: int) -> Path:
    """A real checkpoint file of a full-precision CIFAR-stem network (what a `single` run leaves)."""
    spec = validate_spec(
        {
            "name": "t",
            "method": "single",
            "student": {"arch": arch, "kwargs": {"num_classes": 10}, "weight_bits": 32, "act_bits": 32},
            "surgery": ["cifar_stem"],
            "data": {"dataset": "cifar10"},
        }
    )
    torch.manual_seed(seed)
    state = cg.system.build_network(spec.student, spec).state_dict()
    path = tmp_path / f"{arch}-{seed}.safetensors"
    save_file({n: v.contiguous() for n, v in state.items()}, str(path))
    return path


def spec_for(method: str, teachers: list[dict], distill: dict, student_bits: int = 32) -> cg.Spec:
    return validate_spec(
        {
            "name": "t",
            "method": method,
            "student": {
                "arch": "resnet18",
                "kwargs": {"num_classes": 10},
                "weight_bits": student_bits,
                "act_bits": student_bits,
            },
            "teachers": teachers,
            "taps": {"teachers": STAGES},
            "surgery": ["cifar_stem"],
            "distill": distill,
            "data": {"dataset": "cifar10"},
        }
    )


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 7, 9])


def bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def grads_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Elementwise to 1e-4, with an absolute floor of 1e-5 of the tensor's largest entry: these gradients
    reach ~1e3 at random init, and fp32 sums over 18 layers round by ~1e-6 of that, more on some CPUs'
    kernels (an exact 1e-5 floor failed on one CI machine). A missing or wrong term is off by far more."""
    floor = 1e-5 * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=floor, msg=name)


def student_grads_match(system, eager_student) -> None:
    eager = dict(eager_student.named_parameters())
    for name, p in system.student.named_parameters():
        grads_close(p.grad, eager[name].grad, name)


# ---------------------------------------------------------------------------- AMTML-KD
def test_amtml_kd_matches_an_eager_implementation(tmp_path, batch):
    x, y = batch
    paths = [checkpoint(tmp_path, "resnet18", 1), checkpoint(tmp_path, "resnet34", 2)]
    teachers = [
        {"arch": arch, "weight_bits": 32, "act_bits": 32, "trainable": False, "weights": str(p)}
        for arch, p in zip(("resnet18", "resnet34"), paths, strict=True)
    ]
    spec = spec_for("amtml_kd", teachers, {})
    d = spec.distill
    assert (d.alpha, d.beta, d.tau, d.gamma, d.feature_loss) == (0.3, 1.4, 5.0, 1.0, "attention")
    assert {k: d.options[k] for k in ("kl_reduction", "angle_weight", "distance_weight", "beta_pooling")} == {
        "kl_reduction": "elementwise_mean",
        "angle_weight": 1.0,
        "distance_weight": 1.0,
        "beta_pooling": "average",
    }
    torch.manual_seed(0)
    system = cg.build_system(spec)
    system.train()
    weighting = system.method_modules["weighting"]
    assert weighting.theta.shape == (2, 512) and weighting.w.shape == (512,)

    # eager: the same weights in plain torchvision modules, the same theta and W as leaf tensors
    student = eager_resnet("resnet18", system.student.state_dict()).train()
    t_models = [
        eager_resnet(a, system.teachers.get_submodule(f"teacher{k}").state_dict()).eval()
        for k, a in enumerate(("resnet18", "resnet34"))
    ]
    theta = weighting.theta.detach().clone().requires_grad_()
    w = weighting.w.detach().clone().requires_grad_()
    teacher_bn = [bn_stats(system.teachers.get_submodule(f"teacher{k}")) for k in range(2)]

    out = system(x)
    terms = system.losses(out, y)
    terms["total"].backward()

    zs, fs = eager_forward(student, x)
    with torch.no_grad():
        teacher_out = [eager_forward(t, x) for t in t_models]
    beta = fs[-1].mean(dim=(2, 3))  # the average-pooled last feature map
    weights = torch.softmax((beta[:, None, :] * theta[None]) @ w, dim=1)  # [B, K]
    p_t = sum(weights[:, k : k + 1] * F.softmax(teacher_out[k][0] / 5.0, 1) for k in range(2))
    ce = F.cross_entropy(zs, y)
    kd = kl(p_t, zs, 5.0) / 10  # the KL averaged over the 10 classes too
    hints = sum(at_loss(teacher_out[j % 2][1][j], fs[j]) for j in range(4))  # tap j from teacher j mod K
    angle, distance = rkd_angle_by_triples(zs, p_t), rkd_distance_by_pairs(zs, p_t)
    penalty = w.pow(2).sum() + theta.pow(2).sum()
    total = 0.3 * ce + 1.4 * kd + 1.0 * hints + angle + distance + 0.1 * penalty  # phase 1
    total.backward()

    for name, value in [
        ("ce_student", ce),
        ("kd_student", kd),
        ("feature", hints),
        ("rkd_angle", angle),
        ("rkd_distance", distance),
        ("weighting_penalty", penalty),
    ]:
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(terms["total"], total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["instance"], weights.detach().mean(0), rtol=1e-5, atol=1e-6)
    student_grads_match(system, student)
    grads_close(weighting.theta.grad, theta.grad, "theta")
    grads_close(weighting.w.grad, w.grad, "W")
    # frozen teachers: no gradient, BatchNorm statistics unchanged, even after an optimizer step
    assert all(p.grad is None and not p.requires_grad for p in system.teachers.parameters())
    build_optimizer(system, spec).step()
    for k in range(2):
        after = bn_stats(system.teachers.get_submodule(f"teacher{k}"))
        assert all(torch.equal(after[n], teacher_bn[k][n]) for n in after)


def notebook_kd_loss(y, labels, pool_map, teacher_logits, theta, w, *, phase_1: bool, T=5.0, a=0.7):
    """``LR_adaptive_AT.ipynb``'s objective without the hints, transcribed from its formulas: the student's
    ``pool`` output (the average-pooled map) through ``MaxPool2d`` (a 1x1 window there), the adapter's
    softmax weights, ``nn.KLDivLoss()`` (the element mean over batch x classes, written out here) x 2 a T^2,
    (1 - a) CE, the 0.1 penalty while the adapter trains, and the RKD angle and distance losses of
    ``metric/loss.py`` between the logits and the weighted target (the target side without gradient)."""
    pool = F.adaptive_avg_pool2d(pool_map, 1)
    beta = F.max_pool2d(pool, kernel_size=pool.shape[-1]).flatten(1)
    alpha = torch.stack([(beta * t_k) @ w.unsqueeze(1) for t_k in theta]).squeeze(2).t()  # [B, K]
    miu = F.softmax(alpha, dim=1)
    scores = torch.stack([F.softmax(z / T, dim=1) for z in teacher_logits], dim=1)  # [B, K, C]
    weighted = (miu.unsqueeze(2) * scores).sum(1)
    log_q = F.log_softmax(y / T, dim=1)
    kl_element_mean = (torch.xlogy(weighted, weighted) - weighted * log_q).sum() / weighted.numel()
    loss = kl_element_mean * (T * T * 2.0 * a) + F.cross_entropy(y, labels) * (1.0 - a)
    if phase_1:
        loss = loss + 0.1 * ((w * w).sum() + (theta * theta).sum())
    return loss + rkd_angle_by_triples(y, weighted) + rkd_distance_by_pairs(y, weighted)


def rkd_angle_by_triples(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the angle cosines of every (anchor, b, c) triple of the two batches."""

    def cosines(x):
        x_t = x.detach() if x is t else x
        rows = [F.normalize(x_t - x_t[a], p=2, dim=1) for a in range(len(x_t))]  # unit(x_b - x_a)
        return torch.stack([r @ r.t() for r in rows]).flatten()

    return F.smooth_l1_loss(cosines(s), cosines(t).detach())


def rkd_distance_by_pairs(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Smooth L1 between the pairwise distances of the two batches, each divided by its mean over the
    pairs of distinct rows; the diagonal is 0."""

    def distances(x):
        n = len(x)
        zero = x.new_zeros(())
        d = torch.stack(
            [torch.stack([(x[i] - x[j]).norm() if i != j else zero for j in range(n)]) for i in range(n)]
        )
        return d / d[~torch.eye(n, dtype=torch.bool)].mean()

    return F.smooth_l1_loss(distances(s), distances(t.detach()).detach())


@pytest.mark.parametrize("phase_1", [True, False], ids=["phase 1", "phase 2"])
def test_amtml_kd_objective_is_the_official_notebooks(phase_1):
    """On fixed tensors, the method's loss terms and gradients (logits, feature map, theta, W) against the
    notebook's computation transcribed above; in phase 2 the penalty is gone, as with `adapter.eval()`."""
    from cmtkd_graph.methods import MethodContext, method_for
    from cmtkd_graph.methods.amtml_kd import LAST_FEATURE_MAP, InstanceWeighting
    from cmtkd_graph.system_output import SystemOutput

    g = torch.Generator().manual_seed(7)
    batch, classes, teachers, channels = 6, 10, 3, 8
    logits = torch.randn(batch, classes, generator=g).requires_grad_()
    feature_map = torch.randn(batch, channels, 4, 4, generator=g).requires_grad_()
    teacher_logits = [3 * torch.randn(batch, classes, generator=g) for _ in range(teachers)]
    labels = torch.tensor([0, 3, 7, 9, 1, 1])
    frozen = {"weight_bits": 32, "act_bits": 32, "trainable": False, "weights": "unused.safetensors"}
    spec = spec_for("amtml_kd", [frozen] * teachers, {"feature_loss": "none"})
    spec.train.epochs, spec.distill.options["weighting_epochs"] = 280, 80
    method = method_for(spec)
    weighting = InstanceWeighting(teachers, channels)
    with torch.no_grad():
        weighting.theta.copy_(torch.randn(teachers, channels, generator=g))
        weighting.w.copy_(torch.randn(channels, generator=g))
    epoch = torch.tensor(3.0 if phase_1 else 80.0)
    ctx = MethodContext(nn.ModuleDict({"weighting": weighting}), nn.ModuleDict(), False, epoch)
    out = SystemOutput(
        student_logits=logits,
        each_teacher_logits=tuple(teacher_logits),
        extras={LAST_FEATURE_MAP: feature_map},
    )
    method.complete(ctx, out)
    terms = method.losses(ctx, out, labels)
    terms["total"].backward()

    y, fmap = logits.detach().clone().requires_grad_(), feature_map.detach().clone().requires_grad_()
    theta, w = (
        weighting.theta.detach().clone().requires_grad_(),
        weighting.w.detach().clone().requires_grad_(),
    )
    expected = notebook_kd_loss(y, labels, fmap, teacher_logits, theta, w, phase_1=phase_1)
    expected.backward()
    torch.testing.assert_close(terms["total"], expected, rtol=1e-5, atol=1e-6)
    for got, want, name in [
        (logits.grad, y.grad, "logits"),
        (feature_map.grad, fmap.grad, "feature map"),
        (weighting.theta.grad, theta.grad, "theta"),
        (weighting.w.grad, w.grad, "W"),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    assert set(terms) == {
        "ce_student",
        "kd_student",
        "rkd_angle",
        "rkd_distance",
        "weighting_penalty",
        "total",
    }


def test_amtml_kd_two_phases_follow_the_official_schedule(tmp_path):
    """The lr of the student's and the weighting module's groups in every epoch of the default 280-epoch
    run, against the notebook's optimizers and schedulers driven as it drives them: ``train_adapter(80)``
    steps the adapter's MultiStepLR([40, 50]) at the start of each epoch and never the student's; then
    200 epochs call the student's MultiStepLR([100, 150]).step(epoch) with epoch = 1..200."""
    import warnings

    frozen = {"weight_bits": 32, "act_bits": 32, "trainable": False, "weights": "unused.safetensors"}
    spec = cg.load_spec("amtml_kd", ["teachers=[" + json.dumps(frozen) + "]", "quantizer.name=lsq"])
    options = spec.distill.options
    assert (spec.train.epochs, options["weighting_epochs"]) == (280, 80)
    assert (options["weighting_milestones"], options["student_milestones"]) == ([39, 49], [99, 149])
    system = cg.build_system(spec, device="meta", load=False)
    optimizer = build_optimizer(system, spec)
    scheduler = build_scheduler(optimizer, spec, steps_per_epoch=1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    ours = []
    for _ in range(280):
        ours.append((groups["student"]["lr"], groups["weighting"]["lr"], groups["quantizers"]["lr"]))
        optimizer.step()  # no gradients: nothing moves, only the order torch expects
        scheduler.step()

    student = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, weight_decay=5e-4)
    adapter = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    student_schedule = torch.optim.lr_scheduler.MultiStepLR(student, gamma=0.1, milestones=[100, 150])
    adapter_schedule = torch.optim.lr_scheduler.MultiStepLR(adapter, milestones=[40, 50])
    notebook = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping before optimizer.step(), and the epoch argument
        for _ in range(80):
            adapter_schedule.step()
            notebook.append((student.param_groups[0]["lr"], adapter.param_groups[0]["lr"]))
        for epoch in range(1, 201):
            student_schedule.step(epoch)
            notebook.append((student.param_groups[0]["lr"], 0.0))  # the adapter no longer steps
    got = [(s, wt) for s, wt, _ in ours]
    assert [pytest.approx(pair, rel=1e-12, abs=1e-15) for pair in notebook] == got
    assert all(q == s for s, _, q in ours)  # the student's quantizer steps follow the student


def test_amtml_kd_one_phase_freezes_the_weighting_module_after_its_epochs(tmp_path):
    frozen = {"weight_bits": 32, "act_bits": 32, "trainable": False, "weights": "unused.safetensors"}
    options = {"two_phase": False, "weighting_epochs": 1, "weighting_lr": 0.05}
    spec = validate_spec(
        {**spec_for("amtml_kd", [frozen], {"options": options}).model_dump(), "train": {"epochs": 2}}
    )
    system = cg.build_system(spec, device="meta", load=False)
    optimizer = build_optimizer(system, spec)
    group = next(g for g in optimizer.param_groups if g["name"] == "weighting")
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    scheduler = build_scheduler(optimizer, spec, steps_per_epoch=3)
    lrs = []
    for _ in range(6):
        lrs.append((group["lr"], optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    assert lrs == [(0.05, 0.1)] * 3 + [(0.0, 0.1)] * 3  # then the student alone, on optim.schedule


def test_amtml_kd_two_phases_reject_a_schedule_of_their_own_and_a_too_short_run():
    frozen = {"weight_bits": 32, "act_bits": 32, "trainable": False, "weights": "unused.safetensors"}
    with pytest.raises(cg.SpecError) as err:
        cg.load_spec("amtml_kd", ["teachers=[" + json.dumps(frozen) + "]", "optim.schedule.milestones=[50]"])
    assert err.value.problems == [
        "optim.schedule: amtml_kd's two phases set the schedule of each phase (distill.options."
        "weighting_milestones, student_milestones); keep optim.schedule a multistep without milestones or "
        "warm-up (its gamma applies), or set distill.options.two_phase: false"
    ]
    with pytest.raises(cg.SpecError, match=r"weighting_epochs: phase 1 \(3 epochs\) must end before"):
        cg.load_spec(
            "amtml_kd",
            ["teachers=[" + json.dumps(frozen) + "]", "train.epochs=3", "distill.options.weighting_epochs=3"],
        )


# ---------------------------------------------------------------------------- CTKD
def test_ctkd_refuses_weights_for_the_scratch_teacher(capsys):
    """The scratch teacher learns from scratch beside the student: a `weights:` file would make it a
    second pretrained teacher. One line, exit 2."""
    from cmtkd_graph.cli import main

    weights = "teachers[0].weights=pretrained.safetensors"
    assert main(["validate", "ctkd", "--no-build", "--set", weights]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: teachers[0].weights: the scratch teacher trains from scratch together with the student; "
        "remove `weights:` (the pretrained teacher is the expert, teachers[1])"
    ]


def released_ctkd_loss(ys, y_t_auto, g_s, g_t, targets, *, beta, gamma, batch_size):
    """The loss of CTKD's released code with an expert teacher, transcribed from
    github.com/HaoranZhao1988/CTKD at 238e9fe (train.py, ``h(sample)``; utils.py, ``at``/``at_loss``) in
    today's torch. Its names: ``ys`` the student's logits, ``y_t_auto`` the scratch teacher's, ``g_s``
    the scratch teacher's groups followed by the student's, ``g_t`` the expert's; its ``beta`` weighs
    the attention term, its ``gamma`` the squared distance (this project's gamma and beta)."""

    def at(x):  # utils.py: normalize(x.pow(2).mean(1).view(x.size(0), -1)), p=2, eps 1e-12
        a = x.pow(2).mean(1).view(x.size(0), -1)
        return a / torch.norm(a, 2, 1, keepdim=True).clamp(min=1e-12)

    def at_loss(x, y):
        return (at(x) - at(y)).pow(2).mean()

    loss_groups = [at_loss(x, y) for x, y in zip(g_s, g_t, strict=False)]  # zip stops at the expert's
    y_tech_temp = y_t_auto.detach()  # Variable(y_t_auto.data, requires_grad=False)
    return (
        beta * sum(loss_groups)
        + F.cross_entropy(y_t_auto, targets)
        + F.cross_entropy(ys, targets)
        + gamma * ((y_tech_temp - ys) * (y_tech_temp - ys)).sum() / batch_size
    )


def ctkd_teachers(tmp_path: Path) -> list[dict]:
    expert = checkpoint(tmp_path, "resnet34", 3)
    return [
        {"weight_bits": 32, "act_bits": 32},  # scratch teacher
        {"arch": "resnet34", "weight_bits": 32, "act_bits": 32, "trainable": False, "weights": str(expert)},
    ]


def test_ctkd_is_its_released_code_values_and_gradients(tmp_path, batch):
    """The composed system against the released loss above on eager torchvision networks: the scratch
    teacher on the student's stem convolution, the expert's attention maps on the scratch teacher's
    stages, the student guided by the scratch teacher's detached logits."""
    x, y = batch
    spec = spec_for("ctkd", ctkd_teachers(tmp_path), {})
    d = spec.distill
    assert (d.alpha, d.beta, d.tau, d.gamma, d.feature_loss) == (1.0, 0.5, None, 1000.0, "attention")
    assert d.options == {"expert_guides": "scratch", "share_stem": True}
    torch.manual_seed(0)
    system = cg.build_system(spec)
    system.train()
    scratch_graph = system.teachers.get_submodule("teacher0")
    assert scratch_graph.get_submodule("conv1").weight is system.student.get_submodule("conv1").weight
    student = eager_resnet("resnet18", system.student.state_dict()).train()
    scratch = eager_resnet("resnet18", scratch_graph.state_dict()).train()
    scratch.conv1.weight = student.conv1.weight  # the released code's shared conv0
    expert = eager_resnet("resnet34", system.teachers.get_submodule("teacher1").state_dict()).eval()
    expert_bn = bn_stats(system.teachers.get_submodule("teacher1"))

    out = system(x)
    assert out.teacher_logits is None  # no combined teacher
    terms = system.losses(out, y)
    terms["total"].backward()

    zs, fs = eager_forward(student, x)
    z_scratch, f_scratch = eager_forward(scratch, x)
    with torch.no_grad():
        _, f_expert = eager_forward(expert, x)
    released = released_ctkd_loss(
        zs, z_scratch, f_scratch + fs, f_expert, y, beta=1000.0, gamma=0.5, batch_size=x.shape[0]
    )
    released.backward()
    torch.testing.assert_close(terms["total"], released, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        terms["feature"], sum(at_loss(f_expert[j], f_scratch[j]) for j in range(4)), rtol=1e-5, atol=1e-6
    )
    student_grads_match(system, student)  # conv1's gradient: the student's and the scratch teacher's
    eager_scratch = dict(scratch.named_parameters())
    for name, p in scratch_graph.named_parameters():
        if name != "conv1.weight":  # the student's (above)
            grads_close(p.grad, eager_scratch[name].grad, name)
    expert_graph = system.teachers.get_submodule("teacher1")
    assert all(p.grad is None and not p.requires_grad for p in expert_graph.parameters())
    assert all(torch.equal(v, expert_bn[n]) for n, v in bn_stats(expert_graph).items())


def test_ctkd_as_the_paper_reads_the_expert_guides_the_student(tmp_path, batch):
    x, y = batch
    options = {"expert_guides": "student", "share_stem": False}
    spec = spec_for("ctkd", ctkd_teachers(tmp_path), {"options": options})
    system = cg.build_system(spec)
    system.train()
    scratch_graph = system.teachers.get_submodule("teacher0")
    assert scratch_graph.get_submodule("conv1").weight is not system.student.get_submodule("conv1").weight
    out = system(x)
    terms = system.losses(out, y)
    student = eager_resnet("resnet18", system.student.state_dict()).train()
    expert = eager_resnet("resnet34", system.teachers.get_submodule("teacher1").state_dict()).eval()
    _, fs = eager_forward(student, x)
    with torch.no_grad():
        _, f_expert = eager_forward(expert, x)
    torch.testing.assert_close(
        terms["feature"], sum(at_loss(f_expert[j], fs[j]) for j in range(4)), rtol=1e-5, atol=1e-6
    )
    assert not out.teacher_features


@pytest.mark.parametrize(
    "distill, problem",
    [
        ({"tau": 2.0}, "distill.tau: ctkd has no temperature"),
        ({"feature_loss": "fitnet"}, "distill.feature_loss: fitnet regresses the student's features"),
    ],
)
def test_ctkd_refuses_settings_its_objective_has_no_place_for(tmp_path, distill, problem):
    with pytest.raises(cg.SpecError, match=re.escape(problem)):
        spec_for("ctkd", ctkd_teachers(tmp_path), distill)


@pytest.mark.parametrize(
    "teachers, message",
    [
        ([{"weight_bits": 4, "act_bits": 4}], "teachers: method ctkd distils from exactly two teachers"),
        (
            [
                {"weight_bits": 4, "act_bits": 4, "trainable": False, "weights": "x"},
                {"weight_bits": 8, "act_bits": 8},
            ],
            "teachers[0]: the scratch teacher trains together with the student",
        ),
        (
            [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 8, "act_bits": 8}],
            "teachers[1]: the expert teacher is pretrained and frozen",
        ),
    ],
)
def test_ctkd_teacher_roles_are_checked(teachers, message):
    with pytest.raises(cg.SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec_for("ctkd", teachers, {})


def test_method_options_are_validated_with_their_key_path():
    teachers = [{"weight_bits": 32, "act_bits": 32, "trainable": False, "weights": "x"}]
    with pytest.raises(cg.SpecError) as err:
        spec_for("amtml_kd", teachers, {"options": {"weighting_decy": 0.1}})
    assert err.value.problems == [
        "distill.options.weighting_decy: unknown option of amtml_kd (did you mean weighting_decay?)"
    ]
    with pytest.raises(cg.SpecError, match=r"distill.options.weighting_decay: Input should be greater than"):
        spec_for("amtml_kd", teachers, {"options": {"weighting_decay": -1}})
    with pytest.raises(cg.SpecError, match=r"distill\.options\.x: unknown option of ctkd"):
        spec_for("ctkd", [{"weight_bits": 8, "act_bits": 8}, teachers[0]], {"options": {"x": 1}})


# ---------------------------------------------------------------------------- the example specs
def teacher_overrides(spec: cg.Spec, tmp_path: Path) -> list[str]:
    """Real checkpoint files for the frozen teachers (what `single` runs of those networks leave)."""
    out = []
    for k, t in enumerate(spec.resolved_teachers()):
        if not t.trainable:
            out.append(f"teachers[{k}].weights={checkpoint(tmp_path, t.arch, 10 + k)}")
    return out


@pytest.mark.parametrize("name", ["amtml_kd", "ctkd"])
def test_example_specs_train_on_real_cifar10(name, tmp_path, cifar10_jpeg, fresh_accelerate):
    from cmtkd_graph.train import run

    spec = cg.load_spec(name)
    assert spec.student.bits_label == "W2A2" and spec.data.root == "data/cifar10"
    overrides = [
        *teacher_overrides(spec, tmp_path),
        f"data.root={cifar10_jpeg}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.eval_subset=20",
        "train.max_steps=2",
        "train.log_every=1",
        f"train.output_dir={tmp_path / 'run'}",
        "train.progress_bar=false",
        "train.mixed_precision=no",
        "train.channels_last=false",
        "train.checkpoints=false",
    ]
    run_dir = run(name, overrides)
    lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in lines)
    assert {f"loss/feature/{s}" for s in STAGES} <= set(lines[0])
    final = json.loads((run_dir / "final.json").read_text())
    assert {"acc1/student", "acc1/teacher0", "acc1/teacher1"} <= set(final["accuracy"])
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["samples"] == 20
    if name == "amtml_kd":  # each teacher's mean instance weight, logged, plotted and summarised
        assert all(len(r["importance/instance"]) == 2 for r in lines)
        assert sum(final["importance"]["instance"]) == pytest.approx(1.0, abs=1e-5)
        assert (run_dir / "importance.png").is_file() and "acc1/combined" in final["accuracy"]
        assert lines[0]["lr/weighting"] == 0.1
    else:
        assert "acc1/combined" not in final["accuracy"] and "loss/ce_scratch" in lines[0]


def test_ctkd_with_its_shared_stem_checkpoints_resumes_and_evaluates(
    tmp_path, cifar10_jpeg, fresh_accelerate
):
    """The stem the scratch teacher shares with the student is one tensor in a checkpoint (saved under the
    student's name): a resumed run ties it again, and eval and load_student read the checkpoint."""
    from safetensors import safe_open

    from cmtkd_graph.evaluation.run import evaluate_run
    from cmtkd_graph.train import run

    spec = cg.load_spec("ctkd")
    overrides = [
        *teacher_overrides(spec, tmp_path),
        f"data.root={cifar10_jpeg}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.eval_subset=20",
        "train.max_steps=1",
        f"train.output_dir={tmp_path / 'run'}",
        "train.progress_bar=false",
        "train.mixed_precision=no",
        "train.channels_last=false",
    ]
    run_dir = run("ctkd", overrides)
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        stems = [k for k in f.keys() if k.endswith("conv1.weight") and "layer" not in k]  # noqa: SIM118
    assert stems == ["student.conv1.weight", "teachers.teacher1.conv1.weight"]  # the expert: its own
    shared = "ctkd: first layer shared: the scratch teacher's conv1 computes with the student's conv1 weight"
    assert shared in (run_dir / "train.log").read_text()
    run("ctkd", [*overrides, "train.max_steps=2"], resume=str(run_dir))
    assert json.loads((run_dir / "final.json").read_text())["steps"] == 2
    record = evaluate_run(run_dir, checkpoint="latest")
    assert {"acc1/student", "acc1/teacher0", "acc1/teacher1"} <= set(record)
    cg.load_student(run_dir, checkpoint="latest")


def test_amtml_kd_trains_data_parallel_in_two_processes(tmp_path, cifar10_jpeg):
    """`accelerate launch --multi_gpu --num_processes 2` on CPUs: one model, the weighting module included."""
    spec = cg.load_spec("amtml_kd")
    overrides = [
        *teacher_overrides(spec, tmp_path),
        "surgery=[]",  # the ImageNet stem keeps 32x32 steps cheap; layer4 is 1x1 there, so tap layer1..3
        "taps={teachers: [layer1, layer2, layer3]}",
        f"data.root={cifar10_jpeg}",
        "data.batch_size=16",
        "data.num_workers=0",
        "train.epochs=1",
        "train.log_every=2",
        f"train.output_dir={tmp_path / 'ddp'}",
        "train.progress_bar=false",
        "train.mixed_precision=no",
        "train.channels_last=false",
    ]
    args = ["cmtkd_graph.train", "amtml_kd", *[arg for item in overrides for arg in ("--set", item)]]
    result = launch_two_processes(args, cwd=tmp_path, port=29527)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    ranks = [json.loads((run_dir / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # student, weighting module: one model
    records = read_metrics(run_dir / "metrics.jsonl")
    train_lines = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10, 12]  # 200 images / batch 16 = 12 steps
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["samples"] == 100 and len(evals[0]["importance/instance"]) == 2


# ---------------------------------------------------------------------------- what the spec fills in
def test_the_saved_spec_says_what_ran():
    spec = cg.load_spec("quickstart")
    dumped = cg.dump_spec(spec)
    again = cg.load_spec("quickstart")
    assert cg.dump_spec(again) == dumped
    import yaml

    data = yaml.safe_load(dumped)
    for section, key in [
        ("distill", "gamma"),
        ("distill", "alpha"),
        ("distill", "tau"),
        ("optim", "importance_lr"),
        ("optim", "quantizer_lr"),
        ("optim", "adapter_lr"),
    ]:
        assert data[section][key] is not None, f"{section}.{key}"
    assert data["optim"]["importance_lr"] == pytest.approx(data["optim"]["lr"] / 10)
    assert validate_spec(data) == spec  # the saved spec reads back as the same experiment


def test_inspect_draws_the_weighting_module_and_the_experts_attention_edges():
    amtml = cg.build_system(cg.load_spec("amtml_kd"), device="meta", load=False)
    graph = system_graph(amtml)
    assert graph.nodes["method/weighting"]["role"] == "method"
    assert graph.nodes["method/weighting"]["params"] == 3 * 512
    assert graph.has_edge("student/layer4.1.relu_1", "method/weighting")  # beta(x): the last feature map
    assert {u for u, _ in graph.in_edges("loss/logits")} == {
        "student/fc",
        "teacher0/fc",
        "teacher1/fc",
        "method/weighting",
    }
    # tap j from teacher j mod 2: resnet18 teaches layer1 and layer3, resnet34 layer2 and layer4
    assert graph.has_edge("teacher0/layer1.1.relu_1", "loss/layer1")
    assert graph.has_edge("teacher1/layer2.3.relu_1", "loss/layer2")
    assert graph.has_edge("teacher1/layer4.2.relu_1", "loss/layer4")

    ctkd = system_graph(cg.build_system(cg.load_spec("ctkd"), device="meta", load=False))
    sources = {u for s in STAGES for u, _ in ctkd.in_edges(f"loss/{s}")}
    assert {u.split("/")[0] for u in sources} == {"student", "teacher1"}  # the expert's attention edges
    assert {u for u, _ in ctkd.in_edges("loss/logits")} == {"student/fc", "teacher0/fc"}  # scratch logits


def test_amtml_kd_resumes_exactly(tmp_path, cifar10_jpeg):
    """4 steps straight = 2 steps, stop, resume, 2 more: the same student, weighting module and lr state."""
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    from cmtkd_graph.train import run

    spec = cg.load_spec("amtml_kd")
    base = [
        *teacher_overrides(spec, tmp_path),
        "surgery=[]",
        "taps={teachers: [layer1, layer2, layer3]}",
        f"data.root={cifar10_jpeg}",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.eval_subset=16",
        "train.epochs=2",
        "train.progress_bar=false",
        "train.mixed_precision=no",
        "train.channels_last=false",
        "distill.options.weighting_epochs=1",
    ]

    def fresh_run(*extra: str, resume: Path | None = None) -> Path:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return run(
            "amtml_kd" if resume is None else None, [*base, *extra], resume=str(resume) if resume else None
        )

    straight = fresh_run("train.max_steps=14", f"train.output_dir={tmp_path / 'a'}")
    half = fresh_run("train.max_steps=7", f"train.output_dir={tmp_path / 'b'}")
    fresh_run("train.max_steps=14", resume=half)

    def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
        latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
        return load_file(run_dir / "checkpoints" / latest["checkpoint"] / "model.safetensors")

    a, b = final_state(straight), final_state(half)
    assert a.keys() == b.keys() and "method_modules.weighting.theta" in a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    lines = [r for r in read_metrics(half / "metrics.jsonl") if r["kind"] == "train"]
    # 12 steps per epoch: the weighting module trains in epoch 1 and is frozen from epoch 2 on
    assert [(r["step"], r["lr/weighting"], r["lr/student"]) for r in lines] == [(7, 0.1, 0.1), (14, 0.0, 0.1)]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("method", ["cmtkd", "ctkd"])
def test_channels_last_teacher_maps_reach_the_losses_as_nchw(method):
    """Swin's stages are NHWC: composed (shared knowledge) and side-by-side (hints) teachers alike hand
    the losses NCHW maps, the student's layout."""
    teachers = [{"weight_bits": 8, "act_bits": 8}, {"weight_bits": 32, "act_bits": 32}]
    if method == "ctkd":
        teachers[1].update(trainable=False, weights="unused.safetensors")
    spec = validate_spec(
        {
            "name": "swin",
            "method": method,
            "student": {"arch": "swin_t", "kwargs": {"num_classes": 10}, "weight_bits": 4, "act_bits": 4},
            "teachers": teachers,
            "taps": {"teachers": ["features.1", "features.3"]},
            "data": {"dataset": "cifar10", "image_size": 64},
        }
    )
    torch.manual_seed(0)
    system = cg.build_system(spec, load=False)
    out = system(torch.randn(2, 3, 64, 64))
    shapes = {name: tuple(f.shape) for name, f in out.hints.items()}
    assert shapes == {name: tuple(f.shape) for name, f in out.student_features.items()}
    assert shapes == {"features.1": (2, 96, 16, 16), "features.3": (2, 192, 8, 8)}
