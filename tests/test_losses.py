"""The CMT-KD loss terms against values worked out by hand (docs/methods.md#cmtkd)."""

from __future__ import annotations

import math

import pytest
import torch

from cmtkd_graph.losses import (
    FitNetAdapter,
    attention_loss,
    attention_map,
    fitnet_loss,
    kdcl_min_logit,
    match_sizes,
    soft_kl,
    soft_kl_from_probs,
)


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- match_sizes


def test_match_sizes_averages_the_larger_map_in_2x2_blocks() -> None:
    large = torch.arange(16.0).reshape(1, 1, 4, 4)
    # rows 0 1 2 3 / 4 5 6 7 / 8 9 10 11 / 12 13 14 15, averaged in 2x2 blocks:
    # (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, (8+9+12+13)/4 = 10.5, (10+11+14+15)/4 = 12.5
    expected = tensor([[[[2.5, 4.5], [10.5, 12.5]]]])
    small = torch.zeros(1, 3, 2, 2)

    pooled, unchanged = match_sizes(large, small)
    assert torch.equal(pooled, expected)
    assert unchanged is small

    unchanged, pooled = match_sizes(small, large)  # argument order is kept
    assert unchanged is small
    assert torch.equal(pooled, expected)


def test_match_sizes_pools_each_spatial_axis_to_the_smaller_size() -> None:
    tall = torch.arange(8.0).reshape(1, 1, 4, 2)  # rows: 0 1 / 2 3 / 4 5 / 6 7
    wide = torch.arange(8.0).reshape(1, 1, 2, 4)  # rows: 0 1 2 3 / 4 5 6 7
    tall_pooled, wide_pooled = match_sizes(tall, wide)
    # tall: pairs of rows averaged -> (0+2)/2, (1+3)/2 / (4+6)/2, (5+7)/2
    assert torch.equal(tall_pooled, tensor([[[[1.0, 2.0], [5.0, 6.0]]]]))
    # wide: pairs of columns averaged -> (0+1)/2, (2+3)/2 / (4+5)/2, (6+7)/2
    assert torch.equal(wide_pooled, tensor([[[[0.5, 2.5], [4.5, 6.5]]]]))


def test_match_sizes_pools_the_longer_token_sequence() -> None:
    long = tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]])  # [1, 4 tokens, 2]
    short = torch.zeros(1, 2, 5)  # [1, 2 tokens, 5]
    pooled, unchanged = match_sizes(long, short)
    # consecutive pairs of tokens averaged: (1+2)/2, (3+4)/2 on the first channel
    assert torch.equal(pooled, tensor([[[1.5, 15.0], [3.5, 35.0]]]))
    assert unchanged is short

    # 3 -> 2 tokens: adaptive windows are tokens {0, 1} and {1, 2}
    three = tensor([[[1.0], [2.0], [3.0]]])
    pooled, _ = match_sizes(three, short)
    assert torch.equal(pooled, tensor([[[1.5], [2.5]]]))


def test_match_sizes_returns_equal_sizes_unchanged() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    matched_a, matched_b = match_sizes(a, b)
    assert matched_a is a and matched_b is b


def test_match_sizes_names_both_shapes_on_rank_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 16, 8\)"):
        match_sizes(torch.zeros(2, 3, 4, 4), torch.zeros(2, 16, 8))


def test_match_sizes_rejects_different_batch_sizes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(3, 3, 4, 4\)"):
        match_sizes(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


def test_match_sizes_rejects_unsupported_rank() -> None:
    with pytest.raises(ValueError, match=r"\(2, 10\)"):
        match_sizes(torch.zeros(2, 10), torch.zeros(2, 10))


# ------------------------------------------------------------ attention loss

# A 1x2x2x2 map: channel 0 = [[1, 2], [0, 1]], channel 1 = [[1, 0], [2, 1]].
# Mean over channels of F^2 per position: (1+1)/2, (4+0)/2, (0+4)/2, (1+1)/2 = [1, 2, 2, 1];
# its L2 norm is sqrt(1+4+4+1) = sqrt(10), so q = [1, 2, 2, 1] / sqrt(10).
TWO_CHANNEL_MAP = tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])
TWO_CHANNEL_ATTENTION = [1 / math.sqrt(10), 2 / math.sqrt(10), 2 / math.sqrt(10), 1 / math.sqrt(10)]


