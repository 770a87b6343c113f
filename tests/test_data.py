"""Datasets, transforms and loaders, on small files that each test writes in the real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmtkd_graph.data import (
    CorruptImageError,
    CorruptImageWarning,
    DropSkipped,
    build_datasets,
    build_loaders,
)
from cmtkd_graph.data.cifar import CIFAR10
from cmtkd_graph.data.fashion_mnist import FASHION_MNIST_ROOT
from cmtkd_graph.errors import UserError
from cmtkd_graph.spec import DataSpec

RAW = {"normalize": False, "augment": {"crop": "none", "hflip": False}}
"""Spec fields under which a sample is just its pixels / 255, for round-trip checks."""


def spec(dataset: str, root: Path | str | None, **fields) -> DataSpec:
    return DataSpec(dataset=dataset, root=None if root is None else str(root), num_workers=0, **fields)


def pixels(image: torch.Tensor) -> torch.Tensor:
    """Back from a [0, 1] float image to uint8."""
    return (image * 255).round().to(torch.uint8)


# --- writers of the real formats ------------------------------------------------------------------


def random_images(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 2, test: int = 3) -> dict:
    """torchvision's cifar-10-batches-py: five training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for i, name in enumerate(files):
        n = test if name == "test_batch" else per_batch
        images = random_images(n, 3, 32, seed=i)
        labels = [(i + j) % 10 for j in range(n)]
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": images.reshape(n, -1),
            "filenames": [f"{name}_{j}.png" for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images, labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_cifar100(root: Path, train: int = 7, test: int = 4) -> dict:
    """torchvision's cifar-100-python: train, test and meta (fine and coarse labels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for seed, (name, n) in enumerate([("train", train), ("test", test)]):
        images = random_images(n, 3, 32, seed=10 + seed)
        fine = [(7 * j + seed) % 100 for j in range(n)]
        entry = {
            "filenames": [f"{name}_{j}.png" for j in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": images.reshape(n, -1),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (images, fine)
    meta = {
        "fine_label_names": [f"fine{i:02d}" for i in range(100)],
        "coarse_label_names": [f"coarse{i:02d}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + array.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(root: Path, train: int = 5, test: int = 3, size: int = 28) -> dict:
    """The four gzipped idx files of Fashion-MNIST."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, n, seed in [("train", train, 0), ("t10k", test, 1)]:
        images = random_images(n, 1, size, seed)[:, 0]
        labels = np.arange(seed, seed + n, dtype=np.uint8) % 10
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        written[prefix] = (images, labels)
    return written


def write_image(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_folder(root: Path, layout: dict[str, dict[str, list[str]]], size=(16, 16)) -> dict[str, np.ndarray]:
    """``layout[split][class]`` = file names; returns the pixels written per path."""
    written = {}
    for split, classes in layout.items():
        for cls, files in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for name in files:
                path = root / split / cls / name
                written[str(path)] = write_image(path, size, seed=len(written))
    return written


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])


# --- CIFAR ----------------------------------------------------------------------------------------


def test_cifar100_round_trips_and_matches_torchvision(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path)
    bundle = build_datasets(spec("cifar100", tmp_path, **RAW))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (100, 3, 32)
    assert bundle.classes[:2] == ["fine00", "fine01"] and len(bundle.classes) == 100
    for split, dataset in [("train", bundle.train), ("test", bundle.eval)]:
        images, labels = written[split]
        assert len(dataset) == len(labels)
        for i in range(len(labels)):
            image, label = dataset[i]
            assert label == labels[i]
            assert torch.equal(pixels(image), torch.from_numpy(images[i]))

    # The files are what torchvision itself reads (its md5 check only knows the official archive).
    from torchvision.datasets import CIFAR100, cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    reference = CIFAR100(str(tmp_path), train=True)
    assert reference.classes == bundle.classes
    assert reference.targets == written["train"][1]
    assert torch.equal(bundle.train.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))


