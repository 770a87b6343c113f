"""``cmtkd-graph predict DIR IMAGE...``: class and probability per image, from an exported student.

Images are prepared as the run's evaluation prepared its data (resize/centre-crop to the input size,
the dataset's mean/std; grey where the dataset's record says so), then run by one of ``BACKENDS``:
the PyTorch student as trained (``torch``), its inference form (``inference``; on oneDNN's int8 kernels
where this PyTorch has them), the integer reference
(``integer``), onnxruntime on ``student.onnx`` (``onnx``) or on ``student-int8.onnx`` (``onnx-int8``),
OpenVINO on ``student-openvino.xml`` (``openvino``). ``auto`` (the default) times the usable ones on
this machine and takes the fastest: the integer exports only where the export found them within the
agreement bound, a runtime only where it is installed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from cmtkd_graph.deploy.student import (
    MANIFEST_FILE,
    export_file,
    find_student,
    load_student,
    read_manifest,
)
from cmtkd_graph.errors import UserError, first_line
from cmtkd_graph.passes.common import LOGITS
from cmtkd_graph.registry import DATASETS
from cmtkd_graph.spec import Spec
from cmtkd_graph.tasks import task_record

BACKENDS = ("auto", "torch", "inference", "integer", "onnx", "onnx-int8", "openvino")
FILES = {"onnx": "student.onnx", "onnx-int8": "student-int8.onnx", "openvino": "student-openvino.xml"}
RUNTIMES = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "openvino": "openvino"}  # backend -> package
EXTRAS = {"onnxruntime": "export", "openvino": "openvino"}  # package -> the extra that installs it


def image_files(root: Path) -> list[Path]:
    """The JPEG and PNG files under ``root``, sorted (an image folder: by class, then name)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def read_images(paths: list[str | Path], spec: Spec, *, whole: bool = False) -> Tensor:
    """A batch of images prepared like the run's evaluation data; ``whole``: each image resized to the
    model's input as a whole, nothing cropped (a per-pixel answer is then mapped back onto it)."""
    from PIL import Image
    from torchvision.transforms import v2

    from cmtkd_graph.data.transforms import ScaleNormalize, build_transforms, mean_std

    data = spec.data
    grey = DATASETS.get(data.dataset).grey  # read as grey, repeated to the model's channels
    _, prepare = build_transforms(
        data, size=data.input_size, native_size=None, in_channels=data.in_channels, grey_source=grey
    )
    if whole:
        size = data.input_size
        prepare = v2.Compose(
            [v2.PILToTensor(), v2.Resize((size, size)), ScaleNormalize(*mean_std(data, data.in_channels))]
        )
    batch = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as image:
                batch.append(prepare(image.convert("L" if grey else "RGB")))
        except FileNotFoundError:
            raise UserError(f"{path}: no such image file") from None
        except Exception as err:  # PIL: damaged files, decompression bombs (not OSErrors), ...
            problem = f"{type(err).__name__}: {first_line(err)}"
            raise UserError(f"{path}: not a readable image ({problem})") from None
    return torch.stack(batch)


def read_clips(paths: list[str | Path], spec: Spec) -> Tensor:
    """A batch of clips (frame folders or video files) prepared like the run's evaluation clips: the
    middle T frames at the run's stride, resized and centre-cropped to the input size, normalised."""
    from cmtkd_graph.data.clips import read_clip, sample_window
    from cmtkd_graph.data.transforms import build_clip_transforms

    data = spec.data
    _, prepare = build_clip_transforms(data, size=data.input_size, native_size=None)

    def window(available: int, path: str) -> range:
        return sample_window(available, path, frames=data.clip_frames, stride=data.frame_stride, jitter=False)

    batch = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such clip (a video file or a folder of frame images)")
        try:
            batch.append(prepare(read_clip(str(path), window)))
        except UserError:  # a clip too short for the run's frames, PyAV missing: their own line
            raise
        except Exception as err:  # FFmpeg and PIL report damaged files with many exception types
            problem = f"{type(err).__name__}: {first_line(err)}"
            raise UserError(f"{path}: not a readable clip ({problem})") from None
    return torch.stack(batch)


