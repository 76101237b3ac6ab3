"""The demo study behind ``lightning-tsd demo``, and the training helpers it shares with ``train-teacher``.

:func:`run_demo` trains a small InceptionTime teacher, distils two 1/10-size :class:`~lightning_tsd.models.FCN`
students from the same initialisation and batch order (KD alone, KD+TSD) and compares them on the test
split (accuracy, agreement, KL, saliency alignment, parameters, wall time, and the substitution report's
checks side by side, behavioural ones included), with one sentence on what TSD bought, a figure of the
teacher's and both students' saliency maps, and both substitution reports. :func:`train_teachers` is the work of ``lightning-tsd train-teacher`` (one teacher, or
an ensemble of them, each written as a teacher file). An entry point: nothing in the package imports it
but the CLI.

Example:
    >>> print(results_table([DemoRow("KD", 0.9, 0.95, 0.01, 0.4, 1170, 12.0)]))
    | method | accuracy | agreement | KL | saliency alignment | parameters | wall time (s) |
    |---|---|---|---|---|---|---|
    | KD | 0.9000 | 0.9500 | 0.0100 | 0.4000 | 1,170 | 12.0 |
"""

from __future__ import annotations

import copy
import math
import netrc
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from matplotlib.figure import Figure
from matplotlib.image import imsave
from torch import nn

from lightning_tsd.checkpoint import save_teacher
from lightning_tsd.classifier import TimeSeriesClassifier
from lightning_tsd.data import UCRDataModule
from lightning_tsd.models import FCN, count_parameters
from lightning_tsd.module import TemporalSaliencyDistiller
from lightning_tsd.plotting import figure_to_rgb, format_value, saliency_panels
from lightning_tsd.report import SubstitutionReport, substitution_report

__all__ = ["ConfigError", "DemoRow", "TEACHER_MODEL", "TEACHER_KWARGS", "DEMO_EPOCHS_TEACHER"]
__all__ += ["DEMO_EPOCHS_STUDENT", "DEMO_BATCH_SIZE", "DEMO_SCHEDULER", "REPORT_IG_STEPS", "make_logger"]
__all__ += ["close_logger", "train_teacher", "ensemble_paths", "train_teachers", "distil", "results_table"]
__all__ += [
    "checks_table",
    "comparison_measures",
    "tsd_verdict",
    "tenth_filters",
    "saliency_figure",
    "run_demo",
]

TEACHER_MODEL = "InceptionTime"
TEACHER_KWARGS: dict[str, Any] = {"depth": 3, "num_filters": 16}
"""A small InceptionTime (80k parameters for GunPoint): good enough a teacher, fast on a CPU."""

DEMO_EPOCHS_TEACHER = 100
"""Teacher epochs of the demo: test accuracy 0.99 on GunPoint (37 training series, batch 16)."""

DEMO_EPOCHS_STUDENT = 300
"""Epochs of each demo student (900 steps on GunPoint)."""

DEMO_BATCH_SIZE = 16
"""Batch size of every fit of the demo (``lightning-tsd demo --batch_size``)."""

DEMO_SCHEDULER = "cosine"
"""Learning-rate schedule of both demo students: annealing to 0 keeps the last epoch from landing on a
spike of a small student's noisy training curve, so the two students are compared at rest."""

REPORT_IG_STEPS = 32
"""captum IntegratedGradients steps of the saliency alignment measured on the test split."""


class ConfigError(ValueError):
    """A command line or config that cannot work (missing teacher file, models that do not fit the data)."""


# --- training helpers shared by train-teacher and demo --------------------------------------------------


