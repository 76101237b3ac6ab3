"""Distillation losses as pure functions, plus :class:`TemporalSaliencyLoss` for any training loop.

* :func:`kd_loss`: Hinton et al. (2015), ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``.
* :func:`dkd_loss`: decoupled KD (Zhao et al., 2022), ``alpha * TCKD + beta * NCKD``.
* :func:`saliency_alignment_loss`: the TSD term between two ``(B, T)`` saliency maps.

Every loss is a batch mean and works without Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tsd._batch import InvalidBatchError, call_model
from lightning_tsd.saliency import check_saliency_options, temporal_saliency
from lightning_tsd.teacher import SALIENCY_TARGETS, model_saliency, teacher_options

ALIGNMENTS = ("kl", "pearson", "cosine")
BaseLoss = Callable[[Tensor, Tensor, Tensor | None], Tensor]


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


def smooth_saliency(saliency: Tensor, window: int, mask: Tensor | None = None) -> Tensor:
    """Moving average of ``(B, T)`` maps over ``window`` steps (centred; real steps only, edges included).

    A normalised convolution: each step becomes the mean of the real steps within ``window // 2`` of it,
    so padded steps neither contribute nor receive weight. ``window=1`` returns the maps unchanged.

    Example:
        >>> smooth_saliency(torch.tensor([[0.0, 3.0, 0.0, 0.0]]), 3).tolist()
        [[1.5, 1.0, 1.0, 0.0]]
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"saliency_smoothing must be a positive integer (steps), got {window!r}")
    if window == 1:
        return saliency
    weight = torch.ones_like(saliency) if mask is None else mask.to(saliency.dtype)
    kernel = torch.ones(1, 1, window, dtype=saliency.dtype, device=saliency.device)
    left, right = (window - 1) // 2, window // 2
    total = F.conv1d(F.pad((saliency * weight).unsqueeze(1), (left, right)), kernel).squeeze(1)
    count = F.conv1d(F.pad(weight.unsqueeze(1), (left, right)), kernel).squeeze(1)
    return total / count.clamp_min(1.0) * weight


