"""The ``lightning-tsd`` command line: LightningCLI ``fit`` from a bundled config, the config checks (a
teacher file or a list of them), ``train-teacher`` (one teacher or an ensemble), ``export`` (ONNX, checked
against onnxruntime) and ``demo --fast``.

The two subprocess tests cost most of the time (each imports Lightning afresh); the rest runs in-process.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lightning_tsd import TemporalSaliencyDistiller, load_teacher, save_teacher, temporal_saliency
from lightning_tsd import demo as demo_module
from lightning_tsd.cli import (
    ConfigError,
    build_parser,
    bundled_configs,
    config_path,
    export_checkpoint,
    main,
    run_lightning_cli,
)
from lightning_tsd.data import UCRDataModule
from lightning_tsd.demo import DemoRow, results_table
from lightning_tsd.functional import saliency_alignment
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


@pytest.fixture(scope="module")
def fitted_checkpoint(gunpoint_teacher, tmp_path_factory) -> Path:
    """``last.ckpt`` of an in-process ``lightning-tsd fit --config gunpoint`` (1 epoch of 2 batches)."""
    folder = tmp_path_factory.mktemp("fit")
    run_lightning_cli(
        [
            "fit", "--config", "gunpoint", f"--model.teacher={gunpoint_teacher}", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={folder}",
        ]
    )  # fmt: skip
    return folder / "gunpoint" / "version_0" / "checkpoints" / "last.ckpt"


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
    proc = _run(["demo", "--fast", "--output", "out", "--threads", "1", "--batch_size", "8"], cwd=tmp_path)
    assert re.findall(r"^\[(\d)/4\] ", proc.stdout, flags=re.M) == ["1", "2", "3", "4"]  # a line per phase
    tables = proc.stdout.split("\n\n")
    results, checks = (
        t.strip().splitlines() for t in tables if t.startswith("| method") or t.startswith("| check")
    )
    header, _, *rows = results
    assert [c.strip() for c in header.strip("|").split("|")] == COLUMNS
    assert [r.split("|")[1].strip() for r in rows] == ["teacher (InceptionTime)", "KD (FCN)", "KD+TSD (FCN)"]
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cell not in ("", "–", "nan") for cell in cells), row
        assert cells[-2] == "8,142"  # the 1/10-size FCN of an 80k-parameter teacher
    # both students' checks side by side, behavioural ones included, and one sentence on what TSD bought
    assert checks[0] == "| check | rule | KD | KD+TSD |"
    names = [r.split("|")[1].strip() for r in checks[2:]]
    assert names[-1] == "can substitute" and {"noise_agreement", "deletion_gap", "keep_gap"} <= set(names)
    assert all(
        cell.split()[-1] in ("pass", "FAIL") for r in checks[2:-1] for cell in r.strip("|").split("|")[2:]
    )
    assert sum(line.startswith("TSD bought") for line in proc.stdout.splitlines()) == 1
    out = tmp_path / "out"
    for name in (
        "results.md",
        "teacher.pt",
        "saliency.png",
        "substitution_report.md",
        "substitution_report.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert header in (out / "results.md").read_text() and checks[0] in (out / "results.md").read_text()
    report = (out / "substitution_report.md").read_text()
    assert checks[0] in report and "\n## KD student" in report and "\n## KD+TSD student" in report
    assert report.count("### Verdict") == 2  # each full report, nested under its student
    # two series, each a 8 x 4.5 in panel (the series and three maps) at 100 dpi; two 18 x 4 in reports
    assert imread(out / "saliency.png").shape[:2] == (2 * 450, 800)
    assert imread(out / "substitution_report.png").shape[:2] == (2 * 400, 1800)
    for run in ("teacher", "kd", "kd_tsd"):
        assert (out / "logs" / run / "metrics.csv").is_file()
        assert (
            "batch_size: 8\n" in (out / "logs" / run / "hparams.yaml").read_text()
        )  # --batch_size reached it
    assert type(load_teacher(out / "teacher.pt")).__name__ == "InceptionTime"


def test_demo_saliency_figure_draws_the_teacher_and_both_students_each_with_its_alignment():
    data = UCRDataModule("GunPoint", seed=0)
    torch.manual_seed(0)
    teacher, kd = NarrowFCN(1, 2), NarrowFCN(1, 2)
    figures = demo_module.saliency_figure(
        teacher, {"KD": kd, "KD+TSD": teacher}, data, num_samples=2, steps=4
    )
    assert len(figures) == 2
    test = data.test_dataset
    for figure in figures:
        index = int(re.search(r"test #(\d+)", figure.get_suptitle()).group(1))
        rows = figure.axes[1:4]  # under the series: one heatmap per model
        labels = [ax.get_ylabel().splitlines() for ax in rows]
        assert [label[0] for label in labels] == ["teacher", "KD", "KD+TSD"]
        maps = [ax.images[0].get_array() for ax in rows]
        assert labels[2][1] == "ρ = 1.00" and np.allclose(maps[2], maps[0])  # the teacher as a student
        x = test.x[index : index + 1]
        target = teacher.eval()(x).argmax(1)
        _, t_map = temporal_saliency(teacher, x, target, "integrated_gradients", steps=4)
        _, s_map = temporal_saliency(kd.eval(), x, target, "integrated_gradients", steps=4)
        assert labels[1][1] == f"ρ = {float(saliency_alignment(s_map, t_map)['spearman'][0]):.2f}"
        assert not np.allclose(maps[1], maps[0])


def test_demo_batch_size_flag_parses_and_defaults_to_the_demo_constant():
    parser = build_parser()
    assert parser.parse_args(["demo"]).batch_size == demo_module.DEMO_BATCH_SIZE == 16
    assert parser.parse_args(["demo", "--batch_size", "32"]).batch_size == 32
    assert parser.parse_args(["demo", "--batch-size=4"]).batch_size == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--batch_size", "many"])
    with pytest.raises(ConfigError, match="batch size must be an integer >= 1, got 0"):
        demo_module.run_demo(batch_size=0)


def test_train_teacher_ensemble_writes_one_loadable_file_per_seed(tmp_path, capsys):
    output = tmp_path / "teachers" / "GunPoint.pt"
    main(
        ["train-teacher", "--epochs", "1", "--model", "NarrowFCN", "--ensemble", "2", "--output", str(output)]
    )
    files = [tmp_path / "teachers" / "GunPoint_0.pt", tmp_path / "teachers" / "GunPoint_1.pt"]
    assert sorted(output.parent.glob("*.pt")) == files
    members = [load_teacher(f) for f in files]
    assert [type(m).__name__ for m in members] == ["NarrowFCN", "NarrowFCN"]
    weights = [m.state_dict() for m in members]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # seeds 0 and 1
    printed = capsys.readouterr().out
    assert f"--model.teacher '[{files[0]}, {files[1]}]'" in printed
    for i in range(2):
        assert (output.parent / "logs" / f"teacher_GunPoint_{i}" / "metrics.csv").is_file()
    with pytest.raises(SystemExit, match="--ensemble needs a number of teachers >= 1, got 0"):
        main(["train-teacher", "--ensemble", "0", "--output", str(output)])


def test_config_accepts_a_list_of_teacher_files(tmp_path):
    files = []
    for seed in range(2):
        torch.manual_seed(seed)
        files.append(tmp_path / f"teacher_{seed}.pt")
        save_teacher(NarrowFCN(1, 2), files[-1])
    logs = f"--trainer.logger.init_args.save_dir={tmp_path}"
    cli = run_lightning_cli(
        ["--config", "gunpoint", f"--model.teacher=[{files[0]}, {files[1]}]", logs], run=False
    )
    x = torch.randn(3, 1, 150)
    members = [load_teacher(f).eval() for f in files]
    with torch.no_grad():  # the ensemble predicts the mean of its members' probabilities
        expected = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
        assert torch.allclose(cli.model.teacher(x).softmax(-1), expected, atol=1e-6)
    missing = tmp_path / "missing.pt"
    with pytest.raises(ConfigError, match=f"teacher file not found: {missing}"):
        run_lightning_cli(
            ["--config", "gunpoint", f"--model.teacher=[{files[0]}, {missing}]", logs], run=False
        )
    save_teacher(NarrowFCN(6, 4), tmp_path / "basicmotions.pt")
    with pytest.raises(ConfigError, match="teacher has in_channels=6 but GunPoint has 1"):
        ensemble = f"--model.teacher=[{files[0]}, {tmp_path / 'basicmotions.pt'}]"
        run_lightning_cli(["--config", "gunpoint", ensemble, logs], run=False)


def test_export_writes_an_onnx_student_that_onnxruntime_runs_at_any_batch_size(fitted_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    output = tmp_path / "student.onnx"
    main(["export", "--ckpt_path", str(fitted_checkpoint), "--output", str(output)])
    student = TemporalSaliencyDistiller.load_from_checkpoint(
        fitted_checkpoint, weights_only=True
    ).student.eval()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert feed.shape[1:] == [1, 150]  # GunPoint's shape, read from the checkpoint's data module
    x = torch.randn(5, 1, 150)  # the example had 2 series
    (logits,) = session.run(None, {feed.name: x.numpy()})
    with torch.no_grad():
        expected = student(x).numpy()
    assert logits.shape == (5, 2)
    assert abs(logits - expected).max() <= 1e-4


def test_export_reads_the_shape_from_flags_and_says_what_is_missing(
    fitted_checkpoint, gunpoint_teacher, tmp_path
):
    ort = pytest.importorskip("onnxruntime")
    payload = torch.load(fitted_checkpoint, weights_only=True)
    del payload["datamodule_hyper_parameters"]  # e.g. a fit from Python with plain dataloaders
    payload["hyper_parameters"]["teacher"] = str(tmp_path / "moved.pt")  # its teacher file is not at hand
    ckpt = tmp_path / "bare.ckpt"
    torch.save(payload, ckpt)
    with pytest.raises(ConfigError, match="pass --channels C --length T"):
        export_checkpoint(ckpt, tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="moved.pt.*pass --teacher PATH"):
        export_checkpoint(ckpt, tmp_path / "a.onnx", channels=1, length=150)
    path = export_checkpoint(ckpt, tmp_path / "a.onnx", channels=1, length=150, teacher=str(gunpoint_teacher))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 150]
    with pytest.raises(SystemExit, match="lightning-tsd: error: .*not a Lightning checkpoint"):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
        main(["export", "--ckpt_path", str(tmp_path / "other.pt")])


def test_cache_teacher_writes_a_cache_that_fit_accepts_and_other_options_refuse(tmp_path, capsys):
    from lightning_tsd import TeacherCache, TeacherCacheError, temporal_saliency
    from lightning_tsd.data import UCRDataModule

    torch.manual_seed(0)
    teacher_file, output = tmp_path / "teacher.pt", tmp_path / "cache.pt"
    save_teacher(NarrowFCN(1, 2), teacher_file)
    args = [
        "--config", "gunpoint", f"--model.teacher={teacher_file}", '--model.saliency_options={"steps": 2}',
        '--model.teacher_saliency_options={"steps": 2}',
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    main(["cache-teacher", *args, "--output", str(output)])
    printed = capsys.readouterr()
    assert "teacher cache: 100%" in printed.err  # the progress bar
    assert f"--model.teacher_cache={output}" in printed.out
    cache = TeacherCache.load(output)
    data = UCRDataModule("GunPoint", val_fraction=0.25, seed=0)  # the config's data
    data.setup()
    samples = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    assert len(cache) == len(samples) == 37
    x, index = torch.stack([s["x"] for s in samples[:6]]), torch.stack([s["index"] for s in samples[:6]])
    teacher = load_teacher(teacher_file).eval()
    logits, saliency = temporal_saliency(teacher, x, method="integrated_gradients", steps=2)
    hit, cached_logits, cached_saliency = cache.get(index, x)
    assert hit.all()
    torch.testing.assert_close(cached_logits, logits)
    torch.testing.assert_close(cached_saliency, saliency)
    # a fit of the same config takes it (checked against its teacher and options); other options refuse it
    cli = run_lightning_cli([*args, f"--model.teacher_cache={output}"], run=False)
    assert len(cli.model.teacher_cache) == 37 and cli.model.teacher_cache.origin == str(output)
    with pytest.raises(TeacherCacheError, match=r"other saliency options .*now: '\{\"steps\": 4\}'"):
        other = '--model.teacher_saliency_options={"steps": 4}'
        run_lightning_cli([*args, other, f"--model.teacher_cache={output}"], run=False)
