"""Per-sample metrics of teacher/student agreement, in plain torch (no Lightning).

Each function returns one value per sample, shape ``(B,)``; the metric classes in
:mod:`lightning_tsd.metrics` average them. The student comes first and the teacher second, as in
torchmetrics' ``(preds, target)``.

Saliency maps are ``(B, T)`` floats and ``mask`` is ``(B, T)`` bool, True on real steps; padded steps
are left out of every statistic, so each sample is compared over its own ``T_real`` steps. A map that is
constant over its real steps has no defined correlation: Spearman and Pearson are 0 for it (never NaN),
and cosine is 0 for an all-zero map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGNMENT_KEYS = ("spearman", "pearson", "cosine", "topk_overlap")
DIVERGENCE_KEYS = ("kl", "js")


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{what} must both have shape (B, {'T' if what.startswith('saliency') else 'K'}), "
            f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"{what} must be floating point, got {student.dtype} and {teacher.dtype}")


def average_ranks(x: Tensor) -> Tensor:
    """Rank each row of ``x`` (``(N, L)``) from 1 to L, giving tied values the mean of their ranks.

    This is torchmetrics' ``_rank_data`` (and ``scipy.stats.rankdata(method="average")``), batched over rows.

    Example:
        >>> average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]]))
        tensor([[3.5000, 1.0000, 3.5000, 2.0000]])
    """
    values, order = x.sort(dim=1)
    n = x.shape[1]
    pos = torch.arange(n, device=x.device).expand_as(x)
    starts = torch.ones_like(x, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    last = torch.where(ends, pos, n - 1).flip(1).cummin(dim=1).values.flip(1)
    mean_rank = (first + last).to(x.dtype) / 2 + 1
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of ``(N, L)`` tensors; 0 where either row is constant."""
    constant = (a.amax(1) == a.amin(1)) | (b.amax(1) == b.amin(1))
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = (a.square().sum(1) * b.square().sum(1)).sqrt()
    corr = (a * b).sum(1) / denom.clamp_min(torch.finfo(a.dtype).tiny)
    return torch.where(constant | (denom == 0), torch.zeros_like(corr), corr.clamp(-1, 1))


def _cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity; 0 where either row is all zeros."""
    denom = a.norm(dim=1) * b.norm(dim=1)
    cos = (a * b).sum(1) / denom.clamp_min(torch.finfo(a.dtype).tiny)
    return torch.where(denom == 0, torch.zeros_like(cos), cos.clamp(-1, 1))


def _topk_overlap_rows(a: Tensor, b: Tensor, k: int) -> Tensor:
    """|top-k(a) ∩ top-k(b)| / k per row; ties are broken by the earlier step (stable sort)."""

    def top(v: Tensor) -> Tensor:
        idx = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
        return torch.zeros_like(v, dtype=torch.bool).scatter_(1, idx, True)

    return (top(a) & top(b)).sum(1).to(a.dtype) / k


def topk_size(length: int, fraction: float) -> int:
    """The k of top-k overlap for a map of ``length`` real steps: ``max(1, round(fraction * length))``,
    rounding halves up.

    Example:
        >>> topk_size(25, 0.1), topk_size(4, 0.1)
        (3, 1)
    """
    return max(1, min(length, math.floor(fraction * length + 0.5)))


def saliency_alignment(
    student_saliency: Tensor,
    teacher_saliency: Tensor,
    mask: Tensor | None = None,
    topk_fraction: float = 0.1,
) -> dict[str, Tensor]:
    """Per-sample agreement of two temporal saliency maps, over real steps only.

    Args:
        student_saliency: ``(B, T)`` float.
        teacher_saliency: ``(B, T)`` float.
        mask: ``(B, T)`` bool, True on real steps; None means all steps are real.
        topk_fraction: top-k overlap uses ``k = max(1, round(topk_fraction * T_real))`` per sample.

    Returns:
        ``spearman`` (ranks with ties averaged), ``pearson``, ``cosine`` (of the raw maps) and
        ``topk_overlap`` (``|top-k(teacher) ∩ top-k(student)| / k``), each ``(B,)``. Correlations of a
        constant map are 0.

    Example:
        >>> s = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> out = saliency_alignment(s, 2 * s, topk_fraction=0.5)
        >>> [round(float(out[k]), 4) for k in ("spearman", "pearson", "cosine", "topk_overlap")]
        [1.0, 1.0, 1.0, 1.0]
    """
    _check_pair(student_saliency, teacher_saliency, "saliency maps")
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must lie in (0, 1], got {topk_fraction}")
    dtype = torch.promote_types(
        torch.promote_types(student_saliency.dtype, teacher_saliency.dtype), torch.float32
    )
    student, teacher = student_saliency.to(dtype), teacher_saliency.to(dtype)
    batch, steps = student.shape
    if mask is None:
        mask = torch.ones(batch, steps, dtype=torch.bool, device=student.device)
    elif mask.shape != student.shape:
        raise ValueError(f"mask must have shape (B, T) = {tuple(student.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(device=student.device, dtype=torch.bool)
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(
            f"mask has no real step for sample(s) {torch.nonzero(lengths == 0).flatten().tolist()}"
        )

    out = {key: student.new_zeros(batch) for key in ALIGNMENT_KEYS}
    for length in lengths.unique().tolist():
        rows = lengths == length
        a = student[rows][mask[rows]].reshape(-1, length)
        b = teacher[rows][mask[rows]].reshape(-1, length)
        out["spearman"][rows] = _pearson_rows(average_ranks(a), average_ranks(b))
        out["pearson"][rows] = _pearson_rows(a, b)
        out["cosine"][rows] = _cosine_rows(a, b)
        out["topk_overlap"][rows] = _topk_overlap_rows(a, b, topk_size(length, topk_fraction))
    return out


def teacher_agreement(student_logits: Tensor, teacher_logits: Tensor, top_k: int = 1) -> Tensor:
    """Per-sample agreement: 1.0 where the teacher's predicted class is among the student's ``top_k``.

    With ``top_k=1`` this is ``argmax(student) == argmax(teacher)``.

    Example:
        >>> s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
        >>> t = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
        >>> teacher_agreement(s, t), teacher_agreement(s, t, top_k=2)
        (tensor([0., 1.]), tensor([1., 1.]))
    """
    _check_pair(student_logits, teacher_logits, "logits")
    num_classes = student_logits.shape[1]
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must lie in [1, {num_classes}] (the number of classes), got {top_k}")
    teacher_class = teacher_logits.argmax(1, keepdim=True)
    if top_k == 1:
        hit = student_logits.argmax(1, keepdim=True) == teacher_class
    else:
        hit = (student_logits.topk(top_k, dim=1).indices == teacher_class).any(1, keepdim=True)
    return hit.squeeze(1).to(student_logits.dtype)


def teacher_student_divergence(student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
    """Per-sample ``kl`` = KL(softmax(z_T) || softmax(z_S)) and ``js`` (Jensen-Shannon), natural log.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> out = teacher_student_divergence(z, torch.tensor([[0.0, 100.0]]))
        >>> round(float(out["kl"]), 4), round(float(out["js"]), 4)
        (0.6931, 0.2158)
    """
    _check_pair(student_logits, teacher_logits, "logits")
    log_s = F.log_softmax(student_logits, dim=1)
    log_t = F.log_softmax(teacher_logits, dim=1)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:  # KL(p || q) per row
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1).clamp_min(0)

    return {"kl": kl(log_t, log_s), "js": (kl(log_t, log_m) + kl(log_s, log_m)) / 2}
