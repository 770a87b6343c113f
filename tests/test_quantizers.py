"""Quantizer families and quantized layers: level sets, step tables, STE gradients, state, devices."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, special
from torch import fx, nn

from cmtkd_graph.errors import SpecError
from cmtkd_graph.quantizers import (
    QUANTIZERS,
    QuantConv2d,
    QuantConv3d,
    Quantizer,
    QuantLinear,
    build_quantizer_family,
)
from cmtkd_graph.quantizers.dorefa import DoReFaActivationQuantizer, DoReFaWeightQuantizer
from cmtkd_graph.quantizers.hwgq import (
    HALF_WAVE_STEP,
    MID_RISE_STEP,
    ChannelBinaryWeightQuantizer,
    HalfWaveQuantizer,
    MidRiseWeightQuantizer,
    SignedMidRiseQuantizer,
)
from cmtkd_graph.quantizers.lsq import LSQQuantizer
from cmtkd_graph.quantizers.pact import PACTQuantizer

BITS = range(1, 9)
DENSE = 200_001


def levels(y: torch.Tensor) -> torch.Tensor:
    return torch.unique(y.detach())


# ---------------------------------------------------------------------------------------------
# Step tables: re-derived as MSE-optimal uniform steps for a unit Gaussian.
# ---------------------------------------------------------------------------------------------


def _cells_mse(a: np.ndarray, b: np.ndarray, level: np.ndarray) -> float:
    """Sum over cells of the integral over a < x < b of (x - level)^2 phi(x) dx (truncated moments)."""
    m0 = special.ndtr(b) - special.ndtr(a)
    pdf = lambda t: np.exp(-np.square(t) / 2) / math.sqrt(2 * math.pi)  # 0 at +-inf
    x_pdf = lambda t: np.where(np.isinf(t), 0.0, np.nan_to_num(t) * pdf(t))
    m1 = pdf(a) - pdf(b)
    m2 = m0 + x_pdf(a) - x_pdf(b)
    return float(np.sum(m2 - 2 * level * m1 + level**2 * m0))


def half_wave_mse(s: float, bits: int) -> float:
    """E[(Q(x) - x)^2; x > 0], Q = nearest of the NON-zero levels {s, ..., (2^b - 1)s} (Caffe HWGQ).

    x <= 0 is mapped to 0 exactly and adds nothing; dividing by P(x > 0) = 1/2 would not move the
    minimum. At 1 bit every x > 0 goes to s, so the optimum is E[x | x > 0] = sqrt(2/pi).
    """
    k = np.arange(1, 2**bits)
    lower = np.where(k == 1, 0.0, (k - 0.5) * s)
    upper = np.where(k == k[-1], np.inf, (k + 0.5) * s)
    return _cells_mse(lower, upper, k * s)


def mid_rise_mse(g: float, bits: int) -> float:
    """E[(Q(x) - x)^2] for x ~ N(0, 1), Q = nearest of the 2^b levels +-(k - 1/2) g (by symmetry 2x the
    positive half)."""
    k = np.arange(1, 2 ** (bits - 1) + 1)
    upper = np.where(k == k[-1], np.inf, k * g)
    return 2 * _cells_mse((k - 1) * g, upper, (k - 0.5) * g)


def optimal_step(mse, bits: int) -> float:
    """Global grid search, then a bounded scalar minimisation around the best grid point."""
    grid = np.linspace(1e-3, 3.0, 3000)
    best = int(np.argmin([mse(s, bits) for s in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    return optimize.minimize_scalar(
        lambda s: mse(s, bits), bounds=(lo, hi), method="bounded", options={"xatol": 1e-9}
    ).x


@pytest.mark.parametrize("bits", BITS)
def test_half_wave_table_is_mse_optimal(bits):
    # The table holds the 4-decimal rounding of the optimum (stricter than the 1e-3 asked for).
    assert abs(optimal_step(half_wave_mse, bits) - HALF_WAVE_STEP[bits]) <= 0.5e-4 + 1e-7


@pytest.mark.parametrize("bits", BITS)
def test_mid_rise_table_is_mse_optimal(bits):
    assert abs(optimal_step(mid_rise_mse, bits) - MID_RISE_STEP[bits]) <= 0.5e-4 + 1e-7


def test_one_bit_steps_have_closed_forms():
    assert HALF_WAVE_STEP[1] == pytest.approx(math.sqrt(2 / math.pi), abs=1e-4)
    assert MID_RISE_STEP[1] == pytest.approx(2 * math.sqrt(2 / math.pi), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Level sets on a dense linspace, bits 1..8.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_hwgq_activation_levels(bits):
    q = HalfWaveQuantizer(bits)
    s = HALF_WAVE_STEP[bits]
    x = torch.linspace(-8, 8, DENSE)
    got = levels(q(x))
    assert len(got) == 2**bits
    assert torch.equal(got, torch.arange(2**bits, dtype=torch.float32) * s)
    torch.testing.assert_close(got.diff(), torch.full((2**bits - 1,), s), rtol=1e-5, atol=1e-6)
    # round to nearest: just below s/2 goes to 0, just above to s
    assert q(torch.tensor([0.49 * s, 0.51 * s])).tolist() == pytest.approx([0.0, s])


@pytest.mark.parametrize("bits", BITS)
def test_hwgq_caffe_rounding_never_maps_positive_to_zero(bits):
    q = build_quantizer_family("hwgq", {"caffe_rounding": True}).activation(bits, signed=False)
    assert isinstance(q, HalfWaveQuantizer) and q.caffe_rounding
    s = HALF_WAVE_STEP[bits]
    x = torch.cat([torch.linspace(-8, 8, DENSE), torch.tensor([1e-30, 1e-7, 0.0, -1e-7])])
    y = q(x)
    assert bool((y[x > 0] > 0).all())
    assert bool((y[x <= 0] == 0).all())
    assert torch.equal(levels(y), torch.arange(2**bits, dtype=torch.float32) * s)
    # positive inputs go to the nearest non-zero level: below 1.5 s -> s
    assert q(torch.tensor([0.01 * s, 1.49 * s])).tolist() == pytest.approx([s, s])


def _wide_weight() -> torch.Tensor:
    """A dense ramp padded with zeros, so std(W) is small enough for every level to be reached."""
    ramp = torch.linspace(-5, 5, DENSE)
    return torch.cat([ramp, torch.zeros(8 * DENSE)]).reshape(9, DENSE)


@pytest.mark.parametrize("bits", range(2, 9))
def test_hwgq_weight_levels(bits):
    w = _wide_weight()
    t = MID_RISE_STEP[bits] * w.std()
    got = levels(MidRiseWeightQuantizer(bits)(w))
    assert len(got) == 2**bits
    assert bool((got != 0).all())
    torch.testing.assert_close(got, -got.flip(0))
    torch.testing.assert_close(got.diff(), t.expand(2**bits - 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.max(), (2 ** (bits - 1) - 0.5) * t)


def test_hwgq_one_bit_weight_is_per_channel_sign():
    scale, shift = torch.tensor([[1.0], [2.0], [0.5], [3.0]]), torch.tensor([[0.0], [0.3], [0.0], [0.0]])
    w = torch.linspace(-1, 1, 1001) * scale + shift
    w[1, 300] = 0.0  # sign(0) must be +1
    q = build_quantizer_family("hwgq").weight(1)
    assert isinstance(q, ChannelBinaryWeightQuantizer)
    y = q(w)
    for c in range(4):
        alpha = w[c].abs().mean()
        assert torch.equal(levels(y[c]), torch.stack([-alpha, alpha]))
        assert bool((y[c][w[c] >= 0] == alpha).all())
    conv_w = torch.randn(8, 3, 3, 3)
    alpha = conv_w.abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(q(conv_w).abs().amax(dim=(1, 2, 3)), alpha)


@pytest.mark.parametrize("bits", BITS)
def test_hwgq_signed_activation_levels(bits):
    g = MID_RISE_STEP[bits]
    got = levels(SignedMidRiseQuantizer(bits)(torch.linspace(-8, 8, DENSE)))
    expected = (torch.arange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) + 1, dtype=torch.float32) - 0.5) * g
    assert torch.equal(got, expected)


def _lsq(bits: int, signed: bool, step: float) -> LSQQuantizer:
    q = LSQQuantizer(bits, signed, per_sample=False).eval()  # eval: no data init, keep our step
    with torch.no_grad():
        q.step.fill_(step)
    return q


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_levels(bits, signed):
    s = 4.0 / 2**bits
    q = _lsq(bits, signed, s)
    got = levels(q(torch.linspace(-10, 10, DENSE)))
    if signed and bits == 1:
        expected = torch.tensor([-s, s])
    elif signed:
        expected = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32) * s
    else:
        expected = torch.arange(0, 2**bits, dtype=torch.float32) * s
    assert len(got) == (2 if signed and bits == 1 else q.qp - q.qn + 1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_levels(bits):
    n = 2**bits - 1
    x = torch.linspace(-3, 3, DENSE)
    m = torch.arange(n + 1, dtype=torch.float32)
    unit = m / n
    # the levels are integers times 1/n exactly (what exported codes decode to), q_k's values up to rounding
    unsigned = levels(DoReFaActivationQuantizer(bits, signed=False)(x))
    signed = levels(DoReFaActivationQuantizer(bits, signed=True)(x))
    assert torch.equal(unsigned, m * (1.0 / n))
    assert torch.equal(signed, (2 * m - n) * (1.0 / n))
    torch.testing.assert_close(unsigned, unit, rtol=0, atol=1e-7)
    torch.testing.assert_close(signed, 2 * unit - 1, rtol=0, atol=1e-7)
    w_levels = levels(DoReFaWeightQuantizer(bits)(x))
    if bits == 1:
        mean = x.abs().mean()
        assert torch.equal(w_levels, torch.stack([-mean, mean]))
    else:
        assert torch.equal(w_levels, (2 * m - n) * (1.0 / n))
        torch.testing.assert_close(w_levels, 2 * unit - 1)
        assert len(w_levels) == 2**bits


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_pact_levels(bits, signed):
    alpha = 3.0
    q = PACTQuantizer(bits, signed, init_alpha=alpha)
    got = levels(q(torch.linspace(-10, 10, DENSE)))
    low = -alpha if signed else 0.0
    expected = torch.linspace(low, alpha, 2**bits)
    assert len(got) == 2**bits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Straight-through gradients against analytic values.
# ---------------------------------------------------------------------------------------------


def _grad(q: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    q(x).backward(upstream)
    return x.grad


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("caffe", [False, True])
def test_hwgq_activation_clip_mask(bits, caffe):
    top = (2**bits - 1) * HALF_WAVE_STEP[bits]
    x = torch.cat([torch.linspace(-2, 6, 10_001), torch.tensor([0.0, -1e-6, top * 1.0001])])
    grad = _grad(HalfWaveQuantizer(bits, caffe_rounding=caffe), x, torch.ones_like(x))
    expected = ((x >= 0) & (x <= top)).float()
    assert torch.equal(grad, expected)
    assert grad[-3] == 1 and grad[-2] == 0 and grad[-1] == 0


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_hwgq_signed_activation_clip_mask(bits):
    limit = (2 ** (bits - 1) - 0.5) * MID_RISE_STEP[bits]
    x = torch.linspace(-6, 6, 10_001)
    grad = _grad(SignedMidRiseQuantizer(bits), x, torch.ones_like(x))
    assert torch.equal(grad, (x.abs() <= limit).float())


@pytest.mark.parametrize(
    "q",
    [
        MidRiseWeightQuantizer(2),
        MidRiseWeightQuantizer(8),
        ChannelBinaryWeightQuantizer(),
        DoReFaWeightQuantizer(1),
    ],
    ids=["hwgq2", "hwgq8", "binary", "dorefa1"],
)
def test_weight_ste_is_identity(q):
    w = torch.randn(16, 8, 3, 3) * 5
    upstream = torch.randn_like(w)
    assert torch.equal(_grad(q, w, upstream), upstream)


def lsq_step_grad(
    x: torch.Tensor, upstream: torch.Tensor, s: float, qn: int, qp: int, g: float, binary: bool = False
) -> float:
    """LSQ's d y / d s, summed against the upstream gradient and scaled by g:
    x/s inside [Qn, Qp]: round(x/s) - x/s (binary: sign(x/s) - x/s); below: Qn; above: Qp."""
    u = x / s
    inside = torch.where(u >= 0, 1.0, -1.0) - u if binary else torch.round(u) - u
    local = torch.where(u < qn, float(qn), torch.where(u > qp, float(qp), inside))
    return g * float((upstream * local).sum())


@pytest.mark.parametrize(
    ("bits", "signed", "per_sample"),
    [
        (2, False, True),
        (4, True, False),
        (8, False, True),
        (3, True, True),
        (1, True, False),
        (1, False, True),
    ],
)
def test_lsq_gradients(bits, signed, per_sample):
    torch.manual_seed(bits)
    s = 0.37
    q = LSQQuantizer(bits, signed, per_sample).eval()
    with torch.no_grad():
        q.step.fill_(s)
    x = (torch.randn(4, 5, 6) * 2**bits * s / 2).requires_grad_(True)
    upstream = torch.randn_like(x)
    q(x).backward(upstream)
    n = x[0].numel() if per_sample else x.numel()
    g = 1 / math.sqrt(n * q.qp)
    expected = lsq_step_grad(x.detach(), upstream, s, q.qn, q.qp, g, binary=signed and bits == 1)
    assert float(q.step.grad) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    u = x.detach() / s
    inside = (u >= q.qn) & (u <= q.qp)
    assert bool(inside.any() and (~inside).any())  # both branches exercised
    torch.testing.assert_close(x.grad, upstream * inside)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients(signed):
    alpha = 2.5
    q = PACTQuantizer(3, signed, init_alpha=alpha)
    x = torch.linspace(-5, 5, 1001).requires_grad_(True)
    upstream = torch.randn_like(x)
    q(x).backward(upstream)
    xd = x.detach()
    low = -alpha if signed else 0.0
    expected_alpha = upstream[xd >= alpha].sum() - (upstream[xd < low].sum() if signed else 0)
    torch.testing.assert_close(q.alpha.grad, expected_alpha)
    torch.testing.assert_close(x.grad, upstream * ((xd >= low) & (xd < alpha)))


@pytest.mark.parametrize("signed", [False, True])
def test_dorefa_activation_clip_mask(signed):
    x = torch.linspace(-3, 3, 6001)
    grad = _grad(DoReFaActivationQuantizer(2, signed), x, torch.ones_like(x))
    low = -1.0 if signed else 0.0
    torch.testing.assert_close(grad, ((x >= low) & (x <= 1)).float())


# ---------------------------------------------------------------------------------------------
# LSQ initialisation and state.
# ---------------------------------------------------------------------------------------------


def test_lsq_data_init_happens_once():
    q = LSQQuantizer(2, signed=False, per_sample=True).train()
    x = torch.rand(8, 3, 4, 4) * 3
    q(x)
    assert bool(q.initialized)
    assert q.step.item() == pytest.approx((2 * x.abs().mean() / math.sqrt(3)).item(), rel=1e-6)
    first = q.step.item()
    q(x * 10)
    assert q.step.item() == first


def test_lsq_init_is_averaged_over_data_parallel_ranks(monkeypatch):
    """Two simulated ranks: this one sees x, the other one's initial step is 0.9."""
    from cmtkd_graph.quantizers import lsq

    def all_reduce(t, op):
        assert op == lsq.dist.ReduceOp.SUM
        t += 0.9

    monkeypatch.setattr(lsq.dist, "is_available", lambda: True)
    monkeypatch.setattr(lsq.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(lsq.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(lsq.dist, "all_reduce", all_reduce)
    q = LSQQuantizer(4, signed=True, per_sample=False).train()
    x = torch.randn(32, 32)
    q(x)
    own = (2 * x.abs().mean() / math.sqrt(7)).item()
    assert q.step.item() == pytest.approx((own + 0.9) / 2, rel=1e-6)


def test_lsq_no_init_in_eval_mode():
    q = LSQQuantizer(4, signed=True, per_sample=False).eval()
    q(torch.randn(10, 10))
    assert not bool(q.initialized) and q.step.item() == 1.0


def test_lsq_state_survives_save_and_load():
    q = LSQQuantizer(4, signed=True, per_sample=False).train()
    q(torch.randn(16, 8))
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = LSQQuantizer(4, signed=True, per_sample=False).train()
    fresh.load_state_dict(torch.load(buffer))
    assert bool(fresh.initialized) and fresh.step.item() == q.step.item()
    fresh(torch.randn(16, 8) * 100)
    assert fresh.step.item() == q.step.item()  # no re-initialisation


def test_lsq_loading_an_uninitialised_state_reinitialises():
    q = LSQQuantizer(2, signed=False, per_sample=True).train()
    q(torch.rand(4, 10))
    q.load_state_dict(LSQQuantizer(2, signed=False, per_sample=True).state_dict())
    assert not bool(q.initialized)
    x = torch.rand(4, 10) * 7
    q(x)
    assert q.step.item() == pytest.approx((2 * x.mean() / math.sqrt(3)).item(), rel=1e-6)


def test_lsq_runs_on_meta():
    q = LSQQuantizer(2, signed=False, per_sample=True).to("meta").train()
    x = torch.randn(2, 3, 4, 4, device="meta", requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert y.device.type == "meta" and y.shape == x.shape
    # CPU quantizer state with a meta input: no data init attempted
    cpu = LSQQuantizer(2, signed=False, per_sample=True).train()
    cpu(torch.randn(2, 3, device="meta"))
    assert not bool(cpu.initialized)


# ---------------------------------------------------------------------------------------------
# Every family: CPU and meta forward/backward, dtype round trip, options.
# ---------------------------------------------------------------------------------------------


def _all_quantizers() -> list[tuple[str, str, Quantizer]]:
    out = []
    for name in QUANTIZERS.names():
        family = build_quantizer_family(name)
        for bits in (1, 2, 8):
            out.append((name, f"w{bits}", family.weight(bits)))
            out.append((name, f"a{bits}", family.activation(bits, signed=False)))
            out.append((name, f"a{bits}s", family.activation(bits, signed=True)))
    return out


def test_builtin_families_registered():
    assert {"hwgq", "lsq", "dorefa", "pact"} <= set(QUANTIZERS.names())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_every_quantizer_runs_forward_backward(device):
    for name, kind, q in _all_quantizers():
        q = q.to(device).train()
        x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
        y = q(x)
        assert y.shape == x.shape and y.device.type == device, (name, kind)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape, (name, kind)
        if device == "cpu":
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (name, kind)
            assert len(levels(y)) <= 2**q.bits * (x.shape[0] if kind.startswith("w") else 1), (name, kind)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bf16_in_bf16_out(device):
    for name, kind, q in _all_quantizers():
        q = q.to(device).train()
        x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = q(x)
        assert y.dtype == torch.bfloat16, (name, kind)
        y.float().sum().backward()
        assert x.grad.dtype == torch.bfloat16, (name, kind)


def test_unknown_option_names_its_key():
    with pytest.raises(SpecError, match=r"quantizer\.options\.bogus"):
        build_quantizer_family("hwgq", {"bogus": 1})
    with pytest.raises(SpecError, match=r"quantizer\.options\.init_alpha"):
        build_quantizer_family("pact", {"init_alpha": -1})
    assert build_quantizer_family("pact", {"init_alpha": 4.0}).activation(2, False).alpha.item() == 4.0


# ---------------------------------------------------------------------------------------------
# Quantized layers.
# ---------------------------------------------------------------------------------------------


def test_quant_conv_from_float_shares_parameters_and_matches_f_conv2d():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=True)
    q = QuantConv2d.from_float(conv, build_quantizer_family("lsq").weight(2))
    assert q.weight is conv.weight and q.bias is conv.bias
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "training",
    ):
        assert getattr(q, attr) == getattr(conv, attr), attr
    quantizer_state = {"weight_quantizer.step", "weight_quantizer.initialized"}
    assert set(q.state_dict()) == set(conv.state_dict()) | quantizer_state
    assert "weight_bits=2" in repr(q)
    x = torch.randn(2, 4, 11, 11)
    y = q(x)
    wq = q.weight_quantizer(conv.weight)
    assert not torch.equal(wq, conv.weight)
    torch.testing.assert_close(y, F.conv2d(x, wq, conv.bias, 2, 1, 2, 2))
    y.sum().backward()
    assert conv.weight.grad is not None and q.weight_quantizer.step.grad is not None


def test_quant_conv_keeps_padding_mode_and_no_bias():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False, padding_mode="circular")
    q = QuantConv2d.from_float(conv, build_quantizer_family("hwgq").weight(4))
    assert q.bias is None and q.padding_mode == "circular"
    assert set(q.state_dict()) == set(conv.state_dict())
    x = torch.randn(1, 3, 6, 6)
    wq = q.weight_quantizer(conv.weight)
    torch.testing.assert_close(q(x), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), wq))


