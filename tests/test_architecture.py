"""The house rules, checked: no module imports another in a circle (counting imports inside functions
and type-checking blocks), methods see a narrow context and never the system, model facts are a table,
and a dataset is one record in one file."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest
import torch
from cmtkd_graph.passes.shapes import propagate_shapes
from cmtkd_graph.passes.taps import auto_tap_names
from cmtkd_graph.passes.tracer import qualname

import cmtkd_graph as cg
from cmtkd_graph.data import DATASETS, DatasetRecord, build_datasets, build_loaders, register_dataset
from cmtkd_graph.data.in_memory import Splits, in_memory_bundle
from cmtkd_graph.methods import MethodContext
from cmtkd_graph.models import facts
from cmtkd_graph.spec.io import validate_spec
from cmtkd_graph.system import float_network

from .conftest import REPO


# ------------------------------------------------------------------------------------------ imports
def modules_of(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for packages given as {dotted name: directory}."""
    modules = {}
    for name, directory in package_dirs.items():
        for file in directory.rglob("*.py"):
            parts = [name, *file.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = file
    return modules


def import_graph(modules: dict[str, Path]) -> nx.DiGraph:
    """An edge for every import statement anywhere in a module: at the top, inside functions, under
    ``if TYPE_CHECKING``. Importing ``a.b.c`` also runs the ``__init__`` of package ``a.b`` (not of
    the root package, which every module would otherwise depend on, and not of the module's own
    packages, which are already being imported)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    for module, file in modules.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else known(base))
            for target in filter(None, targets):
                if target != module:
                    graph.add_edge(module, target)
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not module.startswith(parent + ".") and parent != module:
                        graph.add_edge(module, parent)
    return graph


def project_import_graph() -> nx.DiGraph:
    modules = modules_of({"cmtkd_graph": REPO / "cmtkd_graph"})
    modules.update(modules_of({"cmtkd_graph.passes": REPO / "passes"}))
    return import_graph(modules)


def test_no_module_imports_another_in_a_circle():
    graph = project_import_graph()
    assert graph.number_of_nodes() > 60 and graph.number_of_edges() > 200  # the whole package was read
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:10])


def test_the_circle_check_sees_imports_in_functions_type_checking_blocks_and_package_inits(tmp_path):
    """The check above can fail: it finds circles made by each kind of import it claims to count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import x\n")
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    (pkg / "d.py").write_text("from pkg.sub.c import x\n")
    (pkg / "sub" / "e.py").write_text("from pkg import d\n")
    modules = modules_of({"pkg": pkg})
    circles = {frozenset(c) for c in nx.simple_cycles(import_graph(modules))}
    assert frozenset({"pkg.a", "pkg.b"}) in circles
    assert not any("pkg.sub.e" in c for c in circles)  # sub/__init__ does not import e
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.e import *\n")
    circles = {frozenset(c) for c in nx.simple_cycles(import_graph(modules))}
    assert frozenset({"pkg.d", "pkg.sub", "pkg.sub.e"}) in circles  # d -> sub/__init__ -> e -> d


def test_methods_never_import_the_system():
    graph = project_import_graph()
    methods = [m for m in graph if m.startswith("cmtkd_graph.methods")]
    for method in methods:
        assert not nx.has_path(graph, method, "cmtkd_graph.system"), method


# ------------------------------------------------------------------------------------------ methods
def test_a_method_sees_the_method_context_not_the_system():
    spec = cg.load_spec("quickstart", ["taps={teachers: [layer1, layer2]}", "distill.feature_loss=fitnet"])
    system = cg.build_system(spec, load=False)
    seen = []
    original = system.method.losses

    def losses(ctx, out, labels):
        seen.append(ctx)
        return original(ctx, out, labels)

    system.method.losses = losses
    images, labels = torch.randn(2, 3, 28, 28), torch.tensor([0, 1])
    terms = system.losses(system(images), labels)
    (ctx,) = seen
    assert type(ctx) is MethodContext and not isinstance(ctx, torch.nn.Module)
    assert ctx.adapters is system.adapters and ctx.modules is system.method_modules
    assert ctx.teacher_trains is True and set(terms) >= {"total", "feature", "kl_student"}
    assert cg.CMTKDSystem is cg.DistillationSystem and isinstance(system, cg.CMTKDSystem)


# ------------------------------------------------------------------------------------------ model facts
def test_every_builder_belongs_to_one_family_or_the_generic_rule():
    assert facts.family_of("resnet50").name == "resnet"
    assert facts.family_of("wide_resnet50_2").name == "resnet"
    assert facts.family_of("resnext101_64x4d").name == "resnet"
    assert facts.family_of("vit_b_16").name == "vit" and facts.family_of("swin_v2_t").name == "swin"
    assert facts.family_of("mobilenet_v3_small") is facts.GENERIC
    prefixes = [p for f in facts.FAMILIES for p in f.prefixes]
    assert len(prefixes) == len(set(prefixes))


def test_auto_taps_come_from_the_family_table(monkeypatch):
    """A row added to the table changes what `taps: auto` means for its builders; nothing else does."""
    model = cg.spec.ModelSpec(arch="alexnet", weight_bits=32, act_bits=32)
    gm = float_network(model, [], device="meta")
    propagate_shapes(gm, (2, 3, 64, 64))
    generic = auto_tap_names(gm, "alexnet")
    assert generic == ["features.1", "features.4", "features.11"]  # the ends of the three conv blocks
    row = facts.Family("alexnet", ("alexnet",), facts.FixedTaps(("features.4", "features.7")))
    monkeypatch.setattr(facts, "FAMILIES", (*facts.FAMILIES, row))
    assert auto_tap_names(gm, "alexnet") == ["features.4", "features.7"]


@pytest.mark.parametrize("arch", ["efficientnet_b0", "convnext_tiny"])
def test_generic_auto_taps_follow_the_stages_not_the_input_size(arch):
    """At 32x32 an EfficientNet's last stage is a 1x1 map and ConvNeXt's too: read at the data's size,
    the resolution rule lost that stage (EfficientNet) or put a tap in the classifier (ConvNeXt). The
    stages are read at the builders' 224x224 instead: the same taps at any size, the maps the data gives."""
    model = cg.spec.ModelSpec(arch=arch, kwargs={"num_classes": 10}, weight_bits=32, act_bits=32)
    gm = float_network(model, [], device="meta")
    propagate_shapes(gm, (2, 3, 224, 224))
    at_224 = auto_tap_names(gm, arch)
    assert len(at_224) == {"efficientnet_b0": 5, "convnext_tiny": 4}[arch]
    propagate_shapes(gm, (2, 3, 32, 32))
    assert auto_tap_names(gm, arch) == at_224
    last = next(n for n in gm.graph.nodes if qualname(n) == at_224[-1])
    assert tuple(last.meta["val"].shape[2:]) == (1, 1)  # this graph keeps the data's shapes


# ------------------------------------------------------------------------------------------ datasets
class TinySquares(DatasetRecord):
    """A grey 12x12 dataset decoded in memory: what a contributor's new dataset file looks like."""

    summary = "random grey squares (a test's dataset)"
    native_size = 12
    grey = True
    mean = (0.5,)
    std = (0.25,)
    hflip = False

    @classmethod
    def read(cls, spec):
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g)
        labels = torch.arange(40) % 4
        return in_memory_bundle(spec, Splits((images, labels), (images[:8], labels[:8]), list("abcd")))


