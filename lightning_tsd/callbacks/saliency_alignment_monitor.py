"""``SaliencyAlignmentMonitor``: how well the student's saliency maps align with the teacher's, logged
during validation and test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_tsd._batch import unpack_batch
from lightning_tsd.attribution import SALIENCY_TARGETS, check_attribution_options, saliency_pair
from lightning_tsd.callbacks._common import (
    STAGES,
    check_choice,
    check_positive,
    on_epoch_grid,
    teacher_student,
)
from lightning_tsd.metrics import SaliencyAlignment

__all__ = ["SaliencyAlignmentMonitor"]


class SaliencyAlignmentMonitor(Callback):
    """Log how well the student's saliency maps align with the teacher's, during validation and test.

    On the first ``max_batches`` batches of each validation epoch (every ``every_n_epochs`` epochs; not
    during the sanity check) and of each test epoch, it attributes both models and updates a
    :class:`~lightning_tsd.metrics.SaliencyAlignment` metric; at epoch end it logs
    ``{val,test}/saliency_{spearman,pearson,cosine,topk_overlap}``. The metric syncs across ranks.

    Args:
        method: attribution method, one of ``integrated_gradients``, ``gradient``, ``input_x_gradient``,
            ``occlusion``, ``feature_ablation`` (``"saliency"``, captum's name of ``gradient``, is
            deprecated).
        target: class to attribute: ``"teacher"`` (its prediction) or ``"label"`` (``y``).
        max_batches: batches per epoch to attribute.
        every_n_epochs: validation epochs between two measurements (test always measures).
        stages: loops to watch, among ``"validate"`` (also the validation inside ``fit``) and ``"test"``.
        options: the method's options (e.g. ``{"steps": 16}`` for integrated gradients, ``window`` and
            ``stride`` for occlusion); see :func:`lightning_tsd.attribution.temporal_attribution`.
        topk_fraction: fraction of the real steps used for top-k overlap.
        method_kwargs: deprecated name of ``options`` (removed in 0.3.0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = SaliencyAlignmentMonitor(method="gradient", max_batches=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        method: str = "integrated_gradients",
        target: str = "teacher",
        max_batches: int = 4,
        every_n_epochs: int = 1,
        stages: Sequence[str] = STAGES,
        options: Mapping[str, Any] | None = None,
        topk_fraction: float = 0.1,
        *,
        method_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        method, options = check_attribution_options(method, options, method_kwargs)
        check_choice("target", target, SALIENCY_TARGETS)
        check_positive("max_batches", max_batches)
        check_positive("every_n_epochs", every_n_epochs)
        for stage in stages:
            check_choice("each of stages", stage, STAGES)
        self.method, self.target, self.options = method, target, options
        self.max_batches, self.every_n_epochs, self.stages = max_batches, every_n_epochs, tuple(stages)
        self.metric = SaliencyAlignment(topk_fraction=topk_fraction)
        self._active = False
        self._seen = 0

    def _should_measure(self, stage: str, epoch: int, sanity_checking: bool) -> bool:
        """Whether this epoch of ``stage`` (``"validate"`` or ``"test"``) is measured; no side effect.

        Example:
            >>> monitor = SaliencyAlignmentMonitor(every_n_epochs=2)
            >>> [monitor._should_measure("validate", e, sanity_checking=False) for e in range(3)]
            [False, True, False]
            >>> monitor._should_measure("test", 0, sanity_checking=False)
            True
        """
        if stage not in self.stages:
            return False
        return stage == "test" or on_epoch_grid(epoch, self.every_n_epochs, sanity_checking)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        teacher_student(pl_module)

    def _start(self, pl_module: LightningModule, active: bool) -> None:
        self._active, self._seen = active, 0
        self.metric.reset()
        self.metric.to(pl_module.device)

    def _update(self, pl_module: LightningModule, batch: Any) -> None:
        if not self._active or self._seen >= self.max_batches:
            return
        self._seen += 1
        teacher, student = teacher_student(pl_module)
        b = unpack_batch(batch)
        pair = saliency_pair(teacher, student, b, method=self.method, target=self.target, **self.options)
        self.metric.update(pair.student_saliency, pair.teacher_saliency, b.mask)

    def _log(self, pl_module: LightningModule, prefix: str) -> None:
        if not self._active:
            return
        values = self.metric.compute()  # already synced across ranks by torchmetrics
        pl_module.log_dict({f"{prefix}/saliency_{k}": v for k, v in values.items()}, sync_dist=True)
        self.metric.reset()
        self._active = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(
            pl_module, self._should_measure("validate", trainer.current_epoch, trainer.sanity_checking)
        )

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module, self._should_measure("test", trainer.current_epoch, trainer.sanity_checking))

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(pl_module, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "test")
