"""Datasets and the UCR/UEA data module, checked against aeon's own loaders."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from aeon.datasets import load_classification, save_to_ts_file
from torch.utils.data import DataLoader

from lightning_tsd.data import BUNDLED_DATASETS, IndexedDataset, TimeSeriesDataset, UCRDataModule

UNEQUAL = {"JapaneseVowels", "PickupGestureWiimoteZ"}


@functools.cache
def aeon_splits(name: str) -> tuple[list[np.ndarray], np.ndarray, int]:
    """All series (train then test, as ``(C, T_i)`` arrays), their raw labels and the train split's size."""
    x_train, y_train = load_classification(name, split="train")
    x_test, y_test = load_classification(name, split="test")
    return [np.asarray(s) for s in [*x_train, *x_test]], np.concatenate([y_train, y_test]), len(y_train)


@functools.cache
def module(name: str, **kwargs) -> UCRDataModule:
    dm = UCRDataModule(name, **kwargs)
    dm.setup()
    return dm


def datasets(dm: UCRDataModule) -> list[TimeSeriesDataset]:
    return [dm.train_dataset, dm.val_dataset, dm.test_dataset]


@pytest.mark.parametrize("name", BUNDLED_DATASETS)
def test_bundled_dataset_matches_aeon(name):
    series, labels, n_train = aeon_splits(name)
    dm = module(name)
    assert dm.num_classes == len(np.unique(labels))
    assert dm.in_channels == series[0].shape[0]
    assert dm.series_length == max(s.shape[1] for s in series)
    assert len(dm.train_dataset) + len(dm.val_dataset) == n_train
    assert len(dm.test_dataset) == len(series) - n_train
    for ds in datasets(dm):
        assert ds.x.dtype == torch.float32 and ds.x.shape[1:] == (dm.in_channels, dm.series_length)
        # labels decode to aeon's raw labels, sample by sample (index = position over train then test)
        assert (dm.classes_[ds.y.numpy()] == labels[ds.index.numpy()]).all()
        if name in UNEQUAL:
            true_lengths = [series[i].shape[1] for i in ds.index.tolist()]
            assert ds.mask.sum(dim=1).tolist() == true_lengths
            assert (ds.x.masked_select(~ds.mask.unsqueeze(1)) == 0).all()
        else:
            assert ds.mask is None


@pytest.mark.parametrize("name", ["GunPoint", "BasicMotions", "JapaneseVowels"])
def test_batches_are_dicts_with_the_documented_shapes(name):
    dm = UCRDataModule(name, batch_size=5)
    batch = next(iter(dm.train_dataloader()))
    expected = {"x", "y", "index"} | ({"mask"} if name in UNEQUAL else set())
    assert set(batch) == expected
    assert batch["x"].shape == (5, dm.in_channels, dm.series_length) and batch["x"].dtype == torch.float32
    assert batch["y"].dtype == batch["index"].dtype == torch.int64
    if "mask" in batch:
        assert batch["mask"].shape == (5, dm.series_length) and batch["mask"].dtype == torch.bool


@pytest.mark.parametrize("name", ["GunPoint", "BasicMotions", "JapaneseVowels"])
def test_per_series_per_channel_normalisation_over_real_steps(name):
    dm = module(name)
    for ds in datasets(dm):
        mask = torch.ones(len(ds), ds.x.shape[-1], dtype=torch.bool) if ds.mask is None else ds.mask
        m = mask.unsqueeze(1).double()
        n = m.sum(dim=-1)
        mean = (ds.x * m).sum(dim=-1) / n
        std = (((ds.x - mean.unsqueeze(-1)) * m) ** 2).sum(dim=-1).div(n).sqrt()
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        constant = std < 1e-3  # a constant channel becomes all zeros
        torch.testing.assert_close(std[~constant], torch.ones_like(std[~constant]), atol=1e-4, rtol=0)


def test_without_normalisation_values_are_aeons():
    series, _, _ = aeon_splits("JapaneseVowels")
    ds = module("JapaneseVowels", normalize=False).test_dataset
    for row in (0, 7, len(ds) - 1):
        i, length = int(ds.index[row]), int(ds.mask[row].sum())
        np.testing.assert_allclose(ds.x[row, :, :length].numpy(), series[i], rtol=1e-6)


@pytest.mark.parametrize("name", ["GunPoint", "JapaneseVowels"])
def test_index_is_unique_and_covers_every_split(name):
    series, _, _ = aeon_splits(name)
    indices = torch.cat([ds.index for ds in datasets(module(name))])
    assert sorted(indices.tolist()) == list(range(len(series)))


