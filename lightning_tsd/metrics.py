"""torchmetrics ``Metric`` classes for teacher/student agreement, built on :mod:`lightning_tsd.functional`.

Like torchmetrics' ``update(preds, target)``, ``update`` takes the student first and the teacher second.
Each metric keeps the sum of its per-sample values and the sample count (``dist_reduce_fx="sum"``), so
``compute()`` is the mean over every sample seen, on every rank: it syncs under DDP with no extra code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_tsd.functional import (
    ALIGNMENT_KEYS,
    DIVERGENCE_KEYS,
    saliency_alignment,
    teacher_agreement,
    teacher_student_divergence,
)

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


class _MeanOfPerSample(Metric):
    """Mean over samples of named per-sample values; states are one vector of sums and a count."""

    full_state_update = False
    is_differentiable = False
    keys: tuple[str, ...] = ()

    sums: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sums", default=torch.zeros(len(self.keys)), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, per_sample: dict[str, Tensor]) -> None:
        values = torch.stack([per_sample[key] for key in self.keys])  # (num_keys, B)
        self.sums += values.sum(1).to(self.sums.dtype)
        self.count += values.shape[1]

    def _means(self) -> dict[str, Tensor]:
        return dict(zip(self.keys, self.sums / self.count))


class SaliencyAlignment(_MeanOfPerSample):
    """Mean per-sample Spearman, Pearson, cosine and top-k overlap of student vs teacher saliency maps.

    Args:
        topk_fraction: top-k overlap uses ``k = max(1, round(topk_fraction * T_real))`` per sample.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ...).

    Example:
        >>> metric = SaliencyAlignment(topk_fraction=0.5)
        >>> teacher = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> metric.update(teacher.flip(1), teacher)
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'spearman': -1.0, 'pearson': -1.0, 'cosine': 0.67, 'topk_overlap': 0.0}
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    keys = ALIGNMENT_KEYS

    def __init__(self, topk_fraction: float = 0.1, **kwargs: Any) -> None:
        if not 0 < topk_fraction <= 1:
            raise ValueError(f"topk_fraction must lie in (0, 1], got {topk_fraction}")
        super().__init__(**kwargs)
        self.topk_fraction = topk_fraction

    def update(self, student_saliency: Tensor, teacher_saliency: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch of ``(B, T)`` maps; ``mask`` (``(B, T)`` bool) marks the real steps."""
        self._accumulate(saliency_alignment(student_saliency, teacher_saliency, mask, self.topk_fraction))

    def compute(self) -> dict[str, Tensor]:
        """Means over all samples: ``spearman``, ``pearson``, ``cosine``, ``topk_overlap``."""
        return self._means()


class TeacherAgreement(_MeanOfPerSample):
    """Fraction of samples whose teacher-predicted class is in the student's ``top_k`` (top-1: same argmax).

    Example:
        >>> metric = TeacherAgreement()
        >>> metric.update(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        >>> metric.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    keys = ("agreement",)

    def __init__(self, top_k: int = 1, **kwargs: Any) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        super().__init__(**kwargs)
        self.top_k = top_k

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Add a batch of ``(B, K)`` logits."""
        self._accumulate({"agreement": teacher_agreement(student_logits, teacher_logits, self.top_k)})

    def compute(self) -> Tensor:
        """The agreement rate over all samples."""
        return self._means()["agreement"]


class TeacherStudentDivergence(_MeanOfPerSample):
    """Mean ``kl`` = KL(softmax(z_T) || softmax(z_S)) and ``js`` (Jensen-Shannon), natural log.

    Example:
        >>> metric = TeacherStudentDivergence()
        >>> metric.update(torch.zeros(1, 2), torch.tensor([[0.0, 100.0]]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'kl': 0.6931, 'js': 0.2158}
    """

    higher_is_better = False
    plot_lower_bound = 0.0
    keys = DIVERGENCE_KEYS

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        """Add a batch of ``(B, K)`` logits."""
        self._accumulate(teacher_student_divergence(student_logits, teacher_logits))

    def compute(self) -> dict[str, Tensor]:
        """Means over all samples: ``kl`` and ``js``."""
        return self._means()


class DistillationMetrics(torch.nn.Module):
    """The distiller's validation and test metrics: agreement, divergence, student and teacher accuracy, and
    the student's cross-entropy, one torchmetrics collection per stage (they sync under DDP).

    Args:
        num_classes: the class count (None: accuracy and loss need it, so only agreement and divergence).
        stages: the stages to keep metrics for.

    Example:
        >>> metrics = DistillationMetrics(3)
        >>> z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> metrics.update("val", z, z, torch.tensor([0, 2]))
        >>> values = metrics.compute("val")
        >>> float(values["val/agreement"]), float(values["val/acc"])
        (1.0, 0.5)
    """

    def __init__(self, num_classes: int | None, stages: tuple[str, ...] = ("val", "test")) -> None:
        super().__init__()
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        self.num_classes = num_classes
        self.stages = torch.nn.ModuleDict()
        for stage in stages:
            metrics: dict[str, Metric | MetricCollection] = {
                "agreement": TeacherAgreement(),
                "divergence": TeacherStudentDivergence(),
            }
            if num_classes is not None:
                metrics["acc"] = MulticlassAccuracy(num_classes, average="micro")
                metrics["teacher_acc"] = MulticlassAccuracy(num_classes, average="micro")
            metrics["loss"] = MeanMetric(nan_strategy="disable")  # the student's CE (NaN stays NaN)
            self.stages[stage] = MetricCollection(metrics, compute_groups=False)

    def __getitem__(self, stage: str) -> Any:
        return self.stages[stage]

    def update(self, stage: str, student_logits: Tensor, teacher_logits: Tensor, y: Tensor | None) -> None:
        """Update the stage's metrics with one batch (accuracy and loss only for labelled batches)."""
        metrics = cast("MetricCollection", self.stages[stage])
        metrics["agreement"].update(student_logits, teacher_logits)
        metrics["divergence"].update(student_logits, teacher_logits)
        if y is not None and "acc" in metrics:
            metrics["acc"].update(student_logits, y)
            metrics["teacher_acc"].update(teacher_logits, y)
            # a metric, not self.log(sync_dist=True): ranks whose batches lack labels must not skip a collective
            per_sample = torch.nn.functional.cross_entropy(student_logits.float(), y, reduction="none")
            metrics["loss"].update(per_sample)

    def compute(self, stage: str, any_rank: Any = bool) -> dict[str, Tensor]:
        """``{"{stage}/{name}": value}`` for every metric updated on any rank, then reset.

        ``compute()`` syncs, so every rank must call it for a metric or none: ``any_rank(flag)`` (an
        all-reduce under DDP) decides for all of them.
        """
        values: dict[str, Tensor] = {}
        for name, metric in cast("MetricCollection", self.stages[stage]).items():
            if not any_rank(metric.update_called):
                continue
            result = metric.compute()
            if isinstance(result, dict):
                values.update({f"{stage}/{key}": value for key, value in result.items()})
            else:
                values[f"{stage}/{name}"] = result
            with torch.inference_mode(False):  # fresh states usable by a later fit (no inference tensors)
                metric.reset()
        return values
