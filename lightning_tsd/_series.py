"""Array preparation for the data module, Lightning-free: series as ``(C, T_i)`` arrays, sorted class
labels, z-normalisation, right-padding with a mask, and seeded stratified splits and folds."""

from __future__ import annotations

from typing import Any

import numpy as np


def series_list(x: Any) -> list[np.ndarray]:
    """Split ``(N, C, T)``, ``(N, T)`` or a list of ``(C, T_i)``/``(T_i,)`` series into ``(C, T_i)`` arrays."""
    series = [np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in x]
    if len({s.shape[0] for s in series}) > 1:
        raise ValueError(
            f"all series must have the same number of channels, got {sorted({s.shape[0] for s in series})}"
        )
    return series


def sorted_classes(labels: np.ndarray) -> np.ndarray:
    """Unique labels, sorted numerically when they all parse as numbers (so "2" comes before "10")."""
    classes = np.unique(labels)
    try:
        return np.array(sorted(classes, key=float), dtype=classes.dtype)
    except (TypeError, ValueError):
        return classes


def znorm(s: np.ndarray) -> np.ndarray:
    """Z-normalise each channel of one ``(C, T)`` series (a constant channel becomes zeros)."""
    std = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(std < 1e-8, 1.0, std)


def pad(series: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``(C, T_i)`` series on the right to ``length``; return ``(N, C, T)`` values and the mask."""
    x = np.zeros((len(series), series[0].shape[0], length), dtype=np.float32)
    mask = np.zeros((len(series), length), dtype=bool)
    for i, s in enumerate(series):
        x[i, :, : s.shape[1]] = s
        mask[i, : s.shape[1]] = True
    return x, mask


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(y))`` into (train, val), taking ``fraction`` of each class (rounded,
    leaving each class at least one training sample)."""
    rng = np.random.default_rng(seed)
    val_parts = [
        rng.permutation(idx)[: min(int(fraction * len(idx) + 0.5), len(idx) - 1)]
        for idx in (np.flatnonzero(y == c) for c in np.unique(y))
    ]
    val = np.sort(np.concatenate(val_parts))
    return np.setdiff1d(np.arange(len(y)), val), val


def stratified_fold(y: np.ndarray, num_folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified k-fold: split ``range(len(y))`` into (train, val) with ``val`` = fold ``fold`` of
    ``num_folds``. Each class is shuffled, the classes are laid end to end, and the samples are dealt to the
    folds in turn (as scikit-learn's ``StratifiedKFold``): the folds are disjoint, cover every sample once,
    differ in size by at most one, and each holds every class in proportion (within one sample)."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    val = np.sort(order[fold::num_folds])
    return np.setdiff1d(np.arange(len(y)), val), val
