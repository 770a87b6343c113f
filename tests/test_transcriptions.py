"""The quantizers and losses against independent plain-torch transcriptions of their public sources.

Each transcription below is written from the source it names (repository, file, commit), in today's
torch, and compared with this project's code on fixed tensors: the values, the input's gradient and
the learned parameters' gradients. Where a constant differs on purpose, the test sets it equal and the
difference is named in docs/methods.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmtkd_graph.quantizers.lsq import LSQ, LSQOptions


def seeded(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).requires_grad_()


def run_ours(quantizer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """Forward and backward through one of our quantizers: output, input gradient, parameter gradients."""
    x = x.detach().clone().requires_grad_()
    quantizer.zero_grad()
    y = quantizer(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in quantizer.named_parameters()}


# --- LSQ as hustzxd/LSQuantization computes it (lsq.py at 79276d17083c6480649ce1de6dfee12c21c91fbc) ------


class FunLSQ(torch.autograd.Function):
    """``FunLSQ`` of LSQuantization's lsq.py: round then clamp; the input's gradient passes inside
    [Qn, Qp] (unrounded); the step's gradient sums {Qn below, Qp above, round(v/s) - v/s inside} times
    the upstream gradient, divides by g, and is clamped to [-s, s]."""

    @staticmethod
    def forward(ctx, weight, alpha, g, qn, qp):
        ctx.save_for_backward(weight, alpha)
        ctx.other = g, qn, qp
        return (weight / alpha).round().clamp(qn, qp) * alpha

    @staticmethod
    def backward(ctx, grad_weight):
        weight, alpha = ctx.saved_tensors
        g, qn, qp = ctx.other
        q_w = weight / alpha
        small = (q_w < qn).float()
        big = (q_w > qp).float()
        middle = torch.ones(small.shape) - small - big
        grad_alpha = (
            ((small * qn + big * qp + middle * (-q_w + q_w.round())) * grad_weight / g).sum().unsqueeze(0)
        )
        grad_weight = middle * grad_weight
        grad_alpha.clamp_(-alpha.item(), alpha.item())
        return grad_weight, grad_alpha, None, None, None


def lsquantization(x: torch.Tensor, bits: int, *, weight: bool, upstream: torch.Tensor):
    """Conv2dLSQ (weights) and ActLSQ (activations, unsigned) of lsq.py at their first training
    forward: the step initialised from this tensor, then quantized."""
    alpha = torch.nn.Parameter(torch.empty(1))
    if weight:
        alpha.data.copy_(x.detach().abs().max() / 2 ** (bits - 1))
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        alpha.data.copy_(x.detach().max() / 2 ** (bits - 1) * 0.25)
        qn, qp = 0, 2**bits - 1
    g = math.sqrt(x.numel() * qp)
    x = x.detach().clone().requires_grad_()
    y = FunLSQ.apply(x, alpha, g, qn, qp)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, alpha.grad, alpha.detach()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_lsq_lsquantization_is_the_port_the_paper_used(kind, bits):
    family = LSQ(LSQOptions(implementation="lsquantization"))
    weight = kind == "weight"
    ours = family.weight(bits) if weight else family.activation(bits, signed=False)
    x = seeded(16, 8, 3, 3) if weight else F.relu(seeded(4, 8, 6, 6, seed=1))  # half exactly 0: Qn
    for scale in (1.0, 1e4):  # a small and a huge upstream gradient (the second hits the step's clamp)
        ours.train().initialized.fill_(False)
        ours._init_checked = False
        upstream = scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        y, x_grad, grads = run_ours(ours, x, upstream)
        y_ref, x_grad_ref, step_grad_ref, step_ref = lsquantization(x, bits, weight=weight, upstream=upstream)
        torch.testing.assert_close(ours.step.detach().reshape(1), step_ref, rtol=0, atol=0)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(grads["step"].reshape(1), step_grad_ref, rtol=1e-5, atol=1e-9)
        if scale > 1:
            assert step_grad_ref.abs().item() == pytest.approx(step_ref.item())  # clamped: tested


# --- LSQ as its paper writes it (Esser et al., ICLR 2020, eq. 1-3 and section 2.2) --------------------


def lsq_paper(v: torch.Tensor, s: float, bits: int, *, activation: bool, upstream: torch.Tensor):
    """v_bar = round(clip(v / s, -Qn, Qp)), v_hat = v_bar s (eq. 1-2); the straight-through estimator
    for round, passing the gradient strictly inside the clip (its pseudo-code's hardtanh); the step's
    gradient (eq. 3) scaled by g = 1 / sqrt(N Qp), N the number of weights or of features in the layer
    (one sample's); the step initialised to 2 <|v|> / sqrt(Qp)."""
    if activation:
        qn, qp, n = 0, 2**bits - 1, v[0].numel()
    else:
        qn, qp, n = 2 ** (bits - 1), 2 ** (bits - 1) - 1, v.numel()
    s0 = 2 * v.detach().abs().mean() / math.sqrt(qp) if s is None else torch.tensor(s)
    v = v.detach().clone().requires_grad_()
    step = s0.clone().requires_grad_()
    u = v / step
    inside = (u > -qn) & (u < qp)
    v_bar = torch.clamp(u, -qn, qp).round()
    v_hat = v_bar * step
    # eq. 3, written out: d v_hat / d s = -v/s + round(v/s) inside, -Qn or Qp outside
    ends = torch.where(u <= -qn, torch.tensor(-float(qn)), torch.tensor(float(qp)))
    ds = torch.where(inside, -u + u.round(), ends)
    step_grad = (ds * upstream).sum() / math.sqrt(n * qp)
    v_grad = torch.where(inside, upstream, torch.zeros_like(upstream))
    return v_hat.detach(), v_grad, step_grad, s0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_lsq_paper_is_the_papers_equations(kind, bits):
    family = LSQ(LSQOptions(implementation="paper"))
    activation = kind == "activation"
    ours = family.activation(bits, signed=False) if activation else family.weight(bits)
    x = F.relu(seeded(4, 8, 6, 6, seed=3)) if activation else seeded(16, 8, 3, 3, seed=4)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    ours.train()
    y, x_grad, grads = run_ours(ours, x, upstream)
    y_ref, x_grad_ref, step_grad_ref, s0 = lsq_paper(x, None, bits, activation=activation, upstream=upstream)
    torch.testing.assert_close(ours.step.detach(), s0, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads["step"], step_grad_ref, rtol=1e-4, atol=1e-7)  # a sum that cancels


# --- HWGQ as EdMIPS computes it (zhaoweicai/EdMIPS, models/quant_module.py at 866faf3) ---------------

EDMIPS_HWGQ_STEPS = {1: 0.799, 2: 0.538, 3: 0.3217, 4: 0.185}
EDMIPS_GAUSSIAN_STEPS = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.336}


class EdMIPSRound(torch.autograd.Function):
    """``_hwgq``: y = round(x / step) step, gradient passed unchanged (the clip is outside it)."""

    @staticmethod
    def forward(ctx, x, step):
        return torch.round(x / step) * step

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class EdMIPSGauss(torch.autograd.Function):
    """``_gauss_quantize``: mid-rise levels of step g_b std(x), clipped inside; identity gradient."""

    @staticmethod
    def forward(ctx, x, step, bit):
        lvls = 2**bit / 2
        step = step * x.std().item()
        y = (torch.round(x / step + 0.5) - 0.5) * step
        thr = (lvls - 0.5) * step
        return y.clamp(min=-thr, max=thr)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_hwgq_activations_are_edmips_hwgq(bits):
    """EdMIPS's ``HWGQ.forward``: clamp(x, 0, step (2^b - 1)), then ``_hwgq``. Our table holds the exact
    optima (0.5388 at 2 bits where EdMIPS rounds to 0.538): the test gives ours EdMIPS's step."""
    from cmtkd_graph.quantizers.hwgq import HalfWaveQuantizer

    ours = HalfWaveQuantizer(bits)
    ours.step = EDMIPS_HWGQ_STEPS[bits]
    x = seeded(4, 8, 6, 6, seed=6, scale=1.5)  # about BatchNorm's output: negatives, and some above the clip
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y, x_grad, _ = run_ours(ours, x, upstream)
    ref_x = x.detach().clone().requires_grad_()
    step = EDMIPS_HWGQ_STEPS[bits]
    ref = EdMIPSRound.apply(ref_x.clamp(min=0.0, max=step * float(2**bits - 1)), step)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hwgq_weights_are_edmips_gauss_quantize(bits):
    """EdMIPS's ``QuantConv2d`` weights (``_gauss_quantize``) against ours with EdMIPS's step. At 1 bit
    ours is per output channel (mean|W| sign(W)) where EdMIPS has one +-0.798 std(W): not compared."""
    from cmtkd_graph.quantizers.hwgq import MidRiseWeightQuantizer

    ours = MidRiseWeightQuantizer(bits)
    ours.step = EDMIPS_GAUSSIAN_STEPS[bits]
    w = seeded(16, 8, 3, 3, seed=8, scale=0.1)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    y, w_grad, _ = run_ours(ours, w, upstream)
    ref = EdMIPSGauss.apply(w.detach(), EDMIPS_GAUSSIAN_STEPS[bits], bits)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(w_grad, upstream, rtol=0, atol=0)


# --- DoReFa as tensorpack computes it (tensorpack/tensorpack, examples/DoReFa-Net/dorefa.py at 03f1897) ---


def tensorpack_quantize(x: torch.Tensor, k: int) -> torch.Tensor:
    """``quantize(x, k)``: round(x n) / n with the Round's gradient overridden to Identity."""
    n = float(2**k - 1)
    scaled = x * n
    return (scaled + (torch.round(scaled) - scaled).detach()) / n


def tensorpack_fw(x: torch.Tensor, bit_w: int) -> torch.Tensor:
    """``fw``: 1 bit, sign(x / E) E with E = mean|x| (no gradient) and Sign's gradient Identity; else
    tanh, divided by its max |.| (with gradient), mapped to [0, 1], quantized, 2q - 1."""
    if bit_w == 1:
        e = x.abs().mean().detach()
        u = x / e
        return (u + (torch.sign(u) - u).detach()) * e
    x = torch.tanh(x)
    x = x / x.abs().max() * 0.5 + 0.5
    return 2 * tensorpack_quantize(x, bit_w) - 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_weights_are_tensorpacks_fw(bits):
    from cmtkd_graph.quantizers.dorefa import DoReFaWeightQuantizer

    w = seeded(16, 8, 3, 3, seed=10, scale=0.5)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(11))
    y, w_grad, _ = run_ours(DoReFaWeightQuantizer(bits), w, upstream)
    ref_w = w.detach().clone().requires_grad_()
    ref = tensorpack_fw(ref_w, bits)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(w_grad, ref_w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_activations_are_tensorpacks_fa_after_the_clip(bits):
    """``fa(nonlin(x))`` of alexnet-dorefa.py: ``tf.clip_by_value(x, 0, 1)``, then ``quantize``."""
    from cmtkd_graph.quantizers.dorefa import DoReFaActivationQuantizer

    x = seeded(4, 8, 6, 6, seed=12, scale=0.8)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(13))
    y, x_grad, _ = run_ours(DoReFaActivationQuantizer(bits, signed=False), x, upstream)
    ref_x = x.detach().clone().requires_grad_()
    clipped = torch.where((ref_x >= 0) & (ref_x <= 1), ref_x, ref_x.clamp(0, 1).detach())
    ref = tensorpack_quantize(clipped, bits)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x.grad, rtol=1e-6, atol=0)  # n (1/n) != 1 in float