def test_split_is_stratified_and_seeded():
    dm = module("OSULeaf")
    train_counts = np.bincount(dm.train_dataset.y.numpy(), minlength=dm.num_classes)
    val_counts = np.bincount(dm.val_dataset.y.numpy(), minlength=dm.num_classes)
    expected = np.floor(0.25 * (train_counts + val_counts) + 0.5)
    np.testing.assert_array_equal(val_counts, expected)
    fresh = UCRDataModule("OSULeaf")
    fresh.setup()
    assert torch.equal(dm.val_dataset.index, fresh.val_dataset.index)
    assert not torch.equal(dm.val_dataset.index, module("OSULeaf", seed=1).val_dataset.index)


@pytest.mark.parametrize("name,k", [("ArrowHead", 3), ("GunPoint", 5)])
def test_cross_validation_folds_are_disjoint_stratified_and_cover_the_train_split(name, k):
    folds = [module(name, cv_folds=k, fold=f, seed=7) for f in range(k)]
    val = [set(dm.val_dataset.index.tolist()) for dm in folds]
    n_train = len(folds[0].train_dataset) + len(folds[0].val_dataset)
    assert sum(len(v) for v in val) == n_train  # disjoint ...
    assert set().union(*val) == set(range(n_train))  # ... and covering every training series once
    for dm, v in zip(folds, val):
        assert set(dm.train_dataset.index.tolist()) == set(range(n_train)) - v  # trains on the others
        # stratified: each class in each fold within one series of its share of that class
        y_all = torch.cat([dm.train_dataset.y, dm.val_dataset.y]).numpy()
        share = np.bincount(y_all, minlength=dm.num_classes) / k
        counts = np.bincount(dm.val_dataset.y.numpy(), minlength=dm.num_classes)
        assert np.all(np.abs(counts - share) < 1), (counts, share)
    again = module(name, cv_folds=k, fold=1, seed=7)
    assert torch.equal(again.val_dataset.index, folds[1].val_dataset.index)  # seeded
    assert not torch.equal(
        module(name, cv_folds=k, fold=1, seed=8).val_dataset.index, folds[1].val_dataset.index
    )


@pytest.mark.parametrize("counts,k", [([1, 1, 1], 3), ([7] * 10, 5), ([2, 9, 1], 4)])
def test_cross_validation_folds_are_balanced_even_with_tiny_classes(counts, k):
    from lightning_tsd._series import stratified_fold

    y = np.repeat(np.arange(len(counts)), counts)
    folds = [stratified_fold(y, k, f, seed=3)[1] for f in range(k)]
    sizes = [len(v) for v in folds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1  # no empty validation fold
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for c, n in enumerate(counts):  # each class spread as evenly as possible
        per_fold = [int((y[v] == c).sum()) for v in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n


def test_cross_validation_options_are_checked():
    for bad in (
        {"cv_folds": 1},
        {"cv_folds": 2.5},
        {"cv_folds": 3, "fold": 3},
        {"cv_folds": 3, "fold": -1},
        {"cv_folds": 3, "fold": 1.5},
        {"fold": 1},
    ):
        with pytest.raises(ValueError, match="cv_folds|fold"):
            UCRDataModule("GunPoint", **bad)
    tiny = UCRDataModule.from_arrays(np.random.default_rng(0).normal(size=(3, 1, 8)), [0, 1, 0], cv_folds=4)
    with pytest.raises(ValueError, match="cv_folds=4 needs at least"):
        tiny.setup()


def test_train_loader_shuffles_reproducibly_and_eval_loaders_do_not():
    def order(loader):
        return torch.cat([b["index"] for b in loader]).tolist()

    a, b = UCRDataModule("GunPoint", batch_size=8), UCRDataModule("GunPoint", batch_size=8)
    assert order(a.train_dataloader()) == order(b.train_dataloader())
    assert order(a.train_dataloader()) != sorted(order(a.train_dataloader()))
    assert order(a.val_dataloader()) == a.val_dataset.index.tolist()
    assert order(a.test_dataloader()) == a.test_dataset.index.tolist()


def test_val_fraction_zero_validates_on_the_test_split():
    dm = module("ItalyPowerDemand", val_fraction=0.0)
    assert dm.val_dataset is dm.test_dataset
    assert len(dm.train_dataset) == 67
    with pytest.raises(ValueError, match="val_fraction"):
        UCRDataModule("GunPoint", val_fraction=1.0)


def test_setup_and_prepare_data_are_idempotent():
    dm = UCRDataModule("ArrowHead")
    dm.prepare_data()
    dm.prepare_data()
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("test")
    dm.setup()
    assert dm.train_dataset is train


def test_unknown_dataset_offline_raises_a_clear_error():
    dm = UCRDataModule("NoSuchUCRDatasetXyz")
    with pytest.raises(RuntimeError, match="NoSuchUCRDatasetXyz") as info:
        dm.setup()
    assert "GunPoint" in str(info.value)


def test_from_arrays_equal_length_with_string_labels():
    rng = np.random.default_rng(0)
    y = np.array(["b", "a", "c"] * 10)
    dm = UCRDataModule.from_arrays(
        rng.normal(size=(30, 40)), y, rng.normal(size=(6, 40)), y[:6], batch_size=4
    )
    assert (dm.num_classes, dm.in_channels, dm.series_length) == (3, 1, 40)
    assert dm.classes_.tolist() == ["a", "b", "c"]
    assert dm.train_dataset.mask is None and dm.name == "arrays"
    assert len(next(iter(dm.test_dataloader()))["x"]) == 4


def test_from_arrays_unequal_lengths_and_no_test_split():
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7, 9, 6, 8, 4, 9]
    x = [rng.normal(size=(2, n)) for n in lengths]
    dm = UCRDataModule.from_arrays(x, [0, 1] * 4, val_fraction=0.0)
    assert dm.series_length == 9 and dm.in_channels == 2
    ds = dm.train_dataset
    assert ds.mask.sum(dim=1).tolist() == [lengths[i] for i in ds.index.tolist()]
    assert dm.val_dataloader() == []
    with pytest.raises(RuntimeError, match="no test split"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="x_test and y_test"):
        UCRDataModule.from_arrays(x, [0, 1] * 4, x_test=x)


def test_from_ts_files(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(2, n)) for n in (6, 8, 5, 8, 7, 6)]
    test = [rng.normal(size=(2, n)) for n in (9, 4)]
    save_to_ts_file(
        train, np.array(["x", "y"] * 3), label_type="classification", path=tmp_path, problem_name="Toy_TRAIN"
    )
    save_to_ts_file(
        test, np.array(["y", "x"]), label_type="classification", path=tmp_path, problem_name="Toy_TEST"
    )
    dm = UCRDataModule.from_ts_files(tmp_path / "Toy_TRAIN.ts", tmp_path / "Toy_TEST.ts", val_fraction=0.0)
    assert dm.name == "Toy"
    assert (dm.num_classes, dm.in_channels, dm.series_length) == (2, 2, 9)
    assert dm.test_dataset.mask.sum(dim=1).tolist() == [9, 4]
    assert dm.test_dataset.y.tolist() == [1, 0]
    assert dm.test_dataset.index.tolist() == [6, 7]