def test_attention_map_of_a_conv_map_by_hand() -> None:
    q = attention_map(TWO_CHANNEL_MAP)
    assert q.shape == (1, 4)
    assert torch.allclose(q, tensor([TWO_CHANNEL_ATTENTION]))


def test_attention_map_of_tokens_uses_the_last_axis_as_channels() -> None:
    # 3 tokens of 2 channels: mean of squares per token = (1+1)/2, (4+0)/2, 0 = [1, 2, 0];
    # norm sqrt(5) -> q = [1/sqrt(5), 2/sqrt(5), 0] = [0.4472136, 0.8944272, 0]
    tokens = tensor([[[1.0, -1.0], [2.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(attention_map(tokens), tensor([[0.4472136, 0.8944272, 0.0]]))


def test_attention_loss_by_hand() -> None:
    # Student 1x1x2x2 = [[2, 0], [0, 0]]: F^2 = [4, 0, 0, 0] -> q = [1, 0, 0, 0].
    # Squared differences: (1/sqrt10 - 1)^2 + 4/10 + 4/10 + 1/10 = 2 - 2/sqrt(10) = 1.3675445,
    # mean over 1 sample x 4 positions = 0.3418861.
    student = tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    loss = attention_loss(TWO_CHANNEL_MAP, student)
    assert loss.item() == pytest.approx(0.3418861, abs=1e-6)


def test_attention_loss_pools_features_before_squaring() -> None:
    # Shared 1x1x4x4: top-left block [[2, 0], [0, 0]] (mean 0.5), top-right block all 1 (mean 1),
    # bottom blocks 0. Pooled map [[0.5, 1], [0, 0]] -> F^2 = [0.25, 1, 0, 0],
    # norm sqrt(1.0625) -> q = [0.2425356, 0.9701425, 0, 0].
    # (Squaring before pooling would give q = [0.7071, 0.7071, 0, 0] instead.)
    # Student 1x1x2x2 = [[0, 1], [0, 0]] -> q = [0, 1, 0, 0].
    # Loss = (0.2425356^2 + (0.9701425 - 1)^2) / 4 = (2 - 2 * 0.9701425) / 4 = 0.0149287.
    shared = tensor(
        [[[[2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]]
    )
    student = tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert attention_loss(shared, student).item() == pytest.approx(0.0149287, abs=1e-6)
    assert attention_loss(student, shared).item() == pytest.approx(0.0149287, abs=1e-6)


def test_attention_loss_is_zero_for_a_rescaled_copy() -> None:
    # q normalises away the feature scale, which differs between bit-widths
    assert attention_loss(TWO_CHANNEL_MAP, 3.0 * TWO_CHANNEL_MAP).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_loss_trains_both_sides() -> None:
    # the default (docs/methods.md#feature-distillation-eq-4-6): L_KD also reaches the teachers (through
    # the shared knowledge)
    shared = torch.randn(2, 4, 3, 3, requires_grad=True)
    student = torch.randn(2, 2, 3, 3, requires_grad=True)
    attention_loss(shared, student).backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0


# --------------------------------------------------------------- FitNet loss


def test_fitnet_loss_by_hand() -> None:
    shared = tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # 1x2x1x2
    adapted = tensor([[[[0.0, 2.0]], [[3.0, 2.0]]]])
    # squared differences 1, 0, 0, 4 -> mean 5/4
    assert fitnet_loss(shared, adapted).item() == pytest.approx(1.25)


def test_fitnet_loss_pools_the_larger_map() -> None:
    shared = tensor([[[[4.0]]]])  # 1x1x1x1
    adapted = tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # pooled to (1+2+3+4)/4 = 2.5
    # (4 - 2.5)^2 = 2.25
    assert fitnet_loss(shared, adapted).item() == pytest.approx(2.25)


def test_fitnet_loss_rejects_unadapted_channels() -> None:
    with pytest.raises(ValueError, match="FitNetAdapter"):
        fitnet_loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 4, 4))


# ------------------------------------------------------------ FitNetAdapter


def test_fitnet_adapter_maps_student_channels_to_teacher_channels() -> None:
    conv_adapter = FitNetAdapter((8, 4, 4), (16, 2, 2))
    assert conv_adapter(torch.randn(3, 8, 4, 4)).shape == (3, 16, 4, 4)  # spatial size kept

    token_adapter = FitNetAdapter((10, 32), (20, 64))
    assert token_adapter(torch.randn(3, 10, 32)).shape == (3, 10, 64)


def test_fitnet_adapter_is_trainable() -> None:
    conv_adapter = FitNetAdapter(torch.Size([4, 4, 4]), torch.Size([6, 2, 2]))
    fitnet_loss(torch.randn(2, 6, 2, 2), conv_adapter(torch.randn(2, 4, 4, 4))).backward()
    token_adapter = FitNetAdapter((5, 3), (5, 7))
    fitnet_loss(torch.randn(2, 5, 7), token_adapter(torch.randn(2, 5, 3))).backward()

    for adapter in (conv_adapter, token_adapter):
        parameters = list(adapter.named_parameters())
        assert parameters
        for name, parameter in parameters:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_fitnet_adapter_conv_has_no_bias_and_a_batch_norm() -> None:
    adapter = FitNetAdapter((4, 8, 8), (6, 8, 8))
    conv, norm = adapter.regressor
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert isinstance(norm, torch.nn.BatchNorm2d) and norm.num_features == 6


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((8, 4, 4), (16, 32)), ((32,), (64,)), ((1, 2, 3, 4, 5), (1, 2, 3, 4, 5))],
)
def test_fitnet_adapter_rejects_unsupported_ranks(student_shape, teacher_shape) -> None:
    with pytest.raises(ValueError, match=r"\(C, \(T,\) H, W\).*\(N, D\)"):
        FitNetAdapter(student_shape, teacher_shape)


# ----------------------------------------------------------- KDCL-MinLogit

TEACHER_LOGITS = tensor([[3.0, 1.0, 4.0], [0.0, 5.0, 1.0]])
STUDENT_LOGITS = tensor([[1.0, 0.0, 0.5], [2.0, 1.0, 1.0]])
TARGET = torch.tensor([0, 2])
# sample 0, target 0: teacher - 3 = [0, -2, 1],  student - 1 = [0, -1, -0.5] -> min [0, -2, -0.5]
# sample 1, target 2: teacher - 1 = [-1, 4, 0],  student - 1 = [1, 0, 0]     -> min [-1, 0, 0]
EXPECTED_MIN_LOGIT = tensor([[0.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])


def test_kdcl_min_logit_is_the_classwise_minimum_of_shifted_logits() -> None:
    z = kdcl_min_logit(TEACHER_LOGITS, STUDENT_LOGITS, TARGET)
    assert torch.equal(z, EXPECTED_MIN_LOGIT)


def test_kdcl_min_logit_target_entry_is_exactly_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 10, generator=generator) * 5
    student = torch.randn(16, 10, generator=generator) * 5
    target = torch.randint(0, 10, (16,), generator=generator)
    z = kdcl_min_logit(teacher, student, target)
    assert torch.all(z.gather(1, target.unsqueeze(1)) == 0)
    assert torch.count_nonzero(z) == 16 * 9  # every other entry keeps a non-zero shifted logit


def test_kdcl_min_logit_is_detached() -> None:
    teacher = TEACHER_LOGITS.clone().requires_grad_()
    student = STUDENT_LOGITS.clone().requires_grad_()
    z = kdcl_min_logit(teacher, student, TARGET)
    assert not z.requires_grad
    assert z.grad_fn is None


def test_kdcl_min_logit_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kdcl_min_logit(torch.zeros(2, 3), torch.zeros(2, 4), TARGET)
    with pytest.raises(ValueError, match="class indices"):
        kdcl_min_logit(TEACHER_LOGITS, STUDENT_LOGITS, tensor([0.0, 2.0]))


# ------------------------------------------------------------------ soft KL


def test_soft_kl_by_hand_at_tau_2() -> None:
    # Row 0: target [2, 0] / 2 = [1, 0] -> p = [e/(e+1), 1/(e+1)] = [0.7310586, 0.2689414];
    #        logits [0, 0] -> q = [0.5, 0.5];
    #        KL(p||q) = 0.7310586 ln(1.4621172) + 0.2689414 ln(0.5378828) = 0.1109441.
    # Row 1: target equals logits -> KL 0.
    # batchmean: (0.1109441 + 0) / 2 rows; times tau^2 = 4 -> 0.2218881.
    target = tensor([[2.0, 0.0], [1.0, 3.0]])
    logits = tensor([[0.0, 0.0], [1.0, 3.0]])
    assert soft_kl(target, logits, tau=2.0).item() == pytest.approx(0.2218881, abs=1e-6)


def test_soft_kl_is_zero_when_logits_equal_the_target() -> None:
    logits = torch.randn(4, 7)
    assert soft_kl(logits, logits.clone(), tau=2.0).item() == pytest.approx(0.0, abs=1e-6)
    # a constant shift does not change the softmax either
    assert soft_kl(logits, logits + 3.0, tau=4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_soft_kl_trains_logits_not_the_target() -> None:
    target = torch.randn(4, 5, requires_grad=True)
    logits = torch.randn(4, 5, requires_grad=True)
    soft_kl(target, logits, tau=2.0).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert target.grad is None


def test_soft_kl_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        soft_kl(torch.zeros(2, 3), torch.zeros(2, 4), tau=2.0)
    with pytest.raises(ValueError, match="tau"):
        soft_kl(torch.zeros(2, 3), torch.zeros(2, 3), tau=0.0)


def test_soft_kl_from_probs_by_hand_at_tau_2() -> None:
    # target probabilities [0.5, 0.5] (not softened again); logits [2, 0] / 2 -> [0.7310586, 0.2689414]
    # KL = 0.5 ln(0.5 / 0.7310586) + 0.5 ln(0.5 / 0.2689414) = 0.1201145; times 4 -> 0.4804580
    loss = soft_kl_from_probs(tensor([[0.5, 0.5]]), tensor([[2.0, 0.0]]), tau=2.0)
    assert loss.item() == pytest.approx(0.4804580, abs=1e-6)


def test_soft_kl_from_probs_allows_zero_probabilities() -> None:
    # target [1, 0], logits [0, 0] -> q = [0.5, 0.5]; KL = 1 ln(1 / 0.5) + 0 = ln 2; times 4 -> 2.7725887
    loss = soft_kl_from_probs(tensor([[1.0, 0.0]]), tensor([[0.0, 0.0]]), tau=2.0)
    assert loss.item() == pytest.approx(2.7725887, abs=1e-6)


def test_soft_kl_from_probs_agrees_with_soft_kl_and_detaches_the_target() -> None:
    target_logits = torch.randn(3, 6)
    logits = torch.randn(3, 6)
    target_probs = torch.softmax(target_logits / 3.0, dim=1).requires_grad_()
    from_probs = soft_kl_from_probs(target_probs, logits, tau=3.0)
    assert from_probs.item() == pytest.approx(soft_kl(target_logits, logits, tau=3.0).item(), abs=1e-5)
    assert not from_probs.requires_grad  # only the (grad-free) logits could carry a gradient


# --------------------------------------------------------------- precision


def test_bfloat16_inputs_give_float32_losses() -> None:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(2, 8, 4, 4, generator=generator)
    student = torch.randn(2, 8, 2, 2, generator=generator)
    teacher_logits = torch.randn(2, 10, generator=generator) * 4
    student_logits = torch.randn(2, 10, generator=generator) * 4
    target = torch.tensor([3, 7])

    teacher_probs = torch.softmax(teacher_logits / 2.0, dim=1)

    def all_losses(shared, student, teacher_logits, student_logits, teacher_probs):
        z = kdcl_min_logit(teacher_logits, student_logits, target)
        return [
            attention_loss(shared, student),
            fitnet_loss(shared, student),
            soft_kl(z, student_logits, tau=2.0),
            soft_kl_from_probs(teacher_probs, student_logits, tau=2.0),
        ]

    high = [shared, student, teacher_logits, student_logits, teacher_probs]
    low = [x.bfloat16() for x in high]
    low_losses = all_losses(*low)
    # computed in float32: exactly the losses of the bf16 values upcast beforehand
    upcast_losses = all_losses(*(x.float() for x in low))
    float_losses = all_losses(*high)
    for low_loss, upcast_loss, float_loss in zip(low_losses, upcast_losses, float_losses, strict=True):
        assert low_loss.dtype == torch.float32
        assert torch.equal(low_loss, upcast_loss)
        assert low_loss.item() == pytest.approx(float_loss.item(), rel=3e-2, abs=1e-4)
    assert kdcl_min_logit(low[2], low[3], target).dtype == torch.float32


def test_losses_under_bfloat16_autocast_are_float32() -> None:
    adapter = FitNetAdapter((4, 4, 4), (6, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = adapter(torch.randn(2, 4, 4, 4))
        assert adapted.dtype == torch.bfloat16
        loss = fitnet_loss(torch.randn(2, 6, 4, 4), adapted)
    assert loss.dtype == torch.float32
    loss.backward()
    assert adapter.regressor[0].weight.grad is not None


def test_binary_logits_as_two_classes_give_sigmoid_probabilities_and_minlogit():
    from cmtkd_graph.losses import binary_as_two_class

    z = torch.tensor([-2.0, 0.0, 3.0])
    two = binary_as_two_class(z)
    assert two.shape == (3, 2) and torch.equal(two[:, 0], torch.zeros(3))
    assert torch.allclose(torch.softmax(two, -1)[:, 1], torch.sigmoid(z))
    # an object anchor (label 1): shifted by its logit, the min keeps the network more sure it is one
    teacher, student = binary_as_two_class(torch.tensor([1.0])), binary_as_two_class(torch.tensor([4.0]))
    target = kdcl_min_logit(teacher, student, torch.tensor([1]))
    assert target.tolist() == [[-4.0, 0.0]]


def test_min_error_flow_keeps_per_pixel_the_network_that_is_right():
    from cmtkd_graph.losses import min_error_flow

    truth = torch.zeros(1, 2, 1, 3)
    teacher = torch.tensor([[[[1.0, 0.0, 2.0]], [[0.0, 0.0, 0.0]]]])  # errors 1, 0, 2
    student = torch.tensor([[[[0.0, 3.0, 0.0]], [[0.5, 0.0, 1.0]]]])  # errors 0.5, 3, 1
    target = min_error_flow(teacher.requires_grad_(), student, truth)
    assert target.tolist() == [[[[0.0, 0.0, 0.0]], [[0.5, 0.0, 1.0]]]] and not target.requires_grad
    with pytest.raises(ValueError, match="three flows of one shape"):
        min_error_flow(teacher, student[..., :2], truth)


def test_sequence_loss_weights_later_estimates_more_and_skips_huge_or_invalid_targets():
    from cmtkd_graph.losses import sequence_loss

    target = torch.zeros(1, 2, 1, 2)
    target[0, 0, 0, 1] = 500.0  # beyond max_flow: not counted
    first = torch.full((1, 2, 1, 2), 2.0)  # |2 - 0| on u and v of pixel 0: mean over 4 values = 1
    last = torch.full((1, 2, 1, 2), 1.0)  # mean 0.5
    # gamma ** 1 for the first of two estimates, gamma ** 0 for the last
    assert sequence_loss([first, last], target).item() == pytest.approx(0.8 * 1.0 + 0.5)
    valid = torch.tensor([[[False, True]]])  # pixel 0 invalid, pixel 1 too large: nothing counts
    assert sequence_loss([first, last], target, valid).item() == 0.0


def test_flow_l1_averages_over_every_pixel_and_counts_the_ones_left_out_as_zero():
    from cmtkd_graph.losses import flow_l1

    flow, target, truth = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    truth[0, 0, 0, 0] = 400.0  # moves too far: counts 0
    assert flow_l1(flow, target, truth).item() == pytest.approx(6 / 8)
    valid = torch.tensor([[[True, True], [True, False]]])  # and one pixel not valid
    assert flow_l1(flow, target, truth, valid).item() == pytest.approx(4 / 8)