@pytest.mark.parametrize(
    "conv, tap",
    [
        (nn.Conv2d(8, 6, 3, padding=1), (1, 1)),  # ResNet's layer4 at 28-32 px
        (nn.Conv2d(8, 6, 3, stride=2, padding=1), (1, 1)),
        (nn.Conv2d(8, 6, 1, bias=False), (0, 0)),
        (nn.Conv2d(8, 6, 5, padding=2), (2, 2)),
        (nn.Conv2d(8, 6, 3, padding=2, dilation=2), (1, 1)),
        (nn.Conv2d(8, 6, (3, 1), padding=(1, 0)), (1, 0)),
        (nn.Conv3d(8, 6, 3, padding=1), (1, 1, 1)),
        (nn.Conv2d(8, 6, 3, padding=1, groups=2), None),  # grouped: the convolution
        (nn.Conv2d(8, 6, 3, padding=2), None),  # a 3x3 output
        (nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular"), None),
    ],
)
def test_a_convolution_that_meets_one_pixel_trains_as_its_tap_with_the_same_value_and_gradient(conv, tap):
    twin = QuantConv2d if isinstance(conv, nn.Conv2d) else QuantConv3d
    q = twin.from_float(conv, build_quantizer_family("hwgq").weight(2))
    x = torch.randn(4, 8, *[1] * (conv.weight.dim() - 2), requires_grad=True)
    assert q._single_pixel_tap(x) == tap
    grad_out = torch.randn_like(q._conv_forward(x, conv.weight, conv.bias))
    results = []
    for training in (True, False):  # the tap's product in training, the convolution itself in eval
        q.train(training)
        y = q(x)
        computed_by = type(y.grad_fn).__name__
        assert ("Convolution" in computed_by) == (tap is None or not training), computed_by
        (y * grad_out).sum().backward()
        results.append((y.detach(), x.grad, conv.weight.grad))
        x.grad = conv.weight.grad = None
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_quant_linear_from_float():
    lin = nn.Linear(7, 3)
    q = QuantLinear.from_float(lin, build_quantizer_family("hwgq").weight(1))
    assert q.weight is lin.weight and q.bias is lin.bias
    assert (q.in_features, q.out_features) == (7, 3)
    assert set(q.state_dict()) == set(lin.state_dict())
    x = torch.randn(5, 7)
    torch.testing.assert_close(q(x), F.linear(x, q.weight_quantizer(lin.weight), lin.bias))
    assert "weight_bits=1" in repr(q)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_from_float_keeps_device_and_dtype(device):
    conv = nn.Conv2d(2, 4, 1, device=device, dtype=torch.bfloat16)
    lin = nn.Linear(4, 2, bias=False, device=device, dtype=torch.bfloat16)
    qc = QuantConv2d.from_float(conv, build_quantizer_family("lsq").weight(4))
    ql = QuantLinear.from_float(lin, build_quantizer_family("lsq").weight(4))
    for q in (qc, ql):
        assert q.weight.device.type == device and q.weight.dtype == torch.bfloat16
        assert q.weight_quantizer.step.device.type == device
    y = ql(qc(torch.randn(1, 2, 3, 3, device=device, dtype=torch.bfloat16)).permute(0, 2, 3, 1))
    assert y.dtype == torch.bfloat16 and y.device.type == device


class _LeafQuantizers(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Quantizer, QuantConv2d, QuantLinear)) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", ["hwgq", "lsq", "dorefa", "pact"])
def test_fx_traces_quantizers_as_leaves(name):
    family = build_quantizer_family(name)
    model = nn.Sequential(
        family.activation(2, signed=True),
        QuantConv2d.from_float(nn.Conv2d(3, 4, 3), family.weight(2)),
        nn.ReLU(),
        family.activation(2, signed=False),
    ).train()
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)  # LSQ data init happens here, before tracing
    graph = fx.GraphModule(model, _LeafQuantizers().trace(model))
    assert [n.op for n in graph.graph.nodes].count("call_module") == 4
    torch.testing.assert_close(graph(x), reference)


