"""The ``lightning-tsd`` command line: parsers and dispatch.

* ``lightning-tsd fit|validate|test|predict --config CONFIG``: a ``LightningCLI`` over
  :class:`~lightning_tsd.TemporalSaliencyDistiller` (``model``) and :class:`~lightning_tsd.data.UCRDataModule`
  (``data``). ``CONFIG`` is a YAML file or the name of a bundled config (:func:`bundled_configs`:
  ``gunpoint``, ``basicmotions``, ``japanesevowels``). Teacher and student are given as
  ``class_path``/``init_args``, the teacher usually as the path of a teacher file, or a list of them (an
  ensemble: ``--model.teacher '[teachers/GunPoint_0.pt, teachers/GunPoint_1.pt]'``).
* ``lightning-tsd train-teacher --dataset GunPoint [--ensemble 5]``: train an InceptionTime teacher (or an
  ensemble of them) and write teacher files (by default ``teachers/<dataset>.pt``, where the bundled configs
  look for it; an ensemble writes ``teachers/<dataset>_0.pt`` ...).
* ``lightning-tsd demo``: :func:`lightning_tsd.demo.run_demo`, the whole story on GunPoint. The demo and the
  training helpers live in :mod:`lightning_tsd.demo` (their old names here warn, and still work).
* ``lightning-tsd export --ckpt_path CKPT --output student.onnx``: a checkpoint's student as ONNX.
* ``lightning-tsd cache-teacher --config CONFIG --output teacher_cache.pt``: the teacher's logits and saliency
  for every training sample of a config, computed once (with a progress bar) and written as a
  :class:`~lightning_tsd.TeacherCache` file that any number of ``fit --config CONFIG
  --model.teacher_cache=teacher_cache.pt`` runs then share (a sweep of students pays the teacher once).

Example:
    >>> config_path("gunpoint").name
    'gunpoint.yaml'
    >>> build_parser().parse_args(["demo", "--batch_size", "32"]).batch_size
    32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from tqdm.auto import tqdm

from lightning_tsd import demo as _demo
from lightning_tsd.cache import TeacherCache
from lightning_tsd.checkpoint import safe_torch_load
from lightning_tsd.data import UCRDataModule
from lightning_tsd.demo import ConfigError
from lightning_tsd.module import TemporalSaliencyDistiller

__all__ = ["ConfigError", "bundled_configs", "config_path", "check_models_fit_data", "TSDLightningCLI"]
__all__ += ["run_lightning_cli", "build_parser", "export_checkpoint", "cache_teacher", "main"]


# The names that lived here before the demo had a module of its own (only these are served, with a warning).
_MOVED_TO_DEMO = frozenset(
    ("DemoRow", "TEACHER_MODEL", "TEACHER_KWARGS", "DEMO_EPOCHS_TEACHER", "DEMO_EPOCHS_STUDENT")
    + ("DEMO_BATCH_SIZE", "DEMO_SCHEDULER", "REPORT_IG_STEPS", "make_logger", "close_logger", "train_teacher")
    + ("ensemble_paths", "train_teachers", "distil", "results_table", "saliency_figure", "run_demo")
)


def __getattr__(name: str) -> Any:
    """The demo's names moved to :mod:`lightning_tsd.demo`: served from there, with a warning."""
    if name in _MOVED_TO_DEMO:
        message = (
            f"lightning_tsd.cli.{name} moved to lightning_tsd.demo.{name} and will be removed from "
            "lightning_tsd.cli in 0.3.0; import it from there"
        )
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(_demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        entry = model_config[role]  # a list of teachers is an ensemble: each member must fit
        for found in map(_init_args, entry if isinstance(entry, (list, tuple)) else [entry]):
            for key, value in expected.items():
                if found.get(key) is not None and found[key] != value:
                    hint = " (or use a teacher file trained on this dataset)" if role == "teacher" else ""
                    raise ConfigError(
                        f"the {role} has {key}={found[key]} but {data.name} has {value}: set "
                        f"model.{role}.init_args.{key}: {value}{hint}"
                    )


class TSDLightningCLI(LightningCLI):
    """``LightningCLI`` that accepts bundled config names and, before building anything, refuses a missing
    teacher file (or ensemble member) and models whose ``in_channels``/``num_classes`` do not fit the data."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):
            self.config = parser.parse_args(_resolve_configs(sys.argv[1:] if args is None else args))
        else:
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        teacher, data = config["model"]["teacher"], config["data"]
        for member in teacher if isinstance(teacher, (list, tuple)) else [teacher]:
            if isinstance(member, (str, os.PathLike)) and not Path(member).is_file():
                raise ConfigError(
                    f"teacher file not found: {member}. Make one with `lightning-tsd train-teacher --dataset "
                    f"{data['name']} --output {member}`, or pass --model.teacher=PATH"
                )
        check_models_fit_data(config["model"], UCRDataModule(**data.as_dict()))


def run_lightning_cli(argv: Sequence[str] | None = None, run: bool = True) -> TSDLightningCLI:
    """Run ``lightning-tsd fit|validate|test|predict`` (``argv`` without the program name)."""
    description = (
        "Temporal Saliency Distillation with LightningCLI. Bundled configs: "
        f"{', '.join(bundled_configs())} (e.g. `lightning-tsd fit --config gunpoint`). More commands: "
        "`lightning-tsd demo --help`, `lightning-tsd train-teacher --help`, `lightning-tsd export --help`, "
        "`lightning-tsd cache-teacher --help`."
    )
    return TSDLightningCLI(
        TemporalSaliencyDistiller,
        UCRDataModule,
        args=None if argv is None else list(argv),
        run=run,
        auto_configure_optimizers=False,  # the distiller has its own optimizer/lr/scheduler arguments
        parser_kwargs={"prog": "lightning-tsd", "description": description},
    )


# --- cache-teacher ----------------------------------------------------------------------------------------


def cache_teacher(argv: Sequence[str], progress: bool = True) -> TeacherCache:
    """``lightning-tsd cache-teacher --output FILE`` followed by a ``fit`` command's config arguments: fill the
    teacher cache of that config's distiller in one pass over its training data and write it to ``FILE``
    (default ``teacher_cache.pt``); returns the cache.

    The cache is keyed by the teacher's weights and the config's saliency estimator, options and target
    (:func:`lightning_tsd.cache.cache_key`), and each row by its input, so a ``fit`` with another teacher,
    other options or other data refuses it. Pass it on as ``--model.teacher_cache=FILE``.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-tsd cache-teacher",
        description="Compute the teacher's logits and saliency for a config's training data once, and write "
        "them as a teacher cache file. Every other argument is a `lightning-tsd fit` argument (--config, "
        "--model.teacher, --model.saliency_options, --data.* ...).",
    )
    parser.add_argument("--output", default="teacher_cache.pt", help="cache file (default: teacher_cache.pt)")
    own, rest = parser.parse_known_args(list(argv))
    cli = run_lightning_cli([*rest, "--model.teacher_cache=true"], run=False)  # a fresh in-memory cache
    distiller, data = cli.model, cli.datamodule
    loader = data.train_dataloader()
    batches = tqdm(loader, desc="teacher cache", unit="batch", total=len(loader), disable=not progress)
    count = distiller.precompute_teacher_cache(batches)
    cache = distiller.teacher_cache
    assert cache is not None  # teacher_cache=true
    cache.save(own.output)
    print(f"teacher cache of {count} {data.name} training samples written to {own.output}")
    print(f"use it with: lightning-tsd fit {' '.join(rest)} --model.teacher_cache={own.output}")
    return cache


