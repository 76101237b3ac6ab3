"""Shortcut probes: does a TSD setting keep a student off a class-coded artefact its teacher ignores?

One dataset, a few seeds, paired runs (every variant of a seed shares the student's initialisation and batch
order with its ``kd`` run). Rows are appended to ``results/behaviour_probe.csv``; a finished row is skipped on
a re-run, so an interrupted probe resumes. Teachers are cached under ``benchmarks/.cache/teachers/``.

    python benchmarks/behaviour/probe.py run --variants kd default --seeds 0 1 2
    python benchmarks/behaviour/probe.py report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/harness.py
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE.parent / "quality"))

import common  # noqa: E402
import harness  # noqa: E402
import shortcut  # noqa: E402

RESULTS = HERE.parent / "results"
CSV = RESULTS / "behaviour_probe.csv"
CACHE = HERE.parent / ".cache" / "teachers"

# name -> distiller options (on top of the package's defaults; "kd" is tsd_weight=0)
VARIANTS: dict[str, dict] = {
    "kd": dict(tsd_weight=0.0),
    "default": dict(),
    # the explained output: the target's margin over every other class, or its log-probability
    "margin": dict(saliency_options=dict(output="margin")),
    "logprob": dict(saliency_options=dict(output="log_prob")),
    # the update rule
    "sum_w2": dict(tsd_gradient="sum", tsd_weight=2.0),
    "margin_sum_w2": dict(tsd_gradient="sum", tsd_weight=2.0, saliency_options=dict(output="margin")),
    "margin_sum_w8": dict(tsd_gradient="sum", tsd_weight=8.0, saliency_options=dict(output="margin")),
    "grad_sum_w8": dict(tsd_gradient="sum", tsd_weight=8.0, saliency="gradient"),
    "grad_margin_sum_w8": dict(
        tsd_gradient="sum", tsd_weight=8.0, saliency="gradient", saliency_options=dict(output="margin")
    ),
}


def load(name: str):
    return shortcut.load(name)  # the train and test splits


def teacher_for(name: str, seed: int, data) -> torch.nn.Module:
    return shortcut.cached_teacher(CACHE / f"shortcut_{name}_s{seed}.pt", data, seed)


def student_for(size: str, in_channels: int, k: int, activation: str) -> torch.nn.Module:
    from lightning_tsd.models import FCN, GRUClassifier, NarrowFCN

    if size == "tiny":
        return NarrowFCN(in_channels, k, activation=activation)
    if size == "small":
        return NarrowFCN(in_channels, k, num_filters=16, activation=activation)
    if size == "tenth":
        return FCN(in_channels, k, num_filters=32, activation=activation)
    if size == "gru":
        return GRUClassifier(in_channels, k)
    raise ValueError(size)


def run_one(name, seed, size, variant, kind, steps, activation, data, teacher) -> dict:
    from lightning_tsd import TemporalSaliencyDistiller
    from lightning_tsd.data import TimeSeriesDataset

    x_train, y_train, x_test, y_test, k = data
    s = shortcut.shortcut_set(teacher, x_train, y_train, x_test, y_test, kind, k)
    torch.manual_seed(40_000 + seed)
    student = student_for(size, x_train.shape[1], k, activation)
    options = common.as_committed(
        VARIANTS[variant]
    )  # the teacher's maps at IG-8, as the committed rows had them
    model = TemporalSaliencyDistiller(teacher, student, teacher_cache=True, lr=3e-3, **options)
    loader = torch.utils.data.DataLoader(
        TimeSeriesDataset(s.x_transfer, s.y_transfer),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(50_000 + seed),
    )
    t0 = time.perf_counter()
    harness.quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, train_dataloaders=loader)
    out = shortcut.behaviour(student, s)
    return dict(teacher_kept=round(s.kept, 4), fit_s=round(time.perf_counter() - t0, 1), **out)


KEY = ("dataset", "kind", "size", "activation", "steps", "variant", "seed")


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    done = harness.done_keys(CSV, KEY)
    data = load(args.dataset)
    for seed in args.seeds:
        teacher = teacher_for(args.dataset, args.teacher_seed, data)
        for variant in args.variants:
            key = (args.dataset, args.kind, args.size, args.activation, str(args.steps), variant, str(seed))
            if key in done:
                continue
            row = run_one(
                args.dataset, seed, args.size, variant, args.kind, args.steps, args.activation, data, teacher
            )
            row = dict(zip(KEY, key), teacher_seed=args.teacher_seed, **row)
            harness.append_row(CSV, row, list(row))
            print(json.dumps(row), flush=True)


def cmd_report(args) -> None:
    import collections

    rows = harness.read_rows(CSV)
    groups = collections.defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in KEY if k != "seed")].append(r)
    for g, rs in sorted(groups.items()):
        f = [float(r["follows"]) for r in rs]
        a = [float(r["agreement"]) for r in rs]
        print(" ".join(g), f"n={len(rs)} follows={[round(v, 2) for v in f]} agree={[round(v, 2) for v in a]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", default="GunPoint")
    r.add_argument("--kind", default="spike", choices=shortcut.ARTEFACTS)
    r.add_argument("--size", default="small")
    r.add_argument("--activation", default="relu")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--variants", nargs="+", default=["kd", "default"])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--teacher-seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
