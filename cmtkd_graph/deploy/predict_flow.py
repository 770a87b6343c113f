"""``cmtkd-graph predict RUN FIRST SECOND [FIRST SECOND ...]`` for optical flow: the motion of every pixel.

The images are taken two by two, each pair one sample (the first image's pixels moving to the second's,
of one size); both are resized to the run's ``S x S`` input and scaled as its data was, the trained
student (a run's, checkpoint's or export's, as trained: the ``torch`` backend, or the export's
``student.onnx`` in onnxruntime: ``onnx``) estimates the flow, which is resized
back to the images' own size with its components scaled by the same factors (``u`` by width / S, ``v`` by
height / S). With ``draw``, each pair's flow is written there as a ``.flo`` file (Middlebury's format,
what FlyingChairs and Sintel hold) and as a colour PNG (``torchvision.utils.flow_to_image``: hue the
direction, saturation the length).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cmtkd_graph.data.flow_files import read_rgb, write_flo
from cmtkd_graph.errors import UserError
from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.spec import Spec


def read_pairs(paths: list[str | Path], spec: Spec) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pairs ``[B, 3, 2, S, S]`` prepared as the run's data (resized, its mean and std), and each pair's
    own (height, width)."""
    from cmtkd_graph.data.transforms import mean_std

    if len(paths) % 2:
        raise UserError(
            f"give the images of each pair, first then second: {len(paths)} image(s) is not a number of pairs"
        )
    size = spec.data.input_size
    mean, std = mean_std(spec.data, 3)
    batch, sizes = [], []
    for first, second in zip(paths[::2], paths[1::2], strict=True):
        images = [_read(Path(p)) for p in (first, second)]
        if images[0].shape != images[1].shape:
            raise UserError(
                f"{second}: {_side(images[1])} but {Path(first).name} is {_side(images[0])}; the two images "
                "of a pair have one size"
            )
        pair = torch.stack(images).float() / 255  # [2, 3, H, W]
        sizes.append(tuple(pair.shape[-2:]))
        pair = F.interpolate(pair, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        if mean is not None:
            pair = (pair - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        batch.append(pair.movedim(0, 1))  # [3, 2, S, S]
    return torch.stack(batch), sizes


def _read(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return read_rgb(path)


def _side(image: torch.Tensor) -> str:
    return f"{image.shape[-1]}x{image.shape[-2]}"


def predict_flow(
    student: torch.nn.Module,
    spec: Spec,
    images: list[str | Path],
    *,
    classes: list[str] | None = None,
    min_score: float = 0.0,
    draw: str | Path | None = None,
) -> list[dict]:
    """Per pair: ``{"pair": [first, second], "size": [height, width], "mean_motion_px",
    "max_motion_px"}`` and, with ``draw``, ``"flo"`` and ``"png"``: the files written there (``classes``
    and ``min_score``: not for flows, there for the predictors' common signature)."""
    from torchvision.utils import flow_to_image

    size = spec.data.input_size
    batch, sizes = read_pairs(images, spec)
    with torch.no_grad():
        flows = student(batch)[LOGITS].float()
    folder = None
    if draw is not None:
        folder = Path(draw).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (flow, (height, width)) in enumerate(zip(flows, sizes, strict=True)):
        flow = F.interpolate(flow[None], size=(height, width), mode="bilinear")[0]
        flow = flow * torch.tensor([width / size, height / size]).view(2, 1, 1)
        length = torch.linalg.vector_norm(flow, dim=0)
        first, second = str(images[2 * i]), str(images[2 * i + 1])
        result = {
            "pair": [first, second],
            "size": [height, width],
            "mean_motion_px": float(length.mean()),
            "max_motion_px": float(length.max()),
        }
        if folder is not None:
            name = f"{i:04d}-{Path(first).stem}"
            write_flo(folder / f"{name}.flo", flow)
            from PIL import Image

            Image.fromarray(flow_to_image(flow).permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
            result.update(flo=str(folder / f"{name}.flo"), png=str(folder / f"{name}.png"))
        results.append(result)
    return results


def format_flows(results: list[dict]) -> str:
    """One line per pair: ``FIRST -> SECOND: mean motion m px, max M px (FLO, PNG)``."""
    lines = []
    for r in results:
        files = f" ({r['flo']}, {r['png']})" if "flo" in r else ""
        first, second = r["pair"]
        lines.append(
            f"{first} -> {second}: mean motion {r['mean_motion_px']:.2f} px, max {r['max_motion_px']:.2f} px"
            + files
        )
    return "\n".join(lines)
