"""``results/final.md`` / ``final.png`` from ``results/final.csv`` (``final.py``, issue 9 item 4): per-dataset
means of every variant, paired deltas of base+C vs base (KD and DKD bases) pooled over (dataset, seed) with
95% t-intervals, Wilcoxon signed-rank tests, wins/ties/losses per dataset and pooled, and a bar plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import common
import harness
import numpy as np

METRICS = ["student_acc", "agreement", "ig_rho", "occ_rho"]
TESTED = ["agreement", "ig_rho", "occ_rho"]  # the metrics of the Wilcoxon tests, W/T/L and the plot
NAMES = {"student_acc": "student acc", "agreement": "agreement", "ig_rho": "IG-rho", "occ_rho": "occ-rho"}
VARIANTS = ["kd", "kd+C", "dkd", "dkd+C"]
BASES = ["kd", "dkd"]
SIZES = ["tiny", "tenth", "gru"]
TIE = 0.01  # |delta| below this counts as a tie (as in quality_tables.py)


def _block(r: dict) -> tuple[str, str, str, int]:
    return r["candidate"], r["student"], r["dataset"], int(r["seed"])


def blocks(rows: list[dict]) -> dict[tuple[str, str, str, int], dict[str, dict]]:
    """``{(candidate, student, dataset, seed): {variant: row}}``, each from its latest run only (the ``run``
    column and step count of its last row; rows of an earlier run are superseded, not pooled)."""
    return common.latest_runs(rows, _block, lambda r: r["variant"], lambda r: (r["run"], r["steps"]))


def deltas(by_block: dict) -> dict[tuple[str, str, str], list[tuple[str, dict[str, float]]]]:
    """``{(candidate, student, base): [(dataset, {metric: base+C minus base}), ...]}`` over the blocks where
    both ran."""
    out: dict = defaultdict(list)
    for (cand, size, dataset, _), runs in by_block.items():
        for base in BASES:
            a, b = runs.get(f"{base}+C"), runs.get(base)
            if a is not None and b is not None:
                out[(cand, size, base)].append((dataset, {m: float(a[m]) - float(b[m]) for m in METRICS}))
    return out


def _wtl(vals: list[float]) -> str:
    w, lo = sum(v >= TIE for v in vals), sum(v <= -TIE for v in vals)
    return f"{w}/{len(vals) - w - lo}/{lo}"


def means_lines(by_block: dict, cand: str, size: str, datasets: list[str]) -> list[str]:
    """Per dataset and variant: the means over seeds of the test-split measures."""
    out = []
    for d in datasets:
        for v in VARIANTS:
            rs = [runs[v] for k, runs in by_block.items() if k[:3] == (cand, size, d) and v in runs]
            if rs:
                mean = {m: float(np.mean([float(r[m]) for r in rs])) for m in ["teacher_acc", *METRICS]}
                out.append(
                    [d, f"`{v}`", len(rs), rs[0]["steps"], mean["teacher_acc"], *[mean[m] for m in METRICS]]
                )
    return harness.markdown_table(out, ["dataset", "variant", "seeds", "steps", "teacher acc", "student acc",
                                        "agreement", "IG-rho", "occ-rho"])  # fmt: skip


def pooled_lines(dd: dict, cand: str, size: str) -> list[str]:
    out = []
    for base in BASES:
        pairs = dd.get((cand, size, base), [])
        if pairs:
            cis = [common.format_ci(common.mean_ci([x[m] for _, x in pairs])) for m in METRICS]
            out.append([f"`{base}+C` − `{base}`", len(pairs), *cis])
    return harness.markdown_table(out, ["comparison", "pairs", *[f"d {NAMES[m]} [95% CI]" for m in METRICS]])


def wilcoxon_lines(dd: dict, cand: str, size: str) -> list[str]:
    """Two-sided Wilcoxon signed-rank tests of base+C vs base over all (dataset, seed) pairs."""
    from scipy.stats import wilcoxon

    out = []
    for base in BASES:
        for m in TESTED:
            vals = np.asarray([x[m] for _, x in dd.get((cand, size, base), [])])
            if not len(vals):
                continue
            nz = int(np.count_nonzero(vals))
            stat, p = "–", "–"
            if nz:
                res = wilcoxon(vals, zero_method="wilcox", alternative="two-sided")
                stat, p = f"{res.statistic:.1f}", f"{res.pvalue:.2g}"
            out.append(
                [f"`{base}+C` − `{base}`", NAMES[m], len(vals), nz, f"{np.median(vals):+.3f}", stat, p]
            )
    return harness.markdown_table(
        out, ["comparison", "metric", "n", "n != 0", "median delta", "statistic", "p"]
    )


def wtl_lines(dd: dict, cand: str, size: str, datasets: list[str]) -> list[str]:
    out = []
    for base in BASES:
        pairs = dd.get((cand, size, base), [])
        for d in [*datasets, "all"]:
            xs = [x for name, x in pairs if d in ("all", name)]
            if xs:
                label = "**all (pairs)**" if d == "all" else d
                out.append(
                    [f"`{base}+C` − `{base}`", label, len(xs), *[_wtl([x[m] for x in xs]) for m in TESTED]]
                )
    return harness.markdown_table(
        out, ["comparison", "dataset", "pairs", *[f"{NAMES[m]} W/T/L" for m in TESTED]]
    )


def section_lines(by_block: dict, dd: dict, cand: str, size: str, datasets: list[str]) -> list[str]:
    return [
        f"## Candidate `{cand}`, student `{size}`", "",
        "### Per dataset (means over seeds, test split)", "", *means_lines(by_block, cand, size, datasets), "",
        "### Paired deltas pooled over (dataset, seed), mean [95% t-interval]", "", *pooled_lines(dd, cand, size), "",
        "### Wilcoxon signed-rank tests (all dataset x seed pairs)", "", *wilcoxon_lines(dd, cand, size), "",
        "### Wins / ties / losses (per seed pair)", "", *wtl_lines(dd, cand, size, datasets), "",
    ]  # fmt: skip


def intro_lines(csv_path: Path, rows: list[dict], n_old: int, options: dict[str, str]) -> list[str]:
    env = harness.environment()
    cands = "; ".join(f"`{c}` = `{o}`" for c, o in options.items())
    return [
        "# Test-split tables for the chosen default (issue 9, item 4): X+C vs X, X in {KD, DKD}", "",
        f"Generated by `benchmarks/quality/final.py` from `{csv_path.name}` ({env['date']}, torch {env['torch']}, "
        f"{env['device']}, load {env['load']}). Rules: `benchmarks/quality/selection.md`.", "",
        "Teachers: the package InceptionTime at its default size, trained per (dataset, seed) on the whole train "
        f"split with the regime recipe (AdamW {common.TEACHER_LR:g}, weight decay {common.TEACHER_WD:g}, per-step "
        f"cosine, batch {common.BATCH_SIZE}, max({common.TEACHER_MIN_EPOCHS} epochs, {common.TEACHER_MIN_STEPS} steps)); "
        "every measure is on the test split. `JapaneseVowels-raw`: JapaneseVowels without z-normalisation, teachers "
        "and students alike (selection.md, amendment 8: its normalised teachers missed the credibility criterion by "
        "0.19); the selection ran it normalised, and IG's zero baseline and occlusion's zero fill are then a zero "
        "level, not the series mean.",
        "Pairing: per (dataset, seed, student) the four variants share the student's initialisation, batch order "
        "and step count: `kd` (tsd_weight 0), `kd+C`, `dkd` (`base_loss=\"dkd\"`, alpha 1, beta 8, tsd_weight 0), "
        "`dkd+C`. Deltas = X+C − X on the same (dataset, seed); 95% t-intervals over those pairs.",
        "Measures: top-1 agreement with the teacher, student accuracy; IG-rho: captum IG, 32 steps; occ-rho: captum "
        "Occlusion, windows of T/10; both Spearman over time vs the teacher's map (teacher's class), per series, "
        "averaged. On binary datasets DKD with alpha 1 equals KD (its NCKD term is empty).",
        f"Candidate options (C; `{{}}`: the distiller's own defaults): {cands}.", "",
        f"Win = delta >= {TIE}, tie = |delta| < {TIE}, loss = delta <= -{TIE} (W/T/L). Wilcoxon: "
        "`scipy.stats.wilcoxon`, two-sided, `zero_method='wilcox'` (zero differences dropped: *n != 0*); no "
        "correction for multiple tests.", "",
        f"{len(rows)} rows pooled; {n_old} rows superseded by a later run of their (candidate, dataset, seed, "
        "student) (another machine, teacher or step count; the `run` column), kept in the CSV and not pooled.", "",
        "![paired deltas](final.png)", "",
    ]  # fmt: skip


def _bars(ax, pairs: list, m: str, cols: list[str], offset: float, width: float, color) -> None:
    """One bar series: the mean delta of ``m`` per dataset and pooled, error bars = std over the pairs."""
    xs, ms, ss = [], [], []
    for j, d in enumerate(cols):
        vals = [x[m] for name, x in pairs if d in ("all", name)]
        if vals:
            xs.append(j + offset)
            ms.append(np.mean(vals))
            ss.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
    if xs:
        ax.bar(xs, ms, width, yerr=ss, capsize=2, color=color)


def plot(path: Path, dd: dict, datasets: list[str]) -> None:
    """Per student size a row of panels (d agreement, d IG-rho, d occ-rho): bars per dataset and pooled,
    one series per (candidate, base), error bars = std over seeds (over all pairs for "all")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sizes = [s for s in SIZES if any(k[1] == s for k in dd)]
    series = sorted({(c, b) for c, _, b in dd}, key=lambda cb: (cb[0], BASES.index(cb[1])))
    multi = len({c for c, _ in series}) > 1
    cols, width = [*datasets, "all"], 0.8 / len(series)
    colors = [plt.cm.tab10(i % 10) for i in range(len(series))]
    fig, axes = plt.subplots(len(sizes), 3, figsize=(15, 3.8 * len(sizes) + 0.6), squeeze=False)
    for row, size in zip(axes, sizes):
        for ax, m in zip(row, TESTED):
            for i, (cand, base) in enumerate(series):
                offset = (i - (len(series) - 1) / 2) * width
                _bars(ax, dd.get((cand, size, base), []), m, cols, offset, width, colors[i])
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"student {size}: Δ {NAMES[m]} (mean ± std over seeds)", fontsize=9)
    # one legend below the panels (inside, it hides bars)
    labels = [f"{b}+C − {b}" + (f" ({c})" if multi else "") for c, b in series]
    handles = [Patch(color=c) for c in colors]
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)))
    fig.tight_layout(rect=(0, 0.5 / (3.8 * len(sizes) + 0.6) * (1 + (len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(csv_path: Path) -> None:
    """``final.md`` and ``final.png`` next to ``csv_path``; nothing without rows."""
    rows = harness.read_rows(csv_path)
    if not rows:
        return
    by_block = blocks(rows)
    pooled = [r for runs in by_block.values() for r in runs.values()]
    datasets = list(dict.fromkeys(r["dataset"] for r in pooled))  # the order of the run
    options = {r["candidate"]: r["options"] for r in pooled if r["variant"] == "kd+C"}
    dd = deltas(by_block)
    lines = intro_lines(csv_path, pooled, len(rows) - len(pooled), options)
    for cand in dict.fromkeys(r["candidate"] for r in pooled):
        for size in [s for s in SIZES if any(k[:2] == (cand, s) for k in by_block)]:
            lines += section_lines(by_block, dd, cand, size, datasets)
    (csv_path.parent / "final.md").write_text("\n".join(lines) + "\n")
    if dd:
        plot(csv_path.parent / "final.png", dd, datasets)