def test_cifar10_reads_all_batches_in_order_also_from_the_batches_folder(tmp_path):
    written = write_cifar10(tmp_path)
    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        bundle = build_datasets(spec("cifar10", root, **RAW))
        assert bundle.classes[0] == "airplane" and bundle.num_classes == 10
        assert torch.equal(bundle.train.images, torch.from_numpy(train_images))
        assert bundle.train.labels.tolist() == train_labels
        image, label = bundle.eval[2]
        assert label == written["test_batch"][1][2]
        assert torch.equal(pixels(image), torch.from_numpy(written["test_batch"][0][2]))


def test_cifar_present_with_download_true_does_not_download(tmp_path):
    write_cifar10(tmp_path)
    assert len(build_datasets(spec("cifar10", tmp_path, download=True)).train) == 10


def test_cifar_missing_says_where_and_how(tmp_path):
    with pytest.raises(UserError) as error:
        build_datasets(spec("cifar100", tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "download: true" in message and "cifar-100-python.tar.gz" in message
    with pytest.raises(UserError, match=r"data\.root: required"):
        build_datasets(spec("cifar10", None))


def test_cifar_damaged_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        build_datasets(spec("cifar10", tmp_path))


# --- image folders --------------------------------------------------------------------------------


def test_image_folder_classes_pixels_and_eval_split(tmp_path):
    written = write_folder(
        tmp_path,
        {
            "train": {"cat": ["b.png", "a.png"], "dog": ["x.jpg", "y.JPEG"], ".cache": ["z.png"]},
            "val": {"cat": ["v.png"], "dog": ["w.png"]},
            "test": {"cat": ["t.png"], "dog": []},
        },
    )
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "train" / "stray.png").write_bytes(b"outside any class folder: ignored")
    bundle = build_datasets(spec("imagefolder", tmp_path, image_size=16, **RAW))
    assert (bundle.classes, bundle.num_classes) == (["cat", "dog"], 2)
    assert (bundle.in_channels, bundle.image_size) == (3, 16)
    names = [(Path(p).name, label) for p, label in bundle.train.samples]
    assert names == [("a.png", 0), ("b.png", 0), ("x.jpg", 1), ("y.JPEG", 1)]
    assert [Path(p).parent.parent.name for p, _ in bundle.eval.samples] == ["val", "val"]
    for dataset in (bundle.train, bundle.eval):
        for i, (path, label) in enumerate(dataset.samples):
            image, got = dataset[i]
            assert got == label and image.shape == (3, 16, 16)
            if path.endswith(".png"):  # lossless: exact round trip
                assert torch.equal(pixels(image), torch.from_numpy(written[path]).permute(2, 0, 1))

    shutil.rmtree(tmp_path / "val")
    assert [Path(p).name for p, _ in build_datasets(spec("imagefolder", tmp_path)).eval.samples] == ["t.png"]
    (tmp_path / "test").rename(tmp_path / "holdout")
    with pytest.raises(UserError, match="val/ or test/"):
        build_datasets(spec("imagefolder", tmp_path))
    assert len(build_datasets(spec("imagefolder", tmp_path, eval_split="holdout")).eval) == 1
    with pytest.raises(UserError, match="eval_split"):
        build_datasets(spec("imagefolder", tmp_path, eval_split="nope"))


def test_image_folder_class_mismatch_is_explained(tmp_path):
    write_folder(
        tmp_path, {"train": {"cat": ["a.png"], "dog": ["b.png"]}, "val": {"cat": ["c.png"], "cow": ["d.png"]}}
    )
    with pytest.raises(UserError) as error:
        build_datasets(spec("imagefolder", tmp_path))
    assert "only in train: dog" in str(error.value) and "only in val: cow" in str(error.value)


def test_image_folder_subset_takes_classes_in_turn(tmp_path):
    write_folder(
        tmp_path,
        {
            "train": {"a": ["0.png", "1.png", "2.png", "3.png"], "b": ["0.png", "1.png"]},
            "test": {"a": ["0.png"], "b": ["0.png"]},
        },
    )
    bundle = build_datasets(spec("imagefolder", tmp_path, train_subset=3, eval_subset=1))
    chosen = [(Path(p).name, label) for p, label in bundle.train.samples]
    assert chosen == [("0.png", 0), ("1.png", 0), ("0.png", 1)]
    assert len(bundle.eval) == 1


@pytest.mark.timeout(60)
def test_corrupt_image_error_reaches_the_main_process_naming_the_file(tmp_path):
    write_folder(
        tmp_path,
        {
            "train": {"a": ["0.jpg", "1.jpg"], "b": ["2.jpg", "3.jpg"]},
            "val": {"a": ["4.jpg"], "b": ["5.jpg", "6.jpg", "7.jpg"]},
        },
    )
    broken = tmp_path / "val" / "b" / "6.jpg"
    truncate(broken)
    data = spec("imagefolder", tmp_path, image_size=16).model_copy(update={"num_workers": 2})
    bundle = build_datasets(data)
    _, evaluation = build_loaders(bundle, data, train_batch_size=2, eval_batch_size=1, seed=0)
    assert evaluation.num_workers == 2
    error = first_error(evaluation)
    assert isinstance(error, CorruptImageError)
    assert str(error).startswith(f"unreadable image {broken} (")
    assert "Traceback" not in str(error) and "corrupt_images: skip" in str(error)


def first_error(loader) -> Exception:
    """The exception a loader raises, without its traceback: the traceback's reference cycle would leave
    the loader's iterator to the cyclic garbage collector, whose torch shutdown waits 5 s per worker."""
    try:
        list(loader)
    except Exception as e:
        e.__traceback__ = None
        return e
    raise AssertionError("the loader raised nothing")


@pytest.mark.timeout(60)
def test_corrupt_image_skipped_warned_and_counted(tmp_path):
    write_folder(
        tmp_path,
        {
            "train": {"a": ["0.jpg", "1.jpg"], "b": ["2.jpg", "3.jpg"]},
            "val": {"a": ["4.jpg", "5.jpg"], "b": ["6.jpg", "7.jpg"]},
        },
    )
    broken = tmp_path / "val" / "b" / "6.jpg"
    truncate(broken)
    data = spec("imagefolder", tmp_path, image_size=16, corrupt_images="skip")
    data = data.model_copy(update={"num_workers": 2})
    bundle = build_datasets(data)
    _, evaluation = build_loaders(bundle, data, train_batch_size=2, eval_batch_size=3, seed=0)
    for _ in range(2):  # a file is counted once, however often it is read
        batches = list(evaluation)
        assert [len(labels) for _, labels in batches] == [2, 1]
        assert [label for _, labels in batches for label in labels.tolist()] == [0, 0, 1]
    assert bundle.skipped_images() == 1 and bundle.eval.skipped_files == [str(broken)]

    with pytest.warns(CorruptImageWarning, match=str(broken)):
        assert bundle.eval[2] is None


def test_drop_skipped_keeps_an_all_skipped_batch_well_formed():
    images, labels = DropSkipped((3, 8, 8))([None, None])
    assert images.shape == (0, 3, 8, 8) and labels.shape == (0,) and labels.dtype == torch.long
    images, labels = DropSkipped((3, 8, 8))([None, (torch.ones(3, 8, 8), 4)])
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [4]


# --- Fashion-MNIST --------------------------------------------------------------------------------


def test_fashion_mnist_idx_round_trip_grey_and_repeated(tmp_path):
    written = write_fashion(tmp_path)
    grey = build_datasets(spec("fashion_mnist", tmp_path, grey_to_rgb="none", **RAW))
    assert (grey.in_channels, grey.image_size, grey.num_classes) == (1, 28, 10)
    assert grey.classes[0] == "T-shirt/top" and grey.classes[9] == "Ankle boot"
    for dataset, (images, labels) in [(grey.train, written["train"]), (grey.eval, written["t10k"])]:
        assert len(dataset) == len(labels)
        for i in range(len(labels)):
            image, label = dataset[i]
            assert label == labels[i] and image.shape == (1, 28, 28)
            assert torch.equal(pixels(image)[0], torch.from_numpy(images[i]))
    rgb = build_datasets(spec("fashion_mnist", tmp_path, **RAW))
    image, _ = rgb.train[1]
    assert rgb.in_channels == 3 and image.shape == (3, 28, 28)
    assert torch.equal(image, grey.train[1][0].expand(3, -1, -1))


@pytest.mark.parametrize(
    "content, complaint",
    [
        (lambda a: gzip.compress(idx_bytes(a, magic=0x0804)), "magic number 0x00000804, expected 0x00000803"),
        (lambda a: gzip.compress(idx_bytes(a)[:-10]), "truncated"),
        (lambda a: idx_bytes(a), "not a readable gzip file"),
    ],
    ids=["bad magic", "truncated", "not gzip"],
)
def test_fashion_mnist_malformed_file_is_named(tmp_path, content, complaint):
    write_fashion(tmp_path)
    damaged = tmp_path / "t10k-images-idx3-ubyte.gz"
    damaged.write_bytes(content(random_images(3, 1, 28, seed=0)[:, 0]))
    with pytest.raises(UserError, match=complaint) as error:
        build_datasets(spec("fashion_mnist", tmp_path))
    assert str(error.value).startswith(str(damaged))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as error:
        build_datasets(spec("fashion_mnist", tmp_path / "nowhere"))
    assert "train-images-idx3-ubyte.gz" in str(error.value)


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason=f"{FASHION_MNIST_ROOT} absent")
def test_real_fashion_mnist_loads_fast_and_normalises():
    start = time.perf_counter()
    bundle = build_datasets(spec("fashion_mnist", None))
    elapsed = time.perf_counter() - start
    assert (len(bundle.train), len(bundle.eval), bundle.num_classes) == (60000, 10000, 10)
    assert bundle.train.labels.bincount().tolist() == [6000] * 10
    assert elapsed < 3.0, f"loading Fashion-MNIST took {elapsed:.2f} s"
    evaluation = torch.stack([bundle.eval[i][0] for i in range(0, 10000, 4)])
    assert evaluation.shape == (2500, 3, 28, 28)
    assert abs(float(evaluation.mean())) < 0.02 and abs(float(evaluation.std()) - 1) < 0.02


