"""The experiment spec: one YAML file = one experiment, validated by these pydantic models.

Every model forbids unknown keys, so a typo is an error (with the closest valid key) rather than a
silently ignored setting. `load_spec` (in ``cmtkd_graph.spec.io``) reads a file, applies ``--set``
overrides and turns validation errors into one line per problem.

Components are named, not imported: methods, quantizers, surgery passes and datasets are checked and
asked for their facts through the tables of ``cmtkd_graph.registry``, so this module depends on none
of them (they depend on it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    model_validator,
)

from cmtkd_graph.errors import UserError
from cmtkd_graph.models.builders import check_arch
from cmtkd_graph.plugins import load_spec_plugins
from cmtkd_graph.registry import DATASETS, METHODS, QUANTIZERS, SURGERIES, TASKS, Registry
from cmtkd_graph.spec.recipes import RECIPES, expand_recipe

FULL_PRECISION = 32


class Strict(BaseModel):
    """Unknown keys are errors, and so are inf and nan where a number is expected (YAML reads 1e309 as
    inf)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_NAME_LENGTH = 128


def check_name(value: str) -> str:
    """A name that becomes one directory (a run's, a study's, a row's): no path separator, not ``.``
    or ``..``, printable, at most MAX_NAME_LENGTH characters."""
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"at most {MAX_NAME_LENGTH} characters, got {len(value)}")
    if not value or value in {".", ".."} or "/" in value or "\\" in value or not value.isprintable():
        raise ValueError(
            f"must name one directory (no '/', '\\', control characters; not '.' or '..'), got {value!r}"
        )
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _check_bits(value: int) -> int:
    if not (1 <= value <= 8 or value == FULL_PRECISION):
        raise ValueError(f"must be 1..8 or 32, got {value}")
    return value


Bits = Annotated[int, AfterValidator(_check_bits)]
"""A bit-width: 1..8, or 32 meaning full precision (no quantizer)."""


Arch = Annotated[str, AfterValidator(check_arch)]


def _known(registry: Registry, name: str) -> str:
    """``name`` if ``registry`` has it; otherwise the registry's own "unknown ...; known: ..." message."""
    try:
        registry.get(name)
    except UserError as err:
        raise ValueError(str(err)) from None
    return name


def _check_quantizer(name: str) -> str:
    return _known(QUANTIZERS, name)


def _check_surgery(name: str) -> str:
    return _known(SURGERIES, name)


def _check_dataset(name: str) -> str:
    return _known(DATASETS, name)


def _check_method(name: str) -> str:
    return _known(METHODS, name)


def _check_task(name: str) -> str:
    return _known(TASKS, name)


def _registered_names(registry: Registry):
    """``json_schema_extra`` listing a registry's names as the field's enum (editor completion), read
    when the schema is generated, so that components registered later are listed too."""

    def extra(schema: dict[str, Any]) -> None:
        schema["enum"] = registry.names()

    return extra


