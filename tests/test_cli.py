"""The ``lightning-tsd`` command line: LightningCLI ``fit`` from a bundled config, the config checks,
``train-teacher`` and ``demo --fast``.

The two subprocess tests cost most of the time (each imports Lightning afresh); the rest runs in-process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lightning_tsd import load_teacher, save_teacher
from lightning_tsd.cli import (
    ConfigError,
    DemoRow,
    bundled_configs,
    config_path,
    main,
    results_table,
    run_lightning_cli,
)
from lightning_tsd.models import NarrowFCN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COLUMNS = ["method", "accuracy", "agreement", "KL", "saliency alignment", "parameters", "wall time (s)"]
SHAPES = {"gunpoint": (1, 2), "basicmotions": (6, 4), "japanesevowels": (12, 9)}


def _run(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m lightning_tsd.cli ARGS`` on one thread (the cores are shared), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_tsd.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def gunpoint_teacher(tmp_path_factory) -> Path:
    """A GunPoint teacher file written by ``lightning-tsd train-teacher`` (a 1-epoch NarrowFCN: fast)."""
    folder = tmp_path_factory.mktemp("teacher")
    path = folder / "teachers" / "GunPoint.pt"
    main(
        [
            "train-teacher",
            "--dataset",
            "GunPoint",
            "--epochs",
            "1",
            "--model",
            "NarrowFCN",
            "--output",
            str(path),
        ]
    )
    return path


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-tsd") == "lightning_tsd.cli:main"


def test_bundled_configs_state_each_dataset_shape():
    assert set(SHAPES) <= set(bundled_configs())
    for name, (channels, classes) in SHAPES.items():
        text = config_path(name).read_text()
        assert f"in_channels: {channels}\n" in text and f"num_classes: {classes}\n" in text
        assert "teacher: teachers/" in text  # a trained teacher file by default
    assert config_path("GunPoint.yaml") == config_path("gunpoint")
    with pytest.raises(ConfigError, match="bundled configs"):
        config_path("no-such-config")


def test_train_teacher_writes_a_loadable_teacher(gunpoint_teacher, tmp_path):
    teacher = load_teacher(gunpoint_teacher)
    assert type(teacher).__name__ == "NarrowFCN"
    assert teacher.init_args["in_channels"] == 1 and teacher.init_args["num_classes"] == 2
    assert (gunpoint_teacher.parent / "logs" / "teacher_GunPoint" / "metrics.csv").is_file()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_bundled_config_builds_distiller_and_data(name, tmp_path):
    channels, classes = SHAPES[name]
    teacher = tmp_path / "teacher.pt"
    save_teacher(NarrowFCN(channels, classes), teacher)
    cli = run_lightning_cli(
        ["--config", name, f"--model.teacher={teacher}", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        run=False,
    )
    assert cli.datamodule.in_channels == channels and cli.datamodule.num_classes == classes
    assert cli.model.student.init_args == {"in_channels": channels, "num_classes": classes, "num_filters": 8}
    assert cli.model.teacher_cache is not None and cli.model.hparams.tsd_weight > 0
    assert not cli.model.teacher.training


def test_config_errors_say_what_to_change(gunpoint_teacher, tmp_path, capsys):
    with pytest.raises(ConfigError, match="teacher has in_channels=1 but BasicMotions has 6"):
        run_lightning_cli(["--config", "basicmotions", f"--model.teacher={gunpoint_teacher}"], run=False)
    with pytest.raises(ConfigError, match="student has num_classes=3 but GunPoint has 2"):
        run_lightning_cli(
            [
                "--config",
                "gunpoint",
                f"--model.teacher={gunpoint_teacher}",
                "--model.student.init_args.num_classes=3",
            ],
            run=False,
        )
    with pytest.raises(
        ConfigError, match="teacher file not found: .*lightning-tsd train-teacher --dataset GunPoint"
    ):
        run_lightning_cli(["--config", "gunpoint", f"--model.teacher={tmp_path / 'missing.pt'}"], run=False)
    with pytest.raises(SystemExit, match="lightning-tsd: error: config file not found: nope"):
        main(["fit", "--config", "nope"])


def test_results_table_has_every_column():
    table = results_table([DemoRow("teacher", 0.99, None, None, None, 80_000, 30.0)])
    header, rule, row = table.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    assert row == "| teacher | 0.9900 | – | – | – | 80,000 | 30.0 |"


def test_fit_from_bundled_config_in_a_subprocess(gunpoint_teacher, tmp_path):
    _run(
        [
            "fit", "--config", "gunpoint", f"--model.teacher={gunpoint_teacher}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    run = tmp_path / "tsd_logs" / "gunpoint" / "version_0"
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"train/loss", "train/ce", "train/kd", "train/tsd", "val/agreement"} <= set(rows[0])
    assert sum(bool(r["train/tsd"]) for r in rows) == 2  # two TSD steps, logged
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_demo_fast_end_to_end(tmp_path):
    proc = _run(["demo", "--fast", "--output", "out", "--threads", "1"], cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header, _, *rows = lines
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    assert [r.split("|")[1].strip() for r in rows] == [
        "teacher (InceptionTime)",
        "KD (NarrowFCN)",
        "KD+TSD (NarrowFCN)",
    ]
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cell not in ("", "–", "nan") for cell in cells), row
    out = tmp_path / "out"
    for name in (
        "results.md",
        "teacher.pt",
        "saliency.png",
        "substitution_report.md",
        "substitution_report.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert header in (out / "results.md").read_text()
    assert "Substitution report" in (out / "substitution_report.md").read_text()
    for run in ("teacher", "kd", "kd_tsd"):
        assert (out / "logs" / run / "metrics.csv").is_file()
    assert type(load_teacher(out / "teacher.pt")).__name__ == "InceptionTime"
