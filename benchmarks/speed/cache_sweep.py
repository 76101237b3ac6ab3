"""A sweep of N students pays the teacher once with a teacher cache on disk (issue 28, item 4).

The same sweep (``--students`` NarrowFCN widths, the package's default TSD step, ``--epochs`` each) runs three
ways, and a hook on the frozen teacher counts its forward calls and the samples they carry:

* ``live``: ``teacher_cache=False``, the teacher runs on every step of every run;
* ``memory``: ``teacher_cache=True``, each run fills its own in-memory cache in its first epoch;
* ``disk``: the cache is filled once (``precompute_teacher_cache`` + ``TeacherCache.save``, what
  ``lightning-tsd cache-teacher`` runs) and every run loads the file (``teacher_cache=PATH``).

Each row also records a hash of the trained student's weights: a student trained from the cache file must be
the one the live teacher trains. Data: seeded random walks (nothing downloaded); teacher: a reduced
InceptionTime with random weights (its cost, not its accuracy, is measured).

Results: ``benchmarks/results/cache_sweep.csv`` / ``.md``. The CSV is appended one run at a time and a rerun
skips the runs already there (``--fresh`` starts over); the cache file lives in ``benchmarks/.cache/``.

Usage::

    python benchmarks/speed/cache_sweep.py            # the committed run: 4 students x 3 epochs, ~2 min
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/harness.py

import harness  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_tsd import TemporalSaliencyDistiller  # noqa: E402
from lightning_tsd.cache import weights_fingerprint  # noqa: E402
from lightning_tsd.models import InceptionTime, NarrowFCN, count_parameters  # noqa: E402

RESULTS = HERE.parent / "results"
CACHE_DIR = HERE.parent / ".cache"
MODES = ("live", "memory", "disk")
KEY = ["mode", "run"]
FIELDS = KEY + ["student_params", "teacher_calls", "teacher_samples", "wall_s", "student_hash"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--students", type=int, nargs="+", default=[4, 6, 8, 12], help="NarrowFCN num_filters")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true", help="delete the CSV first (default: resume)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def data(n: int, length: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, length, generator=g).cumsum(-1)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    y = (x[:, 0, : length // 2].mean(-1) > x[:, 0, length // 2 :].mean(-1)).long()
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


def teacher() -> tuple[torch.nn.Module, dict[str, int]]:
    """The frozen teacher and its counters (forward calls, samples through them)."""
    torch.manual_seed(0)
    model = InceptionTime(1, 2, num_filters=16, depth=3).eval()
    counts = {"calls": 0, "samples": 0}

    def count(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        counts["calls"] += 1
        counts["samples"] += inputs[0].shape[0]

    model.register_forward_pre_hook(count)
    return model, counts


def loader(args: argparse.Namespace) -> DataLoader:
    generator = torch.Generator().manual_seed(0)  # the same shuffled order in every run
    return DataLoader(
        data(args.samples, args.length), batch_size=args.batch_size, shuffle=True, generator=generator
    )


def run_student(args: argparse.Namespace, width: int, cache: bool | str) -> dict[str, object]:
    model, counts = teacher()
    torch.manual_seed(1)
    student = NarrowFCN(1, 2, num_filters=width)
    distiller = TemporalSaliencyDistiller(model, student, teacher_cache=cache)
    start = time.perf_counter()
    harness.quiet_trainer(max_epochs=args.epochs, limit_val_batches=0).fit(distiller, loader(args))
    return {
        "student_params": count_parameters(student),
        "teacher_calls": counts["calls"],
        "teacher_samples": counts["samples"],
        "wall_s": time.perf_counter() - start,
        "student_hash": weights_fingerprint(student)[:12],
    }


def fill_cache(args: argparse.Namespace, path: Path) -> dict[str, object]:
    """What ``lightning-tsd cache-teacher`` does: one pass over the training data, then save."""
    model, counts = teacher()
    distiller = TemporalSaliencyDistiller(model, NarrowFCN(1, 2), teacher_cache=True)
    start = time.perf_counter()
    distiller.precompute_teacher_cache(loader(args))
    assert distiller.teacher_cache is not None
    distiller.teacher_cache.save(path)
    return {
        "teacher_calls": counts["calls"],
        "teacher_samples": counts["samples"],
        "wall_s": time.perf_counter() - start,
    }


def report(csv_path: Path, args: argparse.Namespace, env: dict[str, str]) -> str:
    rows = harness.read_rows(csv_path)
    live = {r["run"]: r["student_hash"] for r in rows if r["mode"] == "live"}
    table = []
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        runs = [r for r in mine if r["run"] != "fill"]
        if not mine:
            continue
        same = all(live.get(r["run"]) == r["student_hash"] for r in runs) if live else None
        table.append(
            {
                "mode": mode,
                "students": len(runs),
                "teacher forward calls": sum(int(r["teacher_calls"]) for r in mine),
                "of which in the runs": sum(int(r["teacher_calls"]) for r in runs),
                "samples through the teacher": sum(int(r["teacher_samples"]) for r in mine),
                "wall time (s)": sum(float(r["wall_s"]) for r in mine),
                "students identical to live": "–" if same is None else ("yes" if same else "NO"),
            }
        )
    columns = list(table[0]) if table else []
    lines = [
        "# A sweep of students pays the teacher once: the teacher cache on disk",
        "",
        f"Generated by `benchmarks/speed/cache_sweep.py` from `{csv_path.name}`:",
        "",
        "```",
        env.get("command", ""),
        "```",
        "",
        f"* torch {env.get('torch')}, Lightning {env.get('lightning')}, Python {env.get('python')}, "
        f"{env.get('device')}; {env.get('date')}, load average {env.get('load')}.",
        f"* Sweep: NarrowFCN students with num_filters {args.students}, {args.epochs} epochs each, "
        f"{args.samples} random-walk series of length {args.length}, batch size {args.batch_size}; the "
        "package's default TSD step (integrated gradients, 8 steps). Teacher: InceptionTime (16 filters, depth "
        "3), random weights, frozen. A forward pre-hook counts the teacher's calls and the samples they carry "
        "(integrated gradients runs the batch and its interpolants, in chunks).",
        "* `live`: no cache. `memory`: `teacher_cache=True`, each run fills its own cache in its first epoch. "
        "`disk`: one `precompute_teacher_cache` + `TeacherCache.save` (what `lightning-tsd cache-teacher` "
        "runs; its row is `fill`), then every run passes the file as `teacher_cache=PATH`. A `memory` run makes "
        "one call more than the fill: the class count read from the first batch, which a loaded cache answers.",
        "* A student hash (SHA-256 of its trained weights, first 12 digits) equal to the `live` run's means the "
        "cache trained the same student.",
        "",
        *harness.markdown_table(table, columns, digits=1),
        "",
        "Per run:",
        "",
        *harness.markdown_table([{**r, "wall_s": float(r["wall_s"])} for r in rows], FIELDS, digits=2),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "cache_sweep.csv"
    cache_path = CACHE_DIR / "cache_sweep_teacher_cache.pt"
    if args.fresh:
        csv_path.unlink(missing_ok=True)
    env = harness.environment()
    done = harness.done_keys(csv_path, KEY)
    if ("disk", "fill") not in done or not cache_path.is_file():
        if ("disk", "fill") in done:  # the file of an earlier run is gone: the disk runs must refill it
            raise SystemExit(f"{cache_path} is gone: rerun with --fresh")
        harness.append_row(csv_path, {"mode": "disk", "run": "fill", **fill_cache(args, cache_path)}, FIELDS)
    for mode in MODES:
        for width in args.students:
            key = (mode, f"num_filters={width}")
            if key in harness.done_keys(csv_path, KEY):
                continue
            cache = {"live": False, "memory": True, "disk": str(cache_path)}[mode]
            row = {"mode": mode, "run": key[1], **run_student(args, width, cache)}
            harness.append_row(csv_path, row, FIELDS)
            print(
                f"{mode:6s} {key[1]}: {row['teacher_calls']} teacher calls, {row['wall_s']:.1f} s", flush=True
            )
    markdown = report(csv_path, args, env)
    (args.out / "cache_sweep.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