# --- transforms -----------------------------------------------------------------------------------


def transform_names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


@pytest.mark.parametrize(
    "dataset, fields, channels, size",
    [
        ("cifar10", {}, 3, 32),
        ("cifar10", {"image_size": 40}, 3, 40),
        ("cifar10", {"augment": {"crop": "random_resized_crop"}}, 3, 32),
        ("fashion_mnist", {"grey_to_rgb": "none"}, 1, 28),
        ("fashion_mnist", {"image_size": 32}, 3, 32),
        ("imagefolder", {}, 3, 224),
        ("imagefolder", {"image_size": 24}, 3, 24),
        ("imagefolder", {"augment": {"crop": "none"}, "image_size": 64}, 3, 64),
    ],
)
def test_transforms_give_the_declared_size_and_channels(tmp_path, dataset, fields, channels, size):
    if dataset == "cifar10":
        write_cifar10(tmp_path)
    elif dataset == "fashion_mnist":
        write_fashion(tmp_path)
    else:  # not square, so that the resize and crop matter
        write_folder(
            tmp_path,
            {"train": {"a": ["0.png"], "b": ["1.jpg"]}, "val": {"a": ["2.png"], "b": []}},
            size=(50, 30),
        )
    bundle = build_datasets(spec(dataset, tmp_path, **fields))
    assert (bundle.in_channels, bundle.image_size) == (channels, size)
    for dataset_ in (bundle.train, bundle.eval):
        image, _ = dataset_[0]
        assert image.shape == (channels, size, size) and image.dtype == torch.float32
        assert type(image) is torch.Tensor