def test_time_series_dataset_items():
    ds = TimeSeriesDataset(np.ones((4, 10)), np.arange(4), mask=np.ones((4, 10), dtype=bool))
    item = ds[2]
    assert item["x"].shape == (1, 10) and item["x"].dtype == torch.float32
    assert item["y"].dtype == item["index"].dtype == torch.int64 and int(item["index"]) == 2
    assert item["mask"].shape == (10,) and item["mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="integers"):
        TimeSeriesDataset(np.ones((4, 10)), np.ones(4))
    with pytest.raises(ValueError, match="mask"):
        TimeSeriesDataset(np.ones((4, 10)), np.arange(4), mask=np.ones((4, 9), dtype=bool))


def test_indexed_dataset_adds_an_index_to_pairs_and_dicts():
    pairs = IndexedDataset(torch.utils.data.TensorDataset(torch.randn(5, 1, 8), torch.arange(5)))
    batch = next(iter(DataLoader(pairs, batch_size=5)))
    assert set(batch) == {"x", "y", "index"} and batch["index"].tolist() == [0, 1, 2, 3, 4]
    dicts = IndexedDataset([{"x": np.zeros((2, 3)), "y": 1, "mask": [True, True, False]}])
    item = dicts[0]
    assert set(item) == {"x", "y", "index", "mask"} and item["mask"].dtype == torch.bool
    assert item["x"].dtype == torch.float32 and item["y"].dtype == torch.int64
    with pytest.raises(TypeError, match="pairs"):
        IndexedDataset([torch.zeros(3)])[0]


def test_inconsistent_arrays_are_refused():
    x = np.zeros((4, 2, 5))
    with pytest.raises(ValueError, match="channels"):
        UCRDataModule.from_arrays(x, [0, 1, 0, 1], np.zeros((2, 3, 5)), [0, 1]).setup()
    with pytest.raises(ValueError, match="4 series but 3 labels"):
        UCRDataModule.from_arrays(x, [0, 1, 0]).setup()
    x[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match="1 missing"):
        UCRDataModule.from_arrays(x, [0, 1, 0, 1]).setup()
