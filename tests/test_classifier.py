"""TimeSeriesClassifier: it learns an easy problem, logs its keys, handles masks and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tsd._batch import InvalidBatchError
from lightning_tsd.classifier import TimeSeriesClassifier
from lightning_tsd.data import TimeSeriesDataset, UCRDataModule
from lightning_tsd.models import GRUClassifier, NarrowFCN


def easy_problem(n: int = 256, length: int = 32) -> tuple[DataLoader, DataLoader]:
    """Class 0 is a slow sine, class 1 a fast one (random phases), plus noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    phase = 6.3 * torch.rand(n, 1, generator=g)
    freq = torch.where(y == 1, 1.5, 0.3).view(-1, 1)
    x = torch.sin(freq * torch.arange(length) + phase) + 0.3 * torch.randn(n, length, generator=g)
    train, val = TimeSeriesDataset(x[:192], y[:192]), TimeSeriesDataset(x[192:], y[192:])
    loader = torch.Generator().manual_seed(0)
    return DataLoader(train, batch_size=16, shuffle=True, generator=loader), DataLoader(val, batch_size=32)


def test_two_epoch_fit_improves_accuracy(quiet_trainer):
    torch.manual_seed(0)
    train, val = easy_problem()
    clf = TimeSeriesClassifier(model_name="NarrowFCN", in_channels=1, num_classes=2, lr=1e-2)
    fit = quiet_trainer(max_epochs=2)
    before = fit.validate(clf, val, verbose=False)[0]["val/acc"]
    fit.fit(clf, train, val)
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc"} <= set(
        fit.callback_metrics
    )
    after = fit.validate(clf, val, verbose=False)[0]["val/acc"]
    assert after > before and after >= 0.9
    assert fit.test(clf, val, verbose=False)[0]["test/acc"] == pytest.approx(after)


def test_given_model_and_masked_batches_from_the_data_module(quiet_trainer):
    torch.manual_seed(0)
    dm = UCRDataModule("JapaneseVowels", batch_size=32)
    clf = TimeSeriesClassifier(
        GRUClassifier(dm.in_channels, dm.num_classes, hidden_size=8), num_classes=dm.num_classes
    )
    assert "model" not in clf.hparams
    fit = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    fit.fit(clf, datamodule=dm)
    assert torch.isfinite(fit.callback_metrics["val/loss"])
    batch = next(iter(dm.val_dataloader()))
    logits = clf.predict_step(batch, 0)
    torch.testing.assert_close(logits, clf.eval()(batch["x"], mask=batch["mask"]))


def test_checkpoint_round_trip_rebuilds_the_model_from_hparams(quiet_trainer, tmp_path):
    clf = TimeSeriesClassifier(
        model_name="narrowfcn", in_channels=2, num_classes=3, model_kwargs={"num_filters": 4}
    )
    fit = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    data = TimeSeriesDataset(torch.randn(8, 2, 16), torch.arange(8) % 3)
    fit.fit(clf, DataLoader(data, batch_size=4))
    fit.save_checkpoint(tmp_path / "clf.ckpt")
    restored = TimeSeriesClassifier.load_from_checkpoint(tmp_path / "clf.ckpt")
    assert isinstance(restored.model, NarrowFCN) and restored.hparams.model_kwargs == {"num_filters": 4}
    x = torch.randn(2, 2, 16)
    torch.testing.assert_close(restored.eval()(x), clf.eval()(x))


def test_bad_batches_raise_before_training():
    clf = TimeSeriesClassifier(model_name="NarrowFCN", num_classes=2)
    with pytest.raises(InvalidBatchError, match=r"\[0, 2\)"):
        clf.training_step({"x": torch.randn(2, 1, 8), "y": torch.tensor([0, 2])}, 0)
    with pytest.raises(InvalidBatchError, match="labels"):
        clf.training_step({"x": torch.randn(2, 1, 8)}, 0)
    wrong = TimeSeriesClassifier(NarrowFCN(1, 3), num_classes=2)
    with pytest.raises(InvalidBatchError, match="3 logits"):
        wrong.training_step((torch.randn(2, 1, 8), torch.tensor([0, 1])), 0)
