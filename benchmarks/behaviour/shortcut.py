"""Shortcut transfer sets: a class-coded artefact in the student's transfer data, which its teacher ignores.

The teacher (the package's InceptionTime) is trained on the clean train split with a random artefact added to
half of each batch (a random kind at a random position), so that it learns to ignore artefacts; it must keep
at least 0.99 of its predictions on the shortcut transfer set (checked and printed). The student's transfer
set is the train split with an artefact at a position coded by the teacher's predicted class,
``(c + 1) * T / (K + 1)``: a perfect shortcut to the teacher's labels that the teacher never used.

Measures on the clean test split (:func:`behaviour`): accuracy and agreement with the teacher; with a *wrong*
class's artefact added (each series gets the artefact of the class after the teacher's, cyclically), the
fraction of series where the student predicts the artefact's class ("follows").

Plain torch and the package only; the scripts in this folder drive it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ARTEFACTS = ("spike", "burst", "shift")
AMPLITUDE = 4.0  # in units of the (z-normalised) series' std


def artefact(kind: str, length: int, centre: Tensor, amplitude: float = AMPLITUDE) -> Tensor:
    """``(N, T)`` additive artefacts centred at ``centre`` (``(N,)`` steps): ``spike`` (+a over 3 steps),
    ``burst`` (a sine of amplitude a/2 and period 4 over 12 steps) or ``shift`` (+a/2 over T/10 steps)."""
    steps = torch.arange(length).float().unsqueeze(0)  # (1, T)
    offset = steps - centre.float().unsqueeze(1)  # (N, T)
    if kind == "spike":
        return amplitude * (offset.abs() <= 1).float()
    if kind == "burst":
        return 0.5 * amplitude * torch.sin(2 * math.pi * offset / 4) * (offset.abs() < 6).float()
    if kind == "shift":
        half = max(2, length // 20)
        return 0.5 * amplitude * (offset.abs() < half).float()
    raise ValueError(f"artefact kind must be one of {ARTEFACTS}, got {kind!r}")


def class_position(cls: Tensor, num_classes: int, length: int) -> Tensor:
    """The artefact's centre for class ``cls``: ``(c + 1) * T / (K + 1)``."""
    return ((cls.long() + 1) * length) // (num_classes + 1)


def with_artefact(x: Tensor, cls: Tensor, kind: str, num_classes: int) -> Tensor:
    """``x`` ``(N, C, T)`` with the artefact of class ``cls`` ``(N,)`` added to every channel."""
    length = x.shape[-1]
    return x + artefact(kind, length, class_position(cls, num_classes, length)).unsqueeze(1).to(x)


def random_artefacts(x: Tensor, generator: torch.Generator, fraction: float = 0.5) -> Tensor:
    """``x`` with a random artefact (kind and position) added to a random ``fraction`` of the series."""
    n, _, length = x.shape
    hit = torch.rand(n, generator=generator) < fraction
    kinds = torch.randint(len(ARTEFACTS), (n,), generator=generator)
    centres = torch.randint(length, (n,), generator=generator)
    out = x.clone()
    for k, kind in enumerate(ARTEFACTS):
        rows = hit & (kinds == k)
        if rows.any():
            out[rows] += artefact(kind, length, centres[rows]).unsqueeze(1).to(x)
    return out


def train_teacher(model: torch.nn.Module, x: Tensor, y: Tensor, epochs: int, seed: int) -> torch.nn.Module:
    """Fit ``model`` on ``(x, y)`` with random artefacts in half of each batch (AdamW 1e-3, cosine, batch
    16); return it frozen in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    steps = epochs * math.ceil(len(y) / 16)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 16):
            rows = order[i : i + 16]
            if len(rows) < 2:
                continue
            loss = F.cross_entropy(model(random_artefacts(x[rows], gen)), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


def predict(model: torch.nn.Module, x: Tensor) -> Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(1)
    model.train(was)
    return out


def wrong_class(cls: Tensor, num_classes: int) -> Tensor:
    """The class after ``cls``, cyclically: the wrong artefact each test series gets."""
    return (cls + 1) % num_classes


@dataclass
class ShortcutSet:
    """A teacher's shortcut transfer set and its test split."""

    kind: str
    x_transfer: Tensor  # train split + the artefact of the teacher's class
    y_transfer: Tensor
    x_test: Tensor
    y_test: Tensor
    teacher_test: Tensor  # teacher's predictions on the clean test split
    num_classes: int
    kept: float  # fraction of the teacher's train predictions unchanged by the transfer artefacts


def shortcut_set(teacher: torch.nn.Module, x_train, y_train, x_test, y_test, kind: str, num_classes: int):
    """Build the shortcut transfer set of ``kind`` for ``teacher`` (see the module's docstring)."""
    clean = predict(teacher, x_train)
    x_transfer = with_artefact(x_train, clean, kind, num_classes)
    kept = float((predict(teacher, x_transfer) == clean).float().mean())
    return ShortcutSet(kind, x_transfer, y_train, x_test, y_test, predict(teacher, x_test), num_classes, kept)


def behaviour(student: torch.nn.Module, s: ShortcutSet) -> dict[str, float]:
    """Clean accuracy and agreement, and the fraction following a wrong class's artefact."""
    clean = predict(student, s.x_test)
    wrong = wrong_class(s.teacher_test, s.num_classes)
    spiked = predict(student, with_artefact(s.x_test, wrong, s.kind, s.num_classes))
    return dict(
        accuracy=float((clean == s.y_test).float().mean()),
        agreement=float((clean == s.teacher_test).float().mean()),
        follows=float((spiked == wrong).float().mean()),
    )


TEACHER_EPOCHS = 150


def load(name: str, split: str = "test", seed: int = 0):
    """``(x_train, y_train, x_eval, y_eval, K)``: the train split and the test split (``split="test"``), or the
    other folds and the held-out fold 0 of 3-fold CV of the train split, repeat ``seed`` (``split="cv"``)."""
    from lightning_tsd.data import UCRDataModule

    kw = dict(batch_size=16, seed=seed)
    dm = (
        UCRDataModule(name, val_fraction=0.0, **kw)
        if split == "test"
        else UCRDataModule(name, cv_folds=3, fold=0, **kw)
    )
    dm.setup()
    ev = dm.test_dataset if split == "test" else dm.val_dataset
    if dm.train_dataset.mask is not None:
        raise SystemExit(f"{name} has unequal lengths; the shortcut sets need equal-length series")
    return dm.train_dataset.x, dm.train_dataset.y, ev.x, ev.y, dm.num_classes


def cached_teacher(path: Path, data, seed: int) -> torch.nn.Module:
    """The teacher file at ``path``, or an InceptionTime trained on ``data``'s train series with random
    artefacts (:func:`train_teacher`, ``TEACHER_EPOCHS``, seeded by ``seed``) and written there first."""
    from lightning_tsd.checkpoint import load_teacher, save_teacher
    from lightning_tsd.models import InceptionTime

    if path.exists():
        return load_teacher(path).eval().requires_grad_(False)
    x, y, _, _, k = data
    torch.manual_seed(30_000 + seed)
    teacher = train_teacher(InceptionTime(x.shape[1], k), x, y, TEACHER_EPOCHS, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_teacher(teacher, path)
    return teacher