def _wandb_logged_in() -> bool:
    """Whether W&B has credentials (``WANDB_API_KEY`` or a ``.netrc`` entry for its host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(kind: str, output: Path, run: str, group: str) -> Logger:
    """A ``CSVLogger`` (``output/logs/<run>/metrics.csv``) or a ``WandbLogger`` (offline unless logged in,
    or as ``WANDB_MODE`` says).

    Example:
        >>> make_logger("csv", Path("out"), "kd", "GunPoint").log_dir
        'out/logs/kd'
    """
    if kind == "csv":
        return CSVLogger(save_dir=output, name="logs", version=run)
    if kind == "wandb":
        offline = "WANDB_MODE" not in os.environ and not _wandb_logged_in()
        return WandbLogger(
            project="lightning-tsd", group=group, name=f"{group}-{run}", save_dir=str(output), offline=offline
        )
    raise ConfigError(f"unknown logger {kind!r}; choose csv or wandb")


def close_logger(logger: Logger) -> None:
    """Finish a W&B run (the next ``WandbLogger`` starts its own); nothing to do for other loggers."""
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


def _trainer(epochs: int, logger: Logger, output: Path, fast: bool) -> pl.Trainer:
    """The quiet Trainer of every fit here: no checkpoints, no model summary, a log line per step."""
    limits: dict[str, Any] = {"limit_train_batches": 2, "limit_val_batches": 1} if fast else {}
    return pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        default_root_dir=output,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **limits,
    )


def train_teacher(
    data: UCRDataModule,
    epochs: int,
    logger: Logger,
    output: Path,
    model_name: str = TEACHER_MODEL,
    model_kwargs: dict[str, Any] | None = None,
    fast: bool = False,
) -> tuple[nn.Module, float]:
    """Train a :class:`TimeSeriesClassifier` teacher with cross-entropy; returns its network and the
    wall time of the fit in seconds."""
    classifier = TimeSeriesClassifier(
        model_name=model_name,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        model_kwargs=TEACHER_KWARGS if model_kwargs is None else model_kwargs,
    )
    start = time.perf_counter()
    _trainer(epochs, logger, output, fast).fit(classifier, datamodule=data)
    return classifier.model.eval(), time.perf_counter() - start


def ensemble_paths(output: str | Path, size: int) -> list[Path]:
    """The teacher files of an ensemble of ``size`` members written for ``output``: numbered beside it.

    Example:
        >>> [str(p) for p in ensemble_paths("teachers/GunPoint.pt", 2)]
        ['teachers/GunPoint_0.pt', 'teachers/GunPoint_1.pt']
    """
    if int(size) != size or size < 1:
        raise ConfigError(f"--ensemble needs a number of teachers >= 1, got {size}")
    output = Path(output)
    return [output.with_name(f"{output.stem}_{i}{output.suffix or '.pt'}") for i in range(size)]


def train_teachers(
    dataset: str,
    epochs: int,
    output: str | Path | None = None,
    model_name: str = TEACHER_MODEL,
    model_kwargs: dict[str, Any] | None = None,
    logger: str = "csv",
    seed: int = 0,
    ensemble: int | None = None,
) -> list[Path]:
    """Train a teacher on ``dataset`` and write it to ``output`` (default ``teachers/<dataset>.pt``); with
    ``ensemble=n``, train ``n`` teachers (seeds ``seed .. seed + n - 1``, the same train/validation split)
    and write them to :func:`ensemble_paths` (``lightning-tsd train-teacher``). Prints each teacher's test
    accuracy; returns the files.

    The published InceptionTime is an ensemble of five: ``ensemble=5``, then give the distiller the list
    (``--model.teacher '[teachers/GunPoint_0.pt, ...]'``).
    """
    output = Path(output or f"teachers/{dataset}.pt")
    paths = [output] if ensemble is None else ensemble_paths(output, ensemble)
    if model_kwargs is None:
        model_kwargs = TEACHER_KWARGS if model_name == TEACHER_MODEL else {}
    pl.seed_everything(seed, verbose=False)
    data = UCRDataModule(dataset, seed=seed)
    for member, path in enumerate(paths):
        pl.seed_everything(seed + member, verbose=False)
        run = f"teacher_{dataset}" if ensemble is None else f"teacher_{dataset}_{member}"
        run_logger = make_logger(logger, output.parent, run, dataset)
        model, seconds = train_teacher(data, epochs, run_logger, output.parent, model_name, model_kwargs)
        close_logger(run_logger)
        save_teacher(model, path)
        accuracy = substitution_report(model, model, data.test_dataloader(), method=None).teacher_accuracy
        line = f"teacher {model_name} on {dataset}: test accuracy {accuracy:.4f}, {seconds:.1f} s"
        print(f"{line}; written to {path}")
    if ensemble is not None:
        print(f"ensemble of {len(paths)} teachers: --model.teacher '[{', '.join(str(p) for p in paths)}]'")
    return paths


def distil(
    teacher: str | Path | nn.Module,
    student: nn.Module,
    data: UCRDataModule,
    epochs: int,
    logger: Logger,
    output: Path,
    seed: int = 0,
    fast: bool = False,
    **distiller_kwargs: Any,
) -> tuple[TemporalSaliencyDistiller, float]:
    """Distil ``teacher`` into ``student`` with the teacher cache on; returns the distiller and the wall
    time of the fit in seconds. ``seed`` is set just before the fit, so two calls see the same batches."""
    distiller = TemporalSaliencyDistiller(
        str(teacher) if isinstance(teacher, Path) else teacher,
        student,
        teacher_cache=True,
        **distiller_kwargs,
    )
    trainer = _trainer(epochs, logger, output, fast)
    pl.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    trainer.fit(distiller, datamodule=data)
    return distiller, time.perf_counter() - start


# --- the demo -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table (None prints as a dash)."""

    method: str
    accuracy: float | None
    agreement: float | None
    kl: float | None
    saliency_alignment: float | None
    parameters: int
    wall_time: float


