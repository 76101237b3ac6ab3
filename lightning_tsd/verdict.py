"""The substitution verdict: a report's numbers, the thresholds they are judged against, and renderings.

:class:`SubstitutionReport` holds what :func:`lightning_tsd.report.substitution_report` measured (accuracy and
ECE of both models, agreement overall and per class, KL/JS, saliency alignment, the confusion matrix, the
worst samples, the models' cost, and the behaviour under perturbation: a
:class:`~lightning_tsd.behaviour.Behaviour`); its :attr:`~SubstitutionReport.checks` compare them with
:class:`SubstitutionThresholds`, and it renders as Markdown, JSON-ready data or a figure. No Lightning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from matplotlib.figure import Figure

from lightning_tsd.behaviour import Behaviour
from lightning_tsd.plotting import format_value, plot_substitution_report

__all__ = ["Check", "SubstitutionReport", "SubstitutionThresholds", "WorstSample"]


@dataclass(frozen=True)
class SubstitutionThresholds:
    """What the student must reach to replace the teacher (defaults are deliberately strict).

    The last four judge the behavioural checks (when the report measured them, see
    :class:`~lightning_tsd.behaviour.Behaviour`).

    Attributes:
        min_agreement: top-1 agreement with the teacher, at least (0.95).
        max_accuracy_drop: teacher accuracy minus student accuracy, at most (0.02; needs labels).
        min_spearman: mean Spearman correlation of the saliency maps, at least (0.5; needs a method).
        min_noise_agreement: agreement on the same noisy input (Gaussian, 0.5 series std), at least
            (0.90: five points below the clean bar, as noise pushes series towards the decision boundary,
            where any two models disagree more).
        min_masked_agreement: agreement on the same input with a window of 10% of the steps set to 0, at
            least (0.90, as for noise).
        max_deletion_shortfall: the student's deletion gap (agreement after deleting random steps minus
            after deleting the teacher's top steps, mean over the fractions) may fall short of the teacher's
            own gap by at most this (0.10). The teacher sets the bar: a student that is the teacher passes
            whatever the teacher's ranking is worth, and one that relies on other steps keeps its answer
            when the teacher's evidence is deleted, so its gap stays near 0 and it fails.
        max_keep_shortfall: the same for the keep gap (agreement when only the teacher's top steps are
            kept minus when only random ones are), at most (0.10).

    Example:
        >>> SubstitutionThresholds.coerce({"min_agreement": 0.9}).min_agreement
        0.9
    """

    min_agreement: float = 0.95
    max_accuracy_drop: float = 0.02
    min_spearman: float = 0.5
    min_noise_agreement: float = 0.90
    min_masked_agreement: float = 0.90
    max_deletion_shortfall: float = 0.10
    max_keep_shortfall: float = 0.10

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
    Accuracy and ECE are None without labels; ``saliency`` is empty when no method was used;
    ``behaviour`` is None when the behavioural checks were switched off. The checks (and
    ``can_substitute``) follow from the numbers and ``thresholds``; :meth:`with_thresholds` re-judges.
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
    behaviour: Behaviour | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.teacher_accuracy is None or self.student_accuracy is None:
            return None
        return self.teacher_accuracy - self.student_accuracy

    @property
    def checks(self) -> list[Check]:
        """Agreement always; accuracy drop with labels; Spearman when saliency was measured; agreement under
        noise and masked windows, and the deletion and keep gaps, when the behaviour was measured (the
        gaps' threshold is the teacher's own gap minus the allowed shortfall)."""
        t = self.thresholds
        checks = [Check("agreement", self.agreement, ">=", t.min_agreement)]
        if self.accuracy_drop is not None:
            checks.append(Check("accuracy_drop", self.accuracy_drop, "<=", t.max_accuracy_drop))
        if "spearman" in self.saliency:
            checks.append(Check("saliency_spearman", self.saliency["spearman"], ">=", t.min_spearman))
        b = self.behaviour
        if b is not None:
            checks += [
                Check("noise_agreement", b.noise_agreement, ">=", t.min_noise_agreement),
                Check("masked_agreement", b.mask_agreement, ">=", t.min_masked_agreement),
                Check(
                    "deletion_gap",
                    b.gap("delete"),
                    ">=",
                    b.gap("delete", "teacher") - t.max_deletion_shortfall,
                ),
                Check("keep_gap", b.gap("keep"), ">=", b.gap("keep", "teacher") - t.max_keep_shortfall),
            ]
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
        """The report as Markdown: verdict, models, cost, behaviour, per-class agreement, saliency, confusion,
        worst."""
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
        md += _behaviour_section(self.behaviour, self.thresholds)
        md += _section("Agreement per teacher-predicted class", ["class", "samples", "agreement"], classes)
        md += _section("Saliency alignment", list(self.saliency), [list(self.saliency.values())])
        header = ["teacher \\ student", *map(str, range(self.num_classes))]
        md += _section("Confusion (rows: teacher, columns: student)", header, confusion)
        md += _section("Largest divergence samples", ["index", "KL", "teacher", "student", "label"], worst)
        return "\n".join([*md, ""])

    def figure(self) -> Figure:
        """The teacher-vs-student confusion matrix, per-class agreement bars, the deletion and keep curves
        (teacher-ranked vs random, when the behaviour was measured) and a panel listing every check (green
        ``pass``, red ``FAIL``) and both models' cost, as a ``Figure``; the title names the failed checks."""
        checks = [(c.name, c.value, c.op, c.threshold, c.passed) for c in self.checks]
        b = self.behaviour
        return plot_substitution_report(
            self.confusion, self.per_class_agreement, self.per_class_count, self.thresholds.min_agreement,
            checks, self.cost, curves=None if b is None else (b.fractions, b.curves),
        )  # fmt: skip