def test_default_augmentations_follow_the_paper(tmp_path):
    write_cifar10(tmp_path / "cifar")
    write_fashion(tmp_path / "fashion")
    write_folder(tmp_path / "folder", {"train": {"a": ["0.png"]}, "val": {"a": ["1.png"]}})
    cifar = build_datasets(spec("cifar10", tmp_path / "cifar"))
    assert transform_names(cifar.train.transform) == ["RandomCrop", "RandomHorizontalFlip", "ScaleNormalize"]
    assert transform_names(cifar.eval.transform) == ["ScaleNormalize"]
    assert cifar.train.transform.transforms[0].padding == [4, 4, 4, 4]
    fashion = build_datasets(spec("fashion_mnist", tmp_path / "fashion", augment={"padding": 2}))
    assert transform_names(fashion.train.transform) == ["RandomCrop", "RepeatChannels", "ScaleNormalize"]
    assert fashion.train.transform.transforms[0].padding == [2, 2, 2, 2]
    folder = build_datasets(spec("imagefolder", tmp_path / "folder"))
    assert transform_names(folder.train.transform)[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert transform_names(folder.eval.transform)[:2] == ["Resize", "CenterCrop"]
    assert folder.eval.transform.transforms[0].size == [256]
    small = build_datasets(spec("imagefolder", tmp_path / "folder", image_size=32))
    assert "RandomCrop" in transform_names(small.train.transform)


def test_normalisation_uses_the_given_or_default_statistics(tmp_path):
    write_cifar10(tmp_path, per_batch=20)
    unnormalised = build_datasets(spec("cifar10", tmp_path, normalize=False))
    raw = torch.stack([unnormalised.eval[i][0] for i in range(3)])
    images = unnormalised.train.images.float() / 255
    mean, std = images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).tolist()
    own = build_datasets(spec("cifar10", tmp_path, mean=mean, std=std, augment=RAW["augment"]))
    normalised = torch.stack([own.train[i][0] for i in range(len(own.train))])
    assert torch.allclose(normalised.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(normalised.std((0, 2, 3)), torch.ones(3), atol=1e-4)

    default = build_datasets(spec("cifar10", tmp_path))
    default_mean, default_std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR10.mean, CIFAR10.std))
    restored = torch.stack([default.eval[i][0] for i in range(3)]) * default_std + default_mean
    assert torch.allclose(restored, raw, atol=1e-5)


