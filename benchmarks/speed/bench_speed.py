"""Cost of one training step: the package's TSD step vs its KD step and vs a hand-written floor (issue 10).

Per cell (teacher, batch size B, length T) the script builds a frozen InceptionTime teacher (``--teachers``:
``small``, 16 filters and depth 3, ~80k parameters; ``default``, the package's 32 and 6, 420k), a NarrowFCN
student (1.2k) and one batch, then times every variant of ``speed_variants`` (KD and TSD, package and
hand-written, live teacher and cached; one TSD variant per estimator of ``--estimators``; the cache fill of
one batch), interleaved round-robin, and measures the peak memory of one extra step of each.
``speed_report`` turns the rows into the targets (PASS/MISS per cell), the cost and memory of every
estimator vs T, the first epoch's cache fill, and two plots (``.png``; ``_estimators.png``: step cost vs T
and B for IG-8, IG-2 antithetic, IG-1 uniform and the gradient).

Results: ``benchmarks/results/speed{tag}.csv`` / ``.md`` / ``.png`` (``--out``, ``--tag``; CUDA runs get
``_cuda``). The CSV is appended one cell at a time: a rerun of the same command skips the variants already
there (``--fresh`` starts over) and rewrites the Markdown and the plot from every row; ``.env.json`` keeps
where and when the last measuring invocation ran (``--report-only`` reuses it).

Usage::

    python benchmarks/speed/bench_speed.py                 # the full run: T 512 2048, B 16 64, both teachers
    python benchmarks/speed/bench_speed.py --quick         # smoke run, < 2 min (speed_quick.*)
    python benchmarks/speed/bench_speed.py --device cuda   # speed_cuda.*, names the GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/harness.py

import harness  # noqa: E402
import speed_report  # noqa: E402
import speed_timing  # noqa: E402
import speed_variants  # noqa: E402
import torch  # noqa: E402

from lightning_tsd.models import count_parameters  # noqa: E402

RESULTS = HERE.parent / "results"
KEY = ["device", "teacher_params", "batch_size", "T", "variant"]
FIELDS = KEY + ["student_params", "wall_ms", "wall_min_ms", "cpu_ms", "cpu_min_ms", "repeats", "peak_mb"]
QUICK = dict(lengths=[128, 256], batch_sizes=[8], warmup=1, repeats=3, budget=5.0, teachers=["small"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared CPU)"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--estimators", nargs="+", default=list(speed_variants.ESTIMATORS), help="TSD estimators")
    p.add_argument(
        "--floors",
        nargs="+",
        default=None,
        help="estimators with a hand-written floor (default: the default and gradient)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--budget", type=float, default=300.0, help="seconds of timed rounds per cell (at least 3 rounds)"
    )
    p.add_argument(
        "--teachers", nargs="+", default=list(speed_variants.TEACHERS), choices=list(speed_variants.TEACHERS),
        help="InceptionTime teachers by name (small: 16 filters, depth 3; default: the package's 32 and 6)",
    )  # fmt: skip
    p.add_argument(
        "--teacher-filters",
        type=int,
        default=None,
        help="one custom teacher instead: InceptionTime num_filters",
    )
    p.add_argument("--teacher-depth", type=int, default=None, help="one custom teacher instead: its depth")
    p.add_argument("--only", nargs="+", default=None, help="keep variants whose name contains one of these")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument(
        "--occlusion", action="store_true", help="add the occlusion_loop baseline (T forwards per step)"
    )
    p.add_argument("--occlusion-lengths", type=int, nargs="+", default=[512])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument("--fresh", action="store_true", help="delete this tag's CSV first (default: resume)")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite .md/.png from the CSV, measure nothing"
    )
    p.add_argument(
        "--tag", default=None, help="suffix of the results files (default: '', '_quick' with --quick)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def configure(args: argparse.Namespace) -> tuple[torch.device, Path, str]:
    """Apply ``--quick``, the thread count and the default estimator; return the device, the CSV path
    and the default estimator's label."""
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.fresh = True
    default = speed_variants.default_label()
    if default not in args.estimators:
        args.estimators.append(default)
    args.floors = args.floors or [default] + (["gradient"] if default != "gradient" else [])
    unknown = sorted(set(args.estimators + args.floors) - set(speed_variants.ESTIMATORS))
    if unknown:
        raise SystemExit(f"unknown estimator(s) {unknown}; choose from {list(speed_variants.ESTIMATORS)}")
    torch.set_num_threads(args.threads)
    tag = (args.tag if args.tag is not None else "_quick" if args.quick else "") + (
        "_cuda" if args.device == "cuda" else ""
    )
    csv_path = args.out / f"speed{tag}.csv"
    if args.fresh and csv_path.exists() and not args.report_only:
        csv_path.unlink()
    rows = harness.read_rows(csv_path)
    if rows and "cpu_ms" not in rows[0]:
        raise SystemExit(
            f"{csv_path} was written by the earlier script (other columns): pass --fresh to replace it"
        )
    return torch.device(args.device), csv_path, default