# --- export ---------------------------------------------------------------------------------------------


def _example_shape(payload: dict[str, Any], channels: int | None, length: int | None) -> tuple[int, int]:
    """``(C, T)`` of the export's example input: the flags, else the data module the checkpoint records
    (its dataset is loaded to read them)."""
    data_hparams = payload.get("datamodule_hyper_parameters") or {}
    if (channels is None or length is None) and data_hparams.get("name"):
        data = UCRDataModule(**{k: v for k, v in data_hparams.items() if not k.startswith("_")})
        channels, length = channels or data.in_channels, length or data.series_length
    if channels is None or length is None:
        raise ConfigError(
            "the checkpoint records no data module to read the input shape: pass --channels C --length T"
        )
    return int(channels), int(length)


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike,
    channels: int | None = None,
    length: int | None = None,
    teacher: str | Sequence[str] | None = None,
    opset: int | None = None,
) -> Path:
    """Write the student of a :class:`~lightning_tsd.TemporalSaliencyDistiller` checkpoint as ONNX with a
    dynamic batch axis (``lightning-tsd export``); returns the ONNX file.

    The checkpoint is read with ``weights_only=True``. The example input is ``(2, C, T)`` zeros: ``C`` and
    ``T`` are ``channels``/``length``, or else read from the data module that ``lightning-tsd fit`` records
    in the checkpoint. ``teacher`` replaces the teacher file (or the list of an ensemble's files) that the
    checkpoint names, if those are not at hand; the teacher is loaded, not exported.
    """
    from lightning_tsd.export import export_onnx  # onnx is needed by this command only

    payload = safe_torch_load(ckpt_path)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ConfigError(f"{ckpt_path} is not a Lightning checkpoint of a TemporalSaliencyDistiller")
    shape = _example_shape(payload, channels, length)
    if isinstance(teacher, (list, tuple)):  # one file is a teacher, more are an ensemble
        teacher = teacher[0] if len(teacher) == 1 else list(teacher)
    overrides: dict[str, Any] = {} if teacher is None else {"teacher": teacher}
    try:
        distiller = TemporalSaliencyDistiller.load_from_checkpoint(
            Path(ckpt_path), map_location="cpu", weights_only=True, **overrides
        )
    except FileNotFoundError as err:
        raise ConfigError(f"{err} (the checkpoint's teacher): pass --teacher PATH") from err
    return export_onnx(distiller.student.eval(), output, torch.zeros(2, *shape), opset=opset)