# ---------------------------------------------------------------------------------------------
# Integers: every quantizer's levels are integers times a scale, bit for bit (what export stores).
# ---------------------------------------------------------------------------------------------
def _quantizers_of_every_family(bits: int):
    """(label, quantizer) for every registered family: weights, unsigned and signed activations."""
    from cmtkd_graph.quantizers import QUANTIZERS, build_quantizer_family

    for name in QUANTIZERS.names():
        family = build_quantizer_family(name)
        yield f"{name} weight", family.weight(bits)
        yield f"{name} unsigned", family.activation(bits, signed=False)
        yield f"{name} signed", family.activation(bits, signed=True)
    caffe = build_quantizer_family("hwgq", {"caffe_rounding": True})
    yield "hwgq caffe", caffe.activation(bits, signed=False)


@pytest.mark.parametrize("bits", BITS)
def test_levels_are_integers_on_the_grid_times_the_scale_exactly(bits):
    torch.manual_seed(bits)
    x = torch.cat([torch.randn(4000) * 3, torch.linspace(-4, 4, 4001)]).reshape(1, 8001)
    w = torch.randn(16, 8, 3, 3)
    for label, q in _quantizers_of_every_family(bits):
        if isinstance(q, LSQQuantizer):
            with torch.no_grad():
                q.step.fill_(0.37 if bits < 8 else 0.0123)
        q.eval()
        for tensor in (w,) if "weight" in label else (x, x * 0.1):
            integers = q.to_integers(tensor)
            assert torch.equal(integers.dequantize(), q(tensor)), label
            assert torch.equal(integers.q, integers.q.round()), label
            grid = q.grid
            assert grid.qmin <= integers.q.min() and integers.q.max() <= grid.qmax, label
            assert ((integers.q - grid.offset) % grid.step == 0).all(), label  # on the grid
            codes = integers.codes()
            assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits, label
            assert torch.equal(grid.integers(codes).float(), integers.q), label
            assert codes.unique().numel() <= 2**bits, label
        if "weight" not in label:
            assert torch.equal(q.input_scale(), q.to_integers(x).scale.reshape(())), label


def test_integer_grids_hand_checked():
    # HWGQ 2-bit: weights are the odd integers -3..3 times t/2, activations 0..3 times h_2
    assert (MidRiseWeightQuantizer(2).grid.qmin, MidRiseWeightQuantizer(2).grid.qmax) == (-3, 3)
    assert HalfWaveQuantizer(2).grid == type(HalfWaveQuantizer(2).grid)(2, 1, 0)
    w = torch.tensor([[-2.0, -0.1, 0.1, 2.0]])
    integers = MidRiseWeightQuantizer(2).to_integers(w)
    assert integers.q.tolist() == [[-3.0, -1.0, 1.0, 3.0]]
    torch.testing.assert_close(integers.scale, MID_RISE_STEP[2] * w.std() / 2)
    # LSQ signed 4-bit: two's complement -8..7
    q = _lsq(4, True, 0.5)
    assert q.to_integers(torch.tensor([-9.0, -0.74, 0.26, 9.0])).q.tolist() == [-8.0, -1.0, 1.0, 7.0]
    assert q.to_integers(torch.tensor([-9.0, 9.0])).codes().tolist() == [0, 15]