@pytest.mark.parametrize(
    "dataset, fields, complaint",
    [
        ("cifar10", {"grey_to_rgb": "none"}, "grey_to_rgb"),
        ("fashion_mnist", {"download": True}, "apt-get install dataset-fashion-mnist"),
        ("cifar10", {"eval_split": "val"}, "eval_split"),
        ("cifar10", {"mean": [0.5, 0.5]}, "expected 1 or 3 values"),
        ("cifar10", {"mean": [125.3, 123.0, 113.9]}, r"\[0, 1\] units"),
        ("cifar10", {"normalize": False, "std": [0.2]}, "normalize is false"),
        ("cifar10", {"std": [0, 0, 0]}, "every value must be > 0"),
        ("fashion_mnist", {"corrupt_images": "skip"}, "corrupt_images"),
    ],
)
def test_inconsistent_options_are_user_errors(tmp_path, dataset, fields, complaint):
    """Each is refused when the spec is read, so `validate` reports it too (not only `train`)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=complaint):
        spec(dataset, tmp_path, **fields)


# --- loaders --------------------------------------------------------------------------------------


def label_order(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def test_loaders_shuffle_by_seed_drop_last_and_keep_eval_order(tmp_path):
    write_cifar10(tmp_path, per_batch=4, test=10)
    data = spec("cifar10", tmp_path)
    bundle = build_datasets(data)
    train, evaluation = build_loaders(bundle, data, train_batch_size=6, eval_batch_size=4, seed=1)
    assert [len(images) for images, _ in train] == [6, 6, 6]  # 20 samples: the last 2 are dropped
    assert [tuple(images.shape) for images, _ in evaluation] == [(4, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
    assert label_order(evaluation) == bundle.eval.labels.tolist()
    assert (train.pin_memory, train.persistent_workers) == (torch.cuda.is_available(), False)

    def order(seed: int) -> list[int]:
        return label_order(build_loaders(bundle, data, train_batch_size=6, eval_batch_size=4, seed=seed)[0])

    assert order(1) == order(1) and order(1) != order(2)

    # In worker processes the seed also fixes the augmentation (the main process's is the caller's).
    workers = data.model_copy(update={"num_workers": 1})

    def epoch(seed: int) -> torch.Tensor:
        loader, _ = build_loaders(bundle, workers, train_batch_size=6, eval_batch_size=4, seed=seed)
        assert loader.persistent_workers and loader.num_workers == 1
        return torch.cat([images for images, _ in loader])

    assert torch.equal(epoch(1), epoch(1))
    assert not torch.equal(epoch(1), epoch(2))
    with pytest.raises(UserError, match="fewer than one batch"):
        build_loaders(bundle, data, train_batch_size=21, eval_batch_size=4, seed=1)


def test_subsets_take_the_first_samples(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    full = build_datasets(spec("cifar10", tmp_path))
    part = build_datasets(spec("cifar10", tmp_path, train_subset=3, eval_subset=2))
    assert (len(part.train), len(part.eval)) == (3, 2)
    assert torch.equal(part.train.images, full.train.images[:3])
    assert part.eval.labels.tolist() == full.eval.labels[:2].tolist()


def test_bundle_sizes_are_the_specs_and_other_native_sizes_are_explained(tmp_path):
    """The graphs are built for `DataSpec.input_shape()` before any data is read: the data must agree."""
    write_fashion(tmp_path / "f")
    for fields in ({}, {"image_size": 32}, {"grey_to_rgb": "none"}):
        data = spec("fashion_mnist", tmp_path / "f", **fields)
        bundle = build_datasets(data)
        assert (bundle.in_channels, bundle.image_size, bundle.image_size) == data.input_shape()
        assert tuple(bundle.train[0][0].shape) == data.input_shape()
    write_fashion(tmp_path / "small", size=20)
    with pytest.raises(UserError, match=r"are 20x20, not 28x28; set data.image_size: 20"):
        build_datasets(spec("fashion_mnist", tmp_path / "small"))
    assert build_datasets(spec("fashion_mnist", tmp_path / "small", image_size=20)).image_size == 20


# --- the device pipeline --------------------------------------------------------------------------


def _uint8(batch: torch.Tensor, data: DataSpec) -> torch.Tensor:
    """A normalised batch back to its uint8 pixels, with the spec's (CIFAR-10 default) statistics."""
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10.std).view(1, 3, 1, 1)
    return ((batch * std + mean) * 255).round().to(torch.uint8)


