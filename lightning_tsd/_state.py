"""The distiller's hooks outside training: its own state in checkpoints (the bad-batch count, the TSD weight
scale, the epoch's running ``train/agreement``, the teacher cache; restored so that a resumed fit is
bit-exact), and validation, test and predict (agreement, divergence, accuracy, loss)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from lightning_tsd import _compat
from lightning_tsd._batch import Batch, call_model, unpack_batch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.data import AttributeDict

    from lightning_tsd.cache import TeacherCache
    from lightning_tsd.guard import BadBatchGuard
    from lightning_tsd.metrics import DistillationMetrics, TeacherAgreement


class ResumableState:
    """Lightning checkpoint hooks for :class:`~lightning_tsd.TemporalSaliencyDistiller`'s own state.

    The module provides ``guard`` (a :class:`~lightning_tsd.guard.BadBatchGuard`), ``tsd_weight_scale``,
    ``train_agreement`` (a ``TeacherAgreement`` metric) and ``teacher_cache``.
    """

    if TYPE_CHECKING:  # provided by the distiller and its LightningModule base
        guard: BadBatchGuard
        tsd_weight_scale: float
        train_agreement: TeacherAgreement
        _trainer: pl.Trainer | None

        @property
        def teacher_cache(self) -> TeacherCache | None: ...
        # Lightning types it AttributeDict | MutableMapping; the distiller's save_hyperparameters() stores an
        # AttributeDict, which module.py reads as self.hparams.<name>
        @property
        def hparams(self) -> AttributeDict: ...
        @property
        def global_rank(self) -> int: ...

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tsd_skipped_batches"] = self.guard.state_dict()["skipped"]
        checkpoint["tsd_weight_scale"] = self.tsd_weight_scale
        checkpoint["tsd_train_agreement"] = self._running_agreement_state()
        if self.teacher_cache is not None:
            checkpoint["tsd_teacher_cache"] = self.teacher_cache.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict({"skipped": checkpoint.get("tsd_skipped_batches", 0)})
        self.tsd_weight_scale = float(checkpoint.get("tsd_weight_scale", 1.0))
        # The running agreement was summed over ranks when saved: rank 0 takes it, the others start from zero.
        if self.global_rank == 0:
            for name, value in checkpoint.get("tsd_train_agreement", {}).items():
                if name in self.train_agreement.metric_state:
                    setattr(self.train_agreement, name, value.to(self.train_agreement.device))
        if self.teacher_cache is not None and "tsd_teacher_cache" in checkpoint:
            self.teacher_cache.load_state_dict(checkpoint["tsd_teacher_cache"])

    def _running_agreement_state(self) -> dict[str, Tensor]:
        """The epoch's running ``train/agreement`` state, summed over ranks, for a checkpoint taken mid-epoch
        (empty at an epoch's end: a resumed fit must not count the finished epoch again)."""
        trainer = self._trainer
        if trainer is None or _compat.on_last_batch_of_epoch(trainer):
            return {}
        tensors = cast(dict[str, Tensor], self.train_agreement.metric_state)  # no list states (sums, count)
        state = {k: v.detach().clone() for k, v in tensors.items()}
        if trainer.world_size > 1:  # every rank dumps the checkpoint (rank 0 writes it): a collective is safe
            state = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in state.items()}
        return {k: v.cpu() for k, v in state.items()}


class EvaluationHooks:
    """Validation, test and predict steps of :class:`~lightning_tsd.TemporalSaliencyDistiller`: both models on
    each batch, into its ``metrics`` (:class:`~lightning_tsd.metrics.DistillationMetrics`), logged per epoch."""

    if TYPE_CHECKING:  # provided by the distiller and its LightningModule base
        teacher: nn.Module
        student: nn.Module
        metrics: DistillationMetrics
        __call__: Callable[..., Any]
        log_dict: Callable[..., None]

        def _unpack(self, batch: Any, batch_idx: int, deferred: bool = False) -> Batch: ...
        def _read_classes(self, b: Batch) -> None: ...
        def _any_rank(self, flag: bool) -> bool: ...

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        b = self._unpack(batch, batch_idx)
        self._read_classes(b)
        student_logits, teacher_logits = self(b.x, b.mask), call_model(self.teacher, b.x, b.mask)
        self.metrics.update(stage, student_logits, teacher_logits, b.y)

    def _eval_epoch_end(self, stage: str) -> None:
        self.log_dict(self.metrics.compute(stage, self._any_rank), prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        b = unpack_batch(batch)
        return call_model(self.student, b.x, b.mask)
