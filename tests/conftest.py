"""Shared fixtures: the quiet Trainer factory, and, for the metric, callback and report tests, toy batches and
a teacher/student module."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from tiny_models import TinyCNN
from torch.utils.data import DataLoader
from trainers import quiet_trainer as _quiet_trainer

from lightning_tsd._batch import call_model, unpack_batch


class ToyTeacherStudent(LightningModule):
    """The smallest module the callbacks accept: ``teacher`` and ``student`` attributes, CE on the student."""

    def __init__(self, channels: int = 2, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.teacher = TinyCNN(channels, classes, width=6).eval().requires_grad_(False)
        self.student = TinyCNN(channels, classes, width=4)

    def _loss(self, batch):
        b = unpack_batch(batch)
        return F.cross_entropy(call_model(self.student, b.x, b.mask), b.y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


def _toy_loader(n=12, channels=2, steps=24, classes=3, batch_size=4, seed=0, padded=True):
    """Dict batches ``x, y, index`` and, when ``padded``, a ``mask`` that pads every third sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, steps, generator=g).cumsum(-1)
    y = torch.randint(0, classes, (n,), generator=g)
    samples = [{"x": x[i], "y": y[i], "index": i} for i in range(n)]
    if padded:
        for i, sample in enumerate(samples):
            sample["mask"] = torch.arange(steps) < (steps - 5 * (i % 3))
    return DataLoader(samples, batch_size=batch_size)


@pytest.fixture
def toy_loader():
    """Factory: ``toy_loader(n=12, channels=2, steps=24, classes=3, batch_size=4, seed=0, padded=True)``."""
    return _toy_loader


@pytest.fixture
def toy_module():
    """Factory: ``toy_module(channels=2, classes=3, seed=0)`` -> a LightningModule with teacher and student."""
    return ToyTeacherStudent


@pytest.fixture
def quiet_trainer(tmp_path):
    """Factory: ``quiet_trainer(**kwargs)`` -> ``trainers.quiet_trainer(default_root_dir=tmp_path, **kwargs)``."""
    return functools.partial(_quiet_trainer, default_root_dir=tmp_path)