def test_the_device_pipeline_gives_the_worker_pipelines_images_batched(tmp_path):
    """Without augmentation a device batch is exactly the worker pipeline's samples at the epoch's
    indices; an image folder decodes to the pixels its evaluation transform gives, with or without
    decoding processes."""
    from cmtkd_graph.data.device import DeviceBatches, decoded

    write_cifar10(tmp_path, per_batch=4, test=3)
    data = spec("cifar10", tmp_path, augment={"crop": "none", "hflip": False})
    bundle = build_datasets(data)
    loader = DeviceBatches(bundle.train.images, bundle.train.labels, data, batch_size=6, seed=3)
    seen = []
    for images, labels in loader:
        expected = torch.stack([bundle.train_eval[int(i)][0] for i in _indices(bundle, images)])
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
        seen += labels.tolist()
    assert len(seen) == 18 and len(loader) == 3  # 20 images: the incomplete last batch is dropped

    write_folder(
        tmp_path / "folder",
        {"train": {"a": ["x.png", "y.png"], "b": ["z.png"]}, "val": {"a": ["v.png"], "b": []}},
        size=(20, 14),
    )
    folder = spec("imagefolder", tmp_path / "folder", image_size=12)
    files = build_datasets(folder)
    images, labels = decoded(files.train, 12)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 12, 12) and labels.tolist() == [0, 0, 1]
    for k in range(3):
        assert torch.equal(_uint8_plain(files.train_eval[k][0], folder), images[k])
    assert torch.equal(decoded(files.train, 12, workers=2)[0], images)


