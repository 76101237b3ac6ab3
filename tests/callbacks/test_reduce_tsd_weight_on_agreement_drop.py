"""ReduceTSDWeightOnAgreementDrop: the TSD weight is cut when the monitored agreement drops; the decision
alone (no Trainer), then in fits, checkpoints and resumes."""

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


def fit(model, weight_cut, epochs, **kwargs):
    probe = WeightProbe()
    data = make_data()
    callbacks = kwargs.pop("callbacks", [weight_cut]) + [probe]
    t = trainer(max_epochs=epochs, callbacks=callbacks, limit_train_batches=1, **kwargs)
    t.fit(model, loader(data), loader(data))
    return t, probe.weights


def _replay(weight_cut, values, scale=1.0):
    """Drive the pure decision over ``values`` as the driver would (state and scale carried forward)."""
    scales, reasons = [], []
    for value in values:
        decision = weight_cut._evaluate(value, scale)
        weight_cut.best, weight_cut.wait, scale = decision.best, decision.wait, decision.scale
        scales.append(scale)
        reasons.append(decision.reason)
    return scales, reasons


def test_the_decision_is_pure_and_cuts_after_patience_drops_below_the_tolerance():
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/a", factor=0.5, tolerance=0.02, patience=1)
    weight_cut.best, weight_cut.wait = 0.9, 0
    first = weight_cut._evaluate(0.8, 1.0)
    assert first == (0.9, 1, 1.0, None)  # one drop, within the patience: counted, no cut
    assert (weight_cut.best, weight_cut.wait, weight_cut.history) == (0.9, 0, [])  # nothing changed
    weight_cut.wait = 1
    cut = weight_cut._evaluate(0.8, 1.0)
    assert cut[:3] == (0.8, 0, 0.5)  # the second drop in a row: cut, and the best resets
    assert cut.reason == (
        "val/a = 0.8000, more than 0.02 below its best 0.9000 for 2 check(s) in a row: "
        "TSD weight scale 1 -> 0.5"
    )
    assert weight_cut._evaluate(0.885, 1.0) == (0.9, 0, 1.0, None)  # within the tolerance: the count restarts
    assert weight_cut._evaluate(0.95, 1.0) == (0.95, 0, 1.0, None)  # a new best


def test_the_decision_switches_the_term_off_below_min_scale_and_a_nan_is_not_a_drop():
    weight_cut = ReduceTSDWeightOnAgreementDrop(factor=0.5, tolerance=0.0, min_scale=0.3)
    scales, reasons = _replay(weight_cut, [0.9, 0.8, 0.7, 0.6])
    assert scales == [1.0, 0.5, 0.0, 0.0] and [r is None for r in reasons] == [True, False, False, False]
    assert reasons[-1].endswith("TSD weight scale 0 -> 0")  # off stays off
    weight_cut = ReduceTSDWeightOnAgreementDrop(factor=0.5)
    assert _replay(weight_cut, [0.9, float("nan"), 0.9])[0] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_logs_each_cut_with_its_reason(monkeypatch, verbose):
    import lightning_tsd.callbacks.reduce_tsd_weight_on_agreement_drop as module

    messages = []
    monkeypatch.setattr(module, "rank_zero_info", messages.append)
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", tolerance=0.05, verbose=verbose)
    fit(scripted([0.9, 0.7, 0.7]), weight_cut, 3)
    expected = (
        "ReduceTSDWeightOnAgreementDrop: val/scripted = 0.7000, more than 0.05 below its best 0.9000 for "
        "1 check(s) in a row: TSD weight scale 1 -> 0.5"
    )
    assert messages == ([expected] if verbose else [])


def test_a_drop_beyond_the_tolerance_halves_the_weight_for_the_next_epoch():
    script = [0.80, 0.90, 0.85, 0.86, 0.895, 0.80]
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.02)
    _, weights = fit(scripted(script), weight_cut, len(script))
    # 0.85 is 0.05 below the best 0.90: cut (the best resets to 0.85); 0.86 and 0.895 rise; 0.80 drops: cut
    assert [h[2] for h in weight_cut.history] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    assert [round(h[1], 3) for h in weight_cut.history] == script
    assert weights == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]  # a cut applies from the next epoch on
    # a fall within the tolerance is not a drop
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.1)
    model = scripted(script)
    fit(model, weight_cut, len(script))
    assert model.tsd_weight_scale == 1.0 and [h[2] for h in weight_cut.history] == [1.0] * len(script)


def test_patience_and_min_scale_switch_the_term_off(monkeypatch):
    script = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    weight_cut = ReduceTSDWeightOnAgreementDrop(
        monitor="val/scripted", factor=0.5, tolerance=0.0, patience=1, min_scale=0.3
    )
    model = scripted(script)
    _, weights = fit(model, weight_cut, len(script))
    # patience 1: the second drop in a row cuts (each cut resets the best, so the count starts again);
    # 0.25 < min_scale switches the term off
    assert [h[2] for h in weight_cut.history] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
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
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = scripted(script)
    fit(model, weight_cut, 2, enable_checkpointing=True, callbacks=[weight_cut, ckpt])
    assert model.tsd_weight_scale == 0.5
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    # the module owns the scale; the callback saves only its schedule
    assert checkpoint["tsd_weight_scale"] == 0.5
    assert set(checkpoint["callbacks"][weight_cut.state_key]) == {"best", "wait", "history"}

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
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(scripted(script), weight_cut, 2, enable_checkpointing=True, callbacks=[weight_cut, ckpt])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["callbacks"][weight_cut.state_key]["scale"] = 0.125  # what the callback used to save
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
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="train/agreement")
    t = trainer(max_epochs=2, callbacks=[weight_cut], limit_val_batches=0)
    t.fit(model, loader(data))
    x = torch.stack([d["x"] for d in data])
    with torch.no_grad():
        expected = teacher_agreement(model.student.train()(x), model.teacher(x)).float().mean()
    assert float(t.callback_metrics["train/agreement"]) == pytest.approx(float(expected), abs=1e-6)
    assert [h[0] for h in weight_cut.history] == [0, 1] and model.tsd_weight_scale == 1.0  # constant: no cut


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
    weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/scripted", factor=0.5, tolerance=0.05)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = scripted(script)
    fit(model, weight_cut, 2, enable_checkpointing=True, callbacks=[weight_cut, ckpt])
    assert model.tsd_weight_scale == 0.5
    restored = ScriptedAgreement.load_from_checkpoint(
        tmp_path / "last.ckpt", weights_only=True, script=script
    )
    assert restored.tsd_weight_scale == 0.5 and restored.current_tsd_weight() == 1.0
    # the same callback object in a new fit (e.g. the next cross-validation fold) starts a fresh schedule, and a
    # fresh module starts from scale 1
    fold = scripted([0.9, 0.9])
    _, weights = fit(fold, weight_cut, 2)
    assert (
        weights == [2.0, 2.0]
        and fold.tsd_weight_scale == 1.0
        and weight_cut.history[0][1] == pytest.approx(0.9)
    )
    assert len(weight_cut.history) == 2 and weight_cut.best == pytest.approx(0.9)
