"""Can the student replace the teacher? A report over a dataloader, with an explicit verdict.

:func:`substitution_report` runs both models over the data and measures accuracy and calibration (ECE, 15 bins)
of each, their agreement (overall and per teacher-predicted class), KL/JS divergence, saliency alignment
and the teacher-vs-student confusion matrix, all through torchmetrics classes (so, under
``torch.distributed``, call it on every rank: the numbers sync; the worst-sample list is per rank). The
verdict checks them against :class:`SubstitutionThresholds`. ``cost`` holds each model's parameter count,
serialized size and forward latency. ``behaviour`` holds the behavioural checks of
:func:`lightning_tsd.behaviour.measure_behaviour` (agreement under noise and masked windows, deletion and
keep curves), measured on the first ``max_series`` series (per rank under ``torch.distributed``).
:class:`SubstitutionReportCallback` writes the report after ``trainer.test``. The report's types and rendering live in :mod:`lightning_tsd.verdict` (re-exported here).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from lightning_tsd._batch import Batch, unpack_batch
from lightning_tsd.attribution import check_attribution_options, eval_logits, saliency_pair
from lightning_tsd.behaviour import check_behaviour_options, measure_behaviour
from lightning_tsd.callbacks import teacher_student
from lightning_tsd.export import model_cost
from lightning_tsd.functional import teacher_student_divergence
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence
from lightning_tsd.verdict import Check, SubstitutionReport, SubstitutionThresholds, WorstSample

__all__ = [
    "Check",
    "SubstitutionReport",
    "SubstitutionReportCallback",
    "SubstitutionThresholds",
    "WorstSample",
    "substitution_report",
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
            assert b.y is not None  # labelled only while every batch has labels
            for m, logits in (("t", t_logits), ("s", s_logits)):
                self.accuracy[m].update(logits, b.y)
                self.ece[m].update(logits.softmax(1), b.y)
        positions = torch.arange(offset, offset + len(t_pred), device=t_pred.device)
        index = b.index if b.index is not None else positions
        label = b.y if b.y is not None else torch.full_like(t_pred, -1)
        kl = teacher_student_divergence(s_logits, t_logits)["kl"]
        self.per_sample.append(tuple(t.detach().cpu() for t in (kl, index, t_pred, s_pred, label)))

    def worst(self, n: int) -> list[WorstSample]:
        kl, index, t_pred, s_pred, label = (torch.cat(c) for c in zip(*self.per_sample))
        top = kl.topk(min(n, len(kl))).indices.tolist()
        rows = ((index[i], kl[i], t_pred[i], s_pred[i], label[i]) for i in top)
        return [
            WorstSample(int(i), float(k), int(t), int(s), int(y) if y >= 0 else None)
            for i, k, t, s, y in rows
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
    options: Mapping[str, Any] | None = None,
    *,
    method_kwargs: Mapping[str, Any] | None = None,
    behaviour: bool = True,
    behaviour_options: Mapping[str, Any] | None = None,
) -> SubstitutionReport:
    """Compare ``student`` with ``teacher`` over ``dataloader`` and judge whether it can replace it.

    Both models run in eval mode (their ``training`` flags are restored). Saliency is
    :func:`lightning_tsd.attribution.temporal_attribution` with ``method`` for the teacher's predicted
    class; ``method=None`` skips it and its check. Worst samples are named by the batch's ``index`` when it
    has one, else by their position in the iteration. ``cost`` is measured with :func:`model_cost` on the
    first batch (per rank under ``torch.distributed``, like the worst samples). The behavioural checks
    (:func:`~lightning_tsd.behaviour.measure_behaviour`) run on the first ``max_series`` (128) series: about
    ``2 * repeats + 2 * len(fractions) * (repeats + 1)`` extra forwards of each model, plus the teacher's
    occlusion map (about ``20`` forwards); ``behaviour=False`` skips them and their checks.

    Args:
        teacher: the reference model, ``(B, C, T) -> (B, K)``.
        student: the candidate, same interface.
        dataloader: batches as :func:`lightning_tsd._batch.unpack_batch` reads them.
        method: attribution method name (``"integrated_gradients"``, ``"gradient"``, ...), or None.
        thresholds: :class:`SubstitutionThresholds`, a dict of overrides, or None for the defaults.
        device: where to run; the models are moved there. Default: the teacher's device.
        max_batches: stop after this many batches.
        num_worst: how many largest-KL samples to list.
        options: the method's options (e.g. ``{"steps": 16}``; ``window``, ``stride`` for occlusion).
        method_kwargs: deprecated name of ``options``.
        behaviour: measure the behavioural checks (agreement under noise and masked windows, the deletion
            and keep gaps).
        behaviour_options: options of :func:`~lightning_tsd.behaviour.measure_behaviour`: ``max_series``,
            ``noise``, ``masked``, ``fractions``, ``repeats``, ``seed``, ``method`` and ``options`` (of the
            teacher's ranking, occlusion by default).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(4, 1, 8), torch.tensor([0, 1, 0, 1]))]
        >>> report = substitution_report(net, net, data, method="gradient")
        >>> report.agreement, report.kl, report.can_substitute, report.cost["student"]["params"]
        (1.0, 0.0, True, 18)
        >>> report.behaviour.noise_agreement, [c.name for c in report.checks][-2:]
        (1.0, ['deletion_gap', 'keep_gap'])
    """
    if method is not None:
        method, options = check_attribution_options(method, options, method_kwargs)
    settings = check_behaviour_options(behaviour_options) if behaviour else None
    thresholds = SubstitutionThresholds.coerce(thresholds)
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    teacher.to(device)
    student.to(device)
    acc: _Accumulator | None = None
    seen = 0
    cost: dict[str, dict[str, Any]] = {}  # measured on the first batch
    pairs: dict[str, nn.Module] = {"teacher": teacher, "student": student}
    kept: list[Batch] = []  # the first max_series series, for the behavioural checks
    for batch in itertools.islice(dataloader, max_batches):
        b = Batch._make(None if t is None else t.to(device) for t in unpack_batch(batch))
        room = settings["max_series"] - seen if settings else 0
        if room > 0:
            kept.append(Batch._make(None if t is None else t[:room] for t in b))
        if method is None:
            t_logits, s_logits, maps = (
                eval_logits(teacher, b.x, b.mask),
                eval_logits(student, b.x, b.mask),
                None,
            )
        else:
            t_logits, s_logits, *maps = saliency_pair(teacher, student, b, method=method, **(options or {}))
        cost = cost or {name: model_cost(m, b.x, b.mask) for name, m in pairs.items()}
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
        cost=cost,
        behaviour=measure_behaviour(teacher, student, kept, **settings) if settings else None,
    )


class SubstitutionReportCallback(Callback):
    """After ``trainer.test``, write a :func:`substitution_report` over the test dataloaders.

    Every rank computes (the metrics sync); rank zero writes ``substitution_report.md`` and
    ``substitution_report.png`` to ``dirpath`` (default: ``trainer.log_dir``) and logs
    ``test/substitution_<check>`` values (the behavioural ones included: ``noise_agreement``,
    ``masked_agreement``, ``deletion_gap``, ``keep_gap``) and ``test/substitution_can_substitute`` (1.0 or
    0.0) to the loggers. The last report is kept as ``callback.report``. The module must have ``teacher``
    and ``student`` attributes (see :mod:`lightning_tsd.callbacks`).

    Args:
        dirpath: output folder.
        method, thresholds, max_batches, num_worst, options: as in :func:`substitution_report`.
        method_kwargs: deprecated name of ``options``.
        behaviour: measure the behavioural checks (extra forwards on at most ``max_series`` series; False
            switches them off).
        behaviour_options: as in :func:`substitution_report`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SubstitutionReportCallback(method="gradient")], enable_progress_bar=False)
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        method: str | None = "integrated_gradients",
        thresholds: SubstitutionThresholds | Mapping[str, float] | None = None,
        max_batches: int | None = None,
        num_worst: int = 5,
        options: Mapping[str, Any] | None = None,
        *,
        method_kwargs: Mapping[str, Any] | None = None,
        behaviour: bool = True,
        behaviour_options: Mapping[str, Any] | None = None,
    ) -> None:
        if method is not None:
            method, options = check_attribution_options(method, options, method_kwargs)
        if behaviour:
            check_behaviour_options(behaviour_options)  # fail at construction, not after trainer.test
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.options: dict[str, Any] = {
            "method": method,
            "thresholds": SubstitutionThresholds.coerce(thresholds),
            "max_batches": max_batches,
            "num_worst": num_worst,
            "options": options,
            "behaviour": behaviour,
            "behaviour_options": behaviour_options,
        }
        self.report: SubstitutionReport | None = None
        self._dir = self.dirpath

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        teacher_student(pl_module)
        if self.dirpath is None:  # trainer.log_dir broadcasts: resolve it on every rank
            self._dir = Path(trainer.log_dir or trainer.default_root_dir)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.test_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        teacher, student = teacher_student(pl_module)
        self.report = substitution_report(
            teacher, student, itertools.chain(*loaders), device=pl_module.device, **self.options
        )
        self._write(trainer, self.report)

    @rank_zero_only
    def _write(self, trainer: Trainer, report: SubstitutionReport) -> None:
        assert self._dir is not None  # the dirpath, or set by setup()
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / "substitution_report.md").write_text(report.to_markdown())
        report.figure().savefig(self._dir / "substitution_report.png")
        metrics = {f"test/substitution_{c.name}": float(c.value) for c in report.checks}
        metrics["test/substitution_can_substitute"] = float(report.can_substitute)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