_COST_ROWS = (("parameters", "params"), ("state dict (bytes)", "bytes"), ("latency (ms)", "latency_ms"))
_LATENCY = "eval mode, no grad, on the report's device; median of 5 calls after 2 warm-up calls"


def _behaviour_section(b: Behaviour | None, t: SubstitutionThresholds) -> list[str]:
    """The behavioural checks' numbers: agreement under perturbation, the curves and the gaps."""
    if b is None:
        return _section("Behaviour under perturbation", [], [])
    md = [
        "",
        "## Behaviour under perturbation",
        "",
        f"On {b.num_series} series. Agreement on the same perturbed input: Gaussian noise of std "
        f"{b.noise_level:g} times each series' std, and a random window of "
        f"{b.mask_level:.0%} of the real steps set to 0 ({b.repeats} draws each). Deletion curves: agreement "
        "with the teacher's prediction on the clean input after the top steps of a ranking are set to 0 "
        f"(delete) or all other steps are (keep); the teacher's ranking is its {b.method} map, the random "
        f"one the mean of {b.repeats} random rankings. The gap checks pass when the student's gap is at least "
        "the teacher's own gap minus the allowed shortfall: the student relies on the teacher's top steps "
        "about as much as the teacher does.",
    ]
    md += _section(
        None,
        ["perturbation", "agreement"],
        [["noise", b.noise_agreement], ["masked window", b.mask_agreement]],
    )
    s, r = b.curves["student"], b.curves["teacher"]
    rows = [
        [f"{f:.0%}", s["delete"]["teacher"][i], s["delete"]["random"][i], s["keep"]["teacher"][i],
         s["keep"]["random"][i], r["delete"]["teacher"][i], r["delete"]["random"][i],
         r["keep"]["teacher"][i], r["keep"]["random"][i]]
        for i, f in enumerate(b.fractions)
    ]  # fmt: skip
    pairs = ["delete, teacher-ranked", "delete, random", "keep, teacher-ranked", "keep, random"]
    header = ["steps", *(f"student: {p}" for p in pairs), *(f"teacher itself: {p}" for p in pairs)]
    md += _section(None, header, rows)
    gaps = [
        ["deletion (random - teacher-ranked)", b.gap("delete"), b.gap("delete", "teacher"), t.max_deletion_shortfall],
        ["keep (teacher-ranked - random)", b.gap("keep"), b.gap("keep", "teacher"), t.max_keep_shortfall],
    ]  # fmt: skip
    md += _section(
        None, ["gap, mean over the fractions", "student", "teacher itself", "allowed shortfall"], gaps
    )
    return md


def _section(title: str | None, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table under its ``## title`` (none for None), or "not measured" without rows."""
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(map(format_value, r)) + " |" for r in rows]
    return [*(["", f"## {title}"] if title else []), "", *(table if header and rows else ["not measured"])]