def saliency_alignment_loss(
    student_saliency: Tensor,
    teacher_saliency: Tensor,
    alignment: str = "kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    smoothing: int = 1,
    reduction: str = "mean",
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
        smoothing: moving-average window (steps) applied to both maps first (:func:`smooth_saliency`).
        reduction: ``"mean"`` over the batch, or ``"none"`` for the ``(B,)`` per-sample losses.

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
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    student_saliency = smooth_saliency(student_saliency.float(), smoothing, mask)
    teacher_saliency = smooth_saliency(teacher_saliency.float().detach(), smoothing, mask)
    student, weight = _masked(student_saliency, mask)
    teacher, _ = _masked(teacher_saliency, mask)
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
    per_sample = per_sample.clamp_min(0.0)
    return per_sample.mean() if reduction == "mean" else per_sample


BASE_LOSSES = ("kd", "dkd", "none")  # or any callable (student_logits, teacher_logits, y) -> loss


def base_distillation_loss(
    base_loss: str | BaseLoss,
    student_logits: Tensor,
    teacher_logits: Tensor,
    y: Tensor | None,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> Tensor | None:
    """The base loss by name (``"kd"``, ``"dkd"``, ``"none"`` gives None) or a callable ``(z_S, z_T, y)``.

    Example:
        >>> z = torch.tensor([[1.0, 0.0]])
        >>> float(base_distillation_loss("kd", z, z, None)), base_distillation_loss("none", z, z, None)
        (0.0, None)
    """
    if base_loss == "kd":
        return kd_loss(student_logits, teacher_logits, temperature)
    if base_loss == "dkd":
        if y is None:
            raise InvalidBatchError("base_loss='dkd' needs labels y in every batch")
        return dkd_loss(student_logits, teacher_logits, y, alpha, beta, temperature)
    if base_loss == "none":
        return None
    return cast(BaseLoss, base_loss)(student_logits, teacher_logits, y)  # not a known name: the callable


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
    **options: Any,
) -> tuple[Tensor, Tensor | None]:
    """Deprecated, removed in 0.3.0: use :class:`lightning_tsd.teacher.TeacherSource` (``.live(x, y, mask)``)."""
    warnings.warn(
        "lightning_tsd.losses.teacher_outputs is deprecated and will be removed in 0.3.0; "
        "use lightning_tsd.teacher.TeacherSource",
        DeprecationWarning,
        stacklevel=2,
    )
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
        saliency_target: ``"teacher"`` explains the teacher's predicted class, ``"label"`` the label ``y``,
            ``"distribution"`` every class: one map per class for both models, aligned class by class and
            weighted by the teacher's probabilities (Jacobian matching; ``K`` times the saliency cost).
        saliency_smoothing: moving-average window (steps) applied to both maps before alignment.
        teacher_saliency_options: the estimator's options for the teacher's maps; by default the student's
            without ``sampling``/``generator`` (the teacher's maps stay deterministic and cacheable).
        **saliency_options: the estimator's options (``steps``, ``window``/``stride``, ...), checked here.

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
        saliency_smoothing: int = 1,
        teacher_saliency_options: dict[str, Any] | None = None,
        **saliency_options: Any,
    ) -> None:
        super().__init__()
        check_saliency_options(saliency, dict(saliency_options))
        self.teacher_saliency_options = teacher_options(saliency_options, teacher_saliency_options)
        check_saliency_options(saliency, self.teacher_saliency_options)
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {alignment!r}; choose one of {list(ALIGNMENTS)}")
        if saliency_target not in SALIENCY_TARGETS:
            raise ValueError(
                f"saliency_target must be one of {list(SALIENCY_TARGETS)}, got {saliency_target!r}"
            )
        smooth_saliency(torch.zeros(1, 1), saliency_smoothing)  # checks the window
        self.saliency = saliency
        self.alignment = alignment
        self.saliency_temperature = saliency_temperature
        self.saliency_target = saliency_target
        self.saliency_smoothing = saliency_smoothing
        self.saliency_options = dict(saliency_options)

    def forward(
        self,
        teacher: nn.Module,
        student: nn.Module,
        x: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        teacher_cached: tuple[Tensor, Tensor] | None = None,
        validated: bool = False,
        generator: torch.Generator | None = None,
    ) -> TSDOutput:
        """Compute the alignment loss.

        Args:
            teacher: frozen teacher (ignored when ``teacher_cached`` is given).
            student: the student, in the mode you train it in.
            x: ``(B, C, T)`` input.
            y: labels, needed when ``saliency_target="label"``.
            mask: ``(B, T)`` bool, True on real steps.
            teacher_cached: precomputed ``(teacher_logits, teacher_saliency)`` for this batch
                (e.g. from :class:`lightning_tsd.teacher.TeacherSource`).
            validated: ``x``, ``mask`` and ``y`` were checked by the caller (see
                :func:`~lightning_tsd.saliency.temporal_saliency`): no check reads a device value.
            generator: random source of the student's ``sampling="uniform"`` interpolants for this call.
        """
        if self.saliency_target == "label" and y is None:
            raise ValueError("saliency_target='label' needs the labels y")
        label_target = y if self.saliency_target == "label" else None
        common: dict[str, Any] = dict(
            method=self.saliency, target_mode=self.saliency_target, mask=mask, validated=validated
        )
        if teacher_cached is None:
            teacher_logits, teacher_saliency = model_saliency(
                teacher, x, label_target, **common, **self.teacher_saliency_options
            )
        else:
            teacher_logits, teacher_saliency = teacher_cached
        target = label_target if label_target is not None else teacher_logits.detach().argmax(dim=1)
        options = {**self.saliency_options, **({"generator": generator} if generator is not None else {})}
        student_logits, student_saliency = model_saliency(
            student, x, target, create_graph=True, num_classes=teacher_logits.shape[1], **common, **options
        )
        loss = self.alignment_loss(student_saliency, teacher_saliency, teacher_logits, mask)
        return TSDOutput(loss, student_logits, student_saliency, teacher_saliency, teacher_logits)

    def alignment_loss(
        self, student_saliency: Tensor, teacher_saliency: Tensor, teacher_logits: Tensor, mask: Tensor | None
    ) -> Tensor:
        """The alignment of two maps ``(B, T)``, or of two stacks ``(B, K, T)`` class by class, weighted by
        the teacher's probabilities (``saliency_target="distribution"``)."""
        args = (self.alignment, self.saliency_temperature)
        if student_saliency.ndim == 2:
            return saliency_alignment_loss(
                student_saliency, teacher_saliency, *args, mask, self.saliency_smoothing
            )
        batch, classes, length = student_saliency.shape
        class_mask = None if mask is None else mask.repeat_interleave(classes, dim=0)
        per_map = saliency_alignment_loss(
            student_saliency.reshape(-1, length), teacher_saliency.reshape(-1, length), *args, class_mask,
            self.saliency_smoothing, reduction="none",
        )  # fmt: skip
        weights = F.softmax(teacher_logits.detach().float(), dim=1)
        return (weights * per_map.view(batch, classes)).sum(dim=1).mean()
