"""Substitution report: numbers against the metric classes and hand counts, markdown, figure, verdict,
and the callback after ``trainer.test``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error
from trainers import quiet_trainer

from lightning_tsd._batch import call_model, unpack_batch
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence
from lightning_tsd.report import (
    SubstitutionReport,
    SubstitutionReportCallback,
    SubstitutionThresholds,
    substitution_report,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning")


@pytest.fixture
def models(toy_module):
    module = toy_module(seed=3)
    return module.teacher, module.student


@pytest.fixture
def report(models, toy_loader) -> SubstitutionReport:
    return substitution_report(*models, toy_loader(n=20, seed=5), method="gradient", num_worst=3)


def _expected(teacher, student, loader) -> dict:
    """The report's numbers from the metric classes, captum and plain counting."""
    teacher, student = teacher.eval(), student.eval()
    alignment, agreement, divergence = SaliencyAlignment(), TeacherAgreement(), TeacherStudentDivergence()
    t_all, s_all, y_all, index_all = [], [], [], []
    for batch in loader:
        b = unpack_batch(batch)
        with torch.no_grad():
            t, s = call_model(teacher, b.x, b.mask), call_model(student, b.x, b.mask)
        maps = [
            Saliency(lambda x, m, model=model: call_model(model, x, m))
            .attribute(b.x.requires_grad_(), target=t.argmax(1), additional_forward_args=(b.mask,))
            .abs()
            .sum(1)
            * b.mask
            for model in (student, teacher)
        ]
        alignment.update(*maps, b.mask)
        agreement.update(s, t)
        divergence.update(s, t)
        t_all.append(t), s_all.append(s), y_all.append(b.y), index_all.append(b.index)
    t, s, y, index = (torch.cat(v) for v in (t_all, s_all, y_all, index_all))
    t_pred, s_pred = t.argmax(1), s.argmax(1)
    confusion = torch.zeros(3, 3, dtype=torch.long)
    confusion.index_put_((t_pred, s_pred), torch.ones_like(t_pred), accumulate=True)
    kl = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1)
    return {
        "agreement": agreement.compute().item(),
        "kl": divergence.compute()["kl"].item(),
        "js": divergence.compute()["js"].item(),
        "saliency": {k: v.item() for k, v in alignment.compute().items()},
        "teacher_accuracy": (t_pred == y).float().mean().item(),
        "student_accuracy": (s_pred == y).float().mean().item(),
        "teacher_ece": multiclass_calibration_error(t.softmax(1), y, num_classes=3, n_bins=15).item(),
        "student_ece": multiclass_calibration_error(s.softmax(1), y, num_classes=3, n_bins=15).item(),
        "confusion": confusion.tolist(),
        "worst": index[kl.argsort(descending=True)[:3]].tolist(),
        "worst_kl": kl.sort(descending=True).values[:3].tolist(),
    }


def test_report_numbers_equal_metric_classes(report, models, toy_loader):
    want = _expected(*models, toy_loader(n=20, seed=5))
    assert report.num_samples == 20 and report.num_classes == 3
    for key in (
        "agreement",
        "kl",
        "js",
        "teacher_accuracy",
        "student_accuracy",
        "teacher_ece",
        "student_ece",
    ):
        assert getattr(report, key) == pytest.approx(want[key], abs=1e-6), key
    assert report.saliency == pytest.approx(want["saliency"], abs=1e-6)
    assert report.confusion == want["confusion"]
    confusion = np.asarray(want["confusion"])
    assert report.per_class_count == confusion.sum(1).tolist()
    for c, value in enumerate(report.per_class_agreement):
        rows = confusion[c].sum()
        assert (np.isnan(value) and rows == 0) or value == pytest.approx(confusion[c, c] / rows)
    assert [w.index for w in report.worst] == want["worst"]
    assert [w.kl for w in report.worst] == pytest.approx(want["worst_kl"], abs=1e-6)
    assert report.accuracy_drop == pytest.approx(want["teacher_accuracy"] - want["student_accuracy"])


def test_verdict_follows_thresholds(report):
    lenient = report.with_thresholds({"min_agreement": 0.0, "max_accuracy_drop": 1.0, "min_spearman": -1.0})
    assert lenient.can_substitute and all(c.passed for c in lenient.checks)
    strict = report.with_thresholds(
        SubstitutionThresholds(min_agreement=1.01, max_accuracy_drop=1.0, min_spearman=-1)
    )
    assert not strict.can_substitute
    assert [c.passed for c in strict.checks] == [False, True, True]
    assert [c.name for c in report.checks] == ["agreement", "accuracy_drop", "saliency_spearman"]
    assert report.thresholds == SubstitutionThresholds(0.95, 0.02, 0.5)
    with pytest.raises(ValueError, match="unknown threshold"):
        report.with_thresholds({"min_agreemnt": 0.5})


