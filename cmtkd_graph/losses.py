"""The CMT-KD loss terms (paper eq. 4-9; docs/methods.md#cmtkd), as pure functions of tensors.

Two kinds of tap feature are supported:

- convolutional maps ``[B, C, H, W]`` (channels first);
- token features ``[B, N, D]`` (transformers), where ``D`` plays the role of the channel axis.

Every loss is computed in at least float32: under autocast the taps and logits may arrive in
bfloat16, and squaring, normalising and log-softmax in bfloat16 lose most of the signal.
Nothing here decides whether gradients reach the teachers; callers detach the shared knowledge
themselves when the spec switches that off (by default gradients do flow:
docs/methods.md#feature-distillation-eq-4-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAP_RANKS = (4, 5)  # conv maps [B, C, H, W] and, of video models, [B, C, T, H, W]
TOKEN_RANK = 3  # [B, N, D]


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 (and integer) tensors to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_feature_rank(x: Tensor, name: str) -> None:
    if x.dim() not in (*MAP_RANKS, TOKEN_RANK):
        raise ValueError(
            f"{name} must be a conv map [B, C, (T,) H, W] or token features [B, N, D], got shape "
            f"{tuple(x.shape)}"
        )


def match_sizes(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two tap features to the same spatial size / token count, keeping their channels.

    When the teacher and student taps differ in size, the larger one is adaptive-average-pooled to the
    smaller one (docs/methods.md#feature-distillation-eq-4-6).

    - Conv maps ``[B, C, H, W]`` (and clips' ``[B, C, T, H, W]``): each spatial (and time) axis is
      pooled to the smaller of the two sizes (so ``4x2`` against ``2x4`` gives ``2x2`` for both).
    - Token features ``[B, N, D]``: the token axis is treated as a 1-D sequence and pooled with
      ``adaptive_avg_pool1d`` to the shorter length, i.e. windows of consecutive tokens are
      averaged in order. A class token, if present, is averaged into the first window; a tap
      that must keep it separate should strip it before calling this.
    - Equal sizes: both tensors are returned unchanged (the same objects).

    Channel counts may differ (the attention loss does not need them equal; FitNet adapts them).
    """
    _check_feature_rank(a, "first feature")
    _check_feature_rank(b, "second feature")
    if a.dim() != b.dim() or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"cannot match feature sizes {tuple(a.shape)} and {tuple(b.shape)}: "
            "both must have the same rank and batch size"
        )
    if a.dim() in MAP_RANKS:
        target = tuple(min(m, n) for m, n in zip(a.shape[2:], b.shape[2:], strict=True))
        pool = F.adaptive_avg_pool2d if a.dim() == 4 else F.adaptive_avg_pool3d
        a = a if tuple(a.shape[2:]) == target else pool(a, target)
        b = b if tuple(b.shape[2:]) == target else pool(b, target)
        return a, b
    tokens = min(a.shape[1], b.shape[1])
    a = a if a.shape[1] == tokens else _pool_tokens(a, tokens)
    b = b if b.shape[1] == tokens else _pool_tokens(b, tokens)
    return a, b