def _uint8_plain(image: torch.Tensor, data: DataSpec) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # image folders: ImageNet's statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((image * std + mean) * 255).round().to(torch.uint8)


def _indices(bundle, batch: torch.Tensor) -> list[int]:
    """Which training images (by their evaluation form) a batch holds."""
    everything = torch.stack([bundle.train_eval[i][0] for i in range(len(bundle.train_eval))])
    return [int((everything - image).abs().flatten(1).amax(1).argmin()) for image in batch]


def test_device_crops_and_flips_are_torchvisions_and_a_function_of_seed_epoch_and_batch(tmp_path):
    """Every augmented image is a 32x32 window of the zero-padded original (offsets 0..8), possibly
    mirrored; batch b of epoch e is the same however the epoch is entered (a resumed run), another epoch
    or seed gives another one; two processes share each global batch between them."""
    from cmtkd_graph.data.device import DeviceBatches

    write_cifar10(tmp_path, per_batch=4, test=3)
    data = spec("cifar10", tmp_path)  # random_crop with padding 4 and hflip: CIFAR's defaults
    bundle = build_datasets(data)
    originals, labels = bundle.train.images, bundle.train.labels

    def loader(seed=0, **kw):
        return DeviceBatches(originals, labels, data, batch_size=4, seed=seed, **kw)

    full = list(loader())
    flips = 0
    for images, batch_labels in full:
        for image, label in zip(_uint8(images, data), batch_labels, strict=True):
            found = [
                (dy, dx, mirrored)
                for k in (labels == label).nonzero().flatten().tolist()
                for mirrored in (False, True)
                for dy in range(9)
                for dx in range(9)
                if torch.equal(_window(originals[k], dy, dx, mirrored), image)
            ]
            assert found, "not a padded crop of a training image"
            flips += found[0][2]
    assert 0 < flips < 20  # both directions occur

    resumed = loader()
    resumed.set_epoch(0)
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(full[2:], list(resumed.skip_first_batches(2)), strict=True)
    )
    again, other_seed = loader(), loader(seed=1)
    again.set_epoch(1)
    assert not torch.equal(torch.cat([b for b, _ in again]), torch.cat([b for b, _ in full]))
    assert not torch.equal(torch.cat([b for _, b in other_seed]), torch.cat([b for _, b in full]))

    ranks = [
        list(DeviceBatches(originals, labels, data, batch_size=2, seed=0, rank=r, processes=2))
        for r in range(2)
    ]
    for step, (x0, x1) in enumerate(zip(ranks[0], ranks[1], strict=True)):
        assert torch.equal(torch.cat([x0[1], x1[1]]), full[step][1])  # the global batch, shared


def _window(image: torch.Tensor, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
    return padded.flip(-1) if mirrored else padded


def test_the_device_pipeline_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="random_resized_crop needs per-image resizing"):
        spec("imagefolder", tmp_path, image_size=96, pipeline="device")
    with pytest.raises(ValueError, match="corrupt_images: skip needs pipeline: workers"):
        spec("imagefolder", tmp_path, image_size=32, pipeline="device", corrupt_images="skip")
    assert spec("imagefolder", tmp_path, image_size=96, pipeline="device", augment={"crop": "random_crop"})
