"""The spec: YAML + pydantic validation, overrides, error messages, the validate/schema commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import cmtkd_graph as cg
from cmtkd_graph.cli import main
from cmtkd_graph.spec.io import apply_override, parse_key_path

SPECS = sorted(Path(__file__).resolve().parents[1].joinpath("specs").glob("*.yaml"))

GOOD = {
    "name": "t",
    "student": {"arch": "resnet18", "kwargs": {"num_classes": 10}, "weight_bits": 2, "act_bits": 2},
    "teachers": [{"weight_bits": 4, "act_bits": 4}, {"weight_bits": 8, "act_bits": 8}],
    "data": {"dataset": "cifar10", "root": "/nonexistent"},
}


def write(tmp_path: Path, data, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def validate(tmp_path, data, *overrides, capsys):
    args = ["validate", str(write(tmp_path, data)), "--no-build"]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_good_spec_validates_with_a_summary(tmp_path, capsys):
    code, out, err = validate(tmp_path, GOOD, capsys=capsys)
    assert code == 0 and err == ""
    assert "valid" in out.splitlines()[0]
    assert "resnet18 W2A2" in out and "2: resnet18 W4A4, resnet18 W8A8" in out
    assert "1 (CE_T + CE_S) + 0.5 (KL_T + KL_S)" in out and "100 attention loss" in out


def test_validate_builds_the_graphs_and_reports_taps(tmp_path, capsys):
    code = main(["validate", str(write(tmp_path, GOOD)), "--set", "data.image_size=32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "layer1 [64, 8, 8], layer2 [128, 4, 4], layer3 [256, 2, 2], layer4 [512, 1, 1]" in out
    assert "parameters" in out and "student 11.18M" in out


# (what the user set, the line they get, the other half that fixes it)
GREY_MISMATCH = [
    (
        "data.grey_to_rgb=none",
        "node conv1 expects 3 input channels but gets 1 (input shape [2, 1, 28, 28])",
        "surgery=[grey_input]",
    ),
    (
        "surgery=[grey_input]",
        "node conv1 expects 1 input channels but gets 3 (input shape [2, 3, 28, 28])",
        "data.grey_to_rgb=none",
    ),
]


@pytest.mark.parametrize("override, problem, fix", GREY_MISMATCH)
def test_grey_images_and_the_stem_must_agree(tmp_path, capsys, override, problem, fix):
    data = json.loads(json.dumps(GOOD)) | {"data": {"dataset": "fashion_mnist", "root": "/nonexistent"}}
    args = ["validate", str(write(tmp_path, data)), "--set", override]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {problem}; for grey images either repeat them to RGB (data.grey_to_rgb: repeat) or give "
        "the model a 1-channel stem (data.grey_to_rgb: none together with surgery: [grey_input])"
    ]
    assert main([*args, "--set", fix]) == 0


MALFORMED = [
    # (modification, override, expected exact error line)
    (
        lambda d: d["teachers"][1].update(weight_bits=0),
        None,
        "teachers[1].weight_bits: must be 1..8 or 32, got 0",
    ),
    (lambda d: d["student"].update(act_bits=9), None, "student.act_bits: must be 1..8 or 32, got 9"),
    (lambda d: d["student"].update(act_bits=16), None, "student.act_bits: must be 1..8 or 32, got 16"),
    (
        lambda d: d["teachers"][0].update(wieght_bits=4),
        None,
        "teachers[0].wieght_bits: unknown key; did you mean 'weight_bits'?",
    ),
    (lambda d: d.update(epochs=3), None, "epochs: unknown key; did you mean 'train.epochs'?"),
    (
        lambda d: d.update(optim={"learning_rate": 0.1}),
        None,
        "optim.learning_rate: unknown key; valid keys: name, lr, momentum, nesterov, weight_decay_low_bits, "
        "weight_decay, low_bits, norm_weight_decay, importance_lr, quantizer_lr, adapter_lr, grad_clip, "
        "schedule",
    ),
    (
        lambda d: d.update(optim={"importance_learning_rate": 0.1}),
        None,
        "optim.importance_learning_rate: unknown key; did you mean 'importance_lr'?",
    ),
    (lambda d: d.update(teachers=[]), None, "teachers: cmtkd needs at least one teacher (got an empty list)"),
    (
        lambda d: d["student"].update(arch="resnet81"),
        None,
        "student.arch: unknown torchvision model 'resnet81'; did you mean resnet18, resnet152, "
        "resnet101, resnet50, resnet34? (the builders of the tasks: classification (torchvision.models), "
        "detection (torchvision.models.detection), flow (torchvision.models.optical_flow), segmentation "
        "(torchvision.models.segmentation), video (torchvision.models.video))",
    ),
    (
        lambda d: d["teachers"][0].update(arch="vit_b_61"),
        None,
        "teachers[0].arch: unknown torchvision model 'vit_b_61'; did you mean vit_b_16, vit_l_16, "
        "vit_h_14, vit_b_32, vit_l_32? (the builders of the tasks: classification (torchvision.models), "
        "detection (torchvision.models.detection), flow (torchvision.models.optical_flow), segmentation "
        "(torchvision.models.segmentation), video (torchvision.models.video))",
    ),
    (
        lambda d: d["student"].update(arch="fcos_resnet50_fpn"),
        None,
        "data.dataset: cifar10 holds classification data; the spec's task is detection",
    ),
    (
        lambda d: d["student"].update(arch="quantized_mobilenet_v3_large"),
        None,
        "student.arch: 'quantized_mobilenet_v3_large' is torch.ao's 8-bit eager-mode version of "
        "'mobilenet_v3_large' (quantization stubs and fused modules for post-training quantization); "
        "cmtkd-graph quantizes the float network itself at any bits: use arch: mobilenet_v3_large (and "
        "`cmtkd-graph export` for its int8 forms)",
    ),
    (
        lambda d: d.update(quantizer={"name": "hwgqq"}),
        None,
        "quantizer.name: unknown quantizer 'hwgqq' (did you mean hwgq?); known: dorefa, hwgq, lsq, pact "
        "(one of your own: name its module under the spec's plugins:)",
    ),
    (
        lambda d: d.update(surgery=["cifar_stm"]),
        None,
        "surgery[0].name: unknown surgery pass 'cifar_stm' (did you mean cifar_stem?); "
        "known: bn_after_every_layer, cifar_stem, grey_input "
        "(one of your own: name its module under the spec's plugins:)",
    ),
    (
        lambda d: d.update(train={"epochs": "ten"}),
        None,
        "train.epochs: Input should be a valid integer, unable to parse string as an integer, got 'ten'",
    ),
    (
        lambda d: d.update(train={"epochs": 0}),
        None,
        "train.epochs: Input should be greater than or equal to 1, got 0",
    ),
    (
        lambda d: d.update(distill={"feature_loss": "att"}),
        None,
        "distill.feature_loss: Input should be 'attention', 'fitnet' or 'none', got 'att'",
    ),
    (lambda d: d.update(distill={"tau": 0}), None, "distill.tau: Input should be greater than 0, got 0"),
    (
        lambda d: d.update(taps={"teachers": 5}),
        None,
        "taps.teachers: must be 'auto' or a non-empty list of node names / module prefixes, got 5",
    ),
    (
        lambda d: d.update(method="cmtdk"),
        None,
        "method: unknown method 'cmtdk' (did you mean cmtkd, ctkd?); "
        "known: amtml_kd, average_teacher, cmtkd, ctkd, kd, single "
        "(one of your own: name its module under the spec's plugins:)",
    ),
    (lambda d: d.pop("data"), None, "data: required"),
    (lambda d: d.pop("student"), None, "student: required"),
    (lambda d: d["student"].pop("weight_bits"), None, "student.weight_bits: required"),
    (lambda d: d.update(teachers="resnet18"), None, "teachers: Input should be a valid list, got 'resnet18'"),
    (
        lambda d: d.update(method="single"),
        None,
        "teachers: method single trains the student alone; remove the 2 teacher(s)",
    ),
    (lambda d: d.update(method="kd"), None, "teachers: method kd distils from exactly one teacher, got 2"),
    (
        lambda d: d.update(method="average_teacher"),
        None,
        "teachers[0]: average_teacher distils from separately trained teachers; "
        "give `weights:` (a checkpoint) "
        "and `trainable: false`",
    ),
    (
        lambda d: d.update(
            method="kd", teachers=[{"weight_bits": 32, "act_bits": 32}], distill={"mutual_learning": True}
        ),
        None,
        "distill.mutual_learning: KDCL mutual learning is part of cmtkd, not of kd",
    ),
    (
        lambda d: d["data"].update(dataset="imagenet"),
        None,
        "data.dataset: unknown dataset 'imagenet' (did you mean imagefolder?); "
        "known: cifar10, cifar100, clip_folders, coco_folder, fashion_flow, fashion_mnist, fashion_objects, "
        "fashion_scenes, flow_pairs, frame_folders, imagefolder, mask_folders, moving_fashion, voc, "
        "voc_boxes "
        "(one of your own: name its module under the spec's plugins:)",
    ),
    (
        lambda d: d["data"].update(batch_size=0),
        None,
        "data.batch_size: Input should be greater than or equal to 1, got 0",
    ),
    (
        lambda d: (
            d["train"].update(mixed_precision="fp8")
            if "train" in d
            else d.update(train={"mixed_precision": "fp8"})
        ),
        None,
        "train.mixed_precision: Input should be 'auto', 'no', 'fp16' or 'bf16', got 'fp8'",
    ),
    # overrides
    (None, "teachers[1].weight_bits=0", "teachers[1].weight_bits: must be 1..8 or 32, got 0"),
    (None, "train.epoch=3", "train.epoch: unknown key; did you mean 'epochs'?"),
    (None, "train.epochs", "override 'train.epochs': expected key.path=value, e.g. train.epochs=1"),
    (None, "=3", "override '=3': expected key.path=value, e.g. train.epochs=1"),
    (
        None,
        "teachers[5].weight_bits=2",
        "override 'teachers[5].weight_bits=2': teachers has 2 entries, no [5]",
    ),
    (None, "student.arch.name=x", "override 'student.arch.name=x': student.arch is a value, not a mapping"),
    (None, "teachers[x]=1", "override 'teachers[x]=1': bad key segment 'teachers[x]'"),
]


@pytest.mark.parametrize("modify, override, expected", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_specs_exit_2_with_one_line_per_problem(tmp_path, capsys, modify, override, expected):
    data = json.loads(json.dumps(GOOD))
    if modify is not None:
        modify(data)
    code, out, err = validate(tmp_path, data, *([override] if override else []), capsys=capsys)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [f"error: {expected}"]
    assert "Traceback" not in err


def test_several_problems_give_several_lines(tmp_path, capsys):
    data = json.loads(json.dumps(GOOD))
    data["student"]["weight_bits"] = 0
    data["teachers"][0]["act_bits"] = 12
    data["trian"] = {}
    code, _, err = validate(tmp_path, data, capsys=capsys)
    assert code == 2
    assert err.splitlines() == [
        "error: student.weight_bits: must be 1..8 or 32, got 0",
        "error: teachers[0].act_bits: must be 1..8 or 32, got 12",
        "error: trian: unknown key; did you mean 'train'?",
    ]


def test_yaml_syntax_errors_and_missing_files(tmp_path, capsys):
    code, _, err = validate(tmp_path, "name: [unclosed\nstudent: {", capsys=capsys)
    assert (
        code == 2
        and err.startswith("error: ")
        and "invalid YAML at line" in err
        and len(err.splitlines()) == 1
    )
    code, _, err = validate(tmp_path, "- just\n- a list\n", capsys=capsys)
    assert err == f"error: {tmp_path / 'spec.yaml'}: a spec must be a YAML mapping (key: value), got list\n"
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found (packaged examples:" in capsys.readouterr().err


def test_every_command_reports_a_bad_spec_the_same_way(tmp_path, capsys):
    bad = json.loads(json.dumps(GOOD))
    bad["teachers"][1]["weight_bits"] = 0
    path = str(write(tmp_path, bad))
    for command in (["train", path], ["inspect", path]):
        assert main(command) == 2
        assert capsys.readouterr().err == "error: teachers[1].weight_bits: must be 1..8 or 32, got 0\n"


def test_overrides_parse_yaml_values_and_index_syntax():
    assert parse_key_path("teachers[1].weight_bits") == ["teachers", 1, "weight_bits"]
    assert parse_key_path("teachers.1.weight_bits") == ["teachers", 1, "weight_bits"]
    data = json.loads(json.dumps(GOOD))
    for item in [
        "train.epochs=3",
        "optim.lr=1e-2",
        "distill.mutual_learning=false",
        "taps.teachers=[layer1, layer2]",
        "teachers[0].weight_bits=6",
        "train.mixed_precision=no",
        "optim.schedule.milestones=[50, 100]",
    ]:
        apply_override(data, item)
    spec = cg.spec.io.validate_spec(data)
    assert spec.train.epochs == 3 and spec.optim.lr == 0.01 and spec.distill.mutual_learning is False
    assert spec.taps.teachers == ["layer1", "layer2"] and spec.teachers[0].weight_bits == 6
    assert spec.train.mixed_precision == "no" and spec.optim.schedule.milestones == [50, 100]


def test_load_spec_applies_overrides_and_the_resolved_spec_round_trips(tmp_path):
    spec = cg.load_spec(write(tmp_path, GOOD), overrides=["train.epochs=1"])
    assert spec.train.epochs == 1
    assert (
        spec.distill.feature_loss == "attention" and spec.distill.mutual_learning is True
    )  # resolved defaults
    again = cg.load_spec(write(tmp_path, cg.dump_spec(spec), "resolved.yaml"))
    assert again == spec


def test_packaged_examples_load_by_name():
    assert cg.load_spec("quickstart").name == "quickstart"


def test_schema_is_json_schema_with_descriptions(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Spec" and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "student", "data"}
    bits = schema["$defs"]["ModelSpec"]["properties"]["weight_bits"]
    assert "1..8, or 32" in bits["description"]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_example_spec_validates(path):
    spec = cg.load_spec(path)
    assert spec.name


def test_the_task_is_the_students_unless_written_and_every_network_and_the_data_must_fit_it():
    """Tasks are registered like methods (cmtkd_graph.tasks): the spec's task is inferred from the
    student's builder and left unwritten, so that runs trained before tasks were named keep their
    identity; a network or a dataset of another task is one line."""
    from cmtkd_graph.data.fashion_mnist import FashionMNIST
    from cmtkd_graph.registry import TASKS
    from cmtkd_graph.tasks import Task, register_task

    spec = cg.load_spec("quickstart")
    assert spec.task is None and spec.resolved_task == "classification"
    assert cg.load_spec("quickstart", ["task=classification"]).resolved_task == "classification"

    @register_task("toy_task")
    class Toy(Task):  # the one module of torchvision's builders no built-in task covers
        builder_modules = ("torchvision.models.quantization",)

    try:
        assert "quantized_resnet18" in Toy.model_names()
        with pytest.raises(cg.SpecError) as err:
            cg.load_spec("quickstart", ["task=toy_task"])
        assert err.value.problems == [
            "student.arch: resnet18 is a classification model; the spec's task is toy_task",
            "data.dataset: fashion_mnist holds classification data; the spec's task is toy_task",
        ]
        assert FashionMNIST.task == "classification"
        with pytest.raises(
            cg.SpecError, match=r"teachers\[0\]\.arch: quantized_resnet18 is a toy_task model"
        ):
            cg.load_spec("quickstart", ["teachers[0].arch=quantized_resnet18"])
    finally:
        TASKS.unregister("toy_task")


def test_a_model_that_runs_on_one_input_size_says_so_in_one_line():
    """ViT's position embeddings and MaxViT's partitions fix the input size (unless the builder is given
    another): validate says so with the settings to change, not an assertion from inside the graph."""
    base = ["taps={teachers: auto}", "surgery=[]", "data={dataset: cifar10, image_size: 32}"]
    with pytest.raises(cg.SpecError) as err:
        cg.load_spec("quickstart", ["student.arch=vit_b_16", *base])
    assert str(err.value) == (
        "student.arch: vit_b_16 runs on images of 224x224 only (its position embeddings are sized for them), "
        "not 32x32: set data.image_size: 224, or build it for your size with student.kwargs.image_size (a "
        "multiple of its patch size)"
    )
    with pytest.raises(cg.SpecError, match=r"^teachers\[1\].arch: maxvit_t runs on images of 224x224 only"):
        cg.load_spec("quickstart", [*base, "teachers[1].arch=maxvit_t"])
    # built for the data's size: valid, and it builds
    spec = cg.load_spec(
        "quickstart", ["student.arch=vit_b_32", "student.kwargs={num_classes: 10, image_size: 32}", *base]
    )
    assert cg.build_system(spec, device="meta", load=False).num_classes() == 10
    # the builder's own refusal is one line naming the builder and its kwargs
    at_40 = ["student.arch=vit_b_16", "student.kwargs={num_classes: 10, image_size: 40}", *base]
    spec = cg.load_spec("quickstart", [*at_40, "data.image_size=40"])
    with pytest.raises(
        cg.UserError, match=r"^vit_b_16: the builder refuses kwargs .*: Input shape indivisible"
    ):
        cg.build_system(spec, device="meta", load=False)
