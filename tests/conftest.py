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


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST from the Debian package (installed by .ci/run)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"{FASHION_MNIST} is missing: run `apt-get install -y dataset-fashion-mnist` (see .ci/run)"
        )
    return FASHION_MNIST


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
