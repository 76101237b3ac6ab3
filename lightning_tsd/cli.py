"""The ``lightning-tsd`` command line.

* ``lightning-tsd fit|validate|test|predict --config CONFIG``: a ``LightningCLI`` over
  :class:`~lightning_tsd.TemporalSaliencyDistiller` (``model``) and :class:`~lightning_tsd.data.UCRDataModule`
  (``data``). ``CONFIG`` is a YAML file or the name of a bundled config (:func:`bundled_configs`:
  ``gunpoint``, ``basicmotions``, ``japanesevowels``). Teacher and student are given as
  ``class_path``/``init_args``, the teacher usually as the path of a teacher file.
* ``lightning-tsd train-teacher --dataset GunPoint``: train an InceptionTime teacher and write a teacher file
  (by default ``teachers/<dataset>.pt``, where the bundled configs look for it).
* ``lightning-tsd demo``: train a teacher, distil two students (KD alone, KD+TSD) from the same
  initialisation and batch order, and compare them (accuracy, agreement, KL, saliency alignment,
  parameters, wall time), with a saliency figure and a substitution report.

Example:
    >>> config_path("gunpoint").name
    'gunpoint.yaml'
    >>> print(results_table([DemoRow("KD", 0.9, 0.95, 0.01, 0.4, 1170, 12.0)]))
    | method | accuracy | agreement | KL | saliency alignment | parameters | wall time (s) |
    |---|---|---|---|---|---|---|
    | KD | 0.9000 | 0.9500 | 0.0100 | 0.4000 | 1,170 | 12.0 |
"""

from __future__ import annotations

import argparse
import copy
import json
import netrc
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from matplotlib.image import imsave
from torch import nn

from lightning_tsd.checkpoint import safe_torch_load, save_teacher
from lightning_tsd.classifier import TimeSeriesClassifier
from lightning_tsd.data import UCRDataModule
from lightning_tsd.functional import saliency_alignment
from lightning_tsd.models import NarrowFCN, count_parameters
from lightning_tsd.module import TemporalSaliencyDistiller
from lightning_tsd.plotting import figure_to_rgb, plot_saliency
from lightning_tsd.report import substitution_report
from lightning_tsd.saliency import temporal_saliency

TEACHER_MODEL = "InceptionTime"
TEACHER_KWARGS: dict[str, Any] = {"depth": 3, "num_filters": 16}
"""A small InceptionTime (80k parameters for GunPoint): good enough a teacher, fast on a CPU."""

DEMO_EPOCHS_TEACHER = 100
"""Teacher epochs of the demo: test accuracy 0.99 on GunPoint (37 training series, batch 16)."""

DEMO_EPOCHS_STUDENT = 300
"""Epochs of each demo student (900 steps on GunPoint)."""

DEMO_SCHEDULER = "cosine"
"""Learning-rate schedule of both demo students: annealing to 0 keeps the last epoch from landing on a
spike of a small student's noisy training curve, so the two students are compared at rest."""

REPORT_IG_STEPS = 32
"""captum IntegratedGradients steps of the saliency alignment measured on the test split."""


class ConfigError(ValueError):
    """A command line or config that cannot work (missing teacher file, models that do not fit the data)."""


# --- LightningCLI: fit / validate / test / predict ----------------------------------------------------


def bundled_configs() -> list[str]:
    """Names of the configs shipped with the package.

    Example:
        >>> "gunpoint" in bundled_configs()
        True
    """
    folder = resources.files("lightning_tsd") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_path(name: str) -> Path:
    """The file of a bundled config, by name (``"gunpoint"``, ``"GunPoint"`` or ``"gunpoint.yaml"``)."""
    stem = name.lower().removesuffix(".yaml")
    if stem not in bundled_configs():
        raise ConfigError(f"config file not found: {name} (bundled configs: {', '.join(bundled_configs())})")
    return Path(str(resources.files("lightning_tsd") / "configs" / f"{stem}.yaml"))