class SurgerySpec(Strict):
    """A model-surgery pass run on the traced float model before quantization."""

    name: Annotated[str, AfterValidator(_check_surgery)] = Field(
        description="registered surgery pass: bn_after_every_layer, cifar_stem, grey_input",
        json_schema_extra=_registered_names(SURGERIES),
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the pass")


def _surgery_list(value: Any) -> Any:
    # `surgery: [cifar_stem]` is shorthand for `surgery: [{name: cifar_stem}]`.
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class ModelSpec(Strict):
    """One network (the student or a teacher)."""

    arch: Arch | None = Field(
        None, description="torchvision classification builder, e.g. resnet18 (teachers: default = student's)"
    )
    kwargs: dict[str, Any] | None = Field(
        None, description="builder keyword arguments, e.g. {num_classes: 100} (teachers: default = student's)"
    )
    weights: str | None = Field(
        None,
        description="initial weights: a local checkpoint (.pt/.pth/.safetensors, a state_dict or a run's "
        "student.safetensors) or a torchvision weights name such as ResNet18_Weights.IMAGENET1K_V1",
    )
    weight_bits: Bits = Field(description="weight bit-width: 1..8, or 32 = full precision")
    act_bits: Bits = Field(description="activation bit-width: 1..8, or 32 = full precision")
    trainable: bool = Field(True, description="false: frozen (eval mode, no gradient), e.g. a loaded teacher")
    surgery: list[SurgerySpec] | None = Field(None, description="overrides the top-level surgery list")

    _normalise_surgery = model_validator(mode="before")(
        lambda data: (
            {**data, "surgery": _surgery_list(data["surgery"])}
            if isinstance(data, dict) and "surgery" in data
            else data
        )
    )

    @property
    def bits_label(self) -> str:
        return f"W{_b(self.weight_bits)}A{_b(self.act_bits)}"


def _b(bits: int) -> str:
    return "fp" if bits == FULL_PRECISION else str(bits)


class LayerMatch(Strict):
    """Which layers a precision rule is for: every selector given must match (docs/methods.md)."""

    type: str | None = Field(
        None,
        description="class name of the float layer or of a base class: Conv2d, Linear, MultiheadAttention",
    )
    name: str | None = Field(
        None, description="glob on the layer's name or a dotted prefix of it: features.*.block.1, layer4"
    )
    position: Literal["first", "last", "inner"] | None = Field(
        None, description="first (no layer upstream), last (no layer downstream) or inner, by graph position"
    )
    role: Literal["depthwise_conv", "attention", "se_gate", "patch_embedding", "classifier"] | None = Field(
        None,
        description="depthwise_conv, attention (projections), se_gate (squeeze-excitation), "
        "patch_embedding (a first conv with stride >= 4), classifier (the last layers)",
    )
    network: Literal["student", "teacher"] | None = Field(
        None, description="student or teacher; default: every network"
    )

    @model_validator(mode="after")
    def _some_selector(self) -> LayerMatch:
        if not any(v is not None for v in self.model_dump().values()):
            raise ValueError(
                "match: give at least one of type, name, position, role, network (a rule for every "
                "layer is the network's weight_bits / act_bits)"
            )
        return self


class PrecisionRule(Strict):
    """The bits (and quantizer) of the layers a rule matches; the first matching rule decides."""

    match: LayerMatch = Field(description="which layers: type, name, position, role, network")
    weight_bits: Bits | None = Field(
        None, description="their weight bits; default: what they get without the rule"
    )
    act_bits: Bits | None = Field(
        None, description="their input bits; default: what they get without the rule"
    )
    float: bool = Field(False, description="true: keep them full precision (weight and input)")
    quantizer: Annotated[str, AfterValidator(_check_quantizer)] | None = Field(
        None, description="their quantizer family (hwgq, lsq, dorefa, pact); default: quantizer.name"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="that family's options")

    @model_validator(mode="after")
    def _some_setting(self) -> PrecisionRule:
        bits = self.weight_bits is not None or self.act_bits is not None
        if self.float and (bits or self.quantizer is not None):
            raise ValueError(
                "float: true keeps the layers full precision; drop weight_bits, act_bits, quantizer"
            )
        if not (bits or self.float or self.quantizer is not None):
            raise ValueError("give what the layers get: weight_bits, act_bits, float: true or quantizer")
        if self.options and self.quantizer is None:
            raise ValueError("options: set quantizer too (the options are that family's)")
        return self

    def bits(self) -> tuple[int | None, int | None]:
        """(weight bits, input bits) the rule sets (None: left as they are)."""
        if self.float:
            return FULL_PRECISION, FULL_PRECISION
        return self.weight_bits, self.act_bits


class QuantizerSpec(Strict):
    """The quantizer family of weights and activations, the first/last-layer rule, the precision rules."""

    name: Annotated[str, AfterValidator(_check_quantizer)] = Field(
        "hwgq", description="hwgq, lsq, dorefa, pact", json_schema_extra=_registered_names(QUANTIZERS)
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="family options, e.g. {caffe_rounding: true}"
    )
    first_layer_bits: Bits = Field(
        32,
        description="weight and input bits of the first conv/linear (by graph position); 32 keeps it float",
    )
    last_layer_bits: Bits = Field(
        32, description="weight and input bits of the last layer(s) (the classifier); 32 keeps it float"
    )
    rules: list[PrecisionRule] = Field(
        default_factory=list,
        description="per-layer precision, before the first/last-layer rule: the first rule whose match "
        "fits a layer sets its bits or quantizer, e.g. [{match: {role: depthwise_conv}, weight_bits: 8, "
        "act_bits: 8}]",
    )


def _check_taps(value: Any) -> Any:
    if value == "auto" or value is None:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError(f"must be 'auto' or a non-empty list of node names / module prefixes, got {value!r}")


TapList = Annotated[
    Literal["auto"] | list[str],
    PlainValidator(_check_taps, json_schema_input_type=Literal["auto"] | list[str]),
]


class TapSpec(Strict):
    """Where shared knowledge is formed (teachers) and distilled into (student)."""

    teachers: TapList = Field(
        "auto",
        description="node names (layer1.0.relu_1), module prefixes (layer1) or auto (end of every stage)",
    )
    student: TapList | None = Field(None, description="same forms; default: the teachers' list")


class DistillSpec(Strict):
    """The objective's weights; what each weighs is the method's (see the methods below the table).

    Fields left null are filled with the method's defaults when the spec is read, so the saved
    ``spec.yaml`` says exactly what ran.
    """

    feature_loss: Literal["attention", "fitnet", "none"] | None = Field(
        None,
        description="distance between the teachers' and the student's tap features; default: the method's "
        "(attention for cmtkd, amtml_kd and ctkd, none for the baselines)",
    )
    mutual_learning: bool | None = Field(
        None, description="cmtkd only: KDCL-MinLogit mutual learning (KL terms); default true"
    )
    alpha: float | None = Field(
        None, ge=0, description="weight of the cross-entropy terms; default: the method's"
    )
    beta: float | None = Field(None, ge=0, description="weight of the KL / KD terms; default: the method's")
    gamma: float | None = Field(
        None, ge=0, description="weight of the feature loss; default: the method's for that loss"
    )
    tau: float | None = Field(
        None, gt=0, description="softmax temperature of the KL terms; default: the method's"
    )
    combine: Literal["importance", "mean"] = Field(
        "importance",
        description="composed teachers: combined-teacher logits by learned importance or plain mean",
    )
    detach_shared: bool = Field(
        False, description="true: the feature loss gives no gradient to the teachers (and importance logits)"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="label smoothing of every cross-entropy term against the labels (torch's "
        "F.cross_entropy(label_smoothing=...)); the distillation terms are not smoothed",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="the method's own settings (see its section below the table)"
    )


class AugmentSpec(Strict):
    """Training augmentation; `null` fields take the dataset's default (docs/methods.md)."""

    crop: Literal["random_crop", "random_resized_crop", "none"] | None = Field(
        None, description="random_crop (with padding) for small images, random_resized_crop for ImageNet-like"
    )
    padding: int = Field(4, ge=0, description="padding of random_crop")
    hflip: bool | None = Field(
        None, description="random horizontal flip (default: true except fashion_mnist)"
    )
    policy: Literal["none", "autoaugment", "randaugment", "trivialaugment_wide", "augmix"] = Field(
        "none",
        description="classification: an automatic augmentation policy of torchvision.transforms.v2 after the "
        "crop and flip (autoaugment: its ImageNet policy)",
    )
    random_erasing: float = Field(
        0.0,
        ge=0,
        le=1,
        description="classification: probability of v2.RandomErasing per image, after normalising",
    )
    mixup_alpha: float = Field(
        0.0,
        ge=0,
        description="classification: v2.MixUp of each training batch with Beta(alpha, alpha); 0 = off",
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        description="classification: v2.CutMix of each training batch; with mixup_alpha too, one of the two "
        "per batch, at random",
    )

    def is_plain(self) -> bool:
        """No policy, erasing or batch mixing (what every task and the device pipeline can do)."""
        return self.policy == "none" and not self.random_erasing and not self.mixes()

    def mixes(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)


IMAGENET_LIKE_MIN_SIZE = 64
"""Image folders at least this large get ImageNet-style augmentation (random resized crops)."""


class DataSpec(Strict):
    """The dataset and its loaders."""

    dataset: Annotated[str, AfterValidator(_check_dataset)] = Field(
        description="registered dataset: cifar10/cifar100 (torchvision format), imagefolder (train/ + "
        "val|test/), fashion_mnist; for segmentation voc (Pascal VOC layout), mask_folders (images/ + "
        "masks/), fashion_scenes; for video clip_folders (video files), frame_folders (folders of frames), "
        "moving_fashion; for optical flow flow_pairs (FlyingChairs layout), fashion_flow; for detection "
        "coco_folder (COCO layout), voc_boxes (Pascal VOC XML), fashion_objects (see "
        "cmtkd_graph/data/, docs/tasks.md)",
        json_schema_extra=_registered_names(DATASETS),
    )
    root: str | None = Field(
        None, description="data directory (fashion_mnist default: /usr/share/datasets/fashion-mnist)"
    )
    download: bool = Field(False, description="cifar only: download if missing (needs internet)")
    eval_split: str | None = Field(
        None,
        description="imagefolder, mask_folders, clip_folders, frame_folders: evaluation folder (default: "
        "val, else test); voc: the evaluation list of ImageSets/Segmentation (default: val)",
    )
    classes: list[str] | None = Field(
        None,
        description="coco_folder, voc_boxes, fashion_objects: the categories to train and score, by name, "
        "in this order (default: every category of the file); objects of the others are left out and counted",
    )
    batch_size: int = Field(256, ge=1, description="total batch size per optimizer step, over all processes")
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="per-process evaluation batch (default: the per-process training batch, batch_size / "
        "processes / accumulation steps; a run's spec.yaml records the value it used)",
    )
    num_workers: int = Field(2, ge=0, description="data-loading worker processes per training process")
    pipeline: Literal["workers", "device"] = Field(
        "workers",
        description="workers: each image transformed in the loader's worker processes (any dataset); "
        "device: the training images decoded once into memory on the training device and augmented there "
        "batch by batch (random_crop or none, hflip), for small images on a GPU (docs/training.md)",
    )
    image_size: int | None = Field(
        None, ge=8, description="model input size (default: the dataset's native size)"
    )
    frames: int | None = Field(
        None, ge=1, description="video: frames per clip, T of the input [3, T, H, W] (default: the dataset's)"
    )
    frame_stride: int = Field(
        1,
        ge=1,
        description="video: take every s-th frame (a clip needs (T - 1) * s + 1 frames)",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    normalize: bool = Field(True, description="normalise images with mean/std")
    mean: list[float] | None = Field(None, description="per-channel mean in [0, 1] (default: the dataset's)")
    std: list[float] | None = Field(None, description="per-channel std in [0, 1] (default: the dataset's)")
    grey_to_rgb: Literal["repeat", "none"] = Field(
        "repeat",
        description="fashion_mnist: repeat the grey channel 3x, or none (use the grey_input surgery)",
    )
    corrupt_images: Literal["error", "skip"] = Field(
        "error",
        description="files read on demand (image folders, voc, mask_folders, clips): unreadable files",
    )
    train_subset: int | None = Field(
        None, ge=1, description="use only the first N training samples (quick runs)"
    )
    eval_subset: int | None = Field(None, ge=1, description="use only the first N evaluation samples")

    @model_validator(mode="after")
    def _check_dataset_options(self) -> DataSpec:
        """Options that only some datasets have (checked here, so `validate` catches them too): the
        dataset's record says which it has."""
        record = DATASETS.get(self.dataset)
        problems = []
        if self.download and not record.downloadable:
            problems.append(
                f"data.download: only {'/'.join(_datasets_that('downloadable'))} can be downloaded; "
                f"{self.dataset}: {record.how_to_get}"
            )
        if self.pipeline == "device" and not record.device_pipeline:
            problems.append(
                "data.pipeline: device decodes class-labelled images "
                f"({'/'.join(_datasets_that('device_pipeline'))}); {self.dataset} is read by the loader's "
                "workers: set data.pipeline: workers"
            )
        if self.eval_split is not None and not record.has_eval_split_choice:
            problems.append(
                f"data.eval_split: only for {'/'.join(_datasets_that('has_eval_split_choice'))}; "
                f"{self.dataset} has a fixed test split"
            )
        if self.classes is not None and not record.has_class_choice:
            problems.append(
                f"data.classes: only for {'/'.join(_datasets_that('has_class_choice'))}; {self.dataset} has "
                "fixed classes"
            )
        if self.corrupt_images == "skip" and not record.reads_files_on_demand:
            problems.append(
                f"data.corrupt_images: skip is for {'/'.join(_datasets_that('reads_files_on_demand'))} "
                f"only; {self.dataset} is read up front"
            )
        if not record.clips and (self.frames is not None or self.frame_stride != 1):
            problems.append(
                f"data.frames/frame_stride: for clip datasets ({'/'.join(_datasets_that('clips'))}); "
                f"{self.dataset} holds images"
            )
        if self.grey_to_rgb == "none" and not record.grey:
            problems.append(
                f"data.grey_to_rgb: none is for {'/'.join(_datasets_that('grey'))} only; "
                f"{self.dataset} images are RGB"
            )
        if self.pipeline == "device":
            imagenet_like = record.native_size is None and self.input_size >= IMAGENET_LIKE_MIN_SIZE
            crop = self.augment.crop or ("random_resized_crop" if imagenet_like else "random_crop")
            if crop == "random_resized_crop":
                problems.append(
                    "data.augment.crop: random_resized_crop needs per-image resizing; data.pipeline: device "
                    "does random_crop (with padding) or none"
                )
            if self.corrupt_images == "skip":
                problems.append(
                    "data.corrupt_images: skip needs pipeline: workers; the device pipeline decodes every "
                    "image before training"
                )
            if not self.augment.is_plain():
                problems.append(
                    "data.augment: policy, random_erasing, mixup_alpha and cutmix_alpha need pipeline: "
                    "workers; the device pipeline does random_crop and hflip"
                )
        problems += self._normalisation_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _normalisation_problems(self) -> list[str]:
        if not self.normalize:
            given = self.mean is not None or self.std is not None
            return (
                ["data.mean/std are given but data.normalize is false: drop them or normalize"]
                if given
                else []
            )
        problems = []
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is None:
                continue
            if any(not 0 <= v <= 1 for v in values):
                problems.append(
                    f"data.{name}: values must be in [0, 1] units, got {values} (divide 0..255 by 255)"
                )
            elif len(values) not in (1, self.in_channels):
                problems.append(
                    f"data.{name}: expected 1 or {self.in_channels} values (one per input channel), "
                    f"got {len(values)}"
                )
        if self.std is not None and any(v <= 0 for v in self.std):
            problems.append(f"data.std: every value must be > 0 (it divides), got {self.std}")
        return problems

    @property
    def input_size(self) -> int:
        """The model input size: ``image_size`` or the dataset's own (its native size; 224 for image
        folders)."""
        return self.image_size or DATASETS.get(self.dataset).input_size()

    @property
    def in_channels(self) -> int:
        return 1 if DATASETS.get(self.dataset).grey and self.grey_to_rgb == "none" else 3

    @property
    def clip_frames(self) -> int | None:
        """T of a clip: ``frames`` or the dataset's own; its task's (a flow pair: 2) for datasets of
        several images per sample; None for image datasets."""
        record = DATASETS.get(self.dataset)
        if record.clips:
            return self.frames or record.default_frames
        return TASKS.get(record.task).frames

    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one model input, (C, T, H, W) for clips."""
        frames = self.clip_frames
        time = (frames,) if frames is not None else ()
        return (self.in_channels, *time, self.input_size, self.input_size)


def _datasets_that(fact: str) -> list[str]:
    """The registered datasets whose record has ``fact`` (for the messages above)."""
    return [name for name in DATASETS if getattr(DATASETS.get(name), fact)]


class ScheduleSpec(Strict):
    """The learning-rate schedule, a factor on every group's lr."""

    name: Literal["multistep", "cosine", "constant"] = Field(
        "multistep", description="learning-rate schedule"
    )
    milestones: list[float] = Field(
        default_factory=list, description="multistep: epochs at which lr *= gamma"
    )
    gamma: float = Field(0.1, gt=0, description="multistep decay factor")
    min_lr: float = Field(0.0, ge=0, description="cosine: final learning rate")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs (fractions allowed)")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="lr factor at the start of warm-up")
    step_every: Literal["epoch", "iteration"] = Field(
        "iteration", description="update the lr once per epoch or after every optimizer step"
    )


class OptimSpec(Strict):
    """One optimizer, parameter groups by role (docs/training.md)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="model weights' learning rate")
    momentum: float = Field(0.9, ge=0, description="sgd momentum (adamw: beta1)")
    nesterov: bool = False
    weight_decay_low_bits: float = Field(
        25e-6, ge=0, description="weight decay of models with weight bits <= low_bits"
    )
    weight_decay: float = Field(1e-4, ge=0, description="weight decay of higher-precision models")
    low_bits: int = Field(2, ge=1, le=8, description="bit-width up to which weight_decay_low_bits applies")
    norm_weight_decay: float | None = Field(
        None,
        ge=0,
        description="weight decay of normalisation layers' parameters (BatchNorm, LayerNorm...), e.g. 0 as "
        "torchvision's ConvNeXt/Swin recipes; default: the network's",
    )
    importance_lr: float | None = Field(None, gt=0, description="lr of the importance logits (default lr/10)")
    quantizer_lr: float | None = Field(None, gt=0, description="lr of learned quantizer steps (default lr)")
    adapter_lr: float | None = Field(None, gt=0, description="lr of FitNet adapters (default lr)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)


def _yaml_no(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means the string.
    return "no" if value is False else value


class EmaSpec(Strict):
    """An exponential moving average of the student's weights (torch's ``AveragedModel`` with
    ``get_ema_multi_avg_fn``), evaluated beside the trained weights (docs/training.md)."""

    decay: float = Field(
        0.9998, ge=0, lt=1, description="at each update: average = decay x average + (1 - decay) x weights"
    )
    every: int = Field(1, ge=1, description="update the average after every N optimizer steps")
    student: bool = Field(
        True,
        description="true: the run's final student (student.safetensors: eval, export, predict) is the "
        "average; false: the average is only evaluated",
    )


class TrainSpec(Strict):
    """The training run: length, seed, output, precision, checkpoints, logging."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (quick runs)")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="stop after this many minutes of training (then evaluate and save as after max_steps): a "
        "run on a time budget; a resumed run gets the budget again",
    )
    fit_to_budget: bool = Field(
        False,
        description="with max_minutes: time the training step first and train as many whole epochs as the "
        "budget holds (train.epochs at most), the schedule's warm-up and milestones scaled in proportion, "
        "so the run ends its schedule instead of stopping at a high lr (RUN_DIR/budget.json)",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed, 0..2^32-1")
    output_dir: str = Field("runs/{name}", description="run directory; {name} is the spec's name")
    mixed_precision: Annotated[Literal["auto", "no", "fp16", "bf16"] | None, BeforeValidator(_yaml_no)] = (
        Field(
            "auto",
            description="auto = time a few training steps of this spec in fp32 and bf16 autocast, take the "
            "faster (on CUDA: bf16 where supported), cached per machine and spec shape; no, fp16, bf16; "
            "null = the accelerate config's choice",
        )
    )
    grad_accum_steps: int | None = Field(
        None, ge=1, description="gradient accumulation steps; default: the accelerate config's (1)"
    )
    checkpoints: bool = Field(
        True, description="false: write no checkpoints (quick experiments; no --resume)"
    )
    checkpoint_every: int = Field(1, ge=1, description="save a checkpoint every N epochs (and at the end)")
    ema: EmaSpec | None = Field(
        None, description="an exponential moving average of the student's weights, e.g. {decay: 0.9998}"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoints to keep")
    log_every: int = Field(20, ge=1, description="write a metrics.jsonl line every N optimizer steps")
    eval_every: int = Field(1, ge=1, description="evaluate every N epochs (and always after the last)")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format; auto = timed together with mixed_precision"
    )
    compile: bool = False
    activation_checkpointing: bool = Field(
        False,
        description="recompute each teacher's activations between two taps during backward instead of "
        "keeping them: less memory, a longer step (docs/performance.md)",
    )
    cpu_threads: Literal["auto", "env"] | int = Field(
        "auto",
        description="CPU threads per process: auto = available cores / processes on this machine "
        "(accelerate launch would otherwise set 1), env = keep OMP_NUM_THREADS, or a number",
    )
    tensorboard: bool = Field(
        False, description="TensorBoard events in RUN_DIR/tensorboard (log_with: [tensorboard])"
    )
    log_with: list[Literal["tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive"]] = (
        Field(
            default_factory=list,
            description="experiment trackers (Accelerate's): the metrics.jsonl scalars, the spec as "
            "parameters, importance.png and final.json as artifacts; each reads its own settings from the "
            "environment (MLFLOW_TRACKING_URI, WANDB_MODE, ...)",
        )
    )
    progress_bar: bool = True

    @model_validator(mode="after")
    def _budget_to_fit(self) -> TrainSpec:
        if self.fit_to_budget and self.max_minutes is None:
            raise ValueError("fit_to_budget needs a budget: set train.max_minutes too")
        return self


class Spec(Strict):
    """A distillation experiment."""

    name: Name = Field(description="experiment name: the run directory's name (no '/', not '.' or '..')")
    plugins: list[str] = Field(
        default_factory=list,
        description="modules of your own components, imported before any name is looked up: module "
        "names (my_package.my_method) or .py files (relative to the working directory); installed "
        "plugins (entry points cmtkd_graph.plugins) are always loaded",
    )
    task: Annotated[str, AfterValidator(_check_task)] | None = Field(
        None,
        description="what the models compute: a registered task (classification, segmentation, video, flow); "
        "default: the task whose torchvision builders include the student's",
        json_schema_extra=_registered_names(TASKS),
    )
    method: Annotated[str, AfterValidator(_check_method)] = Field(
        "cmtkd",
        description="registered method: cmtkd (the paper), single (student alone), kd (Hinton KD from one "
        "teacher), average_teacher, amtml_kd, ctkd (see the methods below the table)",
        json_schema_extra=_registered_names(METHODS),
    )
    student: ModelSpec
    teachers: list[ModelSpec] = Field(default_factory=list)
    quantizer: QuantizerSpec = Field(default_factory=QuantizerSpec)
    surgery: list[SurgerySpec] = Field(
        default_factory=list, description="passes run on every model before quantization"
    )
    taps: TapSpec = Field(default_factory=TapSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    data: DataSpec
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    recipe: Literal[tuple(RECIPES)] | None = Field(  # type: ignore[valid-type]
        None,
        description="torchvision's reference training settings of a family, filling what the spec leaves "
        "unset (lr scaled to data.batch_size; docs/training.md): " + ", ".join(RECIPES),
    )

    _load_plugins = model_validator(mode="before")(load_spec_plugins)  # before any name is looked up
    _expand_recipe = model_validator(mode="before")(
        lambda data: (
            expand_recipe(
                data,
                DataSpec.model_fields["batch_size"].default,
                TrainSpec.model_fields["epochs"].default,
            )
            if isinstance(data, dict)
            else data
        )
    )
    _normalise_surgery = model_validator(mode="before")(
        lambda data: (
            {**data, "surgery": _surgery_list(data["surgery"])}
            if isinstance(data, dict) and "surgery" in data
            else data
        )
    )

    @model_validator(mode="after")
    def _resolve(self) -> Spec:
        """The method's checks and defaults, then every other default that depends on another field."""
        if self.student.arch is None:
            raise ValueError("student.arch: required (a torchvision model such as resnet18)")
        self._check_task_fits()
        self._check_fixed_input()
        METHODS.get(self.method).resolve(self)
        o = self.optim
        o.importance_lr = o.importance_lr if o.importance_lr is not None else o.lr / 10
        o.quantizer_lr = o.quantizer_lr if o.quantizer_lr is not None else o.lr
        o.adapter_lr = o.adapter_lr if o.adapter_lr is not None else o.lr
        return self

    @property
    def resolved_task(self) -> str:
        """``task``, or the task whose builders include the student's (left unwritten in the spec, so
        that runs trained before tasks were named keep their identity)."""
        from cmtkd_graph.tasks import task_of_model

        return self.task or task_of_model(self.student.arch) or "classification"

    def _check_task_fits(self) -> None:
        """Every network's builder and the dataset belong to the spec's task."""
        from cmtkd_graph.tasks import task_of_model

        task = self.resolved_task
        models = self._networks()
        problems = [  # a teacher that inherits the student's arch is not named again
            f"{where}.arch: {m.arch} is a {task_of_model(m.arch)} model; the spec's task is {task}"
            for where, m in models
            if task_of_model(m.arch) != task and (where == "student" or m.arch != self.student.arch)
        ]
        record = TASKS.get(task)
        problems += [
            f"{where}.kwargs.{problem}"
            for where, m in models
            if (problem := record.kwargs_problem(m.arch, m.kwargs or {})) is not None
        ]
        method = METHODS.get(self.method)
        if record.methods is not None and self.method not in record.methods:
            problems.append(
                f"method: {task} trains with {' or '.join(record.methods)} ({record.methods_reason}), "
                f"not {self.method}"
            )
        elif method.tasks is not None and task not in method.tasks:
            problems.append(
                f"method: {self.method} is for {', '.join(method.tasks)} ({method.tasks_reason}); the spec's "
                f"task is {task}: use {', '.join(m for m in METHODS if METHODS.get(m).tasks is None)}"
            )
        if task != "classification" and not self.data.augment.is_plain():
            problems.append(
                "data.augment: policy, random_erasing, mixup_alpha and cutmix_alpha are for classification; "
                f"the spec's task is {task}"
            )
        problems += record.spec_problems(self)
        data_task = DATASETS.get(self.data.dataset).task
        if data_task != task:
            problems.append(
                f"data.dataset: {self.data.dataset} holds {data_task} data; the spec's task is {task}"
            )
        if problems:
            raise ValueError("\n".join(problems))

    def _networks(self) -> list[tuple[str, ModelSpec]]:
        """(where the spec writes it, the network as built) of the student and each teacher (a teacher
        takes the student's arch and kwargs where it gives none: ``resolved_teachers``)."""
        teachers = enumerate(self.resolved_teachers())
        return [("student", self.student), *((f"teachers[{i}]", t) for i, t in teachers)]

    def _check_fixed_input(self) -> None:
        """A builder that runs on one input size only (ViT, MaxViT, MViT) gets it (its family's fact), so
        that the mismatch is one line here rather than an assertion deep inside a traced graph."""
        from cmtkd_graph.models.facts import family_of

        given = tuple(self.data.input_shape()[1:])
        for where, m in self._networks():
            rule = family_of(m.arch).fixed_input
            if rule is None:
                continue
            needed = rule.for_kwargs(m.kwargs or {})
            if given == needed:
                continue
            fix = f"data.image_size: {needed[-1]}" if needed[-1] == needed[-2] else "square inputs"
            if len(needed) == 3:
                fix = f"data.frames: {needed[0]} and {fix}"
            if rule.kwarg:
                fix += f", or build it for your size with {where}.kwargs.{rule.kwarg} ({rule.kwarg_rule})"
            size, got = "x".join(map(str, needed)), "x".join(map(str, given))
            raise ValueError(
                f"{where}.arch: {m.arch} runs on {'clips' if len(needed) == 3 else 'images'} of {size} only "
                f"({rule.reason}), not {got}: set {fix}"
            )

    def resolved_teachers(self) -> list[ModelSpec]:
        """Teachers with the student's arch/kwargs/surgery filled in where they give none."""
        out = []
        for t in self.teachers:
            out.append(
                t.model_copy(
                    update={
                        "arch": t.arch or self.student.arch,
                        "kwargs": t.kwargs if t.kwargs is not None else self.student.kwargs,
                    }
                )
            )
        return out

    def surgery_for(self, model: ModelSpec) -> list[SurgerySpec]:
        return model.surgery if model.surgery is not None else self.surgery

    @property
    def run_dir(self) -> str:
        return self.train.output_dir.replace("{name}", self.name)
