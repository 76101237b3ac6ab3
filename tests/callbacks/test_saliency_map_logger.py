"""SaliencyMapLogger: PNG files without an image logger, TensorBoard figures, an offline W&B run (with the
monitor's metrics beside the images), the figure it draws, and its argument checks."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers.callback_fits import callback_trainer, read_png
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_tsd.callbacks import SaliencyAlignmentMonitor, SaliencyMapLogger
from lightning_tsd.functional import ALIGNMENT_KEYS
from lightning_tsd.plotting import plot_saliency

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning")


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_saliency_png(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(channels, 40, generator=g).cumsum(-1).squeeze(0)
    mask = torch.arange(40) < 33
    fig = plot_saliency(x, torch.rand(40, generator=g), torch.rand(40, generator=g), mask, title="t", dpi=50)
    path = tmp_path / "saliency.png"
    fig.savefig(path)
    pixels = read_png(path)
    assert pixels.shape == (200, 400, 3)  # figsize (8, 4) inches at 50 dpi
    assert pixels.std() > 10
    assert len(fig.axes[0].lines) == channels


def test_map_logger_writes_pngs_without_image_logger(tmp_path, toy_module, toy_loader):
    callback = SaliencyMapLogger(num_samples=2, method="input_x_gradient")
    callback_trainer(tmp_path, [callback], max_epochs=2).fit(toy_module(), toy_loader(), toy_loader(seed=1))
    files = sorted(p.name for p in (tmp_path / "saliency_maps").glob("*.png"))
    assert files == [f"epoch={e}_sample={i}.png" for e in (0, 1) for i in (0, 1)]
    pixels = read_png(tmp_path / "saliency_maps" / files[0])
    assert pixels.shape == (400, 800, 3) and pixels.std() > 10


def test_map_logger_to_tensorboard(tmp_path, toy_module, toy_loader):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = callback_trainer(tmp_path, [SaliencyMapLogger(num_samples=2, method="gradient")], logger=logger)
    trainer.fit(toy_module(), toy_loader(), toy_loader(seed=1))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["saliency_maps/sample_0", "saliency_maps/sample_1"]
    image = events.Images("saliency_maps/sample_0")[0]
    assert (image.width, image.height) == (800, 400)
    assert not (tmp_path / "saliency_maps").exists()


def test_the_decisions_keep_the_first_batch_once_and_draw_on_the_epoch_grid(toy_loader):
    logger = SaliencyMapLogger(num_samples=2, every_n_epochs=2)
    assert logger._should_keep(batch_idx=0, dataloader_idx=0)
    assert not logger._should_keep(batch_idx=1, dataloader_idx=0)
    assert not logger._should_keep(batch_idx=0, dataloader_idx=1)
    assert not logger._should_draw(1, sanity_checking=False)  # nothing kept yet: nothing to draw
    logger.on_validation_batch_end(None, None, None, next(iter(toy_loader())), batch_idx=0)
    assert logger._samples.x.shape[0] == 2 and not logger._should_keep(batch_idx=0, dataloader_idx=0)
    assert [e for e in range(4) if logger._should_draw(e, sanity_checking=False)] == [1, 3]
    assert not logger._should_draw(1, sanity_checking=True)


def test_map_logger_checks_its_arguments_and_the_module_protocol():
    with pytest.raises(ValueError, match=r"\['window'\] do not apply to attribution method 'gradient'"):
        SaliencyMapLogger(method="gradient", options={"window": 4})
    for name in ("num_samples", "every_n_epochs"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            SaliencyMapLogger(**{name: 0})
    with pytest.raises(ValueError, match="target"):
        SaliencyMapLogger(target="student")
    with pytest.raises(MisconfigurationException, match="teacher"):
        SaliencyMapLogger().setup(None, LightningModule(), "fit")


def _wandb_records(path: str) -> list:
    """Read a ``.wandb`` transaction log (7-byte ``:W&B`` header, then 32 KiB blocks of LevelDB-log chunks:
    crc32 u32, length u16, type u8 with 1 full, 2 first, 3 middle, 4 last) into protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.timeout(120)
def test_wandb_offline_run_has_images_and_metrics(tmp_path, monkeypatch, toy_module, toy_loader):
    import wandb

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    callbacks = [
        SaliencyAlignmentMonitor(method="gradient"),
        SaliencyMapLogger(num_samples=2, method="gradient"),
    ]
    logger = WandbLogger(offline=True, save_dir=tmp_path)
    trainer = callback_trainer(tmp_path, callbacks, logger=logger, max_epochs=2)
    try:
        trainer.fit(toy_module(), toy_loader(), toy_loader(seed=1))
    finally:
        wandb.finish()

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = sorted(Path(run_dir, "files", "media", "images").glob("saliency_maps_*.png"))
    assert len(images) == 4  # 2 samples x 2 epochs
    assert all(read_png(p).shape == (400, 800, 3) and read_png(p).std() > 10 for p in images)

    history = [r.history for r in _wandb_records(glob.glob(f"{run_dir}/*.wandb")[0]) if r.HasField("history")]
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item} for h in history]
    metric_rows = [r for r in rows if "val/saliency_spearman" in r]
    assert [r["epoch"] for r in metric_rows] == [0, 1]
    for key in ALIGNMENT_KEYS:
        assert metric_rows[-1][f"val/saliency_{key}"] == pytest.approx(
            trainer.callback_metrics[f"val/saliency_{key}"].item(), abs=1e-6
        )
    image_rows = [r for r in rows if "saliency_maps/count" in r]
    assert [r["saliency_maps/count"] for r in image_rows] == [2, 2]
