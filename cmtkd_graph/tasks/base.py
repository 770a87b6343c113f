"""The task record: what a model's output means, and everything that follows from it.

A task is a subclass of :class:`Task` registered by name (``@register_task("name")``), like the
methods, quantizers and datasets. Its facts say which torchvision builders belong to it (the modules of
``torchvision.models`` whose ``list_models`` it covers) and, as the tool grows into segmentation, video,
detection and optical flow (docs/architecture.md#tasks), what the head outputs are, the task loss, the
metrics, the data formats it reads and what ``eval``, ``predict`` and ``export`` write. The rest of the
tool asks the spec's task and never branches on a task's name.

The spec's ``task:`` is inferred from the student's builder when not written.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from cmtkd_graph.registry import TASKS

IGNORE = -100
"""The label of a sample no loss counts (``F.cross_entropy``'s default ``ignore_index``): a task maps its
datasets' own ignore label (255 in segmentation masks) to it."""


class Task:
    """Base class of a task record (see the module docstring). Class attributes are the facts; the
    methods say how the task's outputs become samples and metrics. The defaults are classification's:
    one sample per image, logits [B, classes]."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: what the models of this task compute
    builder_modules: ClassVar[tuple[str, ...]] = ()  # torchvision modules whose list_models() it covers
    main_output: ClassVar[str] = "logits"  # the key of the prediction where a model returns a dict
    builder_defaults: ClassVar[dict[str, Any]] = {}  # builder kwargs unless the spec sets them
    # An auxiliary prediction some builders add (segmentation's ``aux_loss=True``): the output key, the
    # submodule computing it (not part of the deployed student) and its cross-entropy's weight beside the
    # main prediction's. None: the task's models have none.
    aux_output: ClassVar[str | None] = None
    aux_head: ClassVar[str] = ""
    aux_weight: ClassVar[float] = 0.0
    labels_may_ignore: ClassVar[bool] = False  # a sample's label may be IGNORE (no class: counted nowhere)
    clips: ClassVar[bool] = False  # inputs are clips [B, C, T, H, W] (data.frames of them), not images
    sample_noun: ClassVar[str] = "image"  # what one input is called in reports and predict's output
    frames: ClassVar[int | None] = None  # a sample is this many images of one scene (flow: a pair)
    run_kwargs: ClassVar[tuple[str, ...]] = ()  # network kwargs the task reads at run time, not the builder
    # "module:function" building the system (None: cmtkd_graph.system's, for networks that trace whole)
    system_builder: ClassVar[str | None] = None
    # "module:function" answering ``predict`` from the student as trained, where the task's answers are not
    # classes: ``function(student, spec, images, *, classes, min_score, draw) -> list[dict]``
    predictor: ClassVar[str | None] = None
    # the part whose nodes are the taps, for networks rewritten part by part (``models.parts``)
    tap_part: ClassVar[str | None] = None
    # how ``export`` traces the student for the Q/DQ ONNX: "torch.export" (one program), or "torchscript",
    # torch's older tracer, which records torchvision's box logic as one image runs it (detectors, which
    # torch.export does not trace); and what the file answers: "logits", RAFT's last "flow", or the
    # "detections" of its one image (deploy/onnx_export.py)
    onnx_tracer: ClassVar[str] = "torch.export"
    onnx_answers: ClassVar[str] = "logits"
    # verbs this version does not have for the task yet: verb -> what the user can do instead
    missing_verbs: ClassVar[dict[str, str]] = {}
    # the methods whose objective the task has (None: every method; their terms read samples)
    methods: ClassVar[tuple[str, ...] | None] = None
    methods_reason: ClassVar[str] = ""
    # metric key -> heading; the first is the one a run is judged by (final.json, studies)
    metric_titles: ClassVar[dict[str, str]] = {"acc1": "top-1 %", "acc5": "top-5 %"}
    # metric_rows gives each sample's objects (detections), scored together by score_objects, not summed
    collects_objects: ClassVar[bool] = False

    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """The torchvision builders of this task (``list_models(module=...)`` of its modules)."""
        return _builders(cls.builder_modules)

    @classmethod
    def kwargs_problem(cls, arch: str, kwargs: dict[str, Any]) -> str | None:
        """What is wrong with builder ``arch``'s ``kwargs`` for this task (None: nothing)."""
        return None

    @classmethod
    def require(cls, verb: str) -> None:
        """Raise a one-line UserError where this version has no ``verb`` for the task yet."""
        if verb in cls.missing_verbs:
            from cmtkd_graph.errors import UserError

            instead = cls.missing_verbs[verb]
            raise UserError(f"{verb}: not yet for {cls.name} models in this version; {instead}")

    @classmethod
    def objective(cls, spec: Any) -> str | None:
        """The objective line of ``validate`` where the task writes it (None: the method's own)."""
        return None

    @classmethod
    def spec_problems(cls, spec: Any) -> list[str]:
        """What the task cannot do that the spec asks for, one ``key: problem`` line each."""
        return []

    @classmethod
    def part_by_part_problems(cls, spec: Any) -> list[str]:
        """What a task whose networks are rewritten part by part (``models.parts``) and whose loss is its
        own (not a cross-entropy over classes) cannot take: surgery, activation checkpointing, crops, label
        smoothing; one ``key: problem`` line each."""
        problems = []
        if any(spec.surgery_for(m) for m in (spec.student, *spec.resolved_teachers())):
            problems.append(f"surgery: not for {cls.name} models (their networks are rewritten part by part)")
        if spec.train.activation_checkpointing:
            problems.append(
                f"train.activation_checkpointing: not for {cls.name} models (rewritten part by part) in this "
                "version; drop it"
            )
        crop = spec.data.augment.crop
        if crop not in (None, "none"):
            problems.append(
                f"data.augment.crop: {crop} is not done to {cls.sample_noun}s in this version (training "
                "mirrors them left-right, data.augment.hflip); drop it"
            )
        if spec.distill.label_smoothing:
            problems.append(f"distill.label_smoothing: {cls.name} losses have no classes to smooth; drop it")
        return problems

    @classmethod
    def builder_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """A network's kwargs as its builder takes them: the task's defaults, without ``run_kwargs``."""
        given = {k: v for k, v in (kwargs or {}).items() if k not in cls.run_kwargs}
        return {**cls.builder_defaults, **given}

    @classmethod
    def without_aux_head(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A network's state dict without the auxiliary head's tensors (the deployed student has none)."""
        if not cls.aux_head:
            return state
        prefix = cls.aux_head + "."
        return {k: v for k, v in state.items() if not k.startswith(prefix)}

    @classmethod
    def label_shape(cls, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one sample's label for an input of ``input_shape`` ((C, H, W), or (C, T, H, W) for
        clips): () for a class."""
        return ()

    @classmethod
    def example_labels(
        cls,
        batch: int,
        classes: int,
        input_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        spec: Any = None,
    ) -> Tensor:
        """Random labels of a batch (probes and FLOP counts run the objective on them); ``spec``: the run's,
        where the labels depend on its networks (detection: Keypoint R-CNN's keypoints)."""
        shape = (batch, *cls.label_shape(input_shape))
        if torch.device(device).type == "meta":
            return torch.zeros(shape, dtype=torch.long, device=device)
        return torch.randint(0, classes, shape, device=device)

    # ---------------------------------------------------------------- the objective's samples
    @staticmethod
    def sample_logits(logits: Tensor) -> Tensor:
        """The logits as samples [N, classes], what every loss term of a method reads."""
        return logits

    @staticmethod
    def sample_labels(labels: Tensor) -> Tensor:
        """The labels as samples [N] (class indices, or :data:`IGNORE`)."""
        return labels

    # ---------------------------------------------------------------- predict
    @classmethod
    def predictions(cls, logits: Tensor, classes: list[str], top: int) -> list[list[dict]]:
        """Per image, its ``top`` answers: ``{"class", "index", "probability"}``."""
        values, indices = torch.softmax(logits.float(), dim=1).topk(min(top, logits.shape[1]), dim=1)
        name = (lambda c: classes[c]) if classes else str
        return [
            [{"class": name(c), "index": c, "probability": q} for c, q in zip(i, p, strict=True)]
            for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    @classmethod
    def masks(cls, logits: Tensor) -> Tensor | None:
        """Per image, a map of the predicted classes (uint8 [B, H, W]) where the task has one; else None."""
        return None

    # ---------------------------------------------------------------- evaluation
    @classmethod
    def metric_rows(cls, logits: Tensor, labels: Tensor) -> Tensor:
        """What each sample of a batch adds to a network's metrics, one row per image [B, S]: rows are
        gathered over processes (each image counted once) and summed. Classification: [1, top-1 hit,
        top-5 hit]."""
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        return torch.stack([torch.ones_like(hits[:, 0]), hits[:, :1].any(1), hits.any(1)], 1).float()

    @classmethod
    def metric_values(cls, state: Tensor) -> dict[str, float | list[float | None]]:
        """The metrics of the summed rows, in %: ``{"acc1": ..., "acc5": ...}`` (a task may add lists,
        e.g. per-class values; the keys of ``metric_titles`` are the scalars a run is reported by)."""
        seen = max(int(state[0]), 1)
        return {"acc1": 100.0 * int(state[1]) / seen, "acc5": 100.0 * int(state[2]) / seen}

    @classmethod
    def score_objects(cls, rows: list, dataset: Any) -> tuple[dict[str, float], list[dict]]:
        """The metrics of every sample's objects (``metric_rows`` of a task that ``collects_objects``)
        against ``dataset``'s ground truth, and the objects as written by ``eval``."""
        raise NotImplementedError(f"{cls.name} metrics are sums of rows (metric_values)")


@functools.cache
def _builders(modules: tuple[str, ...]) -> tuple[str, ...]:
    import torchvision

    return tuple(
        name
        for module in modules
        for name in torchvision.models.list_models(module=importlib.import_module(module))
    )


def register_task(name: str):
    """Class decorator: register a :class:`Task` subclass under ``name`` (and set its ``name``)."""
    return TASKS.register_record(name)


def task_of_model(arch: str) -> str | None:
    """The registered task whose builders include ``arch`` (None: no task has it)."""
    return next((name for name in TASKS if arch in TASKS.get(name).model_names()), None)


def task_record(arch: str) -> type[Task]:
    """The task record of a builder (classification for a name no task has: the spec refuses those)."""
    return TASKS.get(task_of_model(arch) or "classification")
