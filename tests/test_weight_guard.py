"""ReduceTSDWeightOnAgreementDrop: the TSD weight is cut when the monitored agreement drops."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_module import distiller, loader, make_data, trainer
from tiny_models import TinyCNN

from lightning_tsd import ReduceTSDWeightOnAgreementDrop, TemporalSaliencyDistiller
from lightning_tsd.functional import teacher_agreement


class ScriptedAgreement(TemporalSaliencyDistiller):
    """Logs a scripted ``val/scripted`` value per validation epoch, to drive the callback exactly."""

    def __init__(self, *args, script=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.script = list(script)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self.log("val/scripted", self.script[self.current_epoch])


def scripted(script, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("saliency", "gradient")
    return ScriptedAgreement(
        TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4), script=script, tsd_weight=2.0, **kwargs
    )


class WeightProbe(Callback):
    """The TSD weight each training epoch starts with."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_start(self, trainer, module):
        self.weights.append(module.current_tsd_weight())


def fit(model, guard, epochs, **kwargs):
    probe = WeightProbe()
    data = make_data()
    callbacks = kwargs.pop("callbacks", [guard]) + [probe]
    t = trainer(max_epochs=epochs, callbacks=callbacks, limit_train_batches=1, **kwargs)
    t.fit(model, loader(data), loader(data))
    return t, probe.weights


def test_a_drop_beyond_the_tolerance_halves_the_weight_for_the_next_epoch():
    script = [0.80, 0.90, 0.85, 0.86, 0.895, 0.80]
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.02)
    _, weights = fit(scripted(script), guard, len(script))
    # 0.85 is 0.05 below the best 0.90: cut (the best resets to 0.85); 0.86 and 0.895 rise; 0.80 drops: cut
    assert [h[2] for h in guard.history] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    assert [round(h[1], 3) for h in guard.history] == script
    assert weights == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]  # a cut applies from the next epoch on
    # a fall within the tolerance is not a drop
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.1)
    model = scripted(script)
    fit(model, guard, len(script))
    assert model.tsd_weight_scale == 1.0 and [h[2] for h in guard.history] == [1.0] * len(script)


def test_patience_and_min_scale_switch_the_term_off(monkeypatch):
    script = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    guard = ReduceTSDWeightOnAgreementDrop(
        monitor="val/scripted", factor=0.5, tolerance=0.0, patience=1, min_scale=0.3
    )
    model = scripted(script)
    _, weights = fit(model, guard, len(script))
    # patience 1: the second drop in a row cuts (each cut resets the best, so the count starts again)
    assert [h[2] for h in guard.history] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]  # 0.25 < min_scale -> off
    assert weights == [2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0]
    # switched off, the step computes no saliency at all
    import lightning_tsd.losses as losses

    calls = []
    monkeypatch.setattr(losses, "temporal_saliency", lambda *a, **k: calls.append(1))
    data = make_data()
    trainer(max_steps=1, limit_val_batches=0).fit(model, loader(data))
    assert calls == [] and model.current_tsd_weight() == 0.0


