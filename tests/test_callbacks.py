"""Saliency callbacks in real short fits (CSV, TensorBoard, offline W&B), the attribution they use, their
old argument names, and the saliency figure."""

from __future__ import annotations

import csv
import glob
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from trainers import quiet_trainer

from lightning_tsd._batch import call_model, unpack_batch
from lightning_tsd.attribution import CAPTUM_METHODS, saliency_pair, temporal_attribution
from lightning_tsd.callbacks import SaliencyAlignmentMonitor, SaliencyMapLogger, _temporal_attribution
from lightning_tsd.functional import ALIGNMENT_KEYS, saliency_alignment
from lightning_tsd.plotting import plot_saliency

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning")


def _trainer(tmp_path, callbacks, logger=False, max_epochs=1) -> Trainer:
    return quiet_trainer(
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=float)


def _direct_alignment(module, loader, max_batches: int, n_steps: int) -> dict[str, float]:
    """What the monitor should log, computed with captum directly on the final models."""
    teacher, student = module.teacher.eval(), module.student.eval()
    values = []
    for batch in itertools.islice(loader, max_batches):
        b = unpack_batch(batch)
        target = call_model(teacher, b.x, b.mask).argmax(1)
        maps = []
        for model in (student, teacher):
            ig = IntegratedGradients(lambda x, mask, model=model: call_model(model, x, mask))
            attr = ig.attribute(
                b.x,
                target=target,
                additional_forward_args=(b.mask,),
                n_steps=n_steps,
                method="riemann_middle",
            )
            maps.append(attr.detach().abs().sum(1) * b.mask)
        values.append(saliency_alignment(*maps, mask=b.mask))
    return {k: torch.cat([v[k] for v in values]).mean().item() for k in ALIGNMENT_KEYS}


def test_monitor_logs_alignment_equal_to_direct_captum(tmp_path, toy_module, toy_loader):
    module = toy_module()
    monitor = SaliencyAlignmentMonitor(max_batches=2, options={"steps": 8})
    trainer = _trainer(tmp_path, [monitor], max_epochs=2)
    val_loader = toy_loader(seed=1)
    trainer.fit(module, toy_loader(), val_loader)

    logged = {k: trainer.callback_metrics[f"val/saliency_{k}"].item() for k in ALIGNMENT_KEYS}
    assert all(-1.0 <= v <= 1.0 for v in logged.values())
    assert logged == pytest.approx(_direct_alignment(module, val_loader, max_batches=2, n_steps=8), abs=1e-5)

    test_loader = toy_loader(seed=2)
    trainer.test(module, test_loader, verbose=False)
    logged = {k: trainer.callback_metrics[f"test/saliency_{k}"].item() for k in ALIGNMENT_KEYS}
    assert logged == pytest.approx(_direct_alignment(module, test_loader, max_batches=2, n_steps=8), abs=1e-5)


def test_monitor_every_n_epochs_and_stages(tmp_path, toy_module, toy_loader):
    monitor = SaliencyAlignmentMonitor(method="gradient", every_n_epochs=2, stages=("validate",))
    trainer = _trainer(tmp_path, [monitor], logger=CSVLogger(tmp_path), max_epochs=2)
    module = toy_module()
    trainer.fit(module, toy_loader(), toy_loader(seed=1))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/saliency_spearman")]
    assert [int(r["epoch"]) for r in rows] == [1]  # only the second epoch, never the sanity check
    trainer.test(module, toy_loader(seed=2), verbose=False)
    assert not any(k.startswith("test/saliency") for k in trainer.callback_metrics)


@pytest.mark.parametrize("method", sorted(CAPTUM_METHODS))
def test_saliency_pair_under_inference_mode(method, toy_module, toy_loader):
    module = toy_module()
    student = module.student.train()
    student.norm.eval()  # a submodule with its own flag, which must survive
    running_mean = student.norm.running_mean.clone()
    with torch.inference_mode():
        b = unpack_batch(next(iter(toy_loader())))
        pair = saliency_pair(module.teacher, student, b, method=method)
    assert student.training and not student.norm.training and not module.teacher.training
    assert torch.equal(student.norm.running_mean, running_mean)
    for saliency in (pair.teacher_saliency, pair.student_saliency):
        # gradient maps are absolute values; perturbation maps are signed logit drops
        assert saliency.shape == b.mask.shape and (
            method in ("occlusion", "feature_ablation") or saliency.min() >= 0
        )
        assert bool((saliency[~b.mask] == 0).all()) and bool((saliency[b.mask] != 0).any())
    with torch.no_grad():
        assert torch.equal(pair.teacher_logits, call_model(module.teacher.eval(), b.x, b.mask))