def teachers(args: argparse.Namespace) -> list[dict]:
    """The InceptionTime arguments of each teacher to measure (``--teacher-filters/--teacher-depth``: one)."""
    if args.teacher_filters is None and args.teacher_depth is None:
        return [speed_variants.TEACHERS[name] for name in args.teachers]
    default = speed_variants.TEACHERS["default"]
    return [
        {
            "num_filters": args.teacher_filters or default["num_filters"],
            "depth": args.teacher_depth or default["depth"],
        }
    ]


def measure_cell(
    args, device: torch.device, kwargs: dict, B: int, T: int, csv_path: Path, default: str
) -> dict:
    """Time (and measure the memory of) every variant of one cell not yet in the CSV; append their rows."""
    setup = speed_variants.build_setup(B, T, device, kwargs)
    tp, sp = count_parameters(setup.teacher), count_parameters(setup.student0)
    done = harness.done_keys(csv_path, KEY)
    occlusion = args.occlusion and T in args.occlusion_lengths
    steps = speed_variants.make_variants(setup, args.estimators, args.floors, occlusion, default=default)
    steps = {
        n: fn
        for n, fn in steps.items()
        if (args.only is None or any(o in n for o in args.only))
        and (args.device, str(tp), str(B), str(T), n) not in done
    }
    if not steps:
        return {}
    t0 = time.perf_counter()
    stats = speed_timing.time_steps(steps, device, args.warmup, args.repeats, args.budget)
    # occlusion_loop: T student forwards under the profiler, too slow
    peaks = (
        {}
        if args.no_memory
        else speed_timing.peak_memory_mb({n: fn for n, fn in steps.items() if n != "occlusion_loop"}, device)
    )
    for name in steps:
        peak, s = peaks.get(name, float("nan")), stats[name]
        row = dict(
            zip(KEY, (args.device, tp, B, T, name)), student_params=sp, repeats=int(s["n"]), peak_mb=peak
        )
        row.update(wall_ms=s["wall"], wall_min_ms=s["wall_min"], cpu_ms=s["cpu"], cpu_min_ms=s["cpu_min"])
        harness.append_row(csv_path, row, FIELDS, float_format=".4f")
        print(
            f"  {name:34s} {s['cpu']:10.2f} ms cpu {s['wall']:10.2f} ms wall  peak {peak:9.2f} MB", flush=True
        )
    print(
        f"B={B} T={T}: {len(steps)} variants, {int(s['n'])} rounds, {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return {"teacher_params": tp, "student_params": sp}


def write_report(args, env: dict, csv_path: Path, default: str, params: dict) -> None:
    rows = harness.read_rows(csv_path)
    res = speed_report.load(rows, args.device)
    if not res:
        print(f"no rows for device {args.device} in {csv_path}")
        return
    first = next(r for r in rows if r.get("device") == args.device)
    cpu = args.device == "cpu"
    info = {
        "csv": csv_path.name,
        "quick": args.quick,
        "default": default,
        "floors": args.floors,
        "measure": "cpu" if cpu else "wall",
        "measure_label": "process CPU time" if cpu else "wall-clock with device synchronisation",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "teacher_kwargs": teachers(args),
        "student_params": params.get("student_params") or int(first["student_params"]),
    }
    md, png = csv_path.with_suffix(".md"), csv_path.with_suffix(".png")
    md.write_text(speed_report.markdown(env, res, info))
    drawn = speed_report.plot(png, res, info["measure"], default, args.floors)
    per_estimator = csv_path.with_name(csv_path.stem + "_estimators.png")
    drawn = speed_report.plot_estimators(per_estimator, res, info["measure"]) and drawn
    print(
        f"wrote {md}" + (f", {png}, {per_estimator}" if drawn else " (no plot: matplotlib missing)"),
        flush=True,
    )


def main() -> None:
    args = parser().parse_args()
    device, csv_path, default = configure(args)
    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns once per call site
    env = harness.environment(device)
    start, params = time.perf_counter(), {}
    if not args.report_only:
        for kwargs in teachers(args):
            for B in args.batch_sizes:
                for T in args.lengths:
                    params = measure_cell(args, device, kwargs, B, T, csv_path, default) or params
    env_path = csv_path.with_suffix(".env.json")  # where and when the rows were measured
    if args.report_only and env_path.exists():
        env = json.loads(env_path.read_text())
    else:
        env["wall"] = f"{time.perf_counter() - start:.0f} s"
        env_path.write_text(json.dumps(env, indent=1))
    write_report(args, env, csv_path, default, params)


if __name__ == "__main__":
    main()
