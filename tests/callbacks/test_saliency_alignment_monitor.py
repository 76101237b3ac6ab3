"""SaliencyAlignmentMonitor: the alignment it logs equals captum's computed directly, on the epochs and loops
it is asked to watch; the attribution it runs inside Lightning's loops; its argument checks."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch
from captum.attr import IntegratedGradients
from helpers.callback_fits import callback_trainer
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_tsd._batch import call_model, unpack_batch
from lightning_tsd.attribution import CAPTUM_METHODS, saliency_pair
from lightning_tsd.callbacks import SaliencyAlignmentMonitor
from lightning_tsd.functional import ALIGNMENT_KEYS, saliency_alignment

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning")


def _direct_alignment(module, loader, max_batches: int, steps: int) -> dict[str, float]:
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
                n_steps=steps,
                method="riemann_middle",
            )
            maps.append(attr.detach().abs().sum(1) * b.mask)
        values.append(saliency_alignment(*maps, mask=b.mask))
    return {k: torch.cat([v[k] for v in values]).mean().item() for k in ALIGNMENT_KEYS}


def test_monitor_logs_alignment_equal_to_direct_captum(tmp_path, toy_module, toy_loader):
    module = toy_module()
    monitor = SaliencyAlignmentMonitor(max_batches=2, options={"steps": 8})
    trainer = callback_trainer(tmp_path, [monitor], max_epochs=2)
    val_loader = toy_loader(seed=1)
    trainer.fit(module, toy_loader(), val_loader)

    logged = {k: trainer.callback_metrics[f"val/saliency_{k}"].item() for k in ALIGNMENT_KEYS}
    assert all(-1.0 <= v <= 1.0 for v in logged.values())
    assert logged == pytest.approx(_direct_alignment(module, val_loader, max_batches=2, steps=8), abs=1e-5)

    test_loader = toy_loader(seed=2)
    trainer.test(module, test_loader, verbose=False)
    logged = {k: trainer.callback_metrics[f"test/saliency_{k}"].item() for k in ALIGNMENT_KEYS}
    assert logged == pytest.approx(_direct_alignment(module, test_loader, max_batches=2, steps=8), abs=1e-5)


def test_monitor_every_n_epochs_and_stages(tmp_path, toy_module, toy_loader):
    monitor = SaliencyAlignmentMonitor(method="gradient", every_n_epochs=2, stages=("validate",))
    trainer = callback_trainer(tmp_path, [monitor], logger=CSVLogger(tmp_path), max_epochs=2)
    module = toy_module()
    trainer.fit(module, toy_loader(), toy_loader(seed=1))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/saliency_spearman")]
    assert [int(r["epoch"]) for r in rows] == [1]  # only the second epoch, never the sanity check
    trainer.test(module, toy_loader(seed=2), verbose=False)
    assert not any(k.startswith("test/saliency") for k in trainer.callback_metrics)


def test_the_decision_to_measure_follows_stages_the_epoch_grid_and_the_sanity_check():
    monitor = SaliencyAlignmentMonitor(every_n_epochs=3, stages=("validate", "test"))
    assert [e for e in range(9) if monitor._should_measure("validate", e, sanity_checking=False)] == [2, 5, 8]
    assert not monitor._should_measure("validate", 2, sanity_checking=True)
    assert monitor._should_measure("test", 0, sanity_checking=False)  # test measures whatever the epoch
    only_test = SaliencyAlignmentMonitor(stages=("test",))
    assert not only_test._should_measure("validate", 0, sanity_checking=False)
    assert monitor._seen == 0 and not monitor._active  # deciding changes nothing


@pytest.mark.parametrize("method", sorted(CAPTUM_METHODS))
def test_saliency_pair_under_inference_mode(method, toy_module, toy_loader):
    """The attribution the callbacks run inside Lightning's loops: under inference mode, with the models'
    ``training`` flags and buffers left as they were."""
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


def test_monitor_checks_its_arguments_and_the_module_protocol():
    with pytest.raises(ValueError, match="method"):
        SaliencyAlignmentMonitor(method="gradcam")
    with pytest.raises(ValueError, match="stages"):
        SaliencyAlignmentMonitor(stages=("train",))
    with pytest.raises(ValueError, match="target"):
        SaliencyAlignmentMonitor(target="student")
    for name in ("max_batches", "every_n_epochs"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            SaliencyAlignmentMonitor(**{name: 0})
    with pytest.raises(MisconfigurationException, match="teacher"):
        SaliencyAlignmentMonitor().setup(None, LightningModule(), "fit")