def predict(
    directory: str | Path,
    images: list[str | Path],
    *,
    top: int = 1,
    backend: str = "auto",
    report: Callable[[str], None] | None = None,
    masks: str | Path | None = None,
    draw: str | Path | None = None,
    min_score: float = 0.5,
) -> list[dict]:
    """Per image: its path and the ``top`` classes with their probabilities (video: per clip, a frame
    folder or a video file, under the key ``clip``; segmentation: the classes covering most pixels, and
    with ``masks`` a palette PNG of each pixel's class index written there, in the colours of the
    dataset's labelmap.txt, else VOC's; detection: the objects scoring at least ``min_score``, drawn on
    the images in ``draw``, ``deploy.predict_objects``).
    ``report`` receives one line naming the backend ``auto`` chose and why."""
    if backend not in BACKENDS:
        raise UserError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not images:
        raise UserError("give at least one image file")
    directory = Path(directory).expanduser()
    spec = find_student(directory).spec
    task = task_record(spec.student.arch)
    task.require("predict")
    if task.predictor is not None:
        return _task_predict(task, directory, spec, images, backend, masks, draw, min_score)
    if draw is not None:
        raise UserError(f"--draw: for detection and flow models; {spec.resolved_task} answers classes")
    per_pixel = task.label_shape(spec.data.input_shape()) != ()
    batch = read_clips(images, spec) if task.clips else read_images(images, spec, whole=per_pixel)
    if backend == "auto":
        backend, why = fastest_backend(directory, tuple(batch.shape[1:]), noun=task.sample_noun)
        if report is not None:
            report(f"backend: {backend} ({why})")
    logits = runner(directory, backend)(batch)
    results = [
        {task.sample_noun: str(path), "predictions": answers}
        for path, answers in zip(images, task.predictions(logits, _classes(directory), top), strict=True)
    ]
    maps = task.masks(logits)
    if masks is not None and maps is None:
        raise UserError(f"--masks: a {spec.resolved_task} model predicts no per-pixel classes")
    if masks is not None and logits.shape[1] > 255:  # 255 reads back as "not labelled"
        raise UserError(f"--masks: {logits.shape[1]} classes do not fit a palette PNG (at most 255)")
    if masks is not None:
        from PIL import Image

        from cmtkd_graph.data.segmentation_files import voc_palette
        from cmtkd_graph.deploy.predict_objects import output_names

        folder = Path(masks).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        declared = _recorded(directory, "colours") or []  # the dataset's labelmap.txt, if it had one
        palette = [tuple(c) for c in declared] + voc_palette()[len(declared) :]
        names = output_names([r["image"] for r in results])
        for i, (result, mask) in enumerate(zip(results, maps.cpu(), strict=True)):
            with Image.open(result["image"]) as original:
                width, height = original.size
            # back onto the image as given: each pixel takes the class of the nearest input pixel
            mask = torch.nn.functional.interpolate(
                mask[None, None].float(), size=(height, width), mode="nearest"
            )
            path = folder / f"{names[i]}.png"
            # a class index per pixel, in the dataset's colours (a palette PNG: VOC readers take it back)
            image = Image.fromarray(mask[0, 0].to(torch.uint8).numpy(), mode="P")
            image.putpalette([value for colour in palette for value in colour])
            image.save(path)
            result["mask"] = str(path)
    return results


def _task_predict(task, directory, spec, images, backend, masks, draw, min_score) -> list[dict]:
    """The predict of a task whose answers are not classes (``Task.predictor``: detection's boxes, flow's
    motion): the student as trained, from a run, checkpoint or export directory, or (``--backend onnx``)
    its Q/DQ ONNX from an export directory."""
    import importlib

    if backend not in ("auto", "torch", "onnx"):
        raise UserError(
            f"--backend {backend}: {task.name} students run as trained (torch) or from their Q/DQ ONNX "
            "(onnx) in this version"
        )
    if masks is not None:
        raise UserError(f"--masks: for segmentation; {task.name} writes its pictures with --draw DIR")
    module, function = task.predictor.split(":")
    answer = getattr(importlib.import_module(module), function)
    student = (
        _OnnxParts(_onnx_session(directory, backend), task) if backend == "onnx" else load_student(directory)
    )
    return answer(student, spec, images, classes=_classes(directory), min_score=min_score, draw=draw)


class _OnnxParts:
    """The Q/DQ ONNX of a network rewritten part by part (one image or pair per run) answering as the
    network does, ``{"logits": ...}``: each image's detections as a dict, or the flows as one batch."""

    def __init__(self, session, task) -> None:
        self.session, self.answers = session, task.onnx_answers
        self.names = [o.name for o in session.get_outputs()]

    def __call__(self, batch: Tensor) -> dict:
        answers = [self._outputs(x) for x in batch.split(1)]
        if self.answers == "detections":
            return {LOGITS: answers}
        return {LOGITS: torch.cat([a[self.names[0]] for a in answers])}

    def _outputs(self, one: Tensor) -> dict[str, Tensor]:
        outputs = self.session.run(None, {"images": one.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.names, outputs, strict=True)}


def runner(directory: Path, backend: str) -> Callable[[Tensor], Tensor]:
    """``images -> logits`` of one backend (see module docstring)."""
    if backend == "openvino":
        file = _backend_file(directory, backend)  # before the import: a missing runtime is one line
        from cmtkd_graph.deploy import openvino_export

        export_file(directory, file.with_suffix(".bin").name)  # the weights the .xml names
        try:
            return openvino_export.runner(openvino_export.compile_model(file))
        except Exception as err:  # the runtimes report a damaged model file in many ways
            raise _cannot_load(file, backend, err) from None
    if backend in FILES:
        return onnx_runner(_onnx_session(directory, backend))
    if backend == "integer":
        from cmtkd_graph.deploy.integer import integer_student

        model = integer_student(directory)
    else:
        model = load_student(directory, inference=backend == "inference")

    def run(batch: Tensor) -> Tensor:
        with torch.no_grad():
            return model(batch)

    return run