# --- PACT as KwangHoonAn/PACT computes it (module.py and trainer.py at fcc99a4) -----------------------


class PACTActFn(torch.autograd.Function):
    """``ActFn``: clamp(x, 0, alpha), round on (2^k - 1) / alpha; the input's gradient where
    0 <= x <= alpha, alpha's the sum of the upstream gradient where x >= alpha."""

    @staticmethod
    def forward(ctx, x, alpha, k):
        ctx.save_for_backward(x, alpha)
        y = torch.clamp(x, min=0, max=alpha.item())
        scale = (2**k - 1) / alpha
        return torch.round(y * scale) / scale

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        x_range = ~((x < 0) | (x > alpha))
        grad_alpha = torch.sum(grad * torch.ge(x, alpha).float()).view(-1)
        return grad * x_range.float(), grad_alpha, None


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_activations_are_the_pact_port(bits):
    from cmtkd_graph.quantizers.pact import PACTQuantizer

    ours = PACTQuantizer(bits, signed=False, init_alpha=1.5)
    x = seeded(4, 8, 6, 6, seed=14)  # negatives, values inside (0, alpha) and above alpha
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(15))
    y, x_grad, grads = run_ours(ours, x, upstream)
    alpha = torch.tensor([1.5], requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    ref = PACTActFn.apply(ref_x, alpha, bits)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_grad, ref_x.grad, rtol=0, atol=0)
    torch.testing.assert_close(grads["alpha"].reshape(1), alpha.grad, rtol=1e-6, atol=1e-6)


