"""Facts about torchvision architecture families that the passes use, as one table.

The passes are generic: they find layers, stages and shapes in the traced graph. Where a family needs
a fact the graph does not show, it is written here, keyed by the family, never as a branch on a model
name inside a pass. Today that is where ``taps: auto`` puts the taps and whether a family's feature maps
are channels-last (NHWC). A model that matches no family gets the generic rule
(:data:`GENERIC`): the end of every stage, found from the graph (``passes/taps.py``).

To teach the tool a new family, add a row to :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FixedTaps:
    """``auto`` taps that are the same module names in every member of the family."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class BlocksAtDepth:
    """``auto`` taps at fractions of a stack of blocks whose depth varies within the family: the blocks
    named ``template.format(i=index)``, index = round(depth x fraction) - 1, where depth is the number of
    distinct modules under ``container``."""

    container: str
    template: str
    fractions: tuple[float, ...]


@dataclass(frozen=True)
class StageEnds:
    """``auto`` taps found from the graph: the end of every stage, i.e. the last node before each
    spatial downsampling on the main path (the generic rule, ``passes.taps``)."""

    revision: ClassVar[int] = 2
    """2: stages read at the builders' 224x224, not at the data's size (runs on other sizes trained
    before have other taps: their identity changes, docs/studies.md#run-identity-and-stale-runs)."""


TapRule = FixedTaps | BlocksAtDepth | StageEnds


@dataclass(frozen=True)
class FixedInput:
    """The only input size a family's builders run on: ``size`` ((H, W), or (T, H, W) for clips), or
    what the builder kwarg ``kwarg`` sets it to (ViT's ``image_size``), within ``kwarg_rule``; ``reason``
    says why."""

    size: tuple[int, ...]
    reason: str
    kwarg: str | None = None
    kwarg_rule: str = ""

    def for_kwargs(self, kwargs: dict) -> tuple[int, ...]:
        """The size a network built with ``kwargs`` needs."""
        value = kwargs.get(self.kwarg) if self.kwarg else None
        if value is None:
            return self.size
        return tuple(value) if isinstance(value, list | tuple) else (int(value),) * len(self.size)


@dataclass(frozen=True)
class Family:
    """One architecture family: the builder-name prefixes it covers and its facts."""

    name: str
    prefixes: tuple[str, ...]  # torchvision builder names that start with one of these
    auto_taps: TapRule
    channels_last_features: bool = False  # maps are [B, (T,) H, W, C] (exposed to losses channels-first)
    fixed_input: FixedInput | None = None  # the only input size its builders run on
    note: str = ""  # why, for the docs


FAMILIES: tuple[Family, ...] = (
    Family(
        "resnet",
        ("resnet", "resnext", "wide_resnet"),
        FixedTaps(("layer1", "layer2", "layer3", "layer4")),
        note="the paper's ResNet taps: the end of each of the four stages",
    ),
    Family(
        "vit",
        ("vit_",),
        BlocksAtDepth("encoder.layers", "encoder.layers.encoder_layer_{i}", (0.25, 0.5, 0.75, 1.0)),
        fixed_input=FixedInput(
            (224, 224),
            "its position embeddings are sized for them",
            "image_size",
            "a multiple of its patch size",
        ),
        note="one resolution throughout: the encoder blocks at 1/4, 1/2, 3/4 and full depth; images of "
        "224 x 224 only, or of the builder's kwargs.image_size (a multiple of its patch size)",
    ),
    Family(
        "maxvit",
        ("maxvit_",),
        StageEnds(),
        fixed_input=FixedInput(
            (224, 224),
            "its window and grid partitions are sized for them",
            "input_size",
            "each block's input a multiple of 7: 224, 448...",
        ),
        note="the generic rule; images of 224 x 224 only, or of the builder's kwargs.input_size (every "
        "block's input a multiple of its partition size 7)",
    ),
    Family(
        "swin",
        ("swin_",),
        FixedTaps(("features.1", "features.3", "features.5", "features.7")),
        channels_last_features=True,
        note="the four stages; their maps are NHWC",
    ),
)
SEGMENTATION_FAMILIES: tuple[Family, ...] = (
    Family(
        "segmentation resnet",
        ("fcn_resnet", "deeplabv3_resnet"),
        FixedTaps(("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")),
        note="the backbone's four stages (layer3 and layer4 are dilated: they keep layer2's resolution, "
        "which the resolution rule cannot see)",
    ),
    Family(
        "segmentation mobilenet_v3",
        ("deeplabv3_mobilenet_v3", "lraspp_mobilenet_v3"),
        FixedTaps(("backbone.3", "backbone.6", "backbone.12", "backbone.16")),
        note="the MobileNetV3-Large backbone's stage ends at strides 4, 8 and 16, and its last map",
    ),
)
VIDEO_FAMILIES: tuple[Family, ...] = (
    Family(
        "video resnet",
        ("r3d_", "mc3_", "r2plus1d_"),
        FixedTaps(("layer1", "layer2", "layer3", "layer4")),
        note="the four stages of the 3-D ResNets, as for ResNet (maps [B, C, T, H, W])",
    ),
    Family(
        "mvit",
        ("mvit_",),
        BlocksAtDepth("blocks", "blocks.{i}", (0.25, 0.5, 0.75, 1.0)),
        fixed_input=FixedInput((16, 224, 224), "its position embeddings are sized for them"),
        note="the blocks at 1/4, 1/2, 3/4 and full depth; tokens [B, 1 + T*H*W, D] (class token first); "
        "clips of 16 x 224 x 224 only",
    ),
    Family(
        "s3d",
        ("s3d",),
        FixedTaps(("features.3", "features.6", "features.12", "features.15")),
        note="the ends of its stages at strides 4, 8, 16 and 32 (time is halved at other points than space: "
        "the resolution rule would split stages there)",
    ),
    Family(
        "video swin",
        ("swin3d_",),
        FixedTaps(("features.0", "features.2", "features.4", "features.6")),
        channels_last_features=True,
        note="the four stages (the patch embedding is not in features); their maps are [B, T, H, W, C]",
    ),
)
DETECTION_FAMILIES: tuple[Family, ...] = (
    Family(
        "detection resnet50 fpn",
        (
            "fasterrcnn_resnet50",
            "maskrcnn_resnet50",
            "keypointrcnn_resnet50",
            "retinanet_resnet50",
            "fcos_resnet50",
        ),
        FixedTaps(
            ("backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4")
        ),
        note="the ResNet-50 body's four stages, each of which feeds the FPN (so no stage lies on every path "
        "from the image to the maps: the resolution rule finds none)",
    ),
)
FAMILIES = FAMILIES + SEGMENTATION_FAMILIES + VIDEO_FAMILIES + DETECTION_FAMILIES
GENERIC = Family("generic", (), StageEnds(), note="every other model: the end of every stage, from the graph")


def family_of(arch: str) -> Family:
    """The family whose prefix ``arch`` starts with, else :data:`GENERIC`."""
    return next((f for f in FAMILIES if arch.startswith(f.prefixes)), GENERIC)