def _backend_file(directory: Path, backend: str) -> Path:
    """The checked file of an export's ``backend``, its runtime installed (else one line naming the fix)."""
    if not (directory / FILES[backend]).is_file():
        raise UserError(f"{directory}: no {FILES[backend]}; export with --format {backend} first")
    file = export_file(directory, FILES[backend])
    if not _installed(RUNTIMES[backend]):
        package = RUNTIMES[backend]
        raise UserError(f"--backend {backend} needs {package}: pip install 'cmtkd-graph[{EXTRAS[package]}]'")
    return file


def _onnx_session(directory: Path, backend: str):
    """An onnxruntime session of the export's ``backend`` file (onnx or onnx-int8)."""
    file = _backend_file(directory, backend)  # before the import: a missing runtime is one line
    from cmtkd_graph.deploy.onnx_int8 import session

    try:
        return session(file)
    except Exception as err:  # the runtimes report a damaged model file in many ways
        raise _cannot_load(file, backend, err) from None


def _cannot_load(file: Path, backend: str, err: Exception) -> UserError:
    return UserError(f"{file}: {RUNTIMES[backend]} cannot load it ({first_line(err)}); export again")


def onnx_runner(session) -> Callable[[Tensor], Tensor]:
    """``images -> logits`` of an onnxruntime session."""
    return lambda batch: torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])


def usable_backends(directory: Path) -> dict[str, str]:
    """The backends ``auto`` may take here, and why each other one is left out."""
    manifest = read_manifest(directory) or {}
    listed = manifest.get("sha256")  # an export that records its files: only those are part of it
    left_out = {}
    for backend, file in FILES.items():
        if not _installed(RUNTIMES[backend]):
            left_out[backend] = f"{RUNTIMES[backend]} is not installed"
        elif not (directory / file).is_file() or (listed is not None and file not in listed):
            left_out[backend] = f"no {file}"
    for backend in ("onnx-int8", "openvino"):
        section = manifest.get(backend.replace("-", "_")) or {}
        if backend not in left_out and not section.get("usable", False):
            left_out[backend] = section.get("why", "the export did not check it")
    return left_out


def _installed(package: str) -> bool:
    import importlib

    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


QUIET_S = 0.05
"""Pause before each timed call: the idle worker threads of the candidate that ran before (onnxruntime's
spin after each run) stop competing for the cores. Without it, on 2 cores, onnxruntime sessions timed
in turn slowed each other by up to 3x at batch 1 (mobilenet_v2: float 4.6-16 ms from run to run)."""


def interleaved_times(candidates: dict[str, Callable], x: Tensor, repeat: int) -> dict[str, float]:
    """Best time per candidate over ``repeat`` rounds after one warm-up; each round runs every candidate
    once, in turn, so that the machine's drifts touch them all alike, each on a quiet machine (QUIET_S)."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.inference_mode():
        for fn in candidates.values():
            fn(x)
        for _ in range(repeat):
            for name, fn in candidates.items():
                time.sleep(QUIET_S)
                start = time.perf_counter()
                fn(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def fastest_backend(
    directory: Path, input_shape: tuple[int, ...], repeat: int = 5, noun: str = "image"
) -> tuple[str, str]:
    """The backend with the lowest latency for one input (a ``noun``) here (interleaved, best of
    ``repeat``)."""
    left_out = usable_backends(directory)
    candidates = {b: runner(directory, b) for b in ("inference", *FILES) if b not in left_out}
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    best = interleaved_times(candidates, x, repeat)
    chosen = min(best, key=best.get)
    timed = ", ".join(f"{b} {1e3 * t:.1f} ms" for b, t in sorted(best.items(), key=lambda kv: kv[1]))
    skipped = "; ".join(f"{b}: {why}" for b, why in left_out.items())
    return chosen, f"fastest here for one {noun}: {timed}" + (
        f"; not considered: {skipped}" if skipped else ""
    )


def _classes(directory: Path) -> list[str] | None:
    return _recorded(directory, "classes")


def _recorded(directory: Path, key: str) -> list | None:
    """What the export's manifest (``model.<key>``) or the run's ``final.json`` recorded of the data."""
    for name in (MANIFEST_FILE, "final.json"):
        file = directory / name
        if file.is_file():
            data = json.loads(file.read_text())
            value = data.get("model", {}).get(key) if name == MANIFEST_FILE else data.get(key)
            if value:
                return value
    return None


def format_predictions(results: list[dict]) -> str:
    if results and "detections" in results[0]:
        from cmtkd_graph.deploy.predict_objects import format_objects

        return format_objects(results)
    if results and "pair" in results[0]:
        from cmtkd_graph.deploy.predict_flow import format_flows

        return format_flows(results)
    lines = []
    for r in results:
        best = ", ".join(
            f"{p['class']} {100 * p['share']:.1f}% of pixels"
            if "share" in p
            else f"{p['class']} {100 * p['probability']:.1f}%"
            for p in r["predictions"]
        )
        if "mask" in r:
            best += f" (mask: {r['mask']})"
        lines.append(f"{r.get('image', r.get('clip'))}: {best}")
    return "\n".join(lines)
