"""The credible regime of issue 9 (rules: ``benchmarks/quality/selection.md``, 2026-12-03).

``teachers``: train (or find cached) the package's full-size InceptionTime per dataset and split; one row per
teacher in ``results/regime_teachers.csv`` (test accuracy for ``--split full``, held-out-fold accuracy for
``--split cv``). ``curves``: KD students of both sizes on 3-fold CV (repeat 0), validation agreement every
250 steps, ``results/regime_curves.csv``. ``report``: ``results/regime.md`` (teachers beside the published
InceptionTime accuracy; the curves and the step count the rule picks). A dataset name ending in ``-raw``
(``JapaneseVowels-raw``, amendment 8) is that dataset without z-normalisation.

Every command resumes: finished rows are skipped. Smallest datasets first.

Usage::

    python benchmarks/quality/regime.py teachers --split full --seeds 0 1 2 3 4
    python benchmarks/quality/regime.py teachers --split cv --seeds 0 --datasets ItalyPowerDemand GunPoint ArrowHead
    python benchmarks/quality/regime.py curves --datasets ItalyPowerDemand GunPoint ArrowHead
    python benchmarks/quality/regime.py report
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import common
import harness
import torch

DATASETS = ["ItalyPowerDemand", "GunPoint", "BasicMotions", "ArrowHead", "JapaneseVowels", "OSULeaf"]
# The test-split tables' datasets: JapaneseVowels without z-normalisation (selection.md, amendment 8)
FINAL_DATASETS = [d + common.RAW if d == "JapaneseVowels" else d for d in DATASETS]
TEACHER_FIELDS = ["dataset", "split", "params", "epochs", "n_train", "fit_s", "fit_cpu_s", "train_acc",
                  "eval_acc", "eval_on"]  # fmt: skip
CURVE_FIELDS = ["dataset", "split", "student", "student_params", "teacher_params", "step", "agreement"]
CURVE_EVERY, CURVE_MAX = 250, 4000
CURVE_TOLERANCE = 0.01  # the chosen step count: first step within 0.01 of the curve's maximum mean agreement
# Published InceptionTime test accuracy, from hfawaz/InceptionTime: the ensemble of 5 networks (the paper's
# "InceptionTime"; results-InceptionTime-128.csv for UCR 2018, results-mts.csv for UEA) and one network
# ("inception", iteration 0 of results-inception-128.csv; not listed for the UEA sets).
PUBLISHED = {
    "GunPoint": (1.0000, 1.0000),
    "ArrowHead": (0.8457, 0.8229),
    "ItalyPowerDemand": (0.9650, 0.9553),
    "OSULeaf": (0.9421, 0.9256),
    "JapaneseVowels": (0.9919, None),
    "BasicMotions": (1.0000, None),
}
SOURCE = (
    "https://github.com/hfawaz/InceptionTime (results-InceptionTime-128.csv for the UCR sets, "
    "results-mts.csv for the UEA sets JapaneseVowels and BasicMotions); Ismail Fawaz et al., "
    "InceptionTime: Finding AlexNet for time series classification, DMKD 34 (2020)"
)


def splits(kind: str, seeds: list[int], folds: list[int] | None = None) -> list[common.Split]:
    if kind == "full":
        return [common.Split("full", s) for s in seeds]
    return [common.Split("cv", r, f) for r in seeds for f in (folds or range(common.CV_FOLDS))]


def cmd_teachers(args) -> None:
    for split in splits(args.split, args.seeds):
        for name in args.datasets or (FINAL_DATASETS if args.split == "full" else DATASETS):
            record_teacher(name, split, refill=args.refill)


def record_teacher(name: str, split: common.Split, refill: bool = False) -> bool:
    """Train (or find) the teacher of ``(name, split)`` and record its row in ``regime_teachers.csv``; False
    when another process on this machine is training it now (``harness.claim``), True otherwise.
    ``refill``: re-train a recorded teacher whose cache file is gone."""
    path = common.RESULTS / "regime_teachers.csv"
    rows = {(r["dataset"], r["split"]): r for r in harness.read_rows(path)}
    if (name, split.key) in rows:
        if refill and not common.teacher_path(name, split).exists():
            # no CSV to check: the recorded row would make the usual claim say "done"
            if not harness.claim(None, ["dataset", "split"], (name, split.key), "refills"):
                return common.teacher_path(name, split).exists()
            _refill(name, split, rows[(name, split.key)])
        return True
    if not harness.claim(path, ["dataset", "split"], (name, split.key), "teachers"):
        return (name, split.key) in {(r["dataset"], r["split"]) for r in harness.read_rows(path)}
    dm = common.datamodule(name, split)
    _, info = common.get_teacher(name, split, dm)
    harness.append_row(path, info, TEACHER_FIELDS)
    print(f"teacher {name} {split.key}: {split.kind} acc {info['eval_acc']:.3f} (train "
          f"{info['train_acc']:.3f}, {info['epochs']} epochs, {info['fit_s']:.0f}s)", flush=True)  # fmt: skip
    return True


def _refill(name: str, split: common.Split, row: dict) -> None:
    """Re-train a teacher whose row is recorded but whose cache file is gone (a new machine). The fit is
    seeded, but not bit-reproducible across CPUs: when the accuracy differs, the re-trained teacher is kept
    and its row rewritten (said loudly; results computed with the old teacher are then of another run)."""
    _, info = common.get_teacher(name, split, common.datamodule(name, split))
    same = all(abs(float(row[k]) - info[k]) < 1e-6 for k in ("eval_acc", "train_acc"))
    print(f"teacher {name} {split.key}: refilled, {info['eval_acc']:.6f} vs recorded {float(row['eval_acc']):.6f}"
          f" ({'reproduced' if same else 'DIFFERENT: row rewritten'})", flush=True)  # fmt: skip
    if not same:
        path = common.RESULTS / "regime_teachers.csv"
        rows = [dict(r, **{k: info[k] for k in TEACHER_FIELDS}) if (r["dataset"], r["split"]) == (name, split.key)
                else r for r in harness.read_rows(path)]  # fmt: skip
        path.unlink()
        for r in rows:
            harness.append_row(path, r, TEACHER_FIELDS)


def _curve_callback(ref, rows: list):
    import lightning.pytorch as pl

    class Curve(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step % CURVE_EVERY == 0:
                rows.append((trainer.global_step, common.agreement(module.student, ref)))
                module.student.train()

    return Curve()


def kd_curve(name: str, split: common.Split, size: str) -> list[dict]:
    """Validation agreement of a KD student every 250 steps up to 4000 (one fit)."""
    from lightning_tsd.models import count_parameters

    dm = common.datamodule(name, split)
    teacher, _ = common.get_teacher(name, split, dm)
    ref = common.reference(teacher, common.eval_loader(dm, split))
    tp = count_parameters(teacher)
    torch.manual_seed(split.seed * 10 + split.fold)
    student = common.make_student(size, dm, tp)
    rows: list = []
    common.fit_student(common.distiller(teacher, student, dict(tsd_weight=0.0)), dm, CURVE_MAX, split.seed,
                       [_curve_callback(ref, rows)])  # fmt: skip
    base = dict(dataset=name, split=split.key, student=size, student_params=count_parameters(student),
                teacher_params=tp)  # fmt: skip
    return [dict(base, step=s, agreement=a) for s, a in rows]


def cmd_curves(args) -> None:
    done = harness.done_keys(common.RESULTS / "regime_curves.csv", ["dataset", "split", "student", "step"])
    for split in splits("cv", args.seeds, args.folds):
        for name in args.datasets or DATASETS:
            if args.cached_only and not common.teacher_path(name, split).exists():
                print(f"curve {name} {split.key}: no cached teacher yet, skipped (--cached-only)", flush=True)
                continue
            for size in args.students:
                if (name, split.key, size, str(CURVE_MAX)) in done:
                    continue
                for row in kd_curve(name, split, size):
                    harness.append_row(common.RESULTS / "regime_curves.csv", row, CURVE_FIELDS)
                print(f"curve {name} {split.key} {size}: agreement at {CURVE_MAX} steps "
                      f"{row['agreement']:.3f}", flush=True)  # fmt: skip


def chosen_steps() -> dict[str, int | None]:
    """Per student size, the step count the rule picks from the curves done so far (None: no curves)."""
    by = defaultdict(lambda: defaultdict(list))
    for r in harness.read_rows(common.RESULTS / "regime_curves.csv"):
        by[r["student"]][int(r["step"])].append(float(r["agreement"]))
    out: dict[str, int | None] = {"tiny": None, "tenth": None}
    for size, curve in by.items():
        full = {s: v for s, v in curve.items() if len(v) == len(curve[min(curve)])}
        means = {s: sum(v) / len(v) for s, v in sorted(full.items())}
        best = max(means.values())
        out[size] = min(s for s, m in means.items() if m >= best - CURVE_TOLERANCE)
    return out


def _teacher_table() -> list[str]:
    by = defaultdict(list)
    for r in harness.read_rows(common.RESULTS / "regime_teachers.csv"):
        by[(r["dataset"], r["split"].startswith("full"))].append(r)
    rows = []
    for name in [*DATASETS, *(d for d in FINAL_DATASETS if d not in DATASETS)]:
        full, cv = by.get((name, True), []), by.get((name, False), [])
        accs = [float(r["eval_acc"]) for r in full]
        mean = sum(accs) / len(accs) if accs else math.nan
        published, one = PUBLISHED[name.removesuffix(common.RAW)]  # -raw: the same dataset
        gap = (mean - published) if accs and published is not None else math.nan
        cv_acc = [float(r["eval_acc"]) for r in cv]
        rows.append(dict(
            dataset=name, params=(full or cv or [{"params": "–"}])[0]["params"], seeds=len(accs),
            **{"test acc (per seed)": " ".join(f"{a:.3f}" for a in accs) or "–", "mean": mean,
               "published InceptionTime": published, "published, one network": one,
               "ours - published": gap,
               "credible (>= -0.03)": "–" if gap != gap else ("yes" if gap >= -0.03 else "**no**"),
               "CV teachers: held-out-fold acc": " ".join(f"{a:.3f}" for a in cv_acc) or "–"},
        ))  # fmt: skip
    columns = ["dataset", "params", "seeds", "test acc (per seed)", "mean", "published InceptionTime",
               "published, one network", "ours - published", "credible (>= -0.03)", "CV teachers: held-out-fold acc"]  # fmt: skip
    return harness.markdown_table(rows, columns)


def _curve_table() -> list[str]:
    """Mean validation agreement per (student, dataset) and pooled, at every recorded step."""
    by = defaultdict(list)
    for r in harness.read_rows(common.RESULTS / "regime_curves.csv"):
        for key in ((r["student"], r["dataset"]), (r["student"], "**pooled**")):
            by[(*key, int(r["step"]))].append(float(r["agreement"]))
    steps = sorted({k[2] for k in by})
    rows = []
    for size, name in sorted({k[:2] for k in by}, key=lambda k: (k[0], k[1] == "**pooled**", k[1])):
        values = [by.get((size, name, s)) for s in steps]
        rows.append([size, name, len(values[-1] or [])] + [sum(v) / len(v) if v else None for v in values])
    return harness.markdown_table(rows, ["student", "dataset", "folds"] + [str(s) for s in steps])


def _status_lines() -> list[str]:
    rows = harness.read_rows(common.RESULTS / "regime_teachers.csv")
    all_full = [r for r in rows if r["split"].startswith("full")]
    full = [r for r in all_full if r["dataset"] in FINAL_DATASETS]
    extra = len(all_full) - len(full)
    cv = len(rows) - len(all_full)
    fit = defaultdict(list)
    for r in rows:
        fit[r["dataset"]].append(float(r["fit_cpu_s"]) / 60)
    per = ", ".join(f"{d} {sum(v) / len(v):.1f}" for d, v in fit.items())
    return [
        "## Status",
        "",
        f"Teachers done: {len(full)} of {len(FINAL_DATASETS) * 5} full-split (6 datasets x 5 seeds, the test-split "
        f"tables' datasets; {extra} more full-split teachers of datasets those tables do not use), {cv} CV-block "
        f"teachers. Mean CPU minutes per teacher so far: {per or '–'}.",
    ]


def cmd_report(args) -> None:
    env = harness.environment()
    steps = chosen_steps()
    lines = [
        "# The credible regime (issue 9, item 1): teachers and student training length",
        "",
        f"Generated by `benchmarks/quality/regime.py report` ({env['date']}, torch {env['torch']}, {env['device']}).",
        "Rules: `benchmarks/quality/selection.md` (2026-12-03), written before these runs.",
        "",
        "## Teachers",
        "",
        "The package's `InceptionTime` at its default size (32 filters, depth 6, kernel 40), `TimeSeriesClassifier`",
        f"with AdamW (lr {common.TEACHER_LR}, weight decay {common.TEACHER_WD}) and a per-step cosine schedule,",
        f"batch {common.BATCH_SIZE}, max({common.TEACHER_MIN_EPOCHS} epochs, {common.TEACHER_MIN_STEPS} steps), "
        "trained on the whole train split (one teacher per seed; test accuracy) and, for the CV screen, on two of "
        "three folds (accuracy on the held-out fold). Published figures: the InceptionTime ensemble of 5 networks "
        "(the paper's headline; the credibility criterion uses it) and one network where listed; "
        f"source: {SOURCE}.",
        "",
        *_teacher_table(),
        "",
        "## KD validation curves (student training length)",
        "",
        f"Mean validation agreement of KD students (3-fold CV, repeat 0, teacher on the other folds) every "
        f"{CURVE_EVERY} steps. Rule: the first step count within {CURVE_TOLERANCE} of the curve's maximum.",
        "",
        *_curve_table(),
        "",
        "Chosen step counts so far: " + ", ".join(f"{k} {v}" for k, v in steps.items()) + ".",
        "",
        *_status_lines(),
    ]
    notes = common.HERE / "regime_notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    (common.RESULTS / "regime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["teachers", "curves", "report"])
    p.add_argument("--split", choices=["full", "cv"], default="full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (full) or CV repeats (cv)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="default: the six (teachers --split full: JapaneseVowels-raw for JapaneseVowels)")  # fmt: skip
    p.add_argument("--students", nargs="+", default=["tiny", "tenth"])
    p.add_argument("--folds", type=int, nargs="+", default=None, help="curves: only these CV folds")
    p.add_argument("--refill", action="store_true",
                   help="teachers: re-train recorded teachers whose cache file is missing, checking they reproduce")  # fmt: skip
    p.add_argument("--cached-only", action="store_true", help="curves: only blocks whose teacher is cached")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--smoke", type=Path, default=None, help="smoke test: tiny fits, everything under this folder"
    )
    args = p.parse_args()
    if args.smoke:
        global CURVE_EVERY, CURVE_MAX
        common.smoke(args.smoke)
        CURVE_EVERY, CURVE_MAX = 10, 30
    torch.set_num_threads(args.threads)
    {"teachers": cmd_teachers, "curves": cmd_curves, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
