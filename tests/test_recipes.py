"""Training-recipe options: label smoothing, torchvision's automatic augmentation policies, random
erasing, MixUp/CutMix of batches and KDCL-MinLogit on their soft labels. That a run with all of them
resumes bit-identically is in test_train.py (test_resume_gives_bit_identical_weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import cmtkd_graph as cg
from cmtkd_graph.data.mixing import BatchMixing
from cmtkd_graph.data.transforms import build_transforms
from cmtkd_graph.errors import SpecError
from cmtkd_graph.losses import kdcl_min_logit
from cmtkd_graph.spec import AugmentSpec, DataSpec


def spec(**data) -> cg.Spec:
    return cg.Spec.model_validate(
        {
            "name": "recipe",
            "student": {"arch": "resnet18", "weight_bits": 2, "act_bits": 2, "kwargs": {"num_classes": 10}},
            "teachers": [{"weight_bits": 4, "act_bits": 4}],
            "data": {"dataset": "cifar10", **data},
            "distill": {"label_smoothing": 0.1},
            "taps": {"teachers": ["layer2"]},
        }
    )


def test_label_smoothing_reaches_every_cross_entropy_term():
    torch.manual_seed(0)
    system = cg.build_system(spec())
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 3])
    out, terms = system(images, labels)
    for term, logits in (("ce_student", out.student_logits), ("ce_teacher", out.teacher_logits)):
        expected = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        assert terms[term].item() == pytest.approx(expected.item(), rel=1e-6)
        assert terms[term].item() != pytest.approx(F.cross_entropy(logits.float(), labels).item(), rel=1e-3)


def test_mixup_mixes_images_and_labels_by_one_lambda_and_repeats_itself():
    mixing = BatchMixing(AugmentSpec(mixup_alpha=0.4), 10, seed=3)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, soft = mixing(images, labels, epoch=0, batch=0)
    lam = soft[0, 0].item()
    assert 0 < lam < 1 and soft.shape == (6, 10)
    one_hot = F.one_hot(labels, 10).float()
    assert torch.allclose(soft, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)
    again, again_soft = mixing(images, labels, epoch=0, batch=0)
    assert torch.equal(again, mixed) and torch.equal(again_soft, soft)  # seeded by (seed, epoch, batch)
    _, other = mixing(images, labels, epoch=0, batch=1)
    assert not torch.equal(other, soft)
    other_rank = BatchMixing(AugmentSpec(mixup_alpha=0.4), 10, seed=3, rank=1)
    assert not torch.equal(other_rank(images, labels, epoch=0, batch=0)[1], soft)


def test_cutmix_pastes_a_box_whose_area_is_the_label_weight():
    mixing = BatchMixing(AugmentSpec(cutmix_alpha=1.0), 10, seed=0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    for batch in range(5):
        mixed, soft = mixing(images, labels, epoch=1, batch=batch)
        kept = (mixed == images).float().mean(dim=(1, 2, 3))  # pixels of the image's own
        pasted = (mixed == images.roll(1, 0)).float().mean(dim=(1, 2, 3))
        assert torch.allclose(kept + pasted, torch.ones(4))
        assert torch.allclose(soft[torch.arange(4), labels], kept)
        assert torch.allclose(soft.sum(1), torch.ones(4))


def test_kdcl_min_logit_on_soft_labels():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 7), torch.randn(5, 7)
    labels = torch.tensor([0, 6, 2, 2, 4])
    hard = kdcl_min_logit(teacher, student, labels)
    assert torch.equal(kdcl_min_logit(teacher, student, F.one_hot(labels, 7).float()), hard)
    soft = 0.7 * F.one_hot(labels, 7).float() + 0.3 * F.one_hot(labels.roll(1), 7).float()
    by_hand = torch.minimum(
        teacher
        - (0.7 * teacher.gather(1, labels[:, None]) + 0.3 * teacher.gather(1, labels.roll(1)[:, None])),
        student
        - (0.7 * student.gather(1, labels[:, None]) + 0.3 * student.gather(1, labels.roll(1)[:, None])),
    )
    assert torch.allclose(kdcl_min_logit(teacher, student, soft), by_hand, atol=1e-6)


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        ("autoaugment", v2.AutoAugment),
        ("randaugment", v2.RandAugment),
        ("trivialaugment_wide", v2.TrivialAugmentWide),
        ("augmix", v2.AugMix),
    ],
)
def test_policies_follow_the_crop_and_erasing_follows_normalising(policy, kind):
    data = DataSpec(dataset="cifar10", augment={"policy": policy, "random_erasing": 1.0})
    train, evaluation = build_transforms(data, size=32, native_size=32, in_channels=3)
    steps = [type(t) for t in train.transforms]
    assert steps.index(kind) == steps.index(v2.RandomHorizontalFlip) + 1
    assert steps[-1] is v2.RandomErasing and kind not in [type(t) for t in evaluation.transforms]
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = train(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and (out == 0).any()  # a box erased


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dataset": "fashion_scenes", "augment": {"mixup_alpha": 0.2}}, "are for classification"),
        (
            {"dataset": "cifar10", "pipeline": "device", "augment": {"policy": "randaugment"}},
            "need pipeline: workers",
        ),
    ],
)
def test_recipe_options_where_they_cannot_apply_are_one_line(tmp_path, data, message):
    arch = "lraspp_mobilenet_v3_large" if data["dataset"] == "fashion_scenes" else "resnet18"
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "method": "single",
                "student": {"arch": arch, "weight_bits": 2, "act_bits": 2},
                "data": data,
            }
        )
    )
    with pytest.raises(SpecError, match=message):
        cg.load_spec(path)


def test_validate_names_the_recipe():
    from cmtkd_graph.inspection.summary import spec_summary

    text = spec_summary(spec(augment={"policy": "randaugment", "random_erasing": 0.25, "cutmix_alpha": 1.0}))
    line = next(line for line in text.splitlines() if line.strip().startswith("recipe "))
    assert (
        line.split(None, 1)[1]
        == "policy randaugment, random erasing 0.25, cutmix 1 per batch, label smoothing 0.1"
    )


def test_the_moving_average_of_the_weights_updates_every_n_steps_by_torchs_formula(tmp_path):
    from torch import nn

    from cmtkd_graph.ema import StudentAverage
    from cmtkd_graph.spec import EmaSpec

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = StudentAverage(net, EmaSpec(decay=0.9, every=2))
    w0 = net[0].weight.detach().clone()
    average.update(net, 1)  # not an update step
    assert int(average.model.n_averaged) == 0
    average.update(net, 2)  # the first update copies
    assert torch.equal(average.student[0].weight, w0)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(8, 3))  # moves BatchNorm's running statistics
    average.update(net, 4)
    assert torch.allclose(average.student[0].weight, 0.9 * w0 + 0.1 * (w0 + 1))
    assert torch.allclose(average.student[1].running_mean, 0.1 * net[1].running_mean)
    assert int(average.student[1].num_batches_tracked) == int(net[1].num_batches_tracked) == 1  # copied
    assert not average.student[0].weight.requires_grad
    average.save(tmp_path)
    resumed = StudentAverage(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), EmaSpec(decay=0.9, every=2))
    assert resumed.load(tmp_path) and int(resumed.model.n_averaged) == 2
    assert torch.equal(resumed.student[0].weight, average.student[0].weight)
    assert set(average.student_state()) == set(net.state_dict())
    assert not StudentAverage(net, EmaSpec()).load(tmp_path / "elsewhere")
    never = StudentAverage(nn.Linear(3, 2), EmaSpec(every=100))  # fewer steps than `every`
    trained = nn.Linear(3, 2)
    never.update(trained, 1)
    never.start(trained)  # before it is evaluated or saved: the student as it is
    assert torch.equal(never.student.weight, trained.weight) and int(never.model.n_averaged) == 1
    never.start(nn.Linear(3, 2))  # only an average never updated
    assert torch.equal(never.student.weight, trained.weight)


def recipe_spec(recipe: str, **extra) -> cg.Spec:
    return cg.Spec.model_validate(
        {
            "name": "recipe",
            "method": "single",
            "student": {"arch": "resnet18", "weight_bits": 2, "act_bits": 2, "kwargs": {"num_classes": 10}},
            "data": {"dataset": "cifar10", "batch_size": 256},
            "train": {"epochs": 10},
            "recipe": recipe,
            **extra,
        }
    )


def test_recipe_names_expand_to_torchvisions_reference_settings():
    """references/classification/README.md: ConvNeXt `--opt adamw --lr 1e-3 --lr-warmup-epochs 5
    --auto-augment ta_wide --random-erase 0.1 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
    --weight-decay 0.05 --norm-weight-decay 0.0 --model-ema` at 8 x 128 images per step; ViT-B/16 `--opt
    adamw --lr 0.003 --wd 0.3 --lr-warmup-epochs 30 --lr-warmup-decay 0.033 --label-smoothing 0.11
    --mixup-alpha 0.2 --auto-augment ra --clip-grad-norm 1 --cutmix-alpha 1.0 --model-ema` at 8 x 512."""
    convnext = recipe_spec("torchvision_convnext")
    o, a = convnext.optim, convnext.data.augment
    assert (o.name, o.weight_decay, o.norm_weight_decay, o.schedule.name) == ("adamw", 0.05, 0.0, "cosine")
    assert o.lr == pytest.approx(1e-3 * 256 / 1024)  # scaled to the spec's batch
    assert (o.schedule.warmup_epochs, o.schedule.warmup_start_factor) == (5.0, 0.01)
    assert (a.policy, a.random_erasing, a.mixup_alpha, a.cutmix_alpha) == (
        "trivialaugment_wide",
        0.1,
        0.2,
        1.0,
    )
    assert convnext.distill.label_smoothing == 0.1 and convnext.train.ema.every == 32
    # train.py: alpha = min(1, (1 - 0.99998) x batch x ema steps / epochs), decay = 1 - alpha
    assert convnext.train.ema.decay == pytest.approx(1 - 2e-5 * 256 * 32 / 10)
    vit = recipe_spec("torchvision_vit")
    assert (vit.optim.lr, vit.optim.weight_decay, vit.optim.grad_clip) == (
        pytest.approx(3e-3 * 256 / 4096),
        0.3,
        1.0,
    )
    assert (vit.optim.schedule.warmup_epochs, vit.optim.schedule.warmup_start_factor) == (30.0, 0.033)
    assert (vit.data.augment.policy, vit.distill.label_smoothing) == ("randaugment", 0.11)
    swin = recipe_spec("torchvision_swin")
    assert (swin.data.augment.mixup_alpha, swin.data.augment.random_erasing, swin.optim.grad_clip) == (
        0.8,
        0.25,
        5.0,
    )
    assert swin.optim.schedule.min_lr == 1e-5 and swin.optim.schedule.warmup_epochs == 20.0
    regnet = recipe_spec("torchvision_regnet")
    assert (regnet.optim.name, regnet.optim.lr, regnet.optim.weight_decay) == (
        "sgd",
        pytest.approx(0.2),
        5e-5,
    )
    assert regnet.train.ema is None and regnet.data.augment.policy == "none"


def test_a_spec_value_wins_over_its_recipe_and_the_saved_spec_reads_back_the_same(tmp_path):
    from cmtkd_graph.spec.io import dump_spec

    spec = recipe_spec(
        "torchvision_convnext", optim={"weight_decay": 0.01, "schedule": {"warmup_epochs": 1.0}}
    )
    assert spec.optim.weight_decay == 0.01 and spec.optim.name == "adamw"
    assert spec.optim.schedule.warmup_epochs == 1.0 and spec.optim.schedule.name == "cosine"
    (tmp_path / "saved.yaml").write_text(dump_spec(spec))
    assert cg.load_spec(tmp_path / "saved.yaml") == spec
    with pytest.raises(Exception, match="torchvision_convnext"):
        recipe_spec("convnext")


def test_norm_weight_decay_gives_the_normalisation_layers_their_own_adamw_group():
    from cmtkd_graph.optim import build_optimizer

    spec = recipe_spec("torchvision_convnext")
    system = cg.build_system(spec, device="meta")
    optimizer = build_optimizer(system, spec)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    groups = {g["name"]: g for g in optimizer.param_groups}
    norms = {
        id(p) for m in system.student.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()
    }
    assert {id(p) for p in groups["student/norm"]["params"]} == norms and groups["student/norm"][
        "weight_decay"
    ] == 0
    assert (
        not norms & {id(p) for p in groups["student"]["params"]}
        and groups["student"]["weight_decay"] == 2.5e-5
    )