def _pool_tokens(x: Tensor, tokens: int) -> Tensor:
    """Average ``[B, N, D]`` down to ``[B, tokens, D]`` over windows of consecutive tokens."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), tokens).transpose(1, 2)


def attention_map(feature: Tensor) -> Tensor:
    """Spatial attention q(F) of Zagoruyko & Komodakis (paper eq. 5;
    docs/methods.md#feature-distillation-eq-4-6).

    As in their reference code: the mean over channels of ``F**2``, flattened per sample and
    L2-normalised over positions. Conv maps give ``[B, H*W]`` (clips ``[B, T*H*W]``: one map over time
    and space); token features ``[B, N, D]``
    (``D`` is the channel axis) give ``[B, N]``. Normalising makes the map independent of the
    feature scale, which differs between bit-widths.
    """
    _check_feature_rank(feature, "feature")
    feature = _at_least_float32(feature)
    channel_axis = 1 if feature.dim() in MAP_RANKS else 2
    energy = feature.pow(2).mean(dim=channel_axis).flatten(start_dim=1)
    return F.normalize(energy, p=2, dim=1)


def attention_loss(shared: Tensor, student: Tensor) -> Tensor:
    """Attention-transfer distance d(F^l, F_S^l) (eq. 4-5; docs/methods.md#feature-distillation-eq-4-6).

    Mean over batch and positions of ``(q(shared) - q(student))**2``. The raw features are
    size-matched first (:func:`match_sizes`), then turned into attention maps, so channel counts
    may differ. ``shared`` is not detached: by default L_KD also trains the teachers and the
    importance factors.
    """
    shared, student = match_sizes(_at_least_float32(shared), _at_least_float32(student))
    return (attention_map(shared) - attention_map(student)).pow(2).mean()


def fitnet_loss(shared: Tensor, adapted_student: Tensor) -> Tensor:
    """FitNet distance d(F^l, r(F_S^l)) = mean((F^l - r(F_S^l))**2) (eq. 6).

    ``adapted_student`` is the output of a :class:`FitNetAdapter`, so after size matching its
    channels must equal the teacher's.
    """
    shared, adapted_student = match_sizes(_at_least_float32(shared), _at_least_float32(adapted_student))
    if shared.shape != adapted_student.shape:
        raise ValueError(
            f"FitNet loss needs equal channels after size matching, got shared {tuple(shared.shape)} "
            f"and adapted student {tuple(adapted_student.shape)}; is the FitNetAdapter built for this tap?"
        )
    return (shared - adapted_student).pow(2).mean()


class FitNetAdapter(nn.Module):
    """The trainable regressor r of the FitNet loss (eq. 6): student channels -> teacher channels.

    Built from the per-sample tap shapes (no batch axis):

    - conv maps ``(C, H, W)``: 1x1 ``Conv2d(Cs -> Ct, bias=False)`` + ``BatchNorm2d(Ct)``; the
      spatial size is kept (:func:`fitnet_loss` pools it to the teacher's); clips' ``(C, T, H, W)``
      alike with ``Conv3d`` / ``BatchNorm3d``;
    - token features ``(N, D)``: ``Linear(Ds -> Dt)``.

    Used only during training; it is not part of the exported student.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]):
        super().__init__()
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        ranks = (*(r - 1 for r in MAP_RANKS), TOKEN_RANK - 1)
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in ranks:
            raise ValueError(
                f"FitNetAdapter supports conv taps (C, (T,) H, W) or token taps (N, D) of the same kind for "
                f"student and teacher, got student {student_shape} and teacher {teacher_shape}"
            )
        self.student_shape = student_shape
        self.teacher_shape = teacher_shape
        if len(student_shape) == 3:  # (C, H, W): channels first
            self.regressor: nn.Module = nn.Sequential(
                nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False),
                nn.BatchNorm2d(teacher_shape[0]),
            )
        elif len(student_shape) == 4:  # (C, T, H, W)
            self.regressor = nn.Sequential(
                nn.Conv3d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False),
                nn.BatchNorm3d(teacher_shape[0]),
            )
        else:  # (N, D): channels last
            self.regressor = nn.Linear(student_shape[1], teacher_shape[1])

    def forward(self, student_feature: Tensor) -> Tensor:
        return self.regressor(student_feature)

    def extra_repr(self) -> str:
        return f"student_shape={self.student_shape}, teacher_shape={self.teacher_shape}"


def kdcl_min_logit(
    teacher_logits: Tensor, student_logits: Tensor, target: Tensor, *, may_ignore: bool = False
) -> Tensor:
    """The KDCL-MinLogit ensemble target z (paper eq. 7;
    docs/methods.md#mutual-learning-kdcl-minlogit-eq-7-9).

    Each network's logits are shifted so that its target-class logit is 0, then the class-wise
    minimum is taken: ``z_i = min(zT_i - zT_c, zS_i - zS_c)``. Taking the minimum keeps, for
    every wrong class, the network that is most confident against it. ``z`` is returned
    detached: it is a target for both networks (eq. 8-9), not something they should move
    towards each other through.

    ``teacher_logits`` is the combined teacher z_T and ``student_logits`` the student's, both
    ``[B, classes]``; ``target`` holds class indices ``[B]``, or class probabilities ``[B, classes]``
    (MixUp/CutMix's soft labels): then each network's logits are shifted by their label-weighted logit
    ``sum_c y_c z_c``, which is ``z_c`` for a one-hot label (our reading: the paper trains without batch
    mixing). With ``may_ignore`` a sample labelled ``IGNORE`` (< 0: a segmentation pixel without a
    label) has no class to align on: its target is the combined teacher's logits, so the student still
    learns from the teachers there and the teacher's term is zero (without it, no extra work is done for
    labels that are always classes).
    """
    if teacher_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"KDCL-MinLogit needs teacher and student logits of the same shape [B, classes], got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    soft = target.is_floating_point() and target.shape == teacher_logits.shape
    if not soft and (target.shape != teacher_logits.shape[:1] or target.is_floating_point()):
        raise ValueError(
            f"KDCL-MinLogit needs integer class indices of shape [{teacher_logits.shape[0]}] or class "
            f"probabilities of shape {list(teacher_logits.shape)}, got {target.dtype} of shape "
            f"{tuple(target.shape)}"
        )
    with torch.no_grad():
        teacher = _at_least_float32(teacher_logits)
        student = _at_least_float32(student_logits)
        if soft:
            weights = target.to(teacher.dtype)
            shifted_teacher = teacher - (teacher * weights).sum(1, keepdim=True)
            shifted_student = student - (student * weights).sum(1, keepdim=True)
            return torch.minimum(shifted_teacher, shifted_student)
        index = (target.long().clamp_min(0) if may_ignore else target.long()).unsqueeze(1)
        shifted_teacher = teacher - teacher.gather(1, index)
        shifted_student = student - student.gather(1, index)
        target_z = torch.minimum(shifted_teacher, shifted_student)
        if may_ignore:
            target_z = torch.where(target.unsqueeze(1) >= 0, target_z, teacher)
        return target_z