@pytest.fixture
def tiny_squares():
    register_dataset("tiny_squares")(TinySquares)
    yield "tiny_squares"
    DATASETS.unregister("tiny_squares")  # the spec reference lists the built-in datasets only


def _spec(**data):
    return validate_spec(
        {
            "name": "squares",
            "method": "single",
            "student": {"arch": "resnet18", "kwargs": {"num_classes": 4}, "weight_bits": 2, "act_bits": 2},
            "data": {"dataset": "tiny_squares", "batch_size": 8, "num_workers": 0, **data},
        }
    )


def test_a_dataset_registered_from_its_own_file_works_everywhere(tiny_squares):
    """The spec's checks, its input shape, the transforms' mean/std and flip default, the loaders: all
    ask the record, so a record and its registration are all a new dataset needs."""
    spec = _spec(augment={"crop": "none"})
    assert spec.data.input_shape() == (3, 12, 12)
    assert _spec(grey_to_rgb="none").data.input_shape() == (1, 12, 12)
    with pytest.raises(cg.SpecError) as err:
        _spec(download=True, eval_split="val", corrupt_images="skip")
    assert err.value.problems == [
        "data.download: only cifar10/cifar100 can be downloaded; tiny_squares: the images must already "
        "be in data.root",
        "data.eval_split: only for clip_folders/fashion_scenes/frame_folders/imagefolder/mask_folders/"
        "moving_fashion/voc; tiny_squares has a fixed test split",
        "data.corrupt_images: skip is for clip_folders/fashion_scenes/frame_folders/imagefolder/mask_folders/"
        "moving_fashion/voc only; tiny_squares is read up front",
    ]
    with pytest.raises(cg.SpecError, match="grey_to_rgb: none is for fashion_mnist/tiny_squares only"):
        validate_spec({**_spec().model_dump(), "data": {"dataset": "cifar10", "grey_to_rgb": "none"}})

    bundle = build_datasets(spec.data)
    image, label = bundle.train[3]
    assert label == 3
    raw = TinySquares.read(spec.data).train.images[3].float()
    expected = ((raw / 255 - 0.5) / 0.25).expand(3, -1, -1)  # the record's mean/std, grey repeated
    torch.testing.assert_close(image, expected)
    assert torch.equal(image, bundle.train_eval[3][0])  # hflip: False (the record's default), no crop
    train, evaluation = build_loaders(bundle, spec.data, train_batch_size=8, eval_batch_size=8, seed=0)
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 12, 12) and labels.max() < 4 and bundle.classes == list("abcd")
    assert sum(len(y) for _, y in evaluation) == 8  # the record's evaluation split


def test_the_built_in_datasets_keep_their_facts():
    shapes = {name: _native(name) for name in DATASETS}
    assert shapes == {
        "cifar10": (32, False, True, True),
        "cifar100": (32, False, True, True),
        "fashion_mnist": (28, True, False, False),
        "fashion_scenes": (64, False, True, False),
        "imagefolder": (224, False, True, False),
        "mask_folders": (224, False, True, False),
        "voc": (224, False, True, False),
        "clip_folders": (224, False, True, False),
        "frame_folders": (224, False, True, False),
        "moving_fashion": (32, False, False, False),  # a flip would change the direction, the label
        "flow_pairs": (224, False, True, False),  # flipped with the flow's horizontal component negated
        "fashion_flow": (128, False, True, False),
        "coco_folder": (320, False, True, False),  # flipped with boxes, masks and left/right keypoints
        "voc_boxes": (320, False, True, False),
        "fashion_objects": (128, False, True, False),
    }


def _native(name: str) -> tuple[int, bool, bool, bool]:
    record = DATASETS.get(name)
    return record.input_size(), record.grey, record.hflip, record.downloadable
