"""The experiment spec: its pydantic models (``schema``), reading and writing it (``io``), and its
generated Markdown reference (``reference``, imported on its own: it describes the registered methods).

``load_spec("specs/resnet18.yaml", overrides=["train.epochs=1"])`` returns a validated, fully resolved
:class:`Spec`; every problem is one line of a :class:`~cmtkd_graph.errors.SpecError`.
"""

from cmtkd_graph.spec.io import dump_spec, load_spec, validate_spec
from cmtkd_graph.spec.schema import (
    FULL_PRECISION,
    IMAGENET_LIKE_MIN_SIZE,
    AugmentSpec,
    DataSpec,
    DistillSpec,
    EmaSpec,
    ModelSpec,
    OptimSpec,
    QuantizerSpec,
    ScheduleSpec,
    Spec,
    Strict,
    SurgerySpec,
    TapSpec,
    TrainSpec,
)

__all__ = [
    "FULL_PRECISION",
    "IMAGENET_LIKE_MIN_SIZE",
    "AugmentSpec",
    "DataSpec",
    "DistillSpec",
    "EmaSpec",
    "ModelSpec",
    "OptimSpec",
    "QuantizerSpec",
    "ScheduleSpec",
    "Spec",
    "Strict",
    "SurgerySpec",
    "TapSpec",
    "TrainSpec",
    "dump_spec",
    "load_spec",
    "validate_spec",
]
