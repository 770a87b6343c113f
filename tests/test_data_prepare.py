"""`cmtkd-graph data prepare`: the data the repository's specs read, made by one command and verified
(offline here: from the files a user already has; the downloads use the same checks)."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

import cmtkd_graph as cg
from cmtkd_graph.data.fashion_mnist import read_fashion_mnist
from cmtkd_graph.data.prepare import CIFAR10_JPEG_DIGEST, RECIPES, download, prepare, prepare_image_folders
from cmtkd_graph.errors import UserError
from cmtkd_graph.study.plan import plan
from cmtkd_graph.study.spec import load_study

from .conftest import _cifar10_archive, run_module

REPO = Path(__file__).resolve().parents[1]


def test_fashion_mnist_from_debians_files_is_verified_and_readable(tmp_path, fashion_mnist):
    result = run_module(
        ["data", "prepare", "fashion_mnist", "--from", str(fashion_mnist), "--root", "fm"],
        cwd=tmp_path,
        module="cmtkd_graph",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Fashion-MNIST: 4 files verified") and "fm is ready" in result.stdout
    splits = read_fashion_mnist(str(tmp_path / "fm"))
    assert len(splits.train[1]) == 60_000 and len(splits.eval[1]) == 10_000

    # a file that is not the published one (one changed pixel) is refused, and nothing is made
    damaged = tmp_path / "damaged"
    shutil.copytree(fashion_mnist, damaged)
    raw = bytearray(gzip.decompress((damaged / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[1000] ^= 1
    (damaged / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    result = run_module(
        ["data", "prepare", "fashion_mnist", "--from", str(damaged), "--root", "fm2"],
        cwd=tmp_path,
        module="cmtkd_graph",
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "not Fashion-MNIST's t10k-images-idx3-ubyte.gz" in result.stderr
    assert (
        not (tmp_path / "fm2").exists()
        and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    )
    with pytest.raises(UserError, match="is not empty"):
        prepare("fashion_mnist", tmp_path / "fm", fashion_mnist)


def test_a_cifar_archive_that_is_not_the_published_one_is_refused(tmp_path):
    fake = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(fake, "w:gz") as t:
        t.addfile(tarfile.TarInfo("cifar-100-python/meta"), io.BytesIO(b""))
    with pytest.raises(
        UserError, match=r"not CIFAR-100's cifar-100-python.tar.gz \(MD5 [0-9a-f]{32}, expected eb9058c"
    ):
        prepare("cifar100", tmp_path / "c100", fake)
    assert not (tmp_path / "c100").exists()


def test_a_download_the_machine_cannot_make_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:9/x .*pass it with --from"):
        download("http://127.0.0.1:9/x", tmp_path / "x")


def jpeg_tree_archive(path: Path, files: dict[str, bytes], top: str = "CIFAR-10-images-615b199") -> Path:
    """A .tar.gz as GitHub packs a repository: one top folder, a README beside the split folders."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in {"README.md": b"# images\n", **files}.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_image_folders_are_kept_only_with_the_recorded_content(tmp_path):
    files = {
        f"{split}/{c}/{i:04d}.jpg": f"{split}{c}{i}".encode()
        for split in ("train", "test")
        for c in "ab"
        for i in range(3)
    }
    lines = sorted(f"{name}\t{hashlib.sha256(data).hexdigest()}\n" for name, data in files.items())
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()  # the recorded form, written out here
    archive = jpeg_tree_archive(tmp_path / "images.tar.gz", files)

    staging = tmp_path / "staging"
    staging.mkdir()
    line = prepare_image_folders(staging, archive, url="unused", digest=digest, title="toy")
    assert line == "toy: 12 images, content verified"
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()) == sorted(
        files
    )

    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(
        UserError, match=r"are not CIFAR-10 \(JPEG folders\) \(content digest [0-9a-f]{16}\.\.\., "
    ):
        prepare_image_folders(
            other, archive, url="unused", digest=CIFAR10_JPEG_DIGEST, title="CIFAR-10 (JPEG folders)"
        )

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as t:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UserError, match=r"member '\.\./outside\.txt' is a link or points outside; refused"):
        prepare("cifar10_jpeg", tmp_path / "c10", evil)
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as z:
        z.writestr("../outside.txt", b"x")
    with pytest.raises(UserError, match=r"member '\.\./outside\.txt' points outside the archive; refused"):
        prepare("cifar10_jpeg", tmp_path / "c10", evil_zip)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "c10").exists()

    # from a folder the user has: copied (the folder stays as it was), nothing else in the result
    folder = tmp_path / "unpacked"
    with tarfile.open(archive) as t:
        t.extractall(folder, filter="data")
    staging = tmp_path / "from-folder"
    staging.mkdir()
    prepare_image_folders(staging, folder, url="unused", digest=digest, title="toy")
    assert sorted(p.name for p in staging.iterdir()) == ["test", "train"]
    assert (folder / "CIFAR-10-images-615b199" / "train").is_dir()
    with pytest.raises(UserError, match="a file, not a folder"):
        prepare("cifar10_jpeg", archive, archive)


def test_the_cifar10_jpeg_archive_prepares_the_folders_the_published_tables_read(tmp_path):
    archive = _cifar10_archive()
    if archive is None or not archive.is_file():
        pytest.skip("the CIFAR-10 JPEG archive is not on this machine ($CMTKD_CIFAR10_TAR)")
    line = prepare("cifar10_jpeg", tmp_path / "cifar10", archive)
    assert "CIFAR-10 (JPEG folders): 60000 images, content verified" in line
    assert len(list((tmp_path / "cifar10" / "test" / "cat").iterdir())) == 1000


def repository_data() -> list[tuple[str, str, str | None]]:
    """(where, data.dataset, data.root) of every example spec and every study row of the repository."""
    found = []
    for file in sorted((REPO / "specs").glob("*.yaml")):
        spec = cg.load_spec(file)
        found.append((file.name, spec.data.dataset, spec.data.root))
    for file in sorted((REPO / "studies").glob("*.yaml")):
        for run in plan(load_study(file)):
            spec = run.unresolved_spec()
            found.append((f"{file.name} {run.row.name}", spec.data.dataset, spec.data.root))
    return found


def test_every_spec_and_study_reads_data_that_one_command_makes():
    makers = {(r.dataset, r.default_root) for r in RECIPES.values()}
    debian = {("fashion_mnist", None)}  # data.root unset: Debian's package
    imagenet = (
        "resnet18_imagenet.yaml",
        "imagefolder",
        "data/imagenet",
    )  # its licence: from image-net.org only
    unmade = [
        found
        for found in repository_data()
        if found[1:] not in makers and found[1:] not in debian and found != imagenet
    ]
    assert unmade == []
    for file in [*(REPO / "specs").glob("*.yaml"), *(REPO / "studies").glob("*.yaml")]:
        text = file.read_text()
        assert "shared/" not in text, f"{file.name} names a file users do not have"
        roots = {r.default_root for r in RECIPES.values() if re.search(rf"root: {r.default_root}\b", text)}
        for root in roots:
            names = [r.name for r in RECIPES.values() if r.default_root == root]
            assert f"cmtkd-graph data prepare {names[0]}" in text, (
                f"{file.name} reads {root}: say how to make it"
            )
