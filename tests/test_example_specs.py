"""Every spec in specs/ builds; the paper and ablation specs run a training step; the quickstart trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cmtkd_graph as cg
from cmtkd_graph.metrics import read_metrics
from cmtkd_graph.train import run

from .conftest import REPO

SPECS = sorted((REPO / "specs").glob("*.yaml"))
ONE_STEP = [  # tiny mode: one training step, no checkpoints, fp32 in NCHW, no progress bar
    "train.max_steps=1",
    "train.progress_bar=false",
    "train.mixed_precision=no",
    "train.channels_last=false",
    "train.checkpoints=false",
]
CIFAR100_SPECS = [p for p in SPECS if "cifar100" in p.read_text() and "dataset: cifar100" in p.read_text()]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_builds_its_system_and_counts_its_steps_flops_on_the_meta_device(path):
    """On the meta device, as a study's run summary counts a step's FLOPs: every method's objective must
    run there (no indexing by a data-dependent mask)."""
    from cmtkd_graph.runtime.throughput import train_flops_per_image

    spec = cg.load_spec(path)
    flops = train_flops_per_image(spec)
    system = cg.build_system(spec, device="meta", load=False)
    # a detector's step needs values (its box logic): not counted, and said so (None)
    assert flops > 0 if getattr(system, "runs_on_meta", True) else flops is None
    assert system.student is not None
    expected = {"single": 0}.get(spec.method, len(spec.teachers))
    assert system.num_teachers == expected
    if spec.method == "cmtkd":  # a fusion per tap, and per fused output (detection: objectness too)
        taps = {t.name for t in system.networks[1].taps}
        outputs = set(system.importance()) - taps
        assert taps <= set(system.importance()) and bool(outputs) == (spec.distill.combine == "importance")


def _teacher_checkpoints(spec: cg.Spec, tmp_path: Path) -> list[str]:
    """Real checkpoint files for the frozen teachers of average_teacher (what `single` runs would leave)."""
    overrides = []
    for k, teacher in enumerate(spec.resolved_teachers()):
        torch.manual_seed(k)
        state = cg.system.build_network(teacher, spec).state_dict()
        path = tmp_path / f"teacher{k}.safetensors"
        save_file({n: v.contiguous() for n, v in state.items()}, str(path))
        overrides.append(f"teachers[{k}].weights={path}")
    return overrides


@pytest.mark.parametrize("path", CIFAR100_SPECS, ids=[p.stem for p in CIFAR100_SPECS])
def test_paper_and_ablation_specs_run_one_training_step(path, tmp_path, tiny_cifar100, fresh_accelerate):
    overrides = [
        f"data.root={tiny_cifar100}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.eval_subset=16",
        f"train.output_dir={tmp_path / 'run'}",
        *ONE_STEP,
    ]
    spec = cg.load_spec(path, overrides)
    if spec.method == "average_teacher":
        overrides += _teacher_checkpoints(spec, tmp_path)
    if spec.student.arch == "alexnet":
        overrides += ["data.image_size=64"]
    run_dir = run(str(path), overrides)
    records = read_metrics(run_dir / "metrics.jsonl")
    train_line = next(r for r in records if r["kind"] == "train")
    assert train_line["step"] == 1 and torch.isfinite(torch.tensor(train_line["loss/total"]))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] == 1 and "acc1/student" in final["accuracy"]
    if spec.teachers:
        assert "acc1/combined" in final["accuracy"] and "acc1/teacher0" in final["accuracy"]


def test_the_quickstart_trains_a_handful_of_steps(tmp_path, fashion_mnist, fresh_accelerate):
    run_dir = run(
        "quickstart",
        [
            "train.max_steps=6",
            "train.log_every=3",
            "train.mixed_precision=no",  # auto is tested in test_precision.py and test_train.py
            "train.channels_last=false",
            "data.eval_subset=256",
            f"train.output_dir={tmp_path / 'qs'}",
            "train.progress_bar=false",
        ],
    )
    records = read_metrics(run_dir / "metrics.jsonl")
    lines = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in lines] == [3, 6]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in lines)
    assert {"loss/feature/layer1", "loss/feature/layer3", "loss/kl_student"} <= set(lines[0])
    final = json.loads((run_dir / "final.json").read_text())
    assert set(final["importance"]) == {"layer1", "layer2", "layer3", "output"}
    assert final["accuracy"].keys() >= {"acc1/student", "acc1/combined", "acc1/teacher0", "acc1/teacher1"}
    assert (run_dir / "importance.png").is_file() and (run_dir / "student.safetensors").is_file()


def test_the_quickstart_trains_on_one_channel_images_with_the_grey_input_stem(
    tmp_path, fashion_mnist, fresh_accelerate
):
    """Fashion-MNIST fed as 1-channel images: the grey_input surgery gives every network a 1-channel stem."""
    run_dir = run(
        "quickstart",
        [
            "data.grey_to_rgb=none",
            "surgery=[grey_input]",
            "train.max_steps=2",
            "train.mixed_precision=no",
            "train.channels_last=false",
            "data.eval_subset=64",
            "train.checkpoints=false",
            f"train.output_dir={tmp_path / 'grey'}",
            "train.progress_bar=false",
        ],
    )
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] == 2 and "acc1/student" in final["accuracy"]
    student = load_file(str(run_dir / "student.safetensors"))
    assert student["conv1.weight"].shape[1] == 1


FAMILY_SPECS = [
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
    "swin_t",
    "vit_b_16",
]


@pytest.mark.parametrize("name", FAMILY_SPECS)
def test_the_family_specs_train_a_step_on_real_images(name, cifar10_jpeg, tmp_path, fresh_accelerate):
    """Each family's example spec (a W2A2 student with 4- and 8-bit teachers on CIFAR-10 image folders)
    trains one step in tiny mode and is evaluated: student, each teacher and the combined teacher."""
    overrides = [
        f"data.root={cifar10_jpeg}",
        "data.batch_size=4",
        "data.eval_batch_size=10",
        "data.eval_subset=10",
        f"train.output_dir={tmp_path / 'run'}",
        *ONE_STEP,
    ]
    run_dir = run(str(REPO / "specs" / f"{name}.yaml"), overrides)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] == 1
    assert {"acc1/student", "acc1/combined", "acc1/teacher0", "acc1/teacher1"} <= set(final["accuracy"])
    train_line = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")
    assert torch.isfinite(torch.tensor(train_line["loss/total"]))


def test_the_families_study_has_each_family_alone_with_cmtkd_and_in_full_precision():
    """studies/cifar10_families.yaml: 5 rows per family spec (full precision, W2A2 and W4A4 alone and
    with CMT-KD), each run's spec valid, each CMT-KD row compared with its student alone."""
    from cmtkd_graph.study import load_study, plan

    study = load_study(REPO / "studies" / "cifar10_families.yaml")
    runs = plan(study)
    assert len(runs) == 5 * len(FAMILY_SPECS) == len(study.rows)
    bits = {}
    for planned in runs:
        spec = planned.unresolved_spec()
        bits[planned.row.name] = (spec.student.arch, spec.method, spec.student.weight_bits)
    assert {arch for arch, _, _ in bits.values()} == set(FAMILY_SPECS)
    assert sorted(b for b in bits.values() if b[0] == "swin_t") == [
        ("swin_t", "cmtkd", 2),
        ("swin_t", "cmtkd", 4),
        ("swin_t", "single", 2),
        ("swin_t", "single", 4),
        ("swin_t", "single", 32),
    ]
    compared = {(c.rows[0], c.against) for c in study.comparisons}
    assert ("vit_cmtkd_w2a2", "vit_w2a2") in compared and len(compared) == 2 * len(FAMILY_SPECS)