def test_thresholds_passed_to_the_report(models, toy_loader):
    loader = toy_loader(n=8, seed=5)
    report = substitution_report(
        *models, loader, method=None, thresholds={"min_agreement": 0.0, "max_accuracy_drop": 1}
    )
    assert report.can_substitute and report.saliency == {}
    assert [c.name for c in report.checks] == ["agreement", "accuracy_drop"]
    same = substitution_report(models[0], models[0], loader, method="gradient")
    assert same.agreement == 1.0 and same.kl == 0.0 and same.saliency["spearman"] == pytest.approx(1.0)
    assert same.can_substitute


def test_report_without_labels_or_index(models):
    batches = [torch.randn(4, 2, 24), torch.randn(3, 2, 24)]
    report = substitution_report(*models, batches, method=None, num_worst=10)
    assert report.teacher_accuracy is None and report.teacher_ece is None
    assert [c.name for c in report.checks] == ["agreement"]
    assert sorted(w.index for w in report.worst) == list(range(7)) and report.worst[0].label is None


def test_markdown_dict_and_figure(report, tmp_path):
    markdown = report.to_markdown()
    for section in (
        "# Substitution report",
        "## Verdict",
        "## Teacher and student",
        "## Agreement per teacher-predicted class",
        "## Saliency alignment",
        "## Confusion (rows: teacher, columns: student)",
        "## Largest divergence samples",
    ):
        assert section in markdown
    assert f"| agreement | {report.agreement:.4f} | >= 0.9500 |" in markdown
    assert markdown.count("\n| ") >= 3 + 3 + 3 + 3

    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["can_substitute"] == report.can_substitute
    assert [c["passed"] for c in data["checks"]] == [c.passed for c in report.checks]
    assert data["confusion"] == report.confusion and len(data["worst"]) == 3

    report.figure().savefig(tmp_path / "report.png")
    with Image.open(tmp_path / "report.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape == (400, 1400, 3) and pixels.std() > 10
    assert "## Cost" in markdown and f"| parameters | {report.cost['teacher']['params']} |" in markdown
    assert data["cost"] == report.cost


def test_cost_counts_parameters_serialized_bytes_and_latency(report, models):
    assert set(report.cost) == {"teacher", "student"}
    for name, model in zip(("teacher", "student"), models):
        cost = report.cost[name]
        assert cost["params"] == sum(p.numel() for p in model.parameters())
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        assert cost["bytes"] == len(buffer.getvalue()) > 0
        assert math.isfinite(cost["latency_ms"]) and cost["latency_ms"] > 0
    assert report.cost["teacher"]["params"] > report.cost["student"]["params"]  # widths 6 and 4


def test_figure_lists_every_check_and_marks_the_failed_one(report):
    judged = report.with_thresholds({"min_agreement": 0.0, "max_accuracy_drop": 1.0, "min_spearman": 1.01})
    assert [c.passed for c in judged.checks] == [True, True, False]
    fig = judged.figure()
    texts = [t for t in fig.texts] + [t for ax in fig.axes for t in ax.texts]
    failed = [t for t in texts if "saliency_spearman" in t.get_text() and "FAIL" in t.get_text()]
    assert len(failed) == 1 and failed[0].get_color() == "tab:red"
    for name in ("agreement", "accuracy_drop"):
        (passed,) = [t for t in texts if t.get_text().startswith(f"pass  {name} ")]
        assert passed.get_color() == "tab:green"
    assert fig.get_suptitle() == "can substitute: no (failed: saliency_spearman)"
    assert any(t.get_text().startswith("student: ") and "parameters" in t.get_text() for t in texts)


def test_old_option_names_of_the_report_still_work(models, toy_loader):
    loader = toy_loader(n=8, seed=5)
    with pytest.warns(DeprecationWarning):
        old = substitution_report(
            *models, loader, method="integrated_gradients", method_kwargs={"n_steps": 4}
        )
    new = substitution_report(*models, loader, method="integrated_gradients", options={"steps": 4})
    assert old.saliency == new.saliency and old.method == "integrated_gradients"
    with pytest.warns(DeprecationWarning, match="'saliency' is deprecated"):
        assert SubstitutionReportCallback(method="saliency").options["method"] == "gradient"


def test_callback_writes_report_after_test(tmp_path, toy_module, toy_loader):
    module = toy_module(seed=3)
    callback = SubstitutionReportCallback(method="gradient", num_worst=3)
    trainer = quiet_trainer(logger=CSVLogger(tmp_path), callbacks=[callback])
    loader = toy_loader(n=20, seed=5)
    trainer.test(module, loader, verbose=False)

    direct = substitution_report(module.teacher, module.student, loader, method="gradient", num_worst=3)
    assert callback.report.agreement == direct.agreement and callback.report.confusion == direct.confusion
    assert callback.report.saliency == pytest.approx(direct.saliency, abs=1e-6)
    out = Path(trainer.log_dir)
    assert (out / "substitution_report.md").read_text() == callback.report.to_markdown()
    assert (out / "substitution_report.png").stat().st_size > 0
    with open(out / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("test/substitution_can_substitute")]
    assert float(row["test/substitution_can_substitute"]) == float(direct.can_substitute)
    assert float(row["test/substitution_agreement"]) == pytest.approx(direct.agreement)
