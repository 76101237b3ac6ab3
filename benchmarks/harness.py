"""Shared pieces of the benchmark scripts: the environment of a run, a resumable CSV, Markdown tables, line
plots and a quiet Lightning Trainer.

The scripts import it by path (``sys.path.insert(0, <benchmarks/>)``; ``benchmarks/`` is not a package).
A run appends one CSV row per finished measurement, so an interrupted run resumes where it stopped:
``done_keys`` gives the keys already there, ``append_row`` adds a row (and new columns, if any).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: str | torch.device = "cpu") -> dict[str, str]:
    """What a results file must say about where it was measured: versions, hardware, load, date, command.

    ``device`` is the device the benchmark runs on; a CUDA device is named by its GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = (
            f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"
        )
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    try:
        import lightning

        lightning_version = lightning.__version__
    except ImportError:
        lightning_version = "not installed"
    return {
        "torch": torch.__version__,
        "lightning": lightning_version,
        "python": platform.python_version(),
        "device": f"{device.type} ({hardware})",
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "load": load,
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }


# ----------------------------------------------------------------------------- resumable CSV
def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """Every row of ``csv_path`` as a dict of strings (no file: no rows)."""
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def done_keys(csv_path: Path, key_fields: Sequence[str]) -> set[tuple[str, ...]]:
    """The ``key_fields`` of every row already in ``csv_path``, as tuples of strings (a missing column
    reads as ``""``), so a resumed run can skip them."""
    return {tuple(row.get(k) or "" for k in key_fields) for row in read_rows(csv_path)}


def _header(csv_path: Path, fields: Sequence[str], defaults: Mapping[str, str]) -> list[str]:
    """The header of an existing ``csv_path``, extended (file rewritten) with any of ``fields`` it lacks;
    old rows get ``defaults[column]`` (or ``""``) in the new columns."""
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [k for k in fields if k not in header]
        if not missing:
            return header
        rows = list(reader)
    header += missing
    tmp = csv_path.with_suffix(csv_path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) or defaults.get(k, "") for k in header})
    tmp.replace(csv_path)
    return header


def append_row(
    csv_path: Path,
    row: Mapping[str, Any],
    fields: Sequence[str],
    *,
    defaults: Mapping[str, str] | None = None,
    float_format: str = ".6g",
) -> None:
    """Append ``row`` (its ``fields`` only) to ``csv_path``, creating the file with a header when needed.

    An existing file missing some of ``fields`` gets them as new columns first (``defaults`` fills the
    old rows). Floats are written with ``float_format``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.csv"
        >>> append_row(path, {"seed": 0, "acc": 0.91234567}, ["seed", "acc"])
        >>> append_row(path, {"seed": 1, "acc": 0.5, "note": "new column"}, ["seed", "acc", "note"])
        >>> sorted(done_keys(path, ["seed"])), read_rows(path)[0]
        ([('0',), ('1',)], {'seed': '0', 'acc': '0.912346', 'note': ''})
    """
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    header = list(fields) if not csv_path.exists() else _header(csv_path, fields, defaults or {})
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, header)
        if new:
            writer.writeheader()
        writer.writerow(
            {
                k: (format(v, float_format) if isinstance(v, float) else v)
                for k, v in row.items()
                if k in header
            }
        )


def claim(csv_path: Path | None, key_fields: Sequence[str], key: tuple[str, ...], name: str) -> bool:
    """Whether this process should run row ``key``: not in ``csv_path`` yet (re-read now; ``None``: no CSV
    to check, e.g. a job whose row already exists and is rewritten) and not claimed by another live process
    on this machine (a pid file in the temp folder ``lightning_tsd_<name>_claims``), so that several
    processes of one benchmark can share its rows."""
    import tempfile

    if csv_path is not None and key in done_keys(csv_path, key_fields):
        return False
    claims = Path(tempfile.gettempdir()) / f"lightning_tsd_{name}_claims"
    claims.mkdir(exist_ok=True)
    path = claims / ("__".join(key).replace("/", "_").replace(" ", "_") + ".pid")
    try:
        os.kill(int(path.read_text()), 0)  # a live process holds it
        return int(path.read_text()) == os.getpid()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        path.write_text(str(os.getpid()))  # free or stale: take it (a race here costs one duplicate run)
        return True


# ----------------------------------------------------------------------------- tables and plots
def markdown_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str], *, digits: int = 3
) -> list[str]:
    """A Markdown table, one line per element: ``rows`` are dicts keyed by column or sequences in
    column order; floats get ``digits`` decimals, ``None`` and NaN print as an en dash.

    Example:
        >>> for line in markdown_table([{"T": 512, "ms": 1.5}, [2048, None]], ["T", "ms"], digits=1):
        ...     print(line)
        | T | ms |
        |---|---|
        | 512 | 1.5 |
        | 2048 | – |
    """

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return lines


@dataclass
class Panel:
    """One subplot of :func:`line_plot`: ``series`` maps a label to its ``(x, y)`` points."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    logx: bool = True
    logy: bool = True


def line_plot(path: Path, panels: Sequence[Panel], *, title: str = "", columns: int = 2) -> bool:
    """Draw ``panels`` in a grid of ``columns`` and save a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = max(1, min(columns, len(panels)))
    nrows = -(-len(panels) // columns)
    fig, axes = plt.subplots(nrows, columns, figsize=(5.5 * columns, 4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for i, (label, points) in enumerate(panel.series.items()):
            points = sorted(p for p in points if p[1] is not None and p[1] == p[1])
            if points:  # overlapping series stay visible: markers and line styles vary
                style = dict(marker="os^vDx+*"[i % 8], linestyle=("-", "--", ":")[i % 3], alpha=0.85)
                ax.plot(*zip(*points), label=label, **style)
        if panel.logx:
            ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- Lightning
def quiet_trainer(accelerator: str = "cpu", **kwargs: Any):
    """A ``lightning.pytorch.Trainer`` that writes nothing and prints nothing: no logger, checkpoint,
    progress bar, model summary or sanity validation; ``kwargs`` override or add options."""
    import lightning.pytorch as pl

    options = dict(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(**options)