def binary_as_two_class(logits: Tensor) -> Tensor:
    """Sigmoid logits ``[...]`` as two-class logits ``[..., 2]``: ``(0, z)``, whose softmax is
    ``(1 - sigmoid(z), sigmoid(z))``. A detector's objectness and its per-class sigmoid outputs
    (RetinaNet, FCOS) are binary decisions; written so, :func:`kdcl_min_logit` and :func:`soft_kl` apply
    to them unchanged (docs/tasks.md)."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def min_error_flow(teacher_flow: Tensor, student_flow: Tensor, target_flow: Tensor) -> Tensor:
    """Mutual learning's target for a regression output, the analogue of KDCL-MinLogit's: per pixel, the
    flow of the network (combined teacher or student) whose end-point error against ``target_flow`` is
    the smaller (the teacher's on ties), detached. Flows are ``[B, 2, H, W]``. As MinLogit keeps, per
    class, the network most confident against a wrong class, this keeps, per pixel, the network that is
    right; a network learns nothing where it is the better one (docs/tasks.md)."""
    if not teacher_flow.shape == student_flow.shape == target_flow.shape or teacher_flow.dim() != 4:
        raise ValueError(
            f"min_error_flow needs three flows of one shape [B, 2, H, W], got {tuple(teacher_flow.shape)}, "
            f"{tuple(student_flow.shape)} and {tuple(target_flow.shape)}"
        )
    with torch.no_grad():
        teacher, student = _at_least_float32(teacher_flow), _at_least_float32(student_flow)
        target = _at_least_float32(target_flow)
        teacher_error = torch.linalg.vector_norm(teacher - target, dim=1, keepdim=True)
        student_error = torch.linalg.vector_norm(student - target, dim=1, keepdim=True)
        return torch.where(teacher_error <= student_error, teacher, student)


def sequence_loss(
    predictions: Sequence[Tensor],
    target: Tensor,
    valid: Tensor | None = None,
    *,
    gamma: float = 0.8,
    max_flow: float = 400.0,
) -> Tensor:
    """RAFT's loss (Teed and Deng, ECCV 2020, eq. 7; torchvision's reference training): the L1 distance
    of each of the N flow estimates ``[B, 2, H, W]`` to ``target``, averaged over the batch, both
    components and every pixel (pixels not ``valid`` and those whose target moves ``max_flow`` pixels or
    more count as 0), weighted ``gamma ** (N - 1 - i)`` for the i-th estimate and summed."""
    if not predictions:
        raise ValueError("sequence_loss needs at least one flow estimate")
    n = len(predictions)
    terms = [
        gamma ** (n - 1 - i) * flow_l1(flow, target, target, valid, max_flow=max_flow)
        for i, flow in enumerate(predictions)
    ]
    return torch.stack(terms).sum()


def flow_l1(
    flow: Tensor, target: Tensor, truth: Tensor, valid: Tensor | None = None, *, max_flow: float = 400.0
) -> Tensor:
    """The mean absolute difference of two flows ``[B, 2, H, W]`` (RAFT's distance of one estimate), over
    the batch, both components and every pixel; pixels not ``valid`` and those whose true flow ``truth``
    moves ``max_flow`` pixels or more count as 0. ``target`` is ``truth`` in RAFT's loss; the flow of the
    better network in mutual learning (:func:`min_error_flow`)."""
    keep = torch.linalg.vector_norm(_at_least_float32(truth), dim=1) < max_flow
    if valid is not None:
        keep = keep & valid.bool()
    return ((_at_least_float32(flow) - _at_least_float32(target)).abs() * keep.unsqueeze(1)).mean()


def _check_soft_kl_inputs(target: Tensor, logits: Tensor, tau: float) -> None:
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(
            f"soft KL needs target and logits of the same shape [B, classes], got "
            f"{tuple(target.shape)} and {tuple(logits.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"temperature tau must be positive, got {tau}")


def soft_kl(target_logits: Tensor, logits: Tensor, tau: float) -> Tensor:
    """``tau**2 * KL(softmax(target/tau) || softmax(logits/tau))``, batch-mean (eq. 8-9).

    ``target_logits`` is detached here: it is the distillation target (z of eq. 7), so only
    ``logits`` is trained by this term. The ``tau**2`` factor keeps the gradient scale comparable
    to the cross-entropy term as tau changes (Hinton et al.).
    """
    _check_soft_kl_inputs(target_logits, logits, tau)
    target_log_probs = F.log_softmax(_at_least_float32(target_logits.detach()) / tau, dim=1)
    log_probs = F.log_softmax(_at_least_float32(logits) / tau, dim=1)
    kl = F.kl_div(log_probs, target_log_probs, reduction="batchmean", log_target=True)
    return tau**2 * kl


def soft_kl_from_probs(
    target_probs: Tensor, logits: Tensor, tau: float, *, detach_target: bool = True
) -> Tensor:
    """:func:`soft_kl` with a target that is already a (softened) probability distribution.

    Used by the 'average of teachers' baseline, whose target is the mean of the teachers'
    ``softmax(z_k / tau)``; the target is *not* softened again. Zero target probabilities are
    allowed (they contribute 0). The target is detached, as in :func:`soft_kl`, unless
    ``detach_target=False``: AMTML-KD's learned teacher weights are trained through their target.
    """
    _check_soft_kl_inputs(target_probs, logits, tau)
    log_probs = F.log_softmax(_at_least_float32(logits) / tau, dim=1)
    target = target_probs.detach() if detach_target else target_probs
    kl = F.kl_div(log_probs, _at_least_float32(target), reduction="batchmean")
    return tau**2 * kl


def _pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of ``x`` [N, D]; the diagonal is exactly 0 (and passes no
    gradient), every other entry is at least sqrt(eps)."""
    squared = x.pow(2).sum(dim=1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2 * x @ x.t()).clamp(min=eps)
    off_diagonal = 1 - torch.eye(len(x), dtype=x.dtype, device=x.device)
    return d2.sqrt() * off_diagonal


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Relational KD, distance-wise (Park et al. 2019), as AMTML-KD's official code computes it between
    the student's logits and the integrated target: the pairwise distances of each batch, divided by their
    mean over the pairs of distinct rows, compared with the smooth L1 loss (mean over all N x N pairs).
    The teacher side is a target (detached). ``student`` and ``teacher``: [N, D]."""
    s, t = _at_least_float32(student), _at_least_float32(teacher.detach())
    with torch.no_grad():
        t_d = _pairwise_distances(t)
        t_d = t_d / _mean_of_positive(t_d)
    s_d = _pairwise_distances(s)
    s_d = s_d / _mean_of_positive(s_d)
    return F.smooth_l1_loss(s_d, t_d)


def _mean_of_positive(distances: Tensor) -> Tensor:
    """``distances[distances > 0].mean()`` for entries >= 0, without indexing by a mask: no sync with the
    device, and countable on the meta device (a run's FLOPs are counted there)."""
    return distances.sum() / (distances > 0).sum()


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """Relational KD, angle-wise (Park et al. 2019), as AMTML-KD's official code computes it: for every
    anchor a and pair (b, c), the cosine between the unit vectors from a to b and from a to c, compared
    with the smooth L1 loss over all N x N x N triples (b = a or c = a give the zero vector, cosine 0).
    The teacher side is a target (detached). ``student`` and ``teacher``: [N, D]."""

    def cosines(x: Tensor) -> Tensor:
        directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [a, b] = unit(x_b - x_a)
        return torch.bmm(directions, directions.transpose(1, 2)).flatten()

    s, t = _at_least_float32(student), _at_least_float32(teacher.detach())
    with torch.no_grad():
        t_angles = cosines(t)
    return F.smooth_l1_loss(cosines(s), t_angles)
