"""Datasets and the UCR/UEA data module.

Every item is a dict with ``x`` (``(C, T)`` float32), ``y`` (int64), ``index`` (int64: the sample's
position, which keys the teacher cache) and, for unequal-length series, ``mask`` (``(T,)`` bool, True on
real steps), so batches are dicts of ``(B, C, T)``, ``(B,)``, ``(B,)`` and ``(B, T)`` tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_tsd._series import pad, series_list, sorted_classes, stratified_fold, stratified_split, znorm

BUNDLED_DATASETS: tuple[str, ...] = (
    "ACSF1",
    "ArrowHead",
    "BasicMotions",
    "GunPoint",
    "ItalyPowerDemand",
    "JapaneseVowels",
    "OSULeaf",
    "PickupGestureWiimoteZ",
)
"""Classification datasets shipped with aeon, so they load offline."""

ArrayLike = np.ndarray | Tensor | Sequence[Any]
_Raw = tuple[ArrayLike, ArrayLike, ArrayLike | None, ArrayLike | None]


def _int_labels(y: ArrayLike, n: int) -> Tensor:
    """``y`` as an int64 ``(n,)`` tensor, or a ``ValueError`` saying why it cannot be one."""
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if torch.is_floating_point(y) or y.dtype == torch.bool or y.shape != (n,):
        raise ValueError(
            f"labels must be {n} integers (label-encode them first), got {y.dtype} {tuple(y.shape)}"
        )
    return y.long()


class TimeSeriesDataset(Dataset):
    """A map-style dataset over in-memory series whose items are dicts ``x``, ``y``, ``index`` (+ ``mask``).

    Args:
        x: ``(N, C, T)`` or univariate ``(N, T)`` values (numpy array or tensor), stored as float32.
        y: ``N`` integer labels.
        mask: optional ``(N, T)`` bool, True on real steps.
        index: optional ``N`` integer ids reported as ``index`` (default ``0..N-1``).

    Example:
        >>> ds = TimeSeriesDataset(np.zeros((3, 8)), [0, 1, 0])
        >>> item = ds[1]
        >>> item["x"].shape, item["y"], item["index"]
        (torch.Size([1, 8]), tensor(1), tensor(1))
    """

    def __init__(
        self, x: ArrayLike, y: ArrayLike, mask: ArrayLike | None = None, index: ArrayLike | None = None
    ) -> None:
        x = torch.as_tensor(x, dtype=torch.float32)
        self.x = x.unsqueeze(1) if x.ndim == 2 else x
        if self.x.ndim != 3:
            raise ValueError(f"x must have shape (N, C, T) or (N, T), got {tuple(x.shape)}")
        n, _, length = self.x.shape
        self.y = _int_labels(y, n)
        self.mask = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        if self.mask is not None and self.mask.shape != (n, length):
            raise ValueError(f"mask must have shape (N, T) = {(n, length)}, got {tuple(self.mask.shape)}")
        self.index = torch.arange(n) if index is None else _int_labels(index, n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"x": self.x[i], "y": self.y[i], "index": self.index[i]}
        if self.mask is not None:
            item["mask"] = self.mask[i]
        return item


class IndexedDataset(Dataset):
    """Wrap a map-style dataset of ``(x, y)`` pairs or dicts so that its items are dicts with ``x``,
    ``y``, ``index`` (the item's position in the wrapped dataset) and ``mask`` when the item has one.

    Example:
        >>> ds = IndexedDataset([(torch.zeros(1, 4), 1), (torch.ones(1, 4), 0)])
        >>> sorted(ds[1]), ds[1]["index"]
        (['index', 'x', 'y'], tensor(1))
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            x, y, mask = item["x"], item.get("y"), item.get("mask")
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            (x, y), mask = item, None
        else:
            raise TypeError(f"items must be (x, y) pairs or dicts with key 'x', got {type(item).__name__}")
        out = {"x": torch.as_tensor(x, dtype=torch.float32), "index": torch.tensor(i, dtype=torch.long)}
        if y is not None:
            out["y"] = torch.as_tensor(y, dtype=torch.long)
        if mask is not None:
            out["mask"] = torch.as_tensor(mask, dtype=torch.bool)
        return out


def _load_aeon(name: str, extract_path: str | None) -> _Raw:
    from aeon.datasets import load_classification

    try:
        x_train, y_train = load_classification(name, split="train", extract_path=extract_path)
        x_test, y_test = load_classification(name, split="test", extract_path=extract_path)
    except Exception as err:  # aeon raises ValueError, OSError, URLError... for a failed download
        raise RuntimeError(
            f"could not load the UCR/UEA dataset {name!r}: {err}. Without network access use one bundled "
            f"with aeon {BUNDLED_DATASETS}, or UCRDataModule.from_ts_files / UCRDataModule.from_arrays"
        ) from err
    return x_train, y_train, x_test, y_test


def _load_ts_files(train_path: str | Path, test_path: str | Path | None) -> _Raw:
    from aeon.datasets import load_from_ts_file

    x_train, y_train = load_from_ts_file(str(train_path))
    x_test, y_test = load_from_ts_file(str(test_path)) if test_path is not None else (None, None)
    return x_train, y_train, x_test, y_test


class UCRDataModule(L.LightningDataModule):
    """A UCR/UEA classification dataset (via aeon), label-encoded, z-normalised and split.

    The train split is divided into train and validation sets (seeded, stratified by class); the test
    split is the test set. With ``val_fraction=0`` the whole train split trains and validation runs on
    the test split. Labels are encoded as positions in ``classes_`` (sorted, numerically when the labels
    are numbers). Unequal-length series (e.g. JapaneseVowels) are zero-padded on the right to the longest
    series over all splits, and every batch then carries a ``mask``. ``index`` is unique over all splits:
    positions ``0..N_train-1`` of the train split (shared by the train and validation sets), then
    ``N_train..`` for the test split.

    ``classes_``, ``num_classes``, ``in_channels`` and ``series_length`` are available after ``setup()``
    (reading them runs it); ``prepare_data()`` and ``setup()`` may be called any number of times.

    Args:
        name: a UCR/UEA dataset name; those in :data:`BUNDLED_DATASETS` load offline, others are downloaded.
        batch_size: samples per batch.
        val_fraction: share of each class of the train split held out for validation, in ``[0, 1)``.
            Ignored when ``cv_folds`` is set.
        cv_folds: cross-validation on small train splits: cut the train split into this many stratified,
            seeded, disjoint folds (>= 2) and validate on fold ``fold``, training on the others. Running
            ``fold=0..cv_folds-1`` validates every training series exactly once. ``None`` (default) uses
            ``val_fraction`` instead.
        fold: which fold validates, in ``[0, cv_folds)``.
        normalize: z-normalise each series and channel over its real steps.
        seed: seed of the split and of the training shuffle.
        num_workers: ``DataLoader`` worker processes.
        extract_path: where aeon keeps downloaded datasets (its default when None).

    Example:
        >>> dm = UCRDataModule("GunPoint", batch_size=8)
        >>> dm.setup()
        >>> dm.num_classes, dm.in_channels, dm.series_length
        (2, 1, 150)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), batch["x"].shape
        (['index', 'x', 'y'], torch.Size([8, 1, 150]))
    """

    def __init__(
        self,
        name: str = "GunPoint",
        batch_size: int = 16,
        val_fraction: float = 0.25,
        normalize: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        extract_path: str | None = None,
        cv_folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if cv_folds is not None and (int(cv_folds) != cv_folds or cv_folds < 2):
            raise ValueError(f"cv_folds must be an integer >= 2 (or None), got {cv_folds}")
        if cv_folds is not None and (int(fold) != fold or not 0 <= fold < cv_folds):
            raise ValueError(f"fold must be an integer in [0, cv_folds={cv_folds}), got {fold}")
        if cv_folds is None and fold != 0:
            raise ValueError(f"fold={fold} needs cv_folds (the number of folds)")
        self.cv_folds = cv_folds
        self.fold = fold
        self.save_hyperparameters()
        self.name = name
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.normalize = normalize
        self.seed = seed
        self.num_workers = num_workers
        self._load_raw: Callable[[], _Raw] = functools.partial(_load_aeon, name, extract_path)
        self._needs_download = extract_path is not None or name not in BUNDLED_DATASETS
        self.classes_: np.ndarray | None = None
        self.train_dataset: TimeSeriesDataset | None = None
        self.val_dataset: TimeSeriesDataset | None = None
        self.test_dataset: TimeSeriesDataset | None = None

    @classmethod
    def from_arrays(
        cls,
        x_train: ArrayLike,
        y_train: ArrayLike,
        x_test: ArrayLike | None = None,
        y_test: ArrayLike | None = None,
        **kwargs: Any,
    ) -> UCRDataModule:
        """A data module over in-memory series: ``(N, C, T)``/``(N, T)`` arrays or tensors, or lists of
        ``(C, T_i)`` arrays for unequal lengths; labels of any sortable type. ``kwargs`` go to ``__init__``
        (``name`` defaults to ``"arrays"``). Without a test split, ``test_dataloader`` raises.

        Example:
            >>> dm = UCRDataModule.from_arrays(np.random.randn(20, 2, 30), ["a", "b"] * 10, val_fraction=0.2)
            >>> dm.setup()
            >>> dm.classes_.tolist(), len(dm.train_dataset), len(dm.val_dataset)
            (['a', 'b'], 16, 4)
        """
        if (x_test is None) != (y_test is None):
            raise ValueError("pass both x_test and y_test, or neither")
        dm = cls(**{"name": "arrays", **kwargs})
        dm._load_raw, dm._needs_download = (lambda: (x_train, y_train, x_test, y_test)), False
        return dm

    @classmethod
    def from_ts_files(
        cls, train_path: str | Path, test_path: str | Path | None = None, **kwargs: Any
    ) -> UCRDataModule:
        """A data module over ``.ts`` files (read with ``aeon.datasets.load_from_ts_file``); ``kwargs`` go
        to ``__init__`` (``name`` defaults to the train file's stem without ``_TRAIN``)."""
        dm = cls(**{"name": Path(train_path).stem.removesuffix("_TRAIN"), **kwargs})
        dm._load_raw, dm._needs_download = functools.partial(_load_ts_files, train_path, test_path), False
        return dm

    def prepare_data(self) -> None:
        """Download the dataset if it is neither bundled with aeon nor given as arrays or files."""
        if self._needs_download:
            self._load_raw()

    def setup(self, stage: str | None = None) -> None:
        """Load, encode, normalise, pad and split the data (once; later calls do nothing)."""
        if self.classes_ is not None:
            return
        x_train, y_train, x_test, y_test = self._load_raw()
        # y_test is given with x_test (from_arrays checks it; the loaders return both or neither)
        splits = [(x_train, y_train)] + ([(x_test, cast(ArrayLike, y_test))] if x_test is not None else [])
        for xs, ys in splits:
            if len(xs) != len(ys):
                raise ValueError(f"got {len(xs)} series but {len(ys)} labels")
        series = series_list([s for xs, _ in splits for s in xs])  # also checks channels agree
        y_all = np.concatenate([np.asarray(ys) for _, ys in splits])
        bad = sum(int((~np.isfinite(s)).sum()) for s in series)
        if bad:
            raise ValueError(
                f"dataset {self.name!r} has {bad} missing or non-finite values; impute them first"
            )
        classes = sorted_classes(y_all)
        codes = {label: i for i, label in enumerate(classes)}
        y_all = np.array([codes[label] for label in y_all], dtype=np.int64)
        if self.normalize:
            series = [znorm(s) for s in series]
        x, padded = pad(series, max(s.shape[1] for s in series))
        mask = None if padded.all() else padded
        n = len(x_train)

        def subset(idx: np.ndarray) -> TimeSeriesDataset:
            return TimeSeriesDataset(x[idx], y_all[idx], None if mask is None else mask[idx], index=idx)

        if self.cv_folds is not None:
            if n < self.cv_folds:
                raise ValueError(f"cv_folds={self.cv_folds} needs at least as many training series; got {n}")
            train_idx, val_idx = stratified_fold(y_all[:n], self.cv_folds, self.fold, self.seed)
        else:
            train_idx, val_idx = stratified_split(y_all[:n], self.val_fraction, self.seed)
            if self.val_fraction > 0 and len(val_idx) == 0:
                raise ValueError(
                    f"val_fraction={self.val_fraction} holds out no sample of {n}; raise it, or use 0 to validate on test"
                )
        self.train_dataset = subset(train_idx)
        self.test_dataset = subset(np.arange(n, len(series))) if x_test is not None else None
        holds_out = self.cv_folds is not None or self.val_fraction > 0
        self.val_dataset = subset(val_idx) if holds_out else self.test_dataset
        self.classes_ = classes

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, self.batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) batches of the training set."""
        self.setup()
        assert self.train_dataset is not None  # set by setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation set (the test split when ``val_fraction=0``; none without one)."""
        self.setup()
        return [] if self.val_dataset is None else self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split."""
        self.setup()
        if self.test_dataset is None:
            raise RuntimeError(f"{self.name!r} has no test split; pass x_test/y_test or test_path")
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test split (``predict_step`` ignores the labels)."""
        return self.test_dataloader()

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (over all splits)."""
        self.setup()
        assert self.classes_ is not None  # set by setup()
        return len(self.classes_)

    @property
    def in_channels(self) -> int:
        """Number of channels ``C``."""
        self.setup()
        assert self.train_dataset is not None  # set by setup()
        return self.train_dataset.x.shape[1]

    @property
    def series_length(self) -> int:
        """Length ``T`` of every batch (the longest series over all splits)."""
        self.setup()
        assert self.train_dataset is not None  # set by setup()
        return self.train_dataset.x.shape[2]