def test_scale_survives_checkpoint_and_resume(tmp_path):
    script = [0.9, 0.7, 0.7, 0.7]
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = scripted(script)
    fit(model, guard, 2, enable_checkpointing=True, callbacks=[guard, ckpt])
    assert model.tsd_weight_scale == 0.5
    with pytest.warns(DeprecationWarning, match="tsd_weight_scale"):
        assert guard.scale == 0.5  # the old attribute, now read from the history
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # the module owns the scale; the callback saves only its schedule
    assert checkpoint["tsd_weight_scale"] == 0.5
    assert set(checkpoint["callbacks"][guard.state_key]) == {"best", "wait", "history"}

    fresh = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    probe = WeightProbe()
    resumed = scripted(script)
    t = trainer(max_epochs=4, callbacks=[fresh, probe], limit_train_batches=1)
    t.fit(resumed, loader(make_data()), loader(make_data()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert probe.weights == [1.0, 1.0]  # epochs 2 and 3 train with the restored scale
    assert fresh.best == pytest.approx(0.7) and [h[2] for h in fresh.history] == [1.0, 0.5, 0.5, 0.5]
    assert resumed.tsd_weight_scale == 0.5


def test_an_old_checkpoint_whose_callback_state_holds_a_scale_resumes_with_the_modules_scale(tmp_path):
    script = [0.9, 0.7, 0.7]
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(scripted(script), guard, 2, enable_checkpointing=True, callbacks=[guard, ckpt])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["callbacks"][guard.state_key]["scale"] = 0.125  # what the callback used to save
    torch.save(checkpoint, tmp_path / "old.ckpt")

    fresh = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    probe = WeightProbe()
    resumed = scripted(script)
    t = trainer(max_epochs=3, callbacks=[fresh, probe], limit_train_batches=1)
    t.fit(resumed, loader(make_data()), loader(make_data()), ckpt_path=str(tmp_path / "old.ckpt"))
    assert probe.weights == [1.0]  # 2.0 * the module's 0.5; the stale 0.125 is ignored
    assert fresh.wait == 0 and [h[2] for h in fresh.history] == [1.0, 0.5, 0.5]


def test_train_agreement_is_the_agreement_of_the_epochs_training_batches_and_can_be_monitored():
    data = make_data()
    model = distiller(tsd_weight=1.0, lr=0.0)  # lr 0: the student is the same at every step
    guard = ReduceTSDWeightOnAgreementDrop(monitor="train/agreement")
    t = trainer(max_epochs=2, callbacks=[guard], limit_val_batches=0)
    t.fit(model, loader(data))
    x = torch.stack([d["x"] for d in data])
    with torch.no_grad():
        expected = teacher_agreement(model.student.train()(x), model.teacher(x)).float().mean()
    assert float(t.callback_metrics["train/agreement"]) == pytest.approx(float(expected), abs=1e-6)
    assert [h[0] for h in guard.history] == [0, 1] and model.tsd_weight_scale == 1.0  # constant: no cut


def test_arguments_missing_metric_and_module_protocol_are_checked():
    for bad in ({"factor": 1.0}, {"factor": 0.0}, {"tolerance": -1}, {"patience": -1}, {"min_scale": -0.1}):
        with pytest.raises(ValueError):
            ReduceTSDWeightOnAgreementDrop(**bad)
    data = make_data()
    with pytest.raises(MisconfigurationException, match="'val/nope', which was not logged"):
        trainer(max_epochs=1, callbacks=[ReduceTSDWeightOnAgreementDrop(monitor="val/nope")]).fit(
            distiller(), loader(data), loader(data)
        )

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(torch.ones(1, 2)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MisconfigurationException, match="tsd_weight_scale"):
        trainer(max_epochs=1, callbacks=[ReduceTSDWeightOnAgreementDrop()]).fit(Plain(), loader(data))


def test_resuming_from_an_epoch_end_checkpoint_counts_each_epoch_once(tmp_path):
    class Counts(Callback):
        def __init__(self):
            self.counts = []

        def on_train_epoch_end(self, trainer, module):
            self.counts.append(int(module.train_agreement.count))

    data = make_data()
    straight = Counts()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ckpt, straight], limit_val_batches=0).fit(
        distiller(), loader(data)
    )
    assert straight.counts == [48, 48, 48]
    resumed = Counts()
    trainer(max_epochs=3, callbacks=[resumed], limit_val_batches=0).fit(
        distiller(), loader(data), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt")
    )
    assert resumed.counts == [48, 48]  # the finished epoch 0 is not counted again in epoch 1


def test_the_weight_scale_is_kept_in_checkpoints_and_the_guard_starts_fresh_each_fit(tmp_path):
    script = [0.9, 0.5]
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = scripted(script)
    fit(model, guard, 2, enable_checkpointing=True, callbacks=[guard, ckpt])
    assert model.tsd_weight_scale == 0.5
    restored = ScriptedAgreement.load_from_checkpoint(
        tmp_path / "last.ckpt", weights_only=True, script=script
    )
    assert restored.tsd_weight_scale == 0.5 and restored.current_tsd_weight() == 1.0
    # the same guard object in a new fit (e.g. the next cross-validation fold) starts a fresh schedule, and a
    # fresh module starts from scale 1
    fold = scripted([0.9, 0.9])
    _, weights = fit(fold, guard, 2)
    assert (
        weights == [2.0, 2.0] and fold.tsd_weight_scale == 1.0 and guard.history[0][1] == pytest.approx(0.9)
    )
    assert len(guard.history) == 2 and guard.best == pytest.approx(0.9)
