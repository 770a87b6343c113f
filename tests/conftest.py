"""Shared fixtures: real data on disk (Debian's Fashion-MNIST, tiny CIFAR-100 written in its real format)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"


def pytest_configure(config) -> None:
    """Runs started by the tests keep their `mixed_precision: auto` choices in a cache of their own,
    never in the user's ~/.cache/cmtkd_graph. Under ``pytest -n N`` each worker gets its own share of
    the cores (see `_give_this_worker_its_cores`)."""
    import tempfile

    os.environ["CMTKD_GRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="cmtkd-graph-test-cache-")
    _give_this_worker_its_cores()


def _give_this_worker_its_cores() -> None:
    """Pin an xdist worker to its 1/N of the CPUs this process may use, before torch is imported.

    torch sizes its thread pool from the affinity mask, and the training processes the tests start
    inherit it (``cpu_threads: auto`` reads the mask too), so N workers share the machine instead of
    each running as many threads as there are cores: oversubscribed thread pools spin and run slower
    than one test at a time. Outside xdist nothing changes."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker[2:])
    share = cores[index::count] or [cores[index % len(cores)]]  # more workers than cores: one each
    os.sched_setaffinity(0, share)


def pytest_unconfigure(config) -> None:
    import shutil

    shutil.rmtree(os.environ.get("CMTKD_GRAPH_CACHE_DIR", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST from the Debian package (installed by .ci/run)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"{FASHION_MNIST} is missing: run `apt-get install -y dataset-fashion-mnist` (see .ci/run)"
        )
    return FASHION_MNIST


@pytest.fixture(scope="session")
def fashion_items(tmp_path_factory, fashion_mnist) -> Path:
    """The real Fashion-MNIST files cut to their first 300 training and 90 test items (what the data
    generators read)."""
    import gzip

    items = tmp_path_factory.mktemp("fashion-items")
    for prefix, count in (("train", 300), ("t10k", 90)):
        for kind, header in (("images", 16), ("labels", 8)):
            name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
            raw = bytearray(gzip.decompress((fashion_mnist / name).read_bytes()))
            raw[4:8] = count.to_bytes(4, "big")  # the first dimension: how many
            size = 28 * 28 if kind == "images" else 1
            (items / name).write_bytes(gzip.compress(bytes(raw[: header + count * size])))
    return items


def _generated(tmp_path_factory, name: str, fashion_items: Path) -> Path:
    """A root made by the real ``data prepare NAME`` from the cut Fashion-MNIST items."""
    from cmtkd_graph.data.prepare import prepare

    root = tmp_path_factory.mktemp(name) / name
    prepare(name, root, fashion_items)
    return root


@pytest.fixture(scope="session")
def fashion_scenes(tmp_path_factory, fashion_items) -> Path:
    """A VOC-layout root made by the real ``data prepare fashion_scenes`` from the first 300 training and
    90 test items of the real Fashion-MNIST: 100 training and 30 evaluation scenes."""
    return _generated(tmp_path_factory, "fashion_scenes", fashion_items)


@pytest.fixture(scope="session")
def moving_fashion(tmp_path_factory, fashion_items) -> Path:
    """Frame folders made by the real ``data prepare moving_fashion`` from the same items: 150 training
    and 45 evaluation clips of 12 frames."""
    return _generated(tmp_path_factory, "moving_fashion", fashion_items)


@pytest.fixture(scope="session")
def fashion_objects(tmp_path_factory, fashion_items) -> Path:
    """A COCO-layout root made by the real ``data prepare fashion_objects`` from the same items: 100
    training and 30 evaluation scenes."""
    return _generated(tmp_path_factory, "fashion_objects", fashion_items)


@pytest.fixture(scope="session")
def fashion_flow(tmp_path_factory, fashion_items) -> Path:
    """A FlyingChairs-layout root made by the real ``data prepare fashion_flow`` from the same items: 27
    training and 8 evaluation pairs."""
    return _generated(tmp_path_factory, "fashion_flow", fashion_items)


@pytest.fixture(scope="session")
def tiny_cifar100(tmp_path_factory) -> Path:
    """A CIFAR-100 root in torchvision's python-pickle format: 200 train / 100 test images."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = (np.arange(n) % 100).tolist()
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [0] * n}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def _cifar10_archive() -> Path | None:
    """The CIFAR-10 JPEG archive: $CMTKD_CIFAR10_TAR, or shared/data/ beside the checkout or above it."""
    if "CMTKD_CIFAR10_TAR" in os.environ:
        return Path(os.environ["CMTKD_CIFAR10_TAR"])
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / CIFAR10_ARCHIVE
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory) -> Path:
    """Real images in an image-folder root (train/<class>/, test/<class>/; 20 training and 10 test
    images per class, 10 classes): CIFAR-10 from the JPEG archive in shared/data. Where a checkout has
    no such archive, the same counts of real Fashion-MNIST images (Debian's package, which .ci/run
    installs), padded to 32x32 RGB JPEGs, stand in."""
    root = tmp_path_factory.mktemp("cifar10")
    wanted = {"train": 20, "test": 10}
    archive_path = _cifar10_archive()
    if archive_path is None or not archive_path.is_file():
        _fashion_mnist_as_jpeg_folders(root, wanted)
        return root
    import tarfile

    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in wanted:
                continue
            split, label = parts[-3], parts[-2]
            if taken.get((split, label), 0) >= wanted[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            target = root / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return root


def _fashion_mnist_as_jpeg_folders(root: Path, wanted: dict[str, int]) -> None:
    from PIL import Image

    from cmtkd_graph.data.fashion_mnist import read_fashion_mnist

    splits = read_fashion_mnist(None)
    for split, (images, labels) in (("train", splits.train), ("test", splits.eval)):
        for c in range(10):
            for i, index in enumerate((labels == c).nonzero().flatten()[: wanted[split]].tolist()):
                grey = np.pad(images[index, 0].numpy(), 2)  # 28x28 -> 32x32
                target = root / split / f"class{c}" / f"{i:04d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.stack([grey] * 3, axis=-1)).save(target, quality=90)


@pytest.fixture
def fresh_accelerate():
    """Each in-process training run starts with a fresh accelerate state (as a new process would)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_module(
    args: list[str],
    *,
    cwd: Path,
    timeout: float = 600,
    env: dict | None = None,
    module: str = "cmtkd_graph.train",
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` in a fresh process (as users do) and return the result."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_two_machines(
    module_args: list[str], *, cwd: Path, port: int, timeout: float = 900
) -> list[subprocess.CompletedProcess]:
    """Two ``accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`` commands,
    as a user starts one on each node of a cluster; here both nodes are this machine."""
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--num_processes",
            "2",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            *module_args,
        ]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


IN_PROCESS_VERBS = frozenset(
    {"validate", "schema", "taps", "models", "inspect", "eval", "export", "predict", "train", "study"}
)
"""The verbs :func:`run_cli` runs in the test's own process: a fresh interpreter would only add the ~6 s
of importing torch and torchvision (``train`` and a study's driver included: a study's runs are
processes of their own all the same). Tests that are about processes, signals, entry points or plugins
start their own (:func:`run_module`), and so does anything after ``--plugin`` or ``data``."""


def _runs_in_this_process(args: tuple[str, ...]) -> bool:
    return bool(args) and args[0] in IN_PROCESS_VERBS


def run_cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmtkd-graph ARGS`` run from ``cwd``: its exit status, stdout and stderr.

    The verbs of :data:`IN_PROCESS_VERBS` run through ``cmtkd_graph.cli.main`` here, with stdout and
    stderr captured and accelerate's state fresh before and after (as in a new process); ``data`` and
    anything after ``--plugin`` run in a fresh process (``timeout``)."""
    if not _runs_in_this_process(args):
        return run_module(list(args), cwd=cwd, module="cmtkd_graph", timeout=timeout)
    status, out, err = _cli_in_this_process(cwd, list(args))
    return subprocess.CompletedProcess(["cmtkd-graph", *args], status, out, err)


def cli(cwd: Path, *args: str) -> str:
    """:func:`run_cli`'s stdout; the test fails with its stderr where the command fails."""
    result = run_cli(cwd, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _cli_in_this_process(cwd: Path, argv: list[str]) -> tuple[int, str, str]:
    """``cmtkd_graph.cli.main(argv)`` as a fresh process would run it (see :func:`in_this_process`)."""
    from cmtkd_graph.cli import main

    return in_this_process(cwd, lambda: main(argv))


def in_this_process(cwd: Path, command) -> tuple[int, str, str]:
    """``command()`` (a command line's ``main``) as a fresh process would run it, from ``cwd``: its exit
    status, stdout and stderr. Accelerate's state, the tool's logger (no handler of an earlier in-process
    run; warnings to this run's stderr, as Python's last resort prints them) and torch's thread count are
    as they were before, afterwards; an exit (argparse, ``sys.exit``) is its status."""
    import contextlib
    import io
    import logging

    import torch
    from accelerate.state import AcceleratorState, GradientState

    out, err = io.StringIO(), io.StringIO()
    log = logging.getLogger("cmtkd_graph")
    saved = (log.level, log.propagate, list(log.handlers), torch.get_num_threads())
    for handler in saved[2]:
        log.removeHandler(handler)
    last_resort = logging.StreamHandler(err)
    last_resort.setLevel(logging.WARNING)
    log.addHandler(last_resort)
    log.setLevel(logging.NOTSET)
    log.propagate = False
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = command() or 0
            except SystemExit as exit_:
                if isinstance(exit_.code, str):  # sys.exit("error: ...") prints it
                    err.write(exit_.code + "\n")
                status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        for handler in list(log.handlers):  # this run's
            log.removeHandler(handler)
            handler.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]
        for handler in saved[2]:
            log.addHandler(handler)
        torch.set_num_threads(saved[3])
    return status, out.getvalue(), err.getvalue()


TINY_TRAINING = [
    "train.max_steps=2",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.mixed_precision=no",
    "train.channels_last=false",
]
"""The settings that make an example spec a test: two logged fp32 steps."""


def train_tiny_example(spec: str, sets: list[str], *, cwd: Path, port: int) -> tuple[Path, list[dict]]:
    """``specs/<spec>`` with ``sets`` and :data:`TINY_TRAINING` in two training processes, then resumed
    by one process for a third step; the run directory and its metrics.jsonl training lines."""
    import json

    run = cwd / "run"
    every = [*sets, *TINY_TRAINING, f"train.output_dir={run}"]
    overrides = [a for s in every for a in ("--set", s)]
    two = launch_two_processes(
        ["cmtkd_graph.train", str(REPO / "specs" / spec), *overrides], cwd=cwd, port=port
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout + two.stderr
    cli(cwd, "train", "--resume", str(run), "--set", "train.max_steps=3")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    return run, train


def launch_two_processes(
    module_args: list[str], *, cwd: Path, port: int, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m <module_args>`` on this CPU-only machine."""
    cmd = two_process_command(module_args, port=port)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def two_process_command(module_args: list[str], *, port: int) -> list[str]:
    """The command line of ``launch_two_processes`` (for tests that signal the running launch)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        *module_args,
    ]