def test_saliency_pair_label_target_needs_labels(toy_module):
    module = toy_module()
    b = unpack_batch(torch.randn(2, 2, 24))
    with pytest.raises(ValueError, match="needs labels"):
        saliency_pair(module.teacher, module.student, b, method="gradient", target="label")


def test_old_method_and_option_names_still_work_with_a_deprecation_warning(toy_module, toy_loader):
    with pytest.warns(DeprecationWarning, match="'saliency' is deprecated"):
        assert SaliencyAlignmentMonitor(method="saliency").method == "gradient"
    with pytest.warns(DeprecationWarning, match="method_kwargs is deprecated"):
        logger = SaliencyMapLogger(method="integrated_gradients", method_kwargs={"n_steps": 4})
    assert logger.options == {"steps": 4}
    with pytest.warns(DeprecationWarning, match="'n_steps' is deprecated"):
        assert SaliencyAlignmentMonitor(options={"n_steps": 4}).options == {"steps": 4}
    b = unpack_batch(next(iter(toy_loader())))
    teacher = toy_module().teacher
    target = call_model(teacher, b.x, b.mask).argmax(1)
    with pytest.warns(DeprecationWarning, match="_temporal_attribution is deprecated"):
        old = _temporal_attribution(teacher, b.x, target, b.mask, "integrated_gradients", {"n_steps": 4})
    new = temporal_attribution(teacher, b.x, target, mask=b.mask, method="integrated_gradients", steps=4)
    assert torch.equal(old, new)


def test_callbacks_check_arguments_and_module_protocol():
    with pytest.raises(ValueError, match="method"):
        SaliencyAlignmentMonitor(method="gradcam")
    with pytest.raises(ValueError, match=r"\['window'\] do not apply to attribution method 'gradient'"):
        SaliencyMapLogger(method="gradient", options={"window": 4})
    with pytest.raises(ValueError, match="stages"):
        SaliencyAlignmentMonitor(stages=("train",))
    with pytest.raises(ValueError, match="num_samples"):
        SaliencyMapLogger(num_samples=0)
    with pytest.raises(MisconfigurationException, match="teacher"):
        SaliencyAlignmentMonitor().setup(None, LightningModule(), "fit")


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_saliency_png(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(channels, 40, generator=g).cumsum(-1).squeeze(0)
    mask = torch.arange(40) < 33
    fig = plot_saliency(x, torch.rand(40, generator=g), torch.rand(40, generator=g), mask, title="t", dpi=50)
    path = tmp_path / "saliency.png"
    fig.savefig(path)
    pixels = _png(path)
    assert pixels.shape == (200, 400, 3)  # figsize (8, 4) inches at 50 dpi
    assert pixels.std() > 10
    assert len(fig.axes[0].lines) == channels


def test_map_logger_writes_pngs_without_image_logger(tmp_path, toy_module, toy_loader):
    trainer = _trainer(tmp_path, [SaliencyMapLogger(num_samples=2, method="input_x_gradient")], max_epochs=2)
    trainer.fit(toy_module(), toy_loader(), toy_loader(seed=1))
    files = sorted(p.name for p in (tmp_path / "saliency_maps").glob("*.png"))
    assert files == [f"epoch={e}_sample={i}.png" for e in (0, 1) for i in (0, 1)]
    pixels = _png(tmp_path / "saliency_maps" / files[0])
    assert pixels.shape == (400, 800, 3) and pixels.std() > 10


def test_map_logger_to_tensorboard(tmp_path, toy_module, toy_loader):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [SaliencyMapLogger(num_samples=2, method="gradient")], logger=logger)
    trainer.fit(toy_module(), toy_loader(), toy_loader(seed=1))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["saliency_maps/sample_0", "saliency_maps/sample_1"]
    image = events.Images("saliency_maps/sample_0")[0]
    assert (image.width, image.height) == (800, 400)
    assert not (tmp_path / "saliency_maps").exists()


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
    trainer = _trainer(tmp_path, callbacks, logger=WandbLogger(offline=True, save_dir=tmp_path), max_epochs=2)
    try:
        trainer.fit(toy_module(), toy_loader(), toy_loader(seed=1))
    finally:
        wandb.finish()

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = sorted(Path(run_dir, "files", "media", "images").glob("saliency_maps_*.png"))
    assert len(images) == 4  # 2 samples x 2 epochs
    assert all(_png(p).shape == (400, 800, 3) and _png(p).std() > 10 for p in images)

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
