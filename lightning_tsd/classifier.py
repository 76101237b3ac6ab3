"""A plain cross-entropy LightningModule, to train teachers (and baseline students)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tsd._batch import InvalidBatchError, as_bct, call_model, unpack_batch
from lightning_tsd.models import build_model


class TimeSeriesClassifier(L.LightningModule):
    """Train a time-series classifier with cross-entropy.

    Batches are ``(x, y)`` tuples or dicts with ``x``, ``y`` and optionally ``mask`` (passed to the model)
    and ``index``. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and
    ``test/acc`` (multiclass accuracy).

    Args:
        model: the network; when None, ``build_model(model_name, in_channels, num_classes, **model_kwargs)``.
            A given model is not saved in the hyperparameters, so pass it again to ``load_from_checkpoint``.
        model_name: a name of :data:`lightning_tsd.models.MODEL_REGISTRY`.
        in_channels: number of input channels ``C`` (for a built model).
        num_classes: number of classes ``K``; a given model must output ``K`` logits too.
        model_kwargs: further init arguments of the built model.
        lr: AdamW learning rate.
        weight_decay: AdamW (decoupled) weight decay.

    Example:
        >>> clf = TimeSeriesClassifier(model_name="NarrowFCN", in_channels=1, num_classes=3)
        >>> clf(torch.randn(4, 1, 32)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        model_name: str = "InceptionTime",
        in_channels: int = 1,
        num_classes: int = 2,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = (
            model
            if model is not None
            else build_model(model_name, in_channels, num_classes, **(model_kwargs or {}))
        )
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)`` or ``(B, T)``; ``mask`` ``(B, T)`` marks real steps."""
        return call_model(self.model, as_bct(x), mask)

    def _step(self, batch: Any, stage: str) -> Tensor:
        b = unpack_batch(batch, num_classes=self.num_classes)
        if b.y is None:
            raise InvalidBatchError(f"{stage} batches need labels y")
        logits = call_model(self.model, b.x, b.mask)
        if logits.shape[1] != self.num_classes:
            raise InvalidBatchError(
                f"the model returns {logits.shape[1]} logits but num_classes={self.num_classes}"
            )
        loss = F.cross_entropy(logits, b.y)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, b.y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(b.y))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logits of the batch (labels, if any, are ignored)."""
        b = unpack_batch(batch)
        return call_model(self.model, b.x, b.mask)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )
