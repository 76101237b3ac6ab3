"""Can the student replace the teacher? A report over a dataloader, with an explicit verdict.

:func:`substitution_report` runs both models over the data and measures accuracy and calibration (ECE, 15 bins)
of each, their agreement (overall and per teacher-predicted class), KL/JS divergence, saliency alignment
and the teacher-vs-student confusion matrix, all through torchmetrics classes (so, under
``torch.distributed``, call it on every rank: the numbers sync; the worst-sample list is per rank). The
verdict checks them against :class:`SubstitutionThresholds`.
:class:`SubstitutionReportCallback` writes the report after ``trainer.test``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from lightning_tsd._batch import Batch, unpack_batch
from lightning_tsd.callbacks import CAPTUM_METHODS, _check_choice, _logits, _saliency_pair, _teacher_student
from lightning_tsd.functional import teacher_student_divergence
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence


@dataclass(frozen=True)
class SubstitutionThresholds:
    """What the student must reach to replace the teacher (defaults are deliberately strict).

    Attributes:
        min_agreement: top-1 agreement with the teacher, at least (0.95).
        max_accuracy_drop: teacher accuracy minus student accuracy, at most (0.02; needs labels).
        min_spearman: mean Spearman correlation of the saliency maps, at least (0.5; needs a method).

    Example:
        >>> SubstitutionThresholds.coerce({"min_agreement": 0.9}).min_agreement
        0.9
    """

    min_agreement: float = 0.95
    max_accuracy_drop: float = 0.02
    min_spearman: float = 0.5

    @classmethod
    def coerce(
        cls, thresholds: SubstitutionThresholds | Mapping[str, float] | None
    ) -> SubstitutionThresholds:
        """Defaults for None, overrides for a dict (unknown keys raise ``ValueError``), or the instance."""
        if thresholds is None or isinstance(thresholds, cls):
            return thresholds or cls()
        unknown = set(thresholds) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown threshold(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}"
            )
        return cls(**thresholds)


@dataclass(frozen=True)
class Check:
    """One verdict check: ``value`` compared (``>=`` or ``<=``) with ``threshold``."""

    name: str
    value: float
    op: str
    threshold: float

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold


@dataclass(frozen=True)
class WorstSample:
    """A sample where the student's distribution is furthest (KL) from the teacher's."""

    index: int
    kl: float
    teacher_pred: int
    student_pred: int
    label: int | None


@dataclass(frozen=True)
class SubstitutionReport:
    """Teacher-vs-student numbers over a dataset, and the verdict they give.

    ``per_class_agreement[c]`` is the agreement among samples the teacher puts in class ``c`` (NaN if
    none); ``confusion[t][s]`` counts samples the teacher puts in ``t`` and the student in ``s``.
    Accuracy and ECE are None without labels; ``saliency`` is empty when no method was used. The checks
    (and ``can_substitute``) follow from the numbers and ``thresholds``; :meth:`with_thresholds` re-judges.
    """

    num_samples: int
    num_classes: int
    teacher_accuracy: float | None
    student_accuracy: float | None
    teacher_ece: float | None
    student_ece: float | None
    agreement: float
    per_class_agreement: list[float]
    per_class_count: list[int]
    kl: float
    js: float
    saliency: dict[str, float]
    confusion: list[list[int]]
    worst: list[WorstSample]
    method: str | None
    thresholds: SubstitutionThresholds = field(default_factory=SubstitutionThresholds)

    @property
    def accuracy_drop(self) -> float | None:
        if self.teacher_accuracy is None or self.student_accuracy is None:
            return None
        return self.teacher_accuracy - self.student_accuracy

    @property
    def checks(self) -> list[Check]:
        """Agreement always; accuracy drop with labels; Spearman when saliency was measured."""
        t = self.thresholds
        checks = [Check("agreement", self.agreement, ">=", t.min_agreement)]
        if self.accuracy_drop is not None:
            checks.append(Check("accuracy_drop", self.accuracy_drop, "<=", t.max_accuracy_drop))
        if "spearman" in self.saliency:
            checks.append(Check("saliency_spearman", self.saliency["spearman"], ">=", t.min_spearman))
        return checks

    @property
    def can_substitute(self) -> bool:
        return all(check.passed for check in self.checks)

    def with_thresholds(self, thresholds: SubstitutionThresholds | Mapping[str, float]) -> SubstitutionReport:
        """The same numbers judged against other thresholds."""
        return dataclasses.replace(self, thresholds=SubstitutionThresholds.coerce(thresholds))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) including the checks and the verdict."""
        out = dataclasses.asdict(self)
        out["per_class_agreement"] = [None if math.isnan(a) else a for a in self.per_class_agreement]
        out["accuracy_drop"] = self.accuracy_drop
        out["checks"] = [{**dataclasses.asdict(c), "passed": c.passed} for c in self.checks]
        out["can_substitute"] = self.can_substitute
        return out

    def to_markdown(self) -> str:
        """The report as Markdown: verdict, models, per-class agreement, saliency, confusion, worst samples."""
        verdict = "**yes**" if self.can_substitute else "**no**"
        lines = [
            "# Substitution report",
            "",
            f"Can the student replace the teacher? {verdict} ({self.num_samples} samples, "
            f"{self.num_classes} classes, saliency method: {self.method or 'none'})",
            "",
            "## Verdict",
            "",
            *_table(
                ["check", "value", "rule", "result"],
                [
                    [c.name, _fmt(c.value), f"{c.op} {_fmt(c.threshold)}", "pass" if c.passed else "FAIL"]
                    for c in self.checks
                ],
            ),
            "",
            "## Teacher and student",
            "",
            *_table(
                ["metric", "teacher", "student"],
                [
                    ["accuracy", _fmt(self.teacher_accuracy), _fmt(self.student_accuracy)],
                    ["ECE", _fmt(self.teacher_ece), _fmt(self.student_ece)],
                ],
            ),
            "",
            *_table(
                ["agreement", "KL(teacher ‖ student)", "JS"],
                [[_fmt(self.agreement), _fmt(self.kl), _fmt(self.js)]],
            ),
            "",
            "## Agreement per teacher-predicted class",
            "",
            *_table(
                ["class", "samples", "agreement"],
                [
                    [str(c), str(n), _fmt(a)]
                    for c, (n, a) in enumerate(zip(self.per_class_count, self.per_class_agreement))
                ],
            ),
            "",
            "## Saliency alignment",
            "",
            *(
                _table(list(self.saliency), [[_fmt(v) for v in self.saliency.values()]])
                if self.saliency
                else ["not measured"]
            ),
            "",
            "## Confusion (rows: teacher, columns: student)",
            "",
            *_table(
                ["teacher \\ student", *map(str, range(self.num_classes))],
                [[str(t), *map(str, row)] for t, row in enumerate(self.confusion)],
            ),
            "",
            "## Largest divergence samples",
            "",
            *_table(
                ["index", "KL", "teacher", "student", "label"],
                [
                    [str(w.index), _fmt(w.kl), str(w.teacher_pred), str(w.student_pred), _fmt(w.label)]
                    for w in self.worst
                ],
            ),
            "",
        ]
        return "\n".join(lines)

    def figure(self) -> Figure:
        """The teacher-vs-student confusion matrix and per-class agreement bars, as a ``Figure``."""
        fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
        ax_cm, ax_bar = fig.subplots(1, 2)
        confusion = np.asarray(self.confusion)
        image = ax_cm.imshow(confusion, cmap="Blues")
        for (t, s), count in np.ndenumerate(confusion):
            dark = count > confusion.max() / 2
            ax_cm.text(s, t, str(count), ha="center", va="center", color="white" if dark else "black")
        ax_cm.set(xlabel="student prediction", ylabel="teacher prediction", title="teacher vs student")
        ticks = range(self.num_classes)
        ax_cm.set_xticks(ticks)
        ax_cm.set_yticks(ticks)
        fig.colorbar(image, ax=ax_cm, shrink=0.8)
        agreement = np.asarray(self.per_class_agreement, dtype=float)
        ax_bar.bar(ticks, np.nan_to_num(agreement), color="C0")
        for c, (value, count) in enumerate(zip(agreement, self.per_class_count)):
            note = "n/a" if np.isnan(value) else f"n={count}"
            ax_bar.text(c, np.nan_to_num(value) + 0.02, note, ha="center", va="bottom", fontsize="small")
        ax_bar.axhline(self.thresholds.min_agreement, color="C3", linestyle="--", label="threshold")
        ax_bar.set(
            xlabel="teacher-predicted class", ylabel="agreement", ylim=(0, 1.05), title="agreement per class"
        )
        ax_bar.set_xticks(ticks)
        ax_bar.legend(loc="lower right")
        fig.suptitle(f"can substitute: {'yes' if self.can_substitute else 'no'}")
        return fig


def _fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


class _Accumulator:
    """The torchmetrics behind a report, created once the number of classes is known."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        k = num_classes
        self.agreement = TeacherAgreement().to(device)
        self.divergence = TeacherStudentDivergence().to(device)
        self.saliency = SaliencyAlignment().to(device)
        self.confusion = MulticlassConfusionMatrix(num_classes=k).to(device)
        self.accuracy = {m: MulticlassAccuracy(num_classes=k, average="micro").to(device) for m in ("t", "s")}
        self.ece = {m: MulticlassCalibrationError(num_classes=k, n_bins=15).to(device) for m in ("t", "s")}
        self.per_sample: list[tuple[Tensor, ...]] = []  # kl, index, teacher pred, student pred, label
        self.labelled = True

    def update(self, b: Batch, t_logits: Tensor, s_logits: Tensor, offset: int) -> None:
        t_pred, s_pred = t_logits.argmax(1), s_logits.argmax(1)
        self.agreement.update(s_logits, t_logits)
        self.divergence.update(s_logits, t_logits)
        self.confusion.update(s_pred, t_pred)
        self.labelled &= b.y is not None
        if self.labelled:
            for m, logits in (("t", t_logits), ("s", s_logits)):
                self.accuracy[m].update(logits, b.y)
                self.ece[m].update(logits.softmax(1), b.y)
        index = (
            b.index
            if b.index is not None
            else torch.arange(offset, offset + len(t_pred), device=t_pred.device)
        )
        label = b.y if b.y is not None else torch.full_like(t_pred, -1)
        kl = teacher_student_divergence(s_logits, t_logits)["kl"]
        self.per_sample.append(tuple(t.detach().cpu() for t in (kl, index, t_pred, s_pred, label)))

    def worst(self, n: int) -> list[WorstSample]:
        kl, index, t_pred, s_pred, label = (torch.cat(c) for c in zip(*self.per_sample))
        top = kl.topk(min(n, len(kl))).indices.tolist()
        return [
            WorstSample(
                int(index[i]),
                float(kl[i]),
                int(t_pred[i]),
                int(s_pred[i]),
                int(label[i]) if label[i] >= 0 else None,
            )
            for i in top
        ]


def substitution_report(
    teacher: nn.Module,
    student: nn.Module,
    dataloader: Iterable[Any],
    method: str | None = "integrated_gradients",
    thresholds: SubstitutionThresholds | Mapping[str, float] | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    num_worst: int = 5,
    method_kwargs: dict[str, Any] | None = None,
) -> SubstitutionReport:
    """Compare ``student`` with ``teacher`` over ``dataloader`` and judge whether it can replace it.

    Both models run in eval mode (their ``training`` flags are restored). Saliency uses captum's
    ``method`` for the teacher's predicted class (see :mod:`lightning_tsd.callbacks`); ``method=None``
    skips it and its check. Worst samples are named by the batch's ``index`` when it has one, else by
    their position in the iteration.

    Args:
        teacher: the reference model, ``(B, C, T) -> (B, K)``.
        student: the candidate, same interface.
        dataloader: batches as :func:`lightning_tsd._batch.unpack_batch` reads them.
        method: captum method name, or None.
        thresholds: :class:`SubstitutionThresholds`, a dict of overrides, or None for the defaults.
        device: where to run; the models are moved there. Default: the teacher's device.
        max_batches: stop after this many batches.
        num_worst: how many largest-KL samples to list.
        method_kwargs: passed to captum's ``attribute`` (e.g. ``{"n_steps": 16}``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(4, 1, 8), torch.tensor([0, 1, 0, 1]))]
        >>> report = substitution_report(net, net, data, method="saliency")
        >>> report.agreement, report.kl, report.can_substitute
        (1.0, 0.0, True)
    """
    if method is not None:
        _check_choice("method", method, CAPTUM_METHODS)
    thresholds = SubstitutionThresholds.coerce(thresholds)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    teacher.to(device)
    student.to(device)
    acc: _Accumulator | None = None
    seen = 0
    for batch in itertools.islice(dataloader, max_batches):
        b = Batch(*(None if t is None else t.to(device) for t in unpack_batch(batch)))
        if method is None:
            t_logits, s_logits, maps = _logits(teacher, b.x, b.mask), _logits(student, b.x, b.mask), None
        else:
            t_logits, s_logits, *maps = _saliency_pair(teacher, student, b, method, "teacher", method_kwargs)
        acc = acc or _Accumulator(t_logits.shape[1], device)
        if maps is not None:
            acc.saliency.update(maps[1], maps[0], b.mask)
        acc.update(b, t_logits, s_logits, seen)
        seen += len(t_logits)
    if acc is None:
        raise ValueError("the dataloader gave no batch; a substitution report needs at least one")

    confusion = acc.confusion.compute()
    counts = confusion.sum(1)
    per_class = confusion.diagonal() / counts  # NaN for classes the teacher never predicts
    divergence = acc.divergence.compute()

    def scalar(metric: Any) -> float | None:
        return float(metric.compute()) if acc.labelled else None

    return SubstitutionReport(
        num_samples=int(counts.sum()),
        num_classes=confusion.shape[0],
        teacher_accuracy=scalar(acc.accuracy["t"]),
        student_accuracy=scalar(acc.accuracy["s"]),
        teacher_ece=scalar(acc.ece["t"]),
        student_ece=scalar(acc.ece["s"]),
        agreement=float(acc.agreement.compute()),
        per_class_agreement=per_class.tolist(),
        per_class_count=counts.tolist(),
        kl=float(divergence["kl"]),
        js=float(divergence["js"]),
        saliency={k: float(v) for k, v in acc.saliency.compute().items()} if method is not None else {},
        confusion=confusion.tolist(),
        worst=acc.worst(num_worst),
        method=method,
        thresholds=thresholds,
    )


class SubstitutionReportCallback(Callback):
    """After ``trainer.test``, write a :func:`substitution_report` over the test dataloaders.

    Every rank computes (the metrics sync); rank zero writes ``substitution_report.md`` and
    ``substitution_report.png`` to ``dirpath`` (default: ``trainer.log_dir``) and logs
    ``test/substitution_<check>`` values and ``test/substitution_can_substitute`` (1.0 or 0.0) to the
    loggers. The last report is kept as ``callback.report``. The module must have ``teacher`` and
    ``student`` attributes (see :mod:`lightning_tsd.callbacks`).

    Args:
        dirpath: output folder.
        method, thresholds, max_batches, num_worst, method_kwargs: as in :func:`substitution_report`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SubstitutionReportCallback(method="saliency")], enable_progress_bar=False)
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        method: str | None = "integrated_gradients",
        thresholds: SubstitutionThresholds | Mapping[str, float] | None = None,
        max_batches: int | None = None,
        num_worst: int = 5,
        method_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if method is not None:
            _check_choice("method", method, CAPTUM_METHODS)
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.options = {
            "method": method,
            "thresholds": SubstitutionThresholds.coerce(thresholds),
            "max_batches": max_batches,
            "num_worst": num_worst,
            "method_kwargs": method_kwargs,
        }
        self.report: SubstitutionReport | None = None
        self._dir = self.dirpath

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _teacher_student(pl_module)
        if self.dirpath is None:  # trainer.log_dir broadcasts: resolve it on every rank
            self._dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.test_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        teacher, student = _teacher_student(pl_module)
        self.report = substitution_report(
            teacher, student, itertools.chain(*loaders), device=pl_module.device, **self.options
        )
        self._write(trainer, self.report)

    @rank_zero_only
    def _write(self, trainer: Trainer, report: SubstitutionReport) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / "substitution_report.md").write_text(report.to_markdown())
        report.figure().savefig(self._dir / "substitution_report.png")
        metrics = {f"test/substitution_{c.name}": float(c.value) for c in report.checks}
        metrics["test/substitution_can_substitute"] = float(report.can_substitute)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
