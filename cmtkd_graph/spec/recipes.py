"""Training recipes by name (the spec's ``recipe:``): torchvision's classification reference settings per
family, as far as the spec can express them.

Source: torchvision's ``references/classification/README.md`` (the command line each family's weights
were trained with) and ``train.py``'s defaults (``--lr-warmup-decay`` 0.01, ``--model-ema-steps`` 32,
``--model-ema-decay`` 0.99998, SGD momentum 0.9, AdamW's default betas). A recipe fills the keys the spec
leaves unset (the spec's own values, ``--set`` included, win), so the saved ``spec.yaml`` says exactly
what ran. Two values follow the run rather than the recipe's 8-GPU setting, as the reference itself
does or asks: the learning rate is scaled linearly from the recipe's total batch to ``data.batch_size``
("the learning rate should be scaled accordingly"), and the EMA decay is adjusted to the batch and the
number of epochs with ``train.py``'s own formula (``1 - min(1, (1 - decay) x batch x steps / epochs)``).

What a recipe does not carry (the spec has no such setting): training and evaluation crop sizes,
repeated-augmentation sampling (``--ra-sampler``), separate bias and embedding weight decay, bicubic
interpolation, ``--policy-magnitude``, the epoch count (``train.epochs`` stays the spec's: the
references train 100-600 epochs on ImageNet) and mixed precision. ``weight_decay_low_bits`` (the paper's
decay for 1-2-bit networks) is left as it is; the recipe sets the other networks' ``weight_decay``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EMA_STEPS = 32
EMA_DECAY = 0.99998


@dataclass(frozen=True)
class Recipe:
    """One family's reference settings: dotted spec keys -> values, with the lr given at ``batch``."""

    models: str  # the torchvision builders the reference trained with it
    lr: float
    batch: int  # the reference's total batch (8 GPUs x per-GPU batch)
    settings: dict[str, Any] = field(default_factory=dict)
    ema: bool = True


_MIXED = {
    "data.augment.mixup_alpha": 0.2,
    "data.augment.cutmix_alpha": 1.0,
    "distill.label_smoothing": 0.1,
}

_SGD_TRIVIAL_AUGMENT = {  # EfficientNetV2's and ShuffleNetV2's (the same command but for the lr)
    "optim.name": "sgd",
    "optim.weight_decay": 2e-5,
    "optim.norm_weight_decay": 0.0,
    "optim.schedule": {"name": "cosine", "warmup_epochs": 5.0, "warmup_start_factor": 0.01},
    "data.augment.policy": "trivialaugment_wide",
    "data.augment.random_erasing": 0.1,
    **_MIXED,
}

RECIPES: dict[str, Recipe] = {
    "torchvision_convnext": Recipe(
        "convnext_tiny/small/base/large",
        1e-3,
        8 * 128,
        {
            "optim.name": "adamw",
            "optim.weight_decay": 0.05,
            "optim.norm_weight_decay": 0.0,
            "optim.schedule": {"name": "cosine", "warmup_epochs": 5.0, "warmup_start_factor": 0.01},
            "data.augment.policy": "trivialaugment_wide",
            "data.augment.random_erasing": 0.1,
            **_MIXED,
        },
    ),
    "torchvision_swin": Recipe(
        "swin_t/s/b",
        1e-3,
        8 * 128,
        {
            "optim.name": "adamw",
            "optim.weight_decay": 0.05,
            "optim.norm_weight_decay": 0.0,
            "optim.grad_clip": 5.0,
            "optim.schedule": {
                "name": "cosine",
                "min_lr": 1e-5,
                "warmup_epochs": 20.0,
                "warmup_start_factor": 0.01,
            },
            "data.augment.policy": "trivialaugment_wide",
            "data.augment.random_erasing": 0.25,
            **_MIXED,
            "data.augment.mixup_alpha": 0.8,
        },
    ),
    "torchvision_vit": Recipe(
        "vit_b_16 (vit_b_32 used the autoaugment policy)",
        3e-3,
        8 * 512,
        {
            "optim.name": "adamw",
            "optim.weight_decay": 0.3,
            "optim.grad_clip": 1.0,
            "optim.schedule": {"name": "cosine", "warmup_epochs": 30.0, "warmup_start_factor": 0.033},
            "data.augment.policy": "randaugment",
            **_MIXED,
            "distill.label_smoothing": 0.11,
        },
    ),
    "torchvision_regnet": Recipe(
        "regnet_x/y_400mf, 800mf, 1_6gf (the small models)",
        0.8,
        8 * 128,
        {
            "optim.name": "sgd",
            "optim.weight_decay": 5e-5,
            "optim.schedule": {"name": "cosine", "warmup_epochs": 5.0, "warmup_start_factor": 0.1},
        },
        ema=False,
    ),
    "torchvision_efficientnet_v2": Recipe(
        "efficientnet_v2_s/m",
        0.5,
        8 * 128,
        _SGD_TRIVIAL_AUGMENT,
    ),
    "torchvision_shufflenet_v2": Recipe(
        "shufflenet_v2_x1_5/x2_0",
        0.5,
        8 * 128,
        _SGD_TRIVIAL_AUGMENT,
    ),
}


def expand_recipe(raw: dict[str, Any], batch_default: int, epochs_default: int) -> dict[str, Any]:
    """``raw`` (a spec mapping) with its recipe's settings under every key it leaves unset; unchanged
    without ``recipe``. ``batch_default`` / ``epochs_default``: the schema's, where ``raw`` gives none."""
    name = raw.get("recipe")
    if name is None:
        return raw
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    batch = _get(out, "data.batch_size", batch_default)
    epochs = _get(out, "train.epochs", epochs_default)
    settings = {**recipe.settings, "optim.lr": recipe.lr * batch / recipe.batch}
    if recipe.ema:
        alpha = min(1.0, (1 - EMA_DECAY) * batch * EMA_STEPS / epochs)
        settings["train.ema"] = {"decay": 1 - alpha, "every": EMA_STEPS}
    for key, value in settings.items():
        _set_default(out, key, value)
    return out


def _get(raw: dict, dotted: str, default: Any) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def _set_default(raw: dict, dotted: str, value: Any) -> None:
    """Set ``dotted`` in ``raw`` unless given; a mapping value fills its own unset keys."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            return  # the spec gives something else there: its own error, not the recipe's
        node[part] = child = dict(child)
        node = child
    if node.get(last) is None:
        node[last] = value
    elif isinstance(value, dict) and isinstance(node[last], dict):
        node[last] = {**value, **node[last]}


__all__ = ["RECIPES", "Recipe", "expand_recipe"]
