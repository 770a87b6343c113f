"""Quantized attention: ViT's nn.MultiheadAttention and Swin's (shifted) window attention projections."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from cmtkd_graph.passes.activations import explicit_activations
from cmtkd_graph.passes.common import META
from cmtkd_graph.passes.outputs import keep_main_output
from cmtkd_graph.passes.quantize import quantize
from cmtkd_graph.passes.shapes import propagate_shapes
from cmtkd_graph.passes.taps import resolve_taps
from cmtkd_graph.passes.tracer import trace
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

from cmtkd_graph.errors import UserError
from cmtkd_graph.quantizers import Quantizer, QuantLinear, build_quantizer_family
from cmtkd_graph.quantizers.attention import (
    QuantMultiheadAttention,
    QuantShiftedWindowAttention,
    QuantShiftedWindowAttention3d,
    QuantShiftedWindowAttentionV2,
    quantize_attention,
)

HWGQ = build_quantizer_family("hwgq")
LSQ = build_quantizer_family("lsq")
ARCHS = {"vit_b_16": {"image_size": 32}, "swin_t": {}}


# ---------------------------------------------------------------- the modules alone


def small_attention(kind: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict]:
    """A small float attention module and inputs that exercise its code paths (Swin: padding, shift)."""
    torch.manual_seed(0)
    if kind == "mha":
        x = torch.randn(2, 5, 16)
        return nn.MultiheadAttention(16, 4, batch_first=True), (x, x, x), {"need_weights": False}
    if kind.startswith("swin3d"):  # Video Swin: [B, T, H, W, C]; the small map is under one window
        attn = ShiftedWindowAttention3d(16, [2, 4, 4], [1, 2, 2], 4)
        nn.init.normal_(attn.relative_position_bias_table)
        size = (1, 3, 9) if kind == "swin3d_short" else (5, 10, 9)  # shrunk windows in T and H
        return attn, (torch.randn(2, *size, 16),), {}
    cls = ShiftedWindowAttention if kind == "swin" else ShiftedWindowAttentionV2
    attn = cls(16, [4, 4], [2, 2], 4)
    nn.init.normal_(attn.qkv.bias)  # v2 must ignore the key part of the bias in forward
    return attn, (torch.randn(2, 10, 9, 16),), {}


def first_output(y):
    return y[0] if isinstance(y, tuple) else y


def projection_weights(module: nn.Module) -> dict[str, str]:
    """Projection weight name -> name of its quantizer."""
    if isinstance(module, nn.MultiheadAttention):
        return {"in_proj_weight": "in_proj_weight_quantizer", "out_proj.weight": "out_proj.weight_quantizer"}
    return {"qkv.weight": "qkv.weight_quantizer", "proj.weight": "proj.weight_quantizer"}


KINDS = ["mha", "swin", "swin_v2", "swin3d", "swin3d_short"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [True, False])
def test_identity_quantizers_give_torchvisions_output(kind, train):
    attn, args, kwargs = small_attention(kind)
    quant = quantize_attention(attn, LSQ, weight_bits=2, act_bits=2)
    for name, child in list(quant.named_modules()):
        if isinstance(child, Quantizer):
            parent, _, attr = name.rpartition(".")
            setattr(quant.get_submodule(parent), attr, nn.Identity())
    attn.train(train)
    quant.train(train)
    expected = first_output(attn(*args, **kwargs))
    torch.testing.assert_close(first_output(quant(*args, **kwargs)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_are_the_ones_used(kind):
    attn, args, kwargs = small_attention(kind)
    quant = quantize_attention(attn, HWGQ, weight_bits=2, act_bits=32)
    reference = copy.deepcopy(attn)
    with torch.no_grad():
        for name, quantizer_name in projection_weights(attn).items():
            quantizer = quant.get_submodule(quantizer_name)
            weight = attn.get_parameter(name)
            assert len(torch.unique(quantizer(weight))) == 4  # really 2-bit: a quantizer, not an identity
            reference.get_parameter(name).copy_(quantizer(weight))
    expected = first_output(reference(*args, **kwargs))
    torch.testing.assert_close(first_output(quant(*args, **kwargs)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_output_is_quantized_signed_before_the_output_projection(kind):
    attn, args, kwargs = small_attention(kind)
    quant = quantize_attention(attn, HWGQ, weight_bits=32, act_bits=2)
    proj = quant.out_proj if kind == "mha" else quant.proj
    seen = []
    proj.input_quantizer.register_forward_hook(lambda _m, _inp, out: seen.append(out))
    y = first_output(quant(*args, **kwargs))
    (quantized,) = seen
    assert len(torch.unique(quantized)) <= 4 and (quantized < 0).any()
    projected = nn.functional.linear(quantized, proj.weight, proj.bias)
    if kind == "mha":
        torch.testing.assert_close(y, projected, rtol=0, atol=1e-6)
    else:  # the same numbers, in windows
        assert torch.isin(y.flatten(), projected.flatten()).all()


@pytest.mark.parametrize(
    "kind, cls, quantizers",
    [
        ("mha", QuantMultiheadAttention, ["in_proj_weight_quantizer", "out_proj"]),
        ("swin", QuantShiftedWindowAttention, ["qkv.weight_quantizer", "proj"]),
        ("swin_v2", QuantShiftedWindowAttentionV2, ["qkv.weight_quantizer", "proj"]),
        ("swin3d", QuantShiftedWindowAttention3d, ["qkv.weight_quantizer", "proj"]),
    ],
)
def test_twins_share_tensors_and_names(kind, cls, quantizers):
    attn, _, _ = small_attention(kind)
    quant = quantize_attention(attn, LSQ, weight_bits=4, act_bits=4)
    assert type(quant) is cls
    state = quant.state_dict(keep_vars=True)
    for name, tensor in attn.state_dict(keep_vars=True).items():
        assert state[name] is tensor  # the very tensor, under the same name
    first, out = quantizers
    added = {k.rpartition(".")[0] for k in state if k not in attn.state_dict()}
    assert added == {first, f"{out}.weight_quantizer", f"{out}.input_quantizer"}
    assert quant.get_submodule(f"{out}.input_quantizer").signed


def test_unsupported_configurations_are_errors():
    with pytest.raises(UserError, match="batch_first=False"):
        quantize_attention(nn.MultiheadAttention(8, 2), LSQ, weight_bits=2, act_bits=2)
    quant = quantize_attention(nn.MultiheadAttention(8, 2, batch_first=True), LSQ, weight_bits=2, act_bits=2)
    x, other = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(UserError, match="need_weights=False"):
        quant(x, x, x)
    with pytest.raises(UserError, match="self-attention"):
        quant(x, other, other, need_weights=False)


# ---------------------------------------------------------------- whole torchvision models


@pytest.fixture(scope="module")
def float_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {arch: torchvision.models.get_model(arch, **kwargs) for arch, kwargs in ARCHS.items()}
    nn.init.normal_(models["vit_b_16"].heads.head.weight, std=0.02)  # zero-initialised: no gradient upstream
    return models


def rewritten(model: nn.Module) -> torch.fx.GraphModule:
    return explicit_activations(keep_main_output(trace(model, train=True)))


def weight_quantizers(gm: nn.Module) -> list[str]:
    return [n for n, m in gm.named_modules() if isinstance(m, Quantizer) and "weight_quantizer" in n]


@pytest.mark.parametrize("family", [HWGQ, LSQ], ids=["hwgq", "lsq"])
def test_vit_projections_are_quantized(float_models, family):
    gm = quantize(rewritten(float_models["vit_b_16"]), family, weight_bits=2, act_bits=2)
    attention = [n for n, m in gm.named_modules() if isinstance(m, QuantMultiheadAttention)]
    assert len(attention) == 12
    assert sum(isinstance(m, QuantLinear) for m in gm.modules()) == 24  # the MLPs
    names = weight_quantizers(gm)
    assert sum(n.endswith("in_proj_weight_quantizer") for n in names) == 12
    assert sum(n.endswith("out_proj.weight_quantizer") for n in names) == 12
    assert len(names) == 48
    assert type(gm.conv_proj) is nn.Conv2d and type(gm.get_submodule("heads.head")) is nn.Linear
    # one signed input quantizer node feeds query, key and value
    node = gm.graph.find_nodes(op="call_module", target="encoder.layers.encoder_layer_0.self_attention")[0]
    source = node.args[0]
    assert node.args == (source, source, source) and source.meta[META]["signed"]
    assert source.target == "encoder.layers.encoder_layer_0.self_attention.input_quantizer"


@pytest.mark.parametrize("family", [HWGQ, LSQ], ids=["hwgq", "lsq"])
def test_swin_projections_are_quantized_and_taps_resolve(float_models, family):
    gm = quantize(rewritten(float_models["swin_t"]), family, weight_bits=2, act_bits=2)
    assert sum(isinstance(m, QuantShiftedWindowAttention) for m in gm.modules()) == 12
    assert sum(isinstance(m, QuantLinear) for m in gm.modules()) == 27  # 24 MLP + 3 patch merging
    names = weight_quantizers(gm)
    assert sum(n.endswith(("attn.qkv.weight_quantizer", "attn.proj.weight_quantizer")) for n in names) == 24
    assert len(names) == 51
    assert type(gm.get_submodule("features.0.0")) is nn.Conv2d and type(gm.head) is nn.Linear
    propagate_shapes(gm, (1, 3, 32, 32))
    taps = resolve_taps(gm, "auto", arch="swin_t")
    assert [t.node for t in taps] == [f"features.{i}.{b}.add_1" for i, b in [(1, 1), (3, 1), (5, 5), (7, 1)]]
    assert [t.shape for t in taps] == [(96, 8, 8), (192, 4, 4), (384, 2, 2), (768, 1, 1)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", [HWGQ, LSQ], ids=["hwgq", "lsq"])
def test_w2a2_forward_backward(float_models, arch, family):
    gm = quantize(rewritten(float_models[arch]), family, weight_bits=2, act_bits=2)
    gm.zero_grad(set_to_none=True)
    y = gm(torch.randn(2, 3, 32, 32))
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    first_projection = (
        gm.get_submodule("encoder.layers.encoder_layer_0.self_attention").in_proj_weight
        if arch == "vit_b_16"
        else gm.get_submodule("features.1.0.attn.qkv").weight
    )
    grad = first_projection.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_state_dict_loads(float_models, arch):
    gm = quantize(rewritten(copy.deepcopy(float_models[arch])), LSQ, weight_bits=2, act_bits=2)
    reference = {k: v + 1 if v.is_floating_point() else v for k, v in float_models[arch].state_dict().items()}
    result = gm.load_state_dict(reference, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("quantizer" in k for k in result.missing_keys)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in reference.items())


def test_swin_v2_projections_are_quantized():
    with torch.device("meta"):  # structure only
        gm = quantize(rewritten(torchvision.models.swin_v2_t()), HWGQ, weight_bits=2, act_bits=2)
    assert sum(isinstance(m, QuantShiftedWindowAttentionV2) for m in gm.modules()) == 12
    assert len(weight_quantizers(gm)) == 51
    assert type(gm.get_submodule("features.1.0.attn.cpb_mlp.2")) is nn.Linear  # the position-bias MLP


@pytest.mark.parametrize("train", [True, False])
def test_all_32_bit_swin_is_bit_identical(float_models, train):  # (ViT: tests/test_passes.py)
    model = float_models["swin_t"]
    gm = quantize(rewritten(model), LSQ, weight_bits=32, act_bits=32)
    assert not any(type(m).__module__.startswith("cmtkd_graph.quantizers") for m in gm.modules())
    x = torch.randn(2, 3, 32, 32)
    model.train(train)
    gm.train(train)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(gm(x), expected)
