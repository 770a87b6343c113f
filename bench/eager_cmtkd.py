"""CMT-KD written by hand, in plain eager PyTorch: the baseline the composed system is timed against.

No torch.fx, no passes, no method plug-in: torchvision-shaped modules split into stages at the taps, the
teachers run stage by stage with the importance-weighted shared knowledge fed to each teacher's next
stage, and the loss of docs/methods.md#cmtkd written out (alpha (CE_T + CE_S) + beta (KL_T + KL_S) with the
KDCL-MinLogit target + gamma sum of attention-transfer distances). Quantized layers carry their input
quantizer as the child ``input_quantizer``, the name the quantize pass gives it, so the composed
system's state dict loads into these modules key for key (``load_from_system``).

Only what ``bench/step.py`` needs: resnet18 with the CIFAR stem and AlexNet with BatchNorm after every
layer (the paper's two CIFAR models), and vit_b_16 on 32x32 images (a network of linear layers and
self-attention), HWGQ or no quantizers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cmtkd_graph.quantizers import QuantizerFamily
from cmtkd_graph.quantizers.attention import QuantMultiheadAttention
from cmtkd_graph.quantizers.layers import QuantConv2d, QuantLinear


class InputQuantConv2d(QuantConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class InputQuantLinear(QuantLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(x))


class InputQuantSelfAttention(QuantMultiheadAttention):
    """Self-attention whose one input (query = key = value) is quantized first."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **options):
        x = self.input_quantizer(query)
        return super().forward(x, x, x, **options)


def quantize_eagerly(
    model: nn.Module, family: QuantizerFamily | None, bits: int, keep_float: set[str], *, signed: bool = False
) -> nn.Module:
    """Every conv/linear/self-attention but ``keep_float`` computes with ``bits``-bit weights and
    ``bits``-bit inputs, unsigned (resnet18, AlexNet: every input follows a ReLU) or signed (ViT: layer
    norm and GELU outputs); in place."""
    if family is None or bits >= 32:
        return model
    for name, layer in list(model.named_modules()):
        if name in keep_float or type(layer) not in (nn.Conv2d, nn.Linear, nn.MultiheadAttention):
            continue
        if isinstance(layer, nn.MultiheadAttention):
            twin = InputQuantSelfAttention.from_float(layer, family, weight_bits=bits, act_bits=bits)
        else:
            cls = InputQuantConv2d if isinstance(layer, nn.Conv2d) else InputQuantLinear
            twin = cls.from_float(layer, family.weight(bits))
        twin.input_quantizer = family.activation(bits, signed=signed)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


class StagedNet(nn.Module):
    """A network as ``stages`` (each ends at a tap) and a ``head`` (after the last tap, to the logits)."""

    def __init__(self, model: nn.Module, stages: list[list[str]], head: list[str]):
        super().__init__()
        self.model = model
        self.stage_names, self.head_names = stages, head

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            step = STEPS.get(name)
            x = step(self.model, x) if step else self.model.get_submodule(name)(x)
        return x

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.stage_names[i], x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.head_names, x)