def results_table(rows: Sequence[DemoRow]) -> str:
    """The demo's comparison as a Markdown table (see the module's example)."""

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    lines = [
        "| method | accuracy | agreement | KL | saliency alignment | parameters | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        numbers = [fmt(v) for v in (r.accuracy, r.agreement, r.kl, r.saliency_alignment)]
        lines.append(f"| {r.method} | {' | '.join(numbers)} | {r.parameters:,} | {r.wall_time:.1f} |")
    return "\n".join(lines)


def checks_table(reports: Mapping[str, SubstitutionReport]) -> str:
    """The verdict checks of several students' substitution reports side by side, as a Markdown table: a row
    per check (its rule, then each student's value and ``pass``/``FAIL``) and a last row with each verdict.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
        >>> report = substitution_report(net, net, [(torch.randn(4, 1, 8), torch.tensor([0, 1, 0, 1]))],
        ...                              method="gradient", behaviour=False)
        >>> print(checks_table({"KD": report, "KD+TSD": report}))
        | check | rule | KD | KD+TSD |
        |---|---|---|---|
        | agreement | >= 0.9500 | 1.0000 pass | 1.0000 pass |
        | accuracy_drop | <= 0.0200 | 0.0000 pass | 0.0000 pass |
        | saliency_spearman | >= 0.5000 | 1.0000 pass | 1.0000 pass |
        | can substitute | all pass | yes | yes |
    """
    checks = {name: {c.name: c for c in r.checks} for name, r in reports.items()}
    lines = [f"| check | rule | {' | '.join(reports)} |", "|---|---|" + "---|" * len(reports)]
    for check in next(iter(reports.values())).checks:
        row = [by_name[check.name] for by_name in checks.values()]
        rules = " / ".join(dict.fromkeys(f"{c.op} {format_value(c.threshold)}" for c in row))
        cells = [f"{format_value(c.value)} {'pass' if c.passed else 'FAIL'}" for c in row]
        lines.append(f"| {check.name} | {rules} | {' | '.join(cells)} |")
    verdicts = ["yes" if r.can_substitute else "no" for r in reports.values()]
    lines.append(f"| can substitute | all pass | {' | '.join(verdicts)} |")
    return "\n".join(lines)


def comparison_measures(report: SubstitutionReport) -> dict[str, float]:
    """What the demo compares between its students, all higher-is-better: agreement, saliency alignment
    (Spearman), the behavioural numbers (when measured) and the number of checks passed."""
    measures = {"agreement": report.agreement}
    if "spearman" in report.saliency:
        measures["saliency alignment"] = report.saliency["spearman"]
    b = report.behaviour
    if b is not None:
        measures["agreement under noise"] = b.noise_agreement
        measures["agreement with a masked window"] = b.mask_agreement
        measures["deletion gap"] = b.gap("delete")
        measures["keep gap"] = b.gap("keep")
    measures["checks passed"] = sum(c.passed for c in report.checks)
    return measures


def tsd_verdict(kd: Mapping[str, float], tsd: Mapping[str, float], margin: float = 0.01) -> str:
    """One sentence on what TSD bought: the :func:`comparison_measures` on which the KD+TSD student beats the
    KD student by at least ``margin`` (the benchmarks' win rule), and those on which it loses by as much.

    Example:
        >>> print(tsd_verdict({"agreement": 0.98, "keep gap": 0.1}, {"agreement": 0.98, "keep gap": 0.05}))
        TSD bought nothing here: the KD+TSD student beats the KD student by 0.01 or more on none of agreement, saliency alignment and the behavioural checks (it loses on keep gap 0.1000 → 0.0500).
        >>> print(tsd_verdict({"agreement": 0.98, "checks passed": 3}, {"agreement": 0.96, "checks passed": 4}))
        TSD bought checks passed 3 → 4, at a loss in agreement 0.9800 → 0.9600 (KD → KD+TSD).
    """

    def changes(sign: int) -> list[str]:
        return [
            f"{name} {format_value(kd[name])} → {format_value(tsd[name])}"
            for name in kd
            if sign * (tsd[name] - kd[name]) >= margin
        ]

    gains, losses = changes(1), changes(-1)
    if not gains:
        worse = f" (it loses on {', '.join(losses)})" if losses else ""
        return (
            f"TSD bought nothing here: the KD+TSD student beats the KD student by {margin:g} or more on none of "
            f"agreement, saliency alignment and the behavioural checks{worse}."
        )
    lost = f", at a loss in {', '.join(losses)}" if losses else ""
    return f"TSD bought {', '.join(gains)}{lost} (KD → KD+TSD)."


def tenth_filters(in_channels: int, num_classes: int, teacher_params: int) -> int:
    """The filters of the :class:`~lightning_tsd.models.FCN` whose parameter count is closest (in ratio) to a
    tenth of ``teacher_params``: the benchmarks' ``tenth`` student, on which TSD's alignment gain was the largest
    and surest of the CNN students (``benchmarks/results/final.md``).

    Example:
        >>> tenth_filters(1, 2, 79_666), count_parameters(FCN(1, 2, 22))
        (22, 8142)
    """

    def gap(filters: int) -> float:
        return abs(math.log(count_parameters(FCN(in_channels, num_classes, filters)) * 10 / teacher_params))

    return min(range(4, 129), key=gap)


def saliency_figure(
    teacher: nn.Module,
    students: nn.Module | Mapping[str, nn.Module],
    data: UCRDataModule,
    num_samples: int = 3,
    steps: int = REPORT_IG_STEPS,
) -> list[Figure]:
    """The teacher's and the students' integrated-gradients maps of the first test sample of each class (up
    to ``num_samples``), one :func:`~lightning_tsd.plotting.saliency_panels` figure per series, each student's
    map labelled with its Spearman correlation with the teacher's."""
    data.setup()
    test, classes = data.test_dataset, data.classes_
    assert test is not None and classes is not None  # set by setup()
    labels = test.y.numpy()
    first_of_each_class = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    others = [i for i in range(len(test)) if i not in first_of_each_class]
    picks = (first_of_each_class + others)[:num_samples]
    names = [str(c) for c in classes]
    captions = [f"{data.name} test #{i}: class {names[int(test.y[i])]}" for i in picks]
    mask = None if test.mask is None else test.mask[picks]
    return saliency_panels(teacher, students, test.x[picks], mask, captions, names, steps)


def _save_stacked(figures: Sequence[Figure], path: Path) -> None:
    """Render ``figures`` and write them top to bottom as one PNG."""
    imsave(path, np.concatenate([figure_to_rgb(f) for f in figures], axis=0))


def _nested(report: SubstitutionReport) -> str:
    """``report`` as Markdown without its title and with every heading one level deeper, to sit under a
    section of its own."""
    lines = report.to_markdown().splitlines()[2:]  # the title and the blank line after it
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def run_demo(
    dataset: str = "GunPoint",
    epochs_teacher: int | None = None,
    epochs_student: int | None = None,
    logger: str = "csv",
    output: str | Path = "demo_output",
    fast: bool = False,
    seed: int = 0,
    batch_size: int = DEMO_BATCH_SIZE,
) -> str:
    """Run the whole story and write its files to ``output``; returns the Markdown table.

    Trains a small InceptionTime teacher, saves it (``teacher.pt``), distils two 1/10-size
    :class:`~lightning_tsd.models.FCN` students (:func:`tenth_filters`) from the same initialisation and batch order (KD alone:
    ``tsd_weight=0``; KD+TSD: the distiller's defaults; both with a cosine learning-rate schedule), and
    measures each on the test split with :func:`~lightning_tsd.report.substitution_report` (behavioural
    checks included). Prints the comparison, the two reports' checks side by side and one sentence on what
    TSD bought (:func:`tsd_verdict`). Writes ``results.md``, ``saliency.png`` (the teacher's, the KD and the
    KD+TSD student's maps of the same series, each student's with its alignment), ``substitution_report.md``
    (the checks side by side, then both reports) and ``substitution_report.png`` (both reports' figures, KD
    above KD+TSD), and the logs (``logs/<run>/metrics.csv``, or W&B runs).

    Args:
        dataset: a UCR/UEA dataset name (bundled with aeon: works offline).
        epochs_teacher: teacher epochs (default :data:`DEMO_EPOCHS_TEACHER`, or 1 with ``fast``).
        epochs_student: epochs of each student (default :data:`DEMO_EPOCHS_STUDENT`, or 1 with ``fast``).
        logger: ``"csv"`` or ``"wandb"``.
        output: output folder.
        fast: a tiny budget (2 batches per epoch, 1 report batch) that only checks the plumbing.
        seed: seed of the split, the initialisations and the batch order.
        batch_size: batch size of every fit (:data:`DEMO_BATCH_SIZE`).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"the demo's batch size must be an integer >= 1, got {batch_size}")
    epochs_teacher = epochs_teacher or (1 if fast else DEMO_EPOCHS_TEACHER)
    epochs_student = epochs_student or (1 if fast else DEMO_EPOCHS_STUDENT)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = UCRDataModule(dataset, batch_size=batch_size, seed=seed)
    report_options: dict[str, Any] = {
        "method": "integrated_gradients",
        "max_batches": 1 if fast else None,
        "options": {"steps": 8 if fast else REPORT_IG_STEPS},
    }

    print(
        f"[1/4] training the teacher ({TEACHER_MODEL} {TEACHER_KWARGS}) on {dataset}, {epochs_teacher} epochs"
    )
    run_logger = make_logger(logger, output, "teacher", dataset)
    teacher, teacher_seconds = train_teacher(data, epochs_teacher, run_logger, output, fast=fast)
    close_logger(run_logger)
    teacher_path = output / "teacher.pt"
    save_teacher(teacher, teacher_path)

    filters = tenth_filters(data.in_channels, data.num_classes, count_parameters(teacher))
    pl.seed_everything(seed, verbose=False)
    student_init = FCN(data.in_channels, data.num_classes, filters)
    student_name = f"1/10-size FCN: {filters} filters, {count_parameters(student_init):,} parameters"
    students: dict[str, nn.Module] = {}
    reports: dict[str, SubstitutionReport] = {}
    rows = []
    for step, (method, run, kwargs) in enumerate(
        [("KD", "kd", {"tsd_weight": 0.0}), ("KD+TSD", "kd_tsd", {})], 2
    ):
        print(
            f"[{step}/4] distilling a student ({student_name}) with {method}, {epochs_student} "
            "epochs, then its substitution report on the test split"
        )
        if step > 2:
            close_logger(run_logger)
        run_logger = make_logger(logger, output, run, dataset)
        distiller, seconds = distil(
            teacher_path,
            copy.deepcopy(student_init),
            data,
            epochs_student,
            run_logger,
            output,
            seed,
            fast,
            scheduler=DEMO_SCHEDULER,
            **kwargs,
        )
        students[method] = distiller.student
        report = reports[method] = substitution_report(
            teacher, distiller.student, data.test_dataloader(), **report_options
        )
        rows.append(
            DemoRow(
                f"{method} (FCN)",
                report.student_accuracy,
                report.agreement,
                report.kl,
                report.saliency["spearman"],
                count_parameters(distiller.student),
                seconds,
            )
        )
        run_logger.log_metrics(
            {f"test/{key}": value for key, value in vars(rows[-1]).items() if isinstance(value, float)}
        )

    print("[4/4] drawing the three saliency maps and the two substitution reports")
    teacher_row = DemoRow(
        f"teacher ({TEACHER_MODEL})",
        report.teacher_accuracy,
        None,
        None,
        None,
        count_parameters(teacher),
        teacher_seconds,
    )
    table = results_table([teacher_row, *rows])
    checks = checks_table(reports)
    verdict = tsd_verdict(comparison_measures(reports["KD"]), comparison_measures(reports["KD+TSD"]))
    report_figures = [r.figure() for r in reports.values()]
    for method, figure in zip(reports, report_figures, strict=True):
        figure.suptitle(f"{method} student: {figure.get_suptitle()}")
    _save_stacked(report_figures, output / "substitution_report.png")
    _save_stacked(saliency_figure(teacher, students, data, 2 if fast else 3), output / "saliency.png")
    (output / "substitution_report.md").write_text(
        f"# Substitution reports: the KD and the KD+TSD student on {dataset}\n\n{checks}\n\n{verdict}\n"
        + "".join(f"\n## {method} student ({student_name})\n\n{_nested(r)}" for method, r in reports.items())
    )
    if isinstance(run_logger, WandbLogger):
        run_logger.log_image(
            "demo/figures", [str(output / "saliency.png"), str(output / "substitution_report.png")]
        )
    close_logger(run_logger)
    elapsed = time.perf_counter() - start
    fast_note = " FAST RUN: the numbers mean nothing."
    (output / "results.md").write_text(
        f"# lightning-tsd demo: {dataset}\n\n"
        f"Teacher: {TEACHER_MODEL} {TEACHER_KWARGS}, {epochs_teacher} epochs. Students: "
        f"{student_name}, {epochs_student} epochs each, same initialisation and batch order, "
        f"{DEMO_SCHEDULER} learning rate, teacher cache on; KD+TSD uses the distiller's default TSD settings. "
        "Metrics on the test split; saliency alignment is the mean Spearman correlation of captum "
        f"IntegratedGradients maps ({REPORT_IG_STEPS} steps), teacher vs student.{fast_note if fast else ''}"
        f"\n\n{table}\n\n## Substitution checks, side by side\n\n{checks}\n\n{verdict}\n\n"
        f"Total wall time: {elapsed:.1f} s\n"
    )
    print(
        f"\n{table}\n\n{checks}\n\n{verdict}\n\nTotal wall time: {elapsed:.1f} s. Files in {output}/: "
        "results.md, teacher.pt, saliency.png, substitution_report.md, substitution_report.png, logs"
    )
    return table
