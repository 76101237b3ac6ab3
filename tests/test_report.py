"""Substitution report: numbers against the metric classes and hand counts, markdown, figure, verdict,
and the callback after ``trainer.test``."""

from __future__ import annotations

import csv
import dataclasses
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
from test_behaviour import StepProbe
from torchmetrics.functional.classification import multiclass_calibration_error
from trainers import quiet_trainer

from lightning_tsd._batch import call_model, unpack_batch
from lightning_tsd.behaviour import Behaviour
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence
from lightning_tsd.report import (
    SubstitutionReport,
    SubstitutionReportCallback,
    SubstitutionThresholds,
    substitution_report,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode:UserWarning")

BEHAVIOUR = ["noise_agreement", "masked_agreement", "deletion_gap", "keep_gap"]
LENIENT = {
    "min_agreement": 0.0,
    "max_accuracy_drop": 1.0,
    "min_spearman": -1.0,
    "min_noise_agreement": 0.0,
    "min_masked_agreement": 0.0,
    "max_deletion_shortfall": 2.0,
    "max_keep_shortfall": 2.0,
}


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
    lenient = report.with_thresholds(LENIENT)
    assert lenient.can_substitute and all(c.passed for c in lenient.checks)
    strict = report.with_thresholds({**LENIENT, "min_agreement": 1.01, "min_masked_agreement": 1.01})
    assert not strict.can_substitute
    assert [c.passed for c in strict.checks] == [False, True, True, True, False, True, True]
    assert [c.name for c in report.checks] == ["agreement", "accuracy_drop", "saliency_spearman", *BEHAVIOUR]
    assert report.thresholds == SubstitutionThresholds(0.95, 0.02, 0.5, 0.9, 0.9, 0.1, 0.1)
    with pytest.raises(ValueError, match="unknown threshold"):
        report.with_thresholds({"min_agreemnt": 0.5})


def test_thresholds_passed_to_the_report(models, toy_loader):
    loader = toy_loader(n=8, seed=5)
    report = substitution_report(
        *models,
        loader,
        method=None,
        thresholds={"min_agreement": 0.0, "max_accuracy_drop": 1},
        behaviour=False,
    )
    assert report.can_substitute and report.saliency == {} and report.behaviour is None
    assert [c.name for c in report.checks] == ["agreement", "accuracy_drop"]
    same = substitution_report(models[0], models[0], loader, method="gradient")
    assert same.agreement == 1.0 and same.kl == 0.0 and same.saliency["spearman"] == pytest.approx(1.0)
    assert same.can_substitute and [c.name for c in same.checks][3:] == BEHAVIOUR


def test_report_without_labels_or_index(models):
    batches = [torch.randn(4, 2, 24), torch.randn(3, 2, 24)]
    report = substitution_report(*models, batches, method=None, num_worst=10)
    assert report.teacher_accuracy is None and report.teacher_ece is None
    assert [c.name for c in report.checks] == ["agreement", *BEHAVIOUR]
    assert report.behaviour is not None and report.behaviour.num_series == 7
    assert sorted(w.index for w in report.worst) == list(range(7)) and report.worst[0].label is None


def test_markdown_dict_and_figure(report, tmp_path):
    markdown = report.to_markdown()
    for section in (
        "# Substitution report",
        "## Verdict",
        "## Teacher and student",
        "## Behaviour under perturbation",
        "## Agreement per teacher-predicted class",
        "## Saliency alignment",
        "## Confusion (rows: teacher, columns: student)",
        "## Largest divergence samples",
    ):
        assert section in markdown
    assert f"| agreement | {report.agreement:.4f} | >= 0.9500 |" in markdown
    assert markdown.count("\n| ") >= 3 + 3 + 3 + 3
    b = report.behaviour
    assert f"| noise_agreement | {b.noise_agreement:.4f} | >= 0.9000 |" in markdown
    assert f"| masked window | {b.mask_agreement:.4f} |" in markdown
    assert f"| 5% | {b.curves['student']['delete']['teacher'][0]:.4f} |" in markdown

    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["can_substitute"] == report.can_substitute
    assert [c["passed"] for c in data["checks"]] == [c.passed for c in report.checks]
    assert data["confusion"] == report.confusion and len(data["worst"]) == 3
    assert data["behaviour"] == dataclasses.asdict(report.behaviour)
    assert Behaviour(**data["behaviour"]) == report.behaviour
    assert [c["name"] for c in data["checks"]][3:] == BEHAVIOUR

    report.figure().savefig(tmp_path / "report.png")
    with Image.open(tmp_path / "report.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape == (400, 1800, 3) and pixels.std() > 10
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
    judged = report.with_thresholds({**LENIENT, "min_spearman": 1.01})
    assert [c.passed for c in judged.checks] == [True, True, False, True, True, True, True]
    fig = judged.figure()
    texts = [t for t in fig.texts] + [t for ax in fig.axes for t in ax.texts]
    failed = [t for t in texts if "saliency_spearman" in t.get_text() and "FAIL" in t.get_text()]
    assert len(failed) == 1 and failed[0].get_color() == "tab:red"
    for name in ("agreement", "accuracy_drop", *BEHAVIOUR):
        (passed,) = [t for t in texts if t.get_text().startswith(f"pass  {name} ")]
        assert passed.get_color() == "tab:green"
    assert fig.get_suptitle() == "can substitute: no (failed: saliency_spearman)"
    assert any(t.get_text().startswith("student: ") and "parameters" in t.get_text() for t in texts)


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
    for check in direct.checks[3:]:
        assert float(row[f"test/substitution_{check.name}"]) == pytest.approx(check.value), check.name


# ------------------------------------------------------------------------------------ behavioural checks


def _positive_loader(n=24, steps=20, batch_size=8):
    """Positive series: a StepProbe says class 1 on every clean one."""
    x = torch.rand(n, 1, steps, generator=torch.Generator().manual_seed(0)) + 0.5
    return [
        (x[i : i + batch_size], torch.ones(len(x[i : i + batch_size]), dtype=torch.long))
        for i in range(0, n, batch_size)
    ]


def test_a_student_equal_to_the_teacher_passes_the_behavioural_checks():
    teacher = StepProbe(5)
    report = substitution_report(teacher, teacher, _positive_loader(), method=None)
    b = report.behaviour
    assert b.num_series == 24 and b.noise_agreement == 1.0 and b.mask_agreement == 1.0
    assert b.curves["student"] == b.curves["teacher"]
    assert b.curves["teacher"]["delete"]["teacher"] == [0.0] * 5  # deleting its step flips it
    assert b.gap("delete", "teacher") > 0.5 and b.gap("keep", "teacher") > 0.5
    checks = {c.name: c for c in report.checks}
    assert checks["deletion_gap"].threshold == pytest.approx(b.gap("delete", "teacher") - 0.1)
    assert all(c.passed for c in report.checks) and report.can_substitute


def test_a_student_relying_on_a_step_the_teacher_ignores_fails_the_deletion_check():
    # both say class 1 on every clean series: clean agreement 1, but the student reads step 15, outside
    # the teacher's top 50% (its step 5, the occlusion windows around it, then time order)
    report = substitution_report(StepProbe(5), StepProbe(15), _positive_loader(), method=None)
    checks = {c.name: c for c in report.checks}
    assert checks["agreement"].passed and checks["accuracy_drop"].passed and checks["noise_agreement"].passed
    b = report.behaviour
    assert b.curves["student"]["delete"]["teacher"] == [1.0] * 5
    assert b.curves["student"]["keep"]["teacher"] == [0.0] * 5
    assert not checks["deletion_gap"].passed and not checks["keep_gap"].passed
    assert checks["deletion_gap"].value < 0 < checks["deletion_gap"].threshold
    assert not report.can_substitute
    assert "| deletion_gap |" in report.to_markdown() and "FAIL" in report.to_markdown()
    loose = report.with_thresholds({"max_deletion_shortfall": 2.0, "max_keep_shortfall": 2.0})
    assert {c.name: c.passed for c in loose.checks}["deletion_gap"]


def test_behavioural_checks_are_bounded_and_can_be_switched_off(models, toy_loader):
    loader = toy_loader(n=20, seed=5, batch_size=4)
    bounded = substitution_report(
        *models, loader, method=None, behaviour_options={"max_series": 6, "repeats": 1}
    )
    assert bounded.behaviour.num_series == 6 and bounded.behaviour.repeats == 1
    off = substitution_report(*models, loader, method=None, behaviour=False)
    assert off.behaviour is None and [c.name for c in off.checks] == ["agreement", "accuracy_drop"]
    assert "## Behaviour under perturbation\n\nnot measured" in off.to_markdown()
    assert off.to_dict()["behaviour"] is None
    titles = [ax.get_title() for ax in off.figure().axes]
    assert "deletion and keep curves" not in titles
    assert "deletion and keep curves" in [ax.get_title() for ax in bounded.figure().axes]
    with pytest.raises(ValueError, match="unknown behaviour option"):
        substitution_report(*models, loader, behaviour_options={"noise_level": 0.5})


def test_callback_behaviour_flag(tmp_path, toy_module, toy_loader):
    with pytest.raises(ValueError, match="max_series must be an integer >= 1"):
        SubstitutionReportCallback(behaviour_options={"max_series": 0})
    callback = SubstitutionReportCallback(method=None, behaviour=False)
    trainer = quiet_trainer(logger=CSVLogger(tmp_path), callbacks=[callback])
    trainer.test(toy_module(seed=3), toy_loader(n=8, seed=5), verbose=False)
    assert callback.report.behaviour is None
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "test/substitution_agreement" in header and "test/substitution_deletion_gap" not in header