# --- argparse commands ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``demo``, ``train-teacher`` and ``export`` (the other commands are LightningCLI's)."""
    parser = argparse.ArgumentParser(prog="lightning-tsd")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a teacher, distil KD vs KD+TSD students, compare them")
    teacher = commands.add_parser("train-teacher", help="train a teacher classifier and write a teacher file")
    export = commands.add_parser("export", help="write the student of a distiller checkpoint as ONNX")
    for command in (demo, teacher):
        command.add_argument("--dataset", default="GunPoint", help="UCR/UEA dataset (default: GunPoint)")
        logger_help = "csv (default) or wandb (offline unless you are logged in)"
        command.add_argument("--logger", choices=["csv", "wandb"], default="csv", help=logger_help)
        command.add_argument("--seed", type=int, default=0)

    epochs = (
        f"(default: teacher {_demo.DEMO_EPOCHS_TEACHER}, student {_demo.DEMO_EPOCHS_STUDENT}; 1 with --fast)"
    )
    demo.add_argument("--epochs-teacher", type=int, help=f"teacher epochs {epochs}")
    demo.add_argument("--epochs-student", type=int, help=f"epochs per student {epochs}")
    batch = _demo.DEMO_BATCH_SIZE
    demo.add_argument("--batch_size", "--batch-size", type=int, default=batch, help=f"default: {batch}")
    demo.add_argument("--output", default="demo_output", help="output folder (default: ./demo_output)")
    demo.add_argument("--fast", action="store_true", help="a tiny budget that only checks the plumbing")
    threads = "torch CPU threads (default: 1; the demo's models are so small that more threads mostly add "
    threads += "synchronisation, and they stall on shared cores)"
    demo.add_argument("--threads", type=int, default=1, help=threads)

    teacher.add_argument("--epochs", type=int, default=_demo.DEMO_EPOCHS_TEACHER)
    teacher.add_argument(
        "--model", dest="model_name", default=_demo.TEACHER_MODEL, help="a lightning_tsd.models name"
    )
    kwargs = f"JSON init arguments of the model (InceptionTime's: '{json.dumps(_demo.TEACHER_KWARGS)}')"
    teacher.add_argument("--model-kwargs", type=json.loads, help=kwargs)
    teacher.add_argument("--output", help="teacher file (default: teachers/<dataset>.pt)")
    ensemble = "train N teachers (seeds seed .. seed+N-1), written beside --output as <its stem>_0.pt .. "
    ensemble += "<its stem>_<N-1>.pt; the published InceptionTime is an ensemble of 5"
    teacher.add_argument("--ensemble", type=int, metavar="N", help=ensemble)

    export.add_argument("--ckpt_path", "--ckpt-path", required=True, help="a distiller checkpoint")
    export.add_argument("--output", default="student.onnx", help="ONNX file (default: student.onnx)")
    export.add_argument("--channels", type=int, help="input channels C (default: from the checkpoint's data)")
    export.add_argument("--length", type=int, help="series length T (default: from the checkpoint's data)")
    export.add_argument("--teacher", nargs="+", help="teacher file(s), if the checkpoint's are not at hand")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    for command in (teacher, export):
        command.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-tsd`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] == "cache-teacher":
            cache_teacher(args[1:])
            return
        if not (args and args[0] in ("demo", "train-teacher", "export")):
            run_lightning_cli(None if argv is None else args)
            return
        options = vars(build_parser().parse_args(args))  # named as the arguments of the command's function
        command, threads = options.pop("command"), options.pop("threads")
        if threads:
            torch.set_num_threads(threads)
        if command == "demo":
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
        run: dict[str, Callable[..., Any]] = {
            "demo": _demo.run_demo,
            "train-teacher": _demo.train_teachers,
            "export": export_checkpoint,
        }
        result = run[command](**options)
        if command == "export":
            print(f"student written to {result}")
    except ConfigError as err:
        sys.exit(f"lightning-tsd: error: {err}")


if __name__ == "__main__":
    main()
