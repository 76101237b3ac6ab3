"""The behavioural benchmark: does the student rely on what its teacher relies on? (issue 26)

For each dataset, seed, student size and artefact kind, paired runs (the same student initialisation and
batch order) of the variants in :data:`VARIANTS` on the *shortcut transfer set* (:mod:`shortcut`), then, on the
evaluation series (the test split with ``--split test``; the held-out fold of 3-fold CV of the train split
with ``--split cv``, for choices):

- ``accuracy``, ``agreement``: on the clean series;
- ``follows``: the fraction of series where the student predicts the class whose artefact was added (a wrong
  one); the teacher keeps its prediction on >= 0.99 of its transfer series (``teacher_kept``, printed);
- ``noise``, ``masked``, ``shifted``: agreement with the teacher on the same perturbed series (Gaussian noise
  of 0.5 series std, a zeroed window of 10% of T, a shift of 5% of T; ``lightning_tsd.behaviour``);
- ``del_*`` / ``keep_*``: the student's agreement with the teacher's clean prediction when the teacher's top
  k% steps by captum occlusion (an estimator no variant trains with) are deleted, or all others are, and the
  same with a random ranking (``*_rand``), k in 5-50%; ``del_gap`` and ``keep_gap`` average the differences.

Rows are appended to ``results/behaviour.csv`` (a finished row is skipped on a re-run: resumable). Teachers
are cached under ``benchmarks/.cache/teachers/``.

    python benchmarks/behaviour/bench.py run --datasets GunPoint --students tiny --seeds 0 1 2
    python benchmarks/behaviour/bench.py report      # results/behaviour.md and behaviour.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/harness.py
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE.parent / "quality"))

import common  # noqa: E402
import harness  # noqa: E402
import shortcut  # noqa: E402

RESULTS = HERE.parent / "results"
CSV = RESULTS / "behaviour.csv"
CACHE = HERE.parent / ".cache" / "teachers"
DATASETS = ["ItalyPowerDemand", "GunPoint", "BasicMotions", "ArrowHead", "JapaneseVowels", "OSULeaf"]
STEPS = 600
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)

# name -> distiller options (teacher cache on, Adam 3e-3); "kd" is the base method alone
VARIANTS: dict[str, dict] = {
    "kd": dict(tsd_weight=0.0),
    "tsd": dict(),  # the package's TSD defaults (IG-8 maps, Pearson, projected update, w=0.5)
    "recomb": dict(tsd_weight=0.0, recombination_weight=1.0),
    "tsd+recomb": dict(recombination_weight=1.0),
}
KEY = ["dataset", "split", "kind", "student", "seed", "variant", "steps"]


def teacher_for(name: str, split: str, seed: int, data) -> torch.nn.Module:
    return shortcut.cached_teacher(CACHE / f"artefact_{name}_{split}_s{seed}.pt", data, seed)


def make_student(size: str, in_channels: int, k: int) -> torch.nn.Module:
    from lightning_tsd.models import FCN, GRUClassifier, NarrowFCN

    if size == "tiny":
        return NarrowFCN(in_channels, k)
    if size == "tenth":  # ~1/10 of the default InceptionTime teacher (~420k parameters)
        return FCN(in_channels, k, num_filters=36)
    if size == "gru":
        return GRUClassifier(in_channels, k)
    raise ValueError(f"student must be tiny, tenth or gru, got {size!r}")


def fit(teacher, s: shortcut.ShortcutSet, size: str, variant: str, seed: int, steps: int) -> torch.nn.Module:
    from lightning_tsd import TemporalSaliencyDistiller
    from lightning_tsd.data import TimeSeriesDataset

    torch.manual_seed(40_000 + seed)
    student = make_student(size, s.x_transfer.shape[1], s.num_classes)
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
    torch.manual_seed(60_000 + seed)  # recombination partners and any other draw: the same per seed
    harness.quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, train_dataloaders=loader)
    return student.eval()


def measure(teacher, student, s: shortcut.ShortcutSet) -> dict[str, float]:
    from lightning_tsd import behaviour as bh

    out = shortcut.behaviour(student, s)
    gen = torch.Generator().manual_seed(0)
    x = s.x_test
    for name, kind, level in [("noise", "noise", 0.5), ("masked", "mask", 0.1), ("shifted", "shift", 0.05)]:
        out[name] = float(bh.perturbed_agreement(teacher, student, x, kind, level, generator=gen, repeats=2))
    ranking = bh.teacher_ranking(teacher, x, method="occlusion")
    rand = bh.random_ranking(x, generator=gen)
    for mode in ("delete", "keep"):
        by_teacher = bh.deletion_curve(teacher, student, x, ranking, FRACTIONS, mode=mode)
        by_random = bh.deletion_curve(teacher, student, x, rand, FRACTIONS, mode=mode)
        tag = "del" if mode == "delete" else "keep"
        for f, a, b in zip(FRACTIONS, by_teacher.tolist(), by_random.tolist()):
            out[f"{tag}_{int(f * 100)}"], out[f"{tag}_{int(f * 100)}_rand"] = a, b
        diff = (by_random - by_teacher) if mode == "delete" else (by_teacher - by_random)
        out[f"{tag}_gap"] = float(diff.mean())
    return out


def cmd_run(args) -> None:
    torch.set_num_threads(args.threads)
    done = harness.done_keys(CSV, KEY)
    for name in args.datasets:
        for seed in args.seeds:
            data = shortcut.load(name, args.split, seed)
            teacher = teacher_for(name, args.split, seed, data)
            for kind in args.kinds:
                s = shortcut.shortcut_set(teacher, *data[:4], kind, data[4])
                print(
                    f"{name} {args.split} s{seed} {kind}: teacher keeps {s.kept:.3f} of its predictions "
                    f"on the shortcut transfer set" + ("" if s.kept >= 0.99 else "  (BELOW 0.99)"),
                    flush=True,
                )
                for size in args.students:
                    for variant in args.variants:
                        key = dict(dataset=name, split=args.split, kind=kind, student=size, seed=seed,
                                   variant=variant, steps=args.steps)  # fmt: skip
                        if tuple(str(key[k]) for k in KEY) in done:
                            continue
                        t0 = time.perf_counter()
                        student = fit(teacher, s, size, variant, seed, args.steps)
                        row = dict(key, teacher_kept=s.kept, fit_s=time.perf_counter() - t0,
                                   **measure(teacher, student, s))  # fmt: skip
                        harness.append_row(CSV, row, list(row))
                        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                               if not k.startswith(("del_", "keep_")) or k.endswith("gap")}, flush=True)  # fmt: skip


MEASURES = ["agreement", "accuracy", "follows", "noise", "masked", "shifted", "del_gap", "keep_gap"]


def _mean_ci(values: list[float]) -> str:
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return f"{x.mean():+.3f}" if len(x) else "–"
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return f"{x.mean():+.3f} [{x.mean() - half:+.3f}, {x.mean() + half:+.3f}]"


def cmd_report(args) -> None:
    rows = harness.read_rows(CSV)
    by = defaultdict(dict)  # (dataset, split, kind, student, seed) -> variant -> row
    for r in rows:
        by[(r["dataset"], r["split"], r["kind"], r["student"], r["seed"], r["steps"])][r["variant"]] = r
    lines = ["# Behavioural benchmark (issue 26)", "",
             f"Generated by `python benchmarks/behaviour/bench.py report` from `results/behaviour.csv` ({len(rows)} rows).",
             "Each cell: mean over the paired runs; deltas are variant minus `kd` of the same seed, with the 95% "
             "t-interval. `follows`: fraction following a wrong class's artefact (lower is better).", ""]  # fmt: skip
    groups = defaultdict(lambda: defaultdict(list))  # (split, kind, student) -> variant -> [(block, row)]
    for block, variants in by.items():
        for v, r in variants.items():
            groups[(block[1], block[2], block[3])][v].append((block, r))
    for (split, kind, student), variants in sorted(groups.items()):
        lines += [f"## split={split}, artefact={kind}, student={student}", ""]
        lines.append("| variant | n | " + " | ".join(MEASURES) + " |")
        lines.append("|---|---|" + "---|" * len(MEASURES))
        for v in VARIANTS:
            if v not in variants:
                continue
            pairs = [(r, by[b].get("kd")) for b, r in variants[v]]
            cells = []
            for m in MEASURES:
                level = np.mean([float(r[m]) for r, _ in pairs])
                if v == "kd":
                    cells.append(f"{level:.3f}")
                else:
                    d = [float(r[m]) - float(k[m]) for r, k in pairs if k is not None]
                    cells.append(f"{level:.3f} (Δ {_mean_ci(d)})")
            lines.append(f"| {v} | {len(pairs)} | " + " | ".join(cells) + " |")
        datasets = sorted({b[0] for b, _ in variants.get("kd", [])})
        lines += ["", f"Datasets: {', '.join(datasets)}.", ""]
    out = RESULTS / "behaviour.md"
    figure = _plot_curves(groups)
    if figure:
        lines += [f"![deletion and keep curves]({figure.name})", ""]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def _plot_curves(groups) -> Path | None:
    """``behaviour.png``: per (split, artefact, student) and mode, the student's agreement with the teacher's
    clean prediction against k; one colour per variant, teacher-ranked solid, random dashed (means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        for ax, (tag, title) in zip(
            row, (("del", "teacher's top k% deleted"), ("keep", "only its top k% kept"))
        ):
            for colour, v in zip(("C0", "C1", "C2", "C3"), VARIANTS):
                rows = [r for _, r in groups[key].get(v, [])]
                for suffix, style in (("", "-"), ("_rand", "--")):
                    if rows:
                        y = [
                            np.mean([float(r[f"{tag}_{int(f * 100)}{suffix}"]) for r in rows])
                            for f in FRACTIONS
                        ]
                        label = f"{v} ({'teacher-ranked' if not suffix else 'random'}, n={len(rows)})"
                        ax.plot([100 * f for f in FRACTIONS], y, style, color=colour, marker="o", label=label)
            ax.set(
                title=f"{key[2]}, {key[1]}, {key[0]}: {title}", xlabel="k (% of steps)", ylabel="agreement"
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    path = RESULTS / "behaviour.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--datasets", nargs="+", default=["GunPoint"], choices=DATASETS)
    r.add_argument("--split", default="test", choices=["test", "cv"])
    r.add_argument("--kinds", nargs="+", default=["spike"], choices=shortcut.ARTEFACTS)
    r.add_argument("--students", nargs="+", default=["tiny", "tenth"], choices=["tiny", "tenth", "gru"])
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("report")
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
