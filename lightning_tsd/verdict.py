"""The substitution verdict: a report's numbers, the thresholds they are judged against, and renderings.

:class:`SubstitutionReport` holds what :func:`lightning_tsd.report.substitution_report` measured (accuracy and
ECE of both models, agreement overall and per class, KL/JS, saliency alignment, the confusion matrix, the
worst samples, the models' cost); its :attr:`~SubstitutionReport.checks` compare them with
:class:`SubstitutionThresholds`, and it renders as Markdown, JSON-ready data or a figure. No Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from matplotlib.figure import Figure

from lightning_tsd.plotting import format_value, plot_substitution_report

__all__ = ["Check", "SubstitutionReport", "SubstitutionThresholds", "WorstSample"]


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
        thresholds = cast(Mapping[str, float], thresholds)  # isinstance(x, cls) narrows only to Self
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
    cost: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        """The report as Markdown: verdict, models, cost, per-class agreement, saliency, confusion, worst."""
        checks = [
            [c.name, c.value, f"{c.op} {format_value(c.threshold)}", "pass" if c.passed else "FAIL"]
            for c in self.checks
        ]
        models = [
            ["accuracy", self.teacher_accuracy, self.student_accuracy],
            ["ECE", self.teacher_ece, self.student_ece],
        ]
        t, s = self.cost.get("teacher"), self.cost.get("student")
        cost = (
            [[name, t[k], s[k], s[k] / t[k] if t[k] else None] for name, k in _COST_ROWS] if t and s else []
        )
        classes = [[c, n, a] for c, (n, a) in enumerate(zip(self.per_class_count, self.per_class_agreement))]
        confusion = [[c, *row] for c, row in enumerate(self.confusion)]
        worst = [[w.index, w.kl, w.teacher_pred, w.student_pred, w.label] for w in self.worst]
        md = [
            "# Substitution report",
            "",
            f"Can the student replace the teacher? {'**yes**' if self.can_substitute else '**no**'} "
            f"({self.num_samples} samples, {self.num_classes} classes, "
            f"saliency method: {self.method or 'none'})",
        ]
        md += _section("Verdict", ["check", "value", "rule", "result"], checks)
        md += _section("Teacher and student", ["metric", "teacher", "student"], models)
        md += _section(
            None, ["agreement", "KL(teacher ‖ student)", "JS"], [[self.agreement, self.kl, self.js]]
        )
        md += _section("Cost", ["cost", "teacher", "student", "student / teacher"], cost)
        md += (
            ["", f"Latency: median wall time of one forward on the first batch ({_LATENCY})."] if cost else []
        )
        md += _section("Agreement per teacher-predicted class", ["class", "samples", "agreement"], classes)
        md += _section("Saliency alignment", list(self.saliency), [list(self.saliency.values())])
        header = ["teacher \\ student", *map(str, range(self.num_classes))]
        md += _section("Confusion (rows: teacher, columns: student)", header, confusion)
        md += _section("Largest divergence samples", ["index", "KL", "teacher", "student", "label"], worst)
        return "\n".join([*md, ""])

    def figure(self) -> Figure:
        """The teacher-vs-student confusion matrix, per-class agreement bars, and a panel listing every
        check (green ``pass``, red ``FAIL``) and both models' cost, as a ``Figure``; the title names the
        failed checks."""
        checks = [(c.name, c.value, c.op, c.threshold, c.passed) for c in self.checks]
        return plot_substitution_report(
            self.confusion, self.per_class_agreement, self.per_class_count, self.thresholds.min_agreement,
            checks, self.cost,
        )  # fmt: skip


_COST_ROWS = (("parameters", "params"), ("state dict (bytes)", "bytes"), ("latency (ms)", "latency_ms"))
_LATENCY = "eval mode, no grad, on the report's device; median of 5 calls after 2 warm-up calls"


def _section(title: str | None, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table under its ``## title`` (none for None), or "not measured" without rows."""
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(map(format_value, r)) + " |" for r in rows]
    return [*(["", f"## {title}"] if title else []), "", *(table if header and rows else ["not measured"])]