def resnet18_cifar(num_classes: int) -> tuple[nn.Module, list[list[str]], list[str]]:
    """torchvision resnet18 with the CIFAR stem; taps at the end of layer1..layer4."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    stages = [["conv1", "bn1", "relu", "maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    return model, stages, ["avgpool", "flatten", "fc"]


def alexnet_bn(num_classes: int) -> tuple[nn.Module, list[list[str]], list[str]]:
    """torchvision's AlexNet with BatchNorm after every conv/linear but the last (named ``<layer>_bn``
    as the ``bn_after_every_layer`` surgery names them); taps at the ReLUs before the max-pools."""
    ref = torchvision.models.alexnet(num_classes=num_classes)
    features: list[tuple[str, nn.Module]] = []
    for name, layer in ref.features.named_children():
        features.append((name, layer))
        if isinstance(layer, nn.Conv2d):
            features.append((f"{name}_bn", nn.BatchNorm2d(layer.out_channels)))
    classifier: list[tuple[str, nn.Module]] = []
    for name, layer in ref.classifier.named_children():
        classifier.append((name, layer))
        if isinstance(layer, nn.Linear) and layer.out_features != num_classes:
            classifier.append((f"{name}_bn", nn.BatchNorm1d(layer.out_features)))
    model = nn.Module()
    model.features = nn.Sequential(OrderedDict(features))
    model.avgpool = ref.avgpool
    model.classifier = nn.Sequential(OrderedDict(classifier))
    f = [n for n, _ in features]
    cut = [f.index("1") + 1, f.index("4") + 1, f.index("11") + 1]
    stages = [[f"features.{n}" for n in f[a:b]] for a, b in zip([0, *cut[:-1]], cut, strict=True)]
    head = [f"features.{n}" for n in f[cut[-1] :]] + ["avgpool", "flatten"]
    head += [f"classifier.{n}" for n, _ in classifier]
    return model, stages, head


# What is not a submodule call: ViT's patches to tokens with the class token and position embedding
# (VisionTransformer.forward before its encoder's layers), and reading the class token.
def _vit_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model._process_input(x)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return model.encoder.dropout(x + model.encoder.pos_embedding)


STEPS = {
    "flatten": lambda _model, x: torch.flatten(x, 1),
    "vit_tokens": _vit_tokens,
    "class_token": lambda _model, x: x[:, 0],
}
VIT_KWARGS = {"image_size": 32}
"""``vit_b_16`` on 32x32 images: 2x2 patches and the class token, 5 tokens of width 768 through 12 blocks
(its builder fixes the patch size and the depth; the image size is the kwarg it leaves free)."""


def vit_b_16_32(num_classes: int) -> tuple[nn.Module, list[list[str]], list[str]]:
    """torchvision's vit_b_16 at :data:`VIT_KWARGS`; taps as ``auto`` puts them: after the blocks at 1/4,
    1/2, 3/4 and all of its depth (3, 6, 9, 12)."""
    model = torchvision.models.vit_b_16(num_classes=num_classes, **VIT_KWARGS)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(len(model.encoder.layers))]
    stages = [["vit_tokens", *blocks[:3]], blocks[3:6], blocks[6:9], blocks[9:]]
    return model, stages, ["encoder.ln", "class_token", "heads"]


MODELS = {"resnet18": resnet18_cifar, "alexnet": alexnet_bn, "vit": vit_b_16_32}


LAYERS_KEPT_FLOAT = {"vit": ("conv_proj", "heads.head")}  # the first and last layer, where not a stage's


class EagerCMTKD(nn.Module):
    """Student + K teachers + importance logits; ``loss(images, labels)`` is one CMT-KD objective."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        family: QuantizerFamily | None,
        student_bits: int,
        teacher_bits: list[int],
        *,
        alpha: float = 1.0,
        beta: float = 0.5,
        gamma: float = 100.0,
        tau: float = 2.0,
    ):
        super().__init__()

        def network(bits: int) -> StagedNet:
            model, stages, head = MODELS[arch](num_classes)
            first, last = LAYERS_KEPT_FLOAT.get(arch) or (stages[0][0], head[-1])
            quantized = quantize_eagerly(model, family, bits, {first, last}, signed=arch == "vit")
            return StagedNet(quantized, stages, head)

        self.student = network(student_bits)
        self.teachers = nn.ModuleList(network(b) for b in teacher_bits)
        taps = len(self.student.stage_names)
        self.importance = nn.Parameter(torch.zeros(taps, len(teacher_bits)))
        self.output_importance = nn.Parameter(torch.zeros(len(teacher_bits)))
        self.alpha, self.beta, self.gamma, self.tau = alpha, beta, gamma, tau

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        student_features, h = [], images
        for i in range(len(self.student.stage_names)):
            h = self.student.stage(i, h)
            student_features.append(h)
        student_logits = self.student.head(h)

        shared, inputs = [], [images] * len(self.teachers)
        for i in range(len(self.student.stage_names)):
            features = [t.stage(i, x) for t, x in zip(self.teachers, inputs, strict=True)]
            w = torch.softmax(self.importance[i], dim=0)
            fused = sum(f * w[k] for k, f in enumerate(features))
            shared.append(fused)
            inputs = [fused] * len(self.teachers)
        each = [t.head(fused) for t in self.teachers]
        w = torch.softmax(self.output_importance, dim=0)
        teacher_logits = sum(z * w[k] for k, z in enumerate(each))

        ce = F.cross_entropy(teacher_logits.float(), labels) + F.cross_entropy(student_logits.float(), labels)
        with torch.no_grad():  # KDCL-MinLogit: shift each network's target logit to 0, take the minimum
            index = labels.unsqueeze(1)
            zt, zs = teacher_logits.float(), student_logits.float()
            target = torch.minimum(zt - zt.gather(1, index), zs - zs.gather(1, index))
        kl = self._soft_kl(target, student_logits) + self._soft_kl(target, teacher_logits)
        pairs = zip(shared, student_features, strict=True)
        at = sum((self._attention(f) - self._attention(s)).pow(2).mean() for f, s in pairs)
        return self.alpha * ce + self.beta * kl + self.gamma * at

    def _soft_kl(self, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = F.log_softmax(target / self.tau, dim=1)
        q = F.log_softmax(logits.float() / self.tau, dim=1)
        return self.tau**2 * F.kl_div(q, p, reduction="batchmean", log_target=True)

    @staticmethod
    def _attention(feature: torch.Tensor) -> torch.Tensor:
        channels = 2 if feature.dim() == 3 else 1  # tokens [B, N, D], maps [B, C, H, W]
        return F.normalize(feature.float().pow(2).mean(dim=channels).flatten(1), dim=1)

    @torch.no_grad()
    def load_from_system(self, system) -> None:
        """Copy every weight, buffer, quantizer state and importance logit of a composed CMT-KD system."""
        self.student.model.load_state_dict(system.student.state_dict(), strict=True)
        composed = system.teachers
        for k, teacher in enumerate(self.teachers):
            teacher.model.load_state_dict(composed.get_submodule(f"teacher{k}").state_dict(), strict=True)
        fusions = [m for name, m in composed.get_submodule("fusion").named_children() if name != "output"]
        for i, fusion in enumerate(fusions):
            self.importance[i].copy_(fusion.logits)
        self.output_importance.copy_(composed.get_submodule("fusion.output").logits)
