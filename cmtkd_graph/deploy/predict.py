"""``cmtkd-graph predict DIR IMAGE...``: class and probability per image, from an exported student.

Images are prepared as the run's evaluation prepared its data (resize/centre-crop to the input size,
the dataset's mean/std; grey where the dataset's record says so), then run by the PyTorch student, the integer
reference or onnxruntime (``--backend``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from cmtkd_graph.deploy.student import MANIFEST_FILE, find_student, load_student
from cmtkd_graph.errors import UserError
from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import Spec

BACKENDS = ("torch", "integer", "onnx")


def read_images(paths: list[str | Path], spec: Spec) -> Tensor:
    """A batch of images prepared like the run's evaluation data."""
    from PIL import Image, UnidentifiedImageError

    from cmtkd_graph.data.transforms import build_transforms

    data = spec.data
    grey = DATASETS.get(data.dataset).grey  # read as grey, repeated to the model's channels
    _, prepare = build_transforms(
        data, size=data.input_size, native_size=None, in_channels=data.in_channels, grey_source=grey
    )
    batch = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as image:
                batch.append(prepare(image.convert("L" if grey else "RGB")))
        except FileNotFoundError:
            raise UserError(f"{path}: no such image file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path}: not a readable image ({err})") from None
    return torch.stack(batch)


def predict(
    directory: str | Path, images: list[str | Path], *, top: int = 1, backend: str = "torch"
) -> list[dict]:
    """Per image: its path and the ``top`` classes with their probabilities."""
    if backend not in BACKENDS:
        raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not images:
        raise UserError("give at least one image file")
    directory = Path(directory).expanduser()
    spec = find_student(directory).spec
    batch = read_images(images, spec)
    logits = _logits(directory, batch, backend)
    probabilities = torch.softmax(logits.float(), dim=1)
    classes = _classes(directory)
    values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    results = []
    for path, p, i in zip(images, values.tolist(), indices.tolist(), strict=True):
        results.append(
            {
                "image": str(path),
                "predictions": [
                    {"class": classes[c] if classes else str(c), "index": c, "probability": q}
                    for c, q in zip(i, p, strict=True)
                ],
            }
        )
    return results


def _logits(directory: Path, batch: Tensor, backend: str) -> Tensor:
    if backend == "onnx":
        onnx_file = directory / "student.onnx"
        if not onnx_file.is_file():
            raise UserError(f"{directory}: no student.onnx; export with --format onnx first")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--backend onnx needs onnxruntime: pip install 'cmtkd-graph[export]'") from None
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    if backend == "integer":
        from cmtkd_graph.deploy.integer import integer_student

        model = integer_student(directory)
    else:
        model = load_student(directory)
    with torch.no_grad():
        return model(batch)


def _classes(directory: Path) -> list[str] | None:
    for name in (MANIFEST_FILE, "final.json"):
        file = directory / name
        if file.is_file():
            data = json.loads(file.read_text())
            classes = data.get("model", {}).get("classes") if name == MANIFEST_FILE else data.get("classes")
            if classes:
                return classes
    return None


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        best = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in r["predictions"])
        lines.append(f"{r['image']}: {best}")
    return "\n".join(lines)
