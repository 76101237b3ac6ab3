"""Distillation losses as pure functions, plus :class:`TemporalSaliencyLoss` for any training loop.

* :func:`kd_loss`: Hinton et al. (2015), ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``.
* :func:`dkd_loss`: decoupled KD (Zhao et al., 2022), ``alpha * TCKD + beta * NCKD``.
* :func:`saliency_alignment_loss`: the TSD term between two ``(B, T)`` saliency maps.

Every loss is a batch mean and works without Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tsd._batch import call_model
from lightning_tsd.saliency import ESTIMATORS, temporal_saliency

ALIGNMENTS = ("kl", "pearson", "cosine")
BaseLoss = Callable[[Tensor, Tensor, Tensor], Tensor]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``, averaged over the batch.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> float(kd_loss(z, z))
        0.0
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary (target class, all others) distributions; NCKD is the KL between
    the distributions over the non-target classes. Each is a batch mean times ``tau^2``.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, 1.0]])
        >>> round(float(dkd_loss(z, z, torch.tensor([0]))), 4)
        0.0
    """
    gt = F.one_hot(target.long(), student_logits.shape[1]).bool()
    p_student = F.softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    binary_student = torch.stack([(p_student * gt).sum(1), (p_student * ~gt).sum(1)], dim=1)
    binary_teacher = torch.stack([(p_teacher * gt).sum(1), (p_teacher * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(binary_student.clamp_min(1e-12).log(), binary_teacher, reduction="batchmean")
    # Distributions over the non-target classes: push the target logit far down before the softmax.
    offset = 1000.0 * gt
    nckd = F.kl_div(
        F.log_softmax(student_logits / temperature - offset, dim=1),
        F.softmax(teacher_logits / temperature - offset, dim=1),
        reduction="batchmean",
    )
    return (alpha * tckd + beta * nckd) * temperature**2


def _masked(saliency: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return ``(maps with padded steps zeroed, float mask)``."""
    if mask is None:
        return saliency, torch.ones_like(saliency)
    weight = mask.to(saliency.dtype)
    return saliency * weight, weight


def _zscore(saliency: Tensor, weight: Tensor) -> Tensor:
    """Z-score each map over its real steps (population std floored at 1e-8); padded steps give 0."""
    count = weight.sum(dim=1, keepdim=True)
    mean = (saliency * weight).sum(dim=1, keepdim=True) / count
    var = (((saliency - mean) * weight) ** 2).sum(dim=1, keepdim=True) / count
    # clamp before sqrt: a zero variance must not send an infinite gradient through sqrt.
    return (saliency - mean) * weight / var.clamp_min(1e-16).sqrt()


def saliency_alignment_loss(
    student_saliency: Tensor,
    teacher_saliency: Tensor,
    alignment: str = "kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """TSD alignment loss between two ``(B, T)`` saliency maps, over real steps, averaged over the batch.

    Args:
        student_saliency: the student's map, differentiable.
        teacher_saliency: the teacher's map (the target).
        alignment: ``"kl"``: both maps z-scored, divided by ``temperature``, softmaxed over time,
            ``KL(p_teacher || p_student)``; ``"pearson"``: ``1 - Pearson correlation``; ``"cosine"``:
            ``1 - cos`` of the raw maps.
        temperature: saliency temperature ``tau_s`` of the ``"kl"`` alignment.
        mask: ``(B, T)`` bool, True on real steps.

    The loss is >= 0, is 0 when the student map equals the teacher map up to a positive scale, and is
    finite (with finite gradients) for all-zero maps.

    Example:
        >>> t = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
        >>> float(saliency_alignment_loss(2 * t, t, "pearson"))
        0.0
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment {alignment!r}; choose one of {list(ALIGNMENTS)}")
    if student_saliency.shape != teacher_saliency.shape or student_saliency.ndim != 2:
        raise ValueError(
            "saliency maps must both be (B, T); got student "
            f"{tuple(student_saliency.shape)} and teacher {tuple(teacher_saliency.shape)}"
        )
    student, weight = _masked(student_saliency.float(), mask)
    teacher, _ = _masked(teacher_saliency.float().detach(), mask)
    if alignment == "kl":
        if temperature <= 0:
            raise ValueError(f"saliency temperature must be > 0, got {temperature}")
        pad = weight == 0
        log_p_student = F.log_softmax(
            (_zscore(student, weight) / temperature).masked_fill(pad, -torch.inf), 1
        )
        log_p_teacher = F.log_softmax(
            (_zscore(teacher, weight) / temperature).masked_fill(pad, -torch.inf), 1
        )
        per_step = log_p_teacher.exp() * (log_p_teacher - log_p_student)
        per_sample = per_step.masked_fill(pad, 0.0).sum(dim=1)
    else:
        if alignment == "pearson":
            student, teacher = _zscore(student, weight), _zscore(teacher, weight)
        per_sample = 1.0 - F.cosine_similarity(student, teacher, dim=1, eps=1e-12)
    return per_sample.clamp_min(0.0).mean()


BASE_LOSSES = ("kd", "dkd", "none")  # or any callable (student_logits, teacher_logits, y) -> loss


class TSDOutput(NamedTuple):
    """What :class:`TemporalSaliencyLoss` returns."""

    loss: Tensor
    student_logits: Tensor
    student_saliency: Tensor
    teacher_saliency: Tensor
    teacher_logits: Tensor


def teacher_outputs(
    teacher: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    saliency: str | None = "gradient",
    mask: Tensor | None = None,
    **options: object,
) -> tuple[Tensor, Tensor | None]:
    """The teacher's logits and (unless ``saliency is None``) its saliency map, from one forward.

    The teacher must already be in eval mode; no parameter gradient is built. ``target=None`` explains
    the teacher's own prediction.
    """
    if saliency is None:
        with torch.no_grad():
            return call_model(teacher, x, mask), None
    return temporal_saliency(teacher, x, target, method=saliency, mask=mask, **options)


class TemporalSaliencyLoss(nn.Module):
    """The TSD term for your own training loop: aligns the student's temporal saliency with the teacher's.

    ``forward(teacher, student, x)`` runs the teacher (eval mode, no parameter gradients) and the student
    once each, and returns a :class:`TSDOutput` whose ``student_logits`` come from the same student
    forward as the differentiable ``student_saliency``: use them for your cross-entropy / KD terms.

    Args:
        saliency: estimator name (see :data:`lightning_tsd.saliency.ESTIMATORS`).
        alignment: ``"kl"``, ``"pearson"`` or ``"cosine"`` (see :func:`saliency_alignment_loss`).
        saliency_temperature: ``tau_s`` of the ``"kl"`` alignment.
        saliency_target: ``"teacher"`` explains the teacher's predicted class, ``"label"`` the label ``y``.
        **saliency_options: ``steps`` (integrated gradients), ``window``/``stride`` (occlusion).

    Example:
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> out = TemporalSaliencyLoss(saliency="gradient", alignment="pearson")(teacher, student, torch.randn(4, 1, 16))
        >>> loss = F.cross_entropy(out.student_logits, torch.tensor([0, 1, 2, 0])) + 2.0 * out.loss
        >>> loss.backward()
    """

    def __init__(
        self,
        saliency: str = "integrated_gradients",
        alignment: str = "pearson",
        saliency_temperature: float = 1.0,
        saliency_target: str = "teacher",
        **saliency_options: object,
    ) -> None:
        super().__init__()
        if saliency not in ESTIMATORS:
            raise ValueError(f"unknown saliency method {saliency!r}; choose one of {sorted(ESTIMATORS)}")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {alignment!r}; choose one of {list(ALIGNMENTS)}")
        if saliency_target not in ("teacher", "label"):
            raise ValueError(f"saliency_target must be 'teacher' or 'label', got {saliency_target!r}")
        self.saliency = saliency
        self.alignment = alignment
        self.saliency_temperature = saliency_temperature
        self.saliency_target = saliency_target
        self.saliency_options = dict(saliency_options)

    def forward(
        self,
        teacher: nn.Module,
        student: nn.Module,
        x: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        teacher_cached: tuple[Tensor, Tensor] | None = None,
    ) -> TSDOutput:
        """Compute the alignment loss.

        Args:
            teacher: frozen teacher (ignored when ``teacher_cached`` is given).
            student: the student, in the mode you train it in.
            x: ``(B, C, T)`` input.
            y: labels, needed when ``saliency_target="label"``.
            mask: ``(B, T)`` bool, True on real steps.
            teacher_cached: precomputed ``(teacher_logits, teacher_saliency)`` for this batch.
        """
        if self.saliency_target == "label" and y is None:
            raise ValueError("saliency_target='label' needs the labels y")
        label_target = y if self.saliency_target == "label" else None
        if teacher_cached is None:
            teacher_logits, teacher_saliency = teacher_outputs(
                teacher, x, label_target, saliency=self.saliency, mask=mask, **self.saliency_options
            )
        else:
            teacher_logits, teacher_saliency = teacher_cached
        target = label_target if label_target is not None else teacher_logits.argmax(dim=1)
        student_logits, student_saliency = temporal_saliency(
            student, x, target, method=self.saliency, create_graph=True, mask=mask, **self.saliency_options
        )
        loss = saliency_alignment_loss(
            student_saliency, teacher_saliency, self.alignment, self.saliency_temperature, mask
        )
        return TSDOutput(loss, student_logits, student_saliency, teacher_saliency, teacher_logits)