def test_pact_alpha_decays_with_its_networks_weight_decay():
    """PACT's L2 on alpha (lambda_alpha) is its network's weight decay by default (the paper:
    lambda_alpha = lambda; Distiller applies it as the optimizer's weight decay), an option's value where
    given, none where 0."""
    import cmtkd_graph as cg
    from cmtkd_graph.optim import parameter_groups

    def decays(options: dict) -> dict[str, float]:
        spec = cg.load_spec("quickstart", ["quantizer.name=pact", f"quantizer.options={options}"])
        groups = parameter_groups(cg.build_system(spec, device="meta", load=False), spec)
        return {g["name"]: g["weight_decay"] for g in groups if g["name"].startswith("quantizers")}

    assert decays({}) == {
        "quantizers/student": 25e-6,
        "quantizers/teacher0": 1e-4,
        "quantizers/teacher1": 1e-4,
    }
    assert decays({"alpha_decay": 2e-4}) == {
        f"quantizers/{n}": 2e-4 for n in ("student", "teacher0", "teacher1")
    }
    assert decays({"alpha_decay": 0}) == {"quantizers": 0.0}


# --- attention transfer and FitNet's hint ----------------------------------------------------------


def test_attention_loss_is_attention_transfers_at_loss_with_repdistillers_pooling():
    """szagoruyko/attention-transfer utils.py at eb68159: at(x) = normalize(x.pow(2).mean(1).view(N, -1)),
    at_loss = (at(x) - at(y)).pow(2).mean(); HobbitLong/RepDistiller distiller_zoo/AT.py at 5237c1f:
    the larger map adaptive-average-pooled to the smaller first."""
    from cmtkd_graph.losses import attention_loss

    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    def at_loss(f_s, f_t):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        return (at(f_s) - at(f_t)).pow(2).mean()

    for t_shape, s_shape in (((4, 64, 8, 8), (4, 32, 8, 8)), ((4, 64, 4, 4), (4, 32, 8, 8))):
        teacher, student = seeded(*t_shape, seed=16), seeded(*s_shape, seed=17)
        ref_s = student.detach().clone().requires_grad_()
        ours = attention_loss(teacher, student)
        ref = at_loss(ref_s, teacher)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(student.grad, ref_s.grad, rtol=1e-5, atol=1e-9)


def test_fitnet_loss_is_repdistillers_hint_loss():
    """RepDistiller distiller_zoo/FitNet.py at 5237c1f: ``nn.MSELoss()(f_s, f_t)`` of the regressed
    student feature. (Its regressor ConvReg adds a ReLU after the BatchNorm; ours has none:
    docs/methods.md#feature-distillation-eq-4-6.)"""
    from cmtkd_graph.losses import fitnet_loss

    teacher, regressed = seeded(4, 16, 8, 8, seed=18), seeded(4, 16, 8, 8, seed=19)
    torch.testing.assert_close(fitnet_loss(teacher, regressed), torch.nn.MSELoss()(regressed, teacher))