def _resolve_configs(argv: Sequence[str]) -> list[str]:
    """Replace ``--config NAME`` (or ``-c NAME``, ``--config=NAME``) by the bundled config's path when
    ``NAME`` is neither a file nor inline YAML/JSON."""

    def resolve(value: str) -> str:
        inline = value.lstrip().startswith("{") or "\n" in value or ": " in value
        return value if inline or Path(value).exists() else str(config_path(value))

    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("-c", "--config"):
            arg = resolve(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + resolve(arg.removeprefix("--config="))
        out.append(arg)
    return out


def _init_args(model_config: Any) -> dict[str, Any]:
    """The init arguments a model config records: those of a ``class_path``/``init_args`` entry, or those
    stored in a teacher file (or a ``TimeSeriesClassifier`` checkpoint's hyperparameters)."""
    if isinstance(model_config, (str, os.PathLike)):
        payload = safe_torch_load(model_config)
        if not isinstance(payload, dict):
            return {}
        return dict(payload.get("init_args") or payload.get("hyper_parameters") or {})
    init_args = getattr(model_config, "init_args", None)
    return dict(vars(init_args)) if init_args is not None else {}


def check_models_fit_data(model_config: Any, data: UCRDataModule) -> None:
    """Raise :class:`ConfigError` when the configured teacher or student was built for other channels or
    classes than ``data`` has (reading the data's shape loads it).

    Args:
        model_config: the ``model`` section of a parsed config (``teacher`` and ``student`` entries).
        data: the data module.
    """
    expected = {"in_channels": data.in_channels, "num_classes": data.num_classes}
    for role in ("teacher", "student"):
        found = _init_args(model_config[role])
        for key, value in expected.items():
            if found.get(key) is not None and found[key] != value:
                hint = " (or use a teacher file trained on this dataset)" if role == "teacher" else ""
                raise ConfigError(
                    f"the {role} has {key}={found[key]} but {data.name} has {value}: set "
                    f"model.{role}.init_args.{key}: {value}{hint}"
                )


class TSDLightningCLI(LightningCLI):
    """``LightningCLI`` that accepts bundled config names and, before building anything, refuses a missing
    teacher file and models whose ``in_channels``/``num_classes`` do not fit the dataset."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            self.config = parser.parse_args(_resolve_configs(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        teacher, data = config["model"]["teacher"], config["data"]
        if isinstance(teacher, (str, os.PathLike)) and not Path(teacher).is_file():
            raise ConfigError(
                f"teacher file not found: {teacher}. Make one with `lightning-tsd train-teacher --dataset "
                f"{data['name']} --output {teacher}`, or pass --model.teacher=PATH"
            )
        check_models_fit_data(config["model"], UCRDataModule(**data.as_dict()))


def run_lightning_cli(argv: Sequence[str] | None = None, run: bool = True) -> TSDLightningCLI:
    """Run ``lightning-tsd fit|validate|test|predict`` (``argv`` without the program name)."""
    description = (
        "Temporal Saliency Distillation with LightningCLI. Bundled configs: "
        f"{', '.join(bundled_configs())} (e.g. `lightning-tsd fit --config gunpoint`). More commands: "
        "`lightning-tsd demo --help`, `lightning-tsd train-teacher --help`."
    )
    return TSDLightningCLI(
        TemporalSaliencyDistiller,
        UCRDataModule,
        args=None if argv is None else list(argv),
        run=run,
        auto_configure_optimizers=False,  # the distiller has its own optimizer/lr/scheduler arguments
        parser_kwargs={"prog": "lightning-tsd", "description": description},
    )


# --- training helpers shared by train-teacher and demo --------------------------------------------------


def _wandb_logged_in() -> bool:
    """Whether W&B has credentials (``WANDB_API_KEY`` or a ``.netrc`` entry for its host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_logger(kind: str, output: Path, run: str, group: str) -> Logger:
    """A ``CSVLogger`` (``output/logs/<run>/metrics.csv``) or a ``WandbLogger`` (offline unless logged in,
    or as ``WANDB_MODE`` says)."""
    if kind == "csv":
        return CSVLogger(save_dir=output, name="logs", version=run)
    if kind == "wandb":
        offline = "WANDB_MODE" not in os.environ and not _wandb_logged_in()
        return WandbLogger(
            project="lightning-tsd", group=group, name=f"{group}-{run}", save_dir=str(output), offline=offline
        )
    raise ConfigError(f"unknown logger {kind!r}; choose csv or wandb")


def _close(logger: Logger) -> None:
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # the next WandbLogger starts its own run


def _trainer(epochs: int, logger: Logger, output: Path, fast: bool) -> pl.Trainer:
    limits = {"limit_train_batches": 2, "limit_val_batches": 1} if fast else {}
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


# --- demo -----------------------------------------------------------------------------------------------


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
    """The demo's comparison as a Markdown table."""

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


def saliency_figure(
    teacher: nn.Module,
    student: nn.Module,
    data: UCRDataModule,
    num_samples: int = 3,
    steps: int = REPORT_IG_STEPS,
) -> np.ndarray:
    """Teacher and student integrated-gradients maps of the first test sample of each class (up to
    ``num_samples``), drawn with :func:`~lightning_tsd.plotting.plot_saliency` and stacked into one RGB image."""
    test = data.test_dataset
    labels = test.y.numpy()
    first_of_each_class = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    others = [i for i in range(len(test)) if i not in first_of_each_class]
    picks = (first_of_each_class + others)[:num_samples]
    x, mask = test.x[picks], None if test.mask is None else test.mask[picks]
    modes = teacher.training, student.training
    try:
        teacher_logits, teacher_maps = temporal_saliency(
            teacher.eval(), x, None, "integrated_gradients", mask=mask, steps=steps
        )
        target = teacher_logits.argmax(1)
        _, student_maps = temporal_saliency(
            student.eval(), x, target, "integrated_gradients", mask=mask, steps=steps
        )
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    spearman = saliency_alignment(student_maps, teacher_maps, mask)["spearman"]
    names = [str(c) for c in data.classes_]
    images = [
        figure_to_rgb(
            plot_saliency(
                x[i],
                teacher_maps[i],
                student_maps[i],
                None if mask is None else mask[i],
                title=f"{data.name} test #{picks[i]}: class {names[int(test.y[picks[i]])]}, teacher predicts "
                f"{names[int(target[i])]}; Spearman(teacher, student) = {float(spearman[i]):.2f}",
            )
        )
        for i in range(len(picks))
    ]
    return np.concatenate(images, axis=0)


def run_demo(
    dataset: str = "GunPoint",
    epochs_teacher: int | None = None,
    epochs_student: int | None = None,
    logger: str = "csv",
    output: str | Path = "demo_output",
    fast: bool = False,
    seed: int = 0,
    batch_size: int = 16,
) -> str:
    """Run the whole story and write its files to ``output``; returns the Markdown table.

    Trains a small InceptionTime teacher, saves it (``teacher.pt``), distils two :class:`NarrowFCN` students
    from the same initialisation and batch order (KD alone: ``tsd_weight=0``; KD+TSD: the distiller's
    defaults; both with a cosine learning-rate schedule), and measures each on the test split with :func:`~lightning_tsd.report.substitution_report`.
    Writes ``results.md``, ``saliency.png`` (teacher vs KD+TSD student), ``substitution_report.md`` and
    ``substitution_report.png`` (KD+TSD student), and the logs (``logs/<run>/metrics.csv``, or W&B runs).

    Args:
        dataset: a UCR/UEA dataset name (bundled with aeon: works offline).
        epochs_teacher: teacher epochs (default :data:`DEMO_EPOCHS_TEACHER`, or 1 with ``fast``).
        epochs_student: epochs of each student (default :data:`DEMO_EPOCHS_STUDENT`, or 1 with ``fast``).
        logger: ``"csv"`` or ``"wandb"``.
        output: output folder.
        fast: a tiny budget (2 batches per epoch, 1 report batch) that only checks the plumbing.
        seed: seed of the split, the initialisations and the batch order.
        batch_size: batch size of every fit.
    """
    epochs_teacher = epochs_teacher or (1 if fast else DEMO_EPOCHS_TEACHER)
    epochs_student = epochs_student or (1 if fast else DEMO_EPOCHS_STUDENT)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    data = UCRDataModule(dataset, batch_size=batch_size, seed=seed)
    report_options = {
        "method": "integrated_gradients",
        "max_batches": 1 if fast else None,
        "method_kwargs": {"n_steps": 8 if fast else REPORT_IG_STEPS},
    }

    print(
        f"[1/3] training the teacher ({TEACHER_MODEL} {TEACHER_KWARGS}) on {dataset}, {epochs_teacher} epochs"
    )
    run_logger = make_logger(logger, output, "teacher", dataset)
    teacher, teacher_seconds = train_teacher(data, epochs_teacher, run_logger, output, fast=fast)
    _close(run_logger)
    teacher_path = output / "teacher.pt"
    save_teacher(teacher, teacher_path)

    pl.seed_everything(seed, verbose=False)
    student_init = NarrowFCN(data.in_channels, data.num_classes)
    rows = []
    for step, (method, run, kwargs) in enumerate(
        [("KD", "kd", {"tsd_weight": 0.0}), ("KD+TSD", "kd_tsd", {})], 2
    ):
        print(f"[{step}/3] distilling a NarrowFCN student with {method}, {epochs_student} epochs")
        if step > 2:
            _close(run_logger)
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
        student = distiller.student
        report = substitution_report(teacher, student, data.test_dataloader(), **report_options)
        rows.append(
            DemoRow(
                f"{method} (NarrowFCN)",
                report.student_accuracy,
                report.agreement,
                report.kl,
                report.saliency["spearman"],
                count_parameters(student),
                seconds,
            )
        )
        run_logger.log_metrics(
            {f"test/{key}": value for key, value in vars(rows[-1]).items() if isinstance(value, float)}
        )

    # The last report, figures and run belong to the KD+TSD student.
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
    (output / "substitution_report.md").write_text(report.to_markdown())
    report.figure().savefig(output / "substitution_report.png")
    imsave(output / "saliency.png", saliency_figure(teacher, student, data, 2 if fast else 3))
    if isinstance(run_logger, WandbLogger):
        run_logger.log_image(
            "demo/figures", [str(output / "saliency.png"), str(output / "substitution_report.png")]
        )
    _close(run_logger)
    elapsed = time.perf_counter() - start
    (output / "results.md").write_text(
        f"# lightning-tsd demo: {dataset}\n\n"
        f"Teacher: {TEACHER_MODEL} {TEACHER_KWARGS}, {epochs_teacher} epochs. Students: NarrowFCN, "
        f"{epochs_student} epochs each, same initialisation and batch order, {DEMO_SCHEDULER} learning rate, "
        f"teacher cache on; KD+TSD uses the distiller's default TSD settings. Metrics on the "
        f"test split; saliency alignment is the mean Spearman correlation of captum IntegratedGradients maps "
        f"({REPORT_IG_STEPS} steps), teacher vs student.{' FAST RUN: the numbers mean nothing.' if fast else ''}"
        f"\n\n{table}\n\nTotal wall time: {elapsed:.1f} s\n"
    )
    print(
        f"\n{table}\n\nTotal wall time: {elapsed:.1f} s. Files in {output}/: results.md, teacher.pt, "
        "saliency.png, substitution_report.md, substitution_report.png, logs"
    )
    return table


# --- argparse commands ------------------------------------------------------------------------------------


def _extra_commands() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-tsd")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a teacher, distil KD vs KD+TSD students, compare them")
    demo.add_argument("--dataset", default="GunPoint", help="UCR/UEA dataset (default: GunPoint)")
    demo.add_argument(
        "--epochs-teacher", type=int, help=f"teacher epochs (default: {DEMO_EPOCHS_TEACHER}; 1 with --fast)"
    )
    demo.add_argument(
        "--epochs-student",
        type=int,
        help=f"epochs per student (default: {DEMO_EPOCHS_STUDENT}; 1 with --fast)",
    )
    demo.add_argument(
        "--logger",
        choices=["csv", "wandb"],
        default="csv",
        help="csv (default) or wandb (offline unless you are logged in)",
    )
    demo.add_argument("--output", default="demo_output", help="output folder (default: ./demo_output)")
    demo.add_argument("--fast", action="store_true", help="a tiny budget that only checks the plumbing")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; the demo's models are so small that more threads "
        "mostly add synchronisation, and they stall on shared cores)",
    )

    teacher = commands.add_parser("train-teacher", help="train a teacher classifier and write a teacher file")
    teacher.add_argument("--dataset", default="GunPoint", help="UCR/UEA dataset (default: GunPoint)")
    teacher.add_argument("--epochs", type=int, default=DEMO_EPOCHS_TEACHER)
    teacher.add_argument(
        "--model", default=TEACHER_MODEL, help=f"a lightning_tsd.models name ({TEACHER_MODEL})"
    )
    teacher.add_argument(
        "--model-kwargs",
        type=json.loads,
        help=f"JSON init arguments of the model (default for InceptionTime: '{json.dumps(TEACHER_KWARGS)}')",
    )
    teacher.add_argument("--output", help="teacher file (default: teachers/<dataset>.pt)")
    teacher.add_argument("--logger", choices=["csv", "wandb"], default="csv")
    teacher.add_argument("--seed", type=int, default=0)
    teacher.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def _train_teacher_command(args: argparse.Namespace) -> None:
    output = Path(args.output or f"teachers/{args.dataset}.pt")
    pl.seed_everything(args.seed, verbose=False)
    data = UCRDataModule(args.dataset, seed=args.seed)
    kwargs = (
        args.model_kwargs
        if args.model_kwargs is not None
        else (TEACHER_KWARGS if args.model == TEACHER_MODEL else {})
    )
    logger = make_logger(args.logger, output.parent, f"teacher_{args.dataset}", args.dataset)
    model, seconds = train_teacher(data, args.epochs, logger, output.parent, args.model, kwargs)
    _close(logger)
    save_teacher(model, output)
    accuracy = substitution_report(model, model, data.test_dataloader(), method=None).teacher_accuracy
    print(
        f"teacher {args.model} on {args.dataset}: test accuracy {accuracy:.4f}, "
        f"{seconds:.1f} s; written to {output}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-tsd`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] in ("demo", "train-teacher"):
            options = _extra_commands().parse_args(args)
            if options.threads:
                torch.set_num_threads(options.threads)
            if options.command == "demo":
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
                run_demo(
                    options.dataset,
                    options.epochs_teacher,
                    options.epochs_student,
                    options.logger,
                    options.output,
                    options.fast,
                    options.seed,
                )
            else:
                _train_teacher_command(options)
        else:
            run_lightning_cli(None if argv is None else args)
    except ConfigError as err:
        sys.exit(f"lightning-tsd: error: {err}")


if __name__ == "__main__":
    main()
