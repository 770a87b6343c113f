"""``cmtkd-graph predict RUN IMAGE...`` for detection: boxes, classes and scores (masks, keypoints) per image.

Each image is read whole and resized to the run's ``S x S`` input, as its training and evaluation data
were; the trained student (``student.safetensors`` of a run, checkpoint or export directory, as
trained: the ``torch`` backend, or the export's ``student.onnx`` in onnxruntime: ``onnx``) detects,
and its detections are scaled back to the image's own pixels (the same conversion ``eval`` scores,
``tasks.detection.detection_results``). With ``draw``, each image is written there as a PNG with its
detections drawn (boxes with class and score, masks, keypoints) by ``torchvision.utils``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.spec import Spec


def read_whole_images(paths: list[str | Path], size: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """A batch ``[B, 3, size, size]`` in [0, 1] of the images resized whole, and each one's own (height,
    width)."""
    from PIL import Image

    batch, sizes = [], []
    for path in map(Path, paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                width, height = rgb.size
                pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        except FileNotFoundError:
            raise UserError(f"{path}: no such image file") from None
        except Exception as err:  # PIL: damaged files, decompression bombs (not OSErrors), ...
            raise UserError(
                f"{path}: not a readable image ({type(err).__name__}: {first_line(err)})"
            ) from None
        image = pixels.view(height, width, 3).permute(2, 0, 1).float()[None] / 255
        batch.append(F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1))
        sizes.append((height, width))
    return torch.stack(batch), sizes


def predict_objects(
    student: torch.nn.Module,
    spec: Spec,
    images: list[str | Path],
    *,
    classes: list[str] | None = None,
    min_score: float = 0.5,
    draw: str | Path | None = None,
) -> list[dict]:
    """Per image: ``{"image", "detections": [{"class", "index", "score", "box" [x1, y1, x2, y2],
    ("mask": COCO RLE), ("keypoints": [[x, y, visibility], ...])}]}``, the detections scoring at least
    ``min_score``, in the image's own pixels; with ``draw``, ``"drawn"``: the PNG written there."""
    from cmtkd_graph.tasks.detection import detection_results

    size = spec.data.input_size
    batch, sizes = read_whole_images(images, size)
    with torch.no_grad():
        found = student(batch)[LOGITS]
    results = []
    for path, (height, width), detections in zip(images, sizes, found, strict=True):
        target = {"scale": torch.tensor([width / size, height / size]), "size": torch.tensor([height, width])}
        rows = [r for r in detection_results(detections, target) if r["score"] >= min_score]
        results.append({"image": str(path), "detections": [_answer(r, classes) for r in rows]})
    if draw is not None:
        folder = Path(draw).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        for result, name in zip(results, output_names([r["image"] for r in results]), strict=True):
            result["drawn"] = str(_draw(result, folder / f"{name}.png"))
    return results


def output_names(images: list[str]) -> list[str]:
    """The name of each image's output file: its stem, numbered ``NNNN-stem`` where two images share one."""
    stems = [Path(image).stem for image in images]
    return [stem if stems.count(stem) == 1 else f"{i:04d}-{stem}" for i, stem in enumerate(stems)]


def _answer(result: dict, classes: list[str] | None) -> dict:
    x, y, w, h = result["bbox"]
    index = result["label"]
    answer = {
        "class": classes[index] if classes and index < len(classes) else str(index),
        "index": index,
        "score": result["score"],
        "box": [x, y, x + w, y + h],
    }
    if "segmentation" in result:
        answer["mask"] = result["segmentation"]
    if "keypoints" in result:
        points = result["keypoints"]
        answer["keypoints"] = [points[i : i + 3] for i in range(0, len(points), 3)]
    return answer


def _draw(result: dict, path: Path) -> Path:
    """The image with its detections drawn, written as a PNG at ``path``."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

    from cmtkd_graph.coco import decode_mask

    with Image.open(result["image"]) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        picture = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)
    picture = picture.permute(2, 0, 1).contiguous()
    found = result["detections"]
    if found and "mask" in found[0]:
        masks = torch.stack([decode_mask(d["mask"], height, width).bool() for d in found])
        picture = draw_segmentation_masks(picture, masks, alpha=0.4)
    if found:
        boxes = torch.tensor([d["box"] for d in found])
        labels = [f"{d['class']} {d['score']:.2f}" for d in found]
        picture = draw_bounding_boxes(picture, boxes, labels=labels, colors="yellow", width=2)
    if found and "keypoints" in found[0]:
        points = torch.tensor([d["keypoints"] for d in found])
        picture = draw_keypoints(
            picture, points[..., :2], visibility=points[..., 2] > 0, colors="cyan", radius=3
        )
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
    return path


def format_objects(results: list[dict]) -> str:
    """One line per image: ``IMAGE: class score [x1, y1, x2, y2], ...`` (``-``: nothing found)."""
    lines = []
    for r in results:
        found = ", ".join(
            f"{d['class']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
            for d in r["detections"]
        )
        drawn = f" (drawn: {r['drawn']})" if "drawn" in r else ""
        lines.append(f"{r['image']}: {found or '-'}{drawn}")
    return "\n".join(lines)
