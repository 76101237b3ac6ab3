"""``results/screen.md`` from ``results/screen.csv``: paired deltas vs ``kd`` pooled over blocks with 95%
intervals, per dataset, and the screening decision of ``selection.md`` (2026-12-03)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import common
import harness

METRICS = ["agreement", "ig_rho", "occ_rho"]
SIZES = ["tiny", "tenth", "gru"]
SCREEN_DATASETS = 3
SCREEN_MIN_BLOCKS = SCREEN_DATASETS * common.CV_FOLDS  # repeat 0 complete on the three screen datasets


def blocks(rows: list[dict]) -> dict[tuple[str, str, str, str], dict[str, dict]]:
    """``{(dataset, split, student, steps): {candidate: row}}``, each block from its latest run only (the
    ``run`` column: machine and teacher; rows of an earlier run of the block are superseded, not pooled)."""
    return common.latest_runs(rows, lambda r: (r["dataset"], r["split"], r["student"], r["steps"]),
                              lambda r: r["candidate"], lambda r: r.get("run", ""))  # fmt: skip


def paired_deltas(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[tuple[str, float]]]]:
    """``{(size, candidate): {metric: [(dataset, delta), ...]}}`` over blocks where both it and kd ran."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for (dataset, _, size, _), runs in blocks(rows).items():
        kd = runs.get("kd")
        for cand, r in runs.items():
            if kd is None or cand == "kd":
                continue
            for m in METRICS:
                out[(size, cand)][m].append((dataset, float(r[m]) - float(kd[m])))
    return out


def stats(deltas: dict[str, list[tuple[str, float]]]) -> dict:
    s = {"n": len(deltas["agreement"])}
    for m in METRICS:
        s[m] = common.mean_ci([d for _, d in deltas[m]])
    return s


def failed_conditions(s: dict) -> list[str]:
    """The selection rule's four conditions that a candidate misses, each with its number."""
    agr, lo, _ = s["agreement"]
    checks = [(agr >= 0, f"d agreement >= 0 ({agr:+.3f})"),
              (lo >= -0.01, f"its interval's lower end >= -0.01 ({lo:+.3f})"),
              (s["ig_rho"][0] >= 0.05, f"d IG-rho >= +0.05 ({s['ig_rho'][0]:+.3f})"),
              (s["occ_rho"][0] >= 0.05, f"d occ-rho >= +0.05 ({s['occ_rho'][0]:+.3f})")]  # fmt: skip
    return [text for ok, text in checks if not ok]


def final_conditions(s: dict) -> int:
    """How many of the selection rule's four conditions a candidate meets."""
    return 4 - len(failed_conditions(s))


def screen_pass(s: dict) -> bool:
    agr, _, hi = s["agreement"]
    return agr >= -0.02 and hi >= 0 and s["ig_rho"][0] >= 0.025 and s["occ_rho"][0] >= 0.025


def carried(table: dict[str, dict]) -> list[str]:
    """The screening rule: passers (at most 5, by the lower end of d agreement), filled up to 3."""

    def lower(c: str) -> float:
        lo = table[c]["agreement"][1]
        return lo if lo == lo else -math.inf

    passed = sorted((c for c, s in table.items() if screen_pass(s)), key=lower, reverse=True)[:5]
    rest = sorted((c for c in table if c not in passed),
                  key=lambda c: (final_conditions(table[c]), lower(c)), reverse=True)  # fmt: skip
    return passed + rest[: max(0, 3 - len(passed))]


def decisions(deltas: dict, candidates: list[str], cut: list[str]) -> dict[str, tuple[dict, int, list[str]]]:
    """Per student size: ``(stats per candidate, the fewest blocks of a screened candidate, carried)``;
    nothing is carried until every screened candidate has the blocks the decision needs."""
    out = {}
    for size in SIZES:
        table = {c: stats(deltas[(size, c)]) for c in candidates if (size, c) in deltas}
        if not table:
            continue
        live = {c: s for c, s in table.items() if c not in cut}
        n_min = min((s["n"] for s in live.values()), default=0)
        out[size] = (table, n_min, carried(live) if n_min >= SCREEN_MIN_BLOCKS else [])
    return out


def relative_costs(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Amendment 6: each row's CPU time per step as a multiple of ``kd``'s in the same block (same machine,
    teacher and student), averaged per (size, candidate); what the rule ranks by, since the ``ig1s_*`` rows
    come from one machine and the others from two of different speed."""
    acc: dict = {}
    for (_, _, size, _), block in blocks(rows).items():
        if "kd" not in block:
            continue
        kd_ms = float(block["kd"]["cpu_ms_per_step"])
        for cand, r in block.items():
            acc.setdefault((size, cand), []).append(float(r["cpu_ms_per_step"]) / kd_ms)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def pooled_lines(deltas: dict, candidates: list[str], rows: list[dict], cut: list[str]) -> list[str]:
    cost = defaultdict(list)
    for r in rows:
        cost[(r["student"], r["candidate"])].append(float(r["cpu_ms_per_step"]))
    relative = relative_costs(rows)  # the rows come from machines of different speed (AMD, Intel)
    lines = []
    for size, (table, n_min, keep) in decisions(deltas, candidates, cut).items():
        complete = n_min >= SCREEN_MIN_BLOCKS
        out = []
        for c, s in table.items():
            ms = cost[(size, c)]
            decision = "cut (amendment 2)" if c in cut else "**carried**" if c in keep else ""
            out.append([f"`{c}`", s["n"], common.format_ci(s["agreement"]), common.format_ci(s["ig_rho"]), common.format_ci(s["occ_rho"]),
                        f"{final_conditions(s)}/4", "yes" if screen_pass(s) else "no",
                        sum(ms) / len(ms), relative.get((size, c), float("nan")), decision])  # fmt: skip
        kd_ms = cost[(size, "kd")]
        lines += [f"### Student `{size}`", "",
                  f"KD's CPU time per step: {sum(kd_ms) / max(1, len(kd_ms)):.1f} ms (screen rows; not the speed benchmark).", "",
                  *harness.markdown_table(out, ["candidate", "blocks", "d agreement [95% CI]", "d IG-rho [95% CI]",
                                                "d occ-rho [95% CI]", "final rule: conditions met",
                                                "passes the screen", "CPU ms/step", "x KD (same block)", "decision"], digits=1),
                  "", (f"Screen complete ({n_min} blocks each): carried: {', '.join(keep) or 'none'}." if complete else
                       f"**Partial**: {n_min} of the {SCREEN_MIN_BLOCKS} blocks the screening decision needs; nothing is "
                       "carried yet."), ""]  # fmt: skip
    return lines


def cheap_comparison(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Issue 10: each cheap variant minus its IG-8 counterpart, paired over the blocks where both ran, per
    student size: ``{"size", "cheap", "full", "n", "diffs": {metric: (mean, se)}, "passes"}``; a metric
    passes when the mean difference is >= -1 standard error of that mean (amendment 2), and ``passes`` needs
    all three (and at least two blocks)."""
    by_block = blocks(rows)
    out = []
    for size in SIZES:
        for cheap, full in pairs:
            diffs = {m: [float(v[cheap][m]) - float(v[full][m]) for k, v in by_block.items()
                         if k[2] == size and cheap in v and full in v] for m in METRICS}  # fmt: skip
            n = len(diffs["agreement"])
            if n == 0:
                continue
            stat = {}
            for m in METRICS:
                mean = sum(diffs[m]) / n
                se = math.sqrt(sum((d - mean) ** 2 for d in diffs[m]) / (n - 1) / n) if n > 1 else math.nan
                stat[m] = (mean, se)
            passes = n > 1 and all(mean >= -se for mean, se in stat.values())
            out.append(dict(size=size, cheap=cheap, full=full, n=n, diffs=stat, passes=passes))
    return out


def cheap_gate(csv_path: Path, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """``{(size, cheap variant): passes issue 10's comparison}`` on the screen's pooled rows (amendment 4:
    only a passing cheap variant is eligible for the default)."""
    rows, _, _ = pooled_rows(csv_path)
    return {(c["size"], c["cheap"]): c["passes"] for c in cheap_comparison(rows, pairs)}


def cheap_lines(rows: list[dict], pairs: list[tuple[str, str]]) -> list[str]:
    return comparison_lines(cheap_comparison(rows, pairs))


def comparison_lines(comparison: list[dict]) -> list[str]:
    """The Markdown table of ``cheap_comparison``'s result."""
    out = []
    for c in comparison:
        cells = [
            f"{mean:+.3f} (se {se:.3f})" if c["n"] > 1 else f"{mean:+.3f}" for mean, se in c["diffs"].values()
        ]
        verdict = "within 1 se or better" if c["passes"] else "not within 1 se" if c["n"] > 1 else "one block"
        out.append([c["size"], f"`{c['cheap']}` - `{c['full']}`", c["n"], *cells, verdict])
    return harness.markdown_table(out, ["student", "pair", "blocks", "diff agreement", "diff IG-rho",
                                        "diff occ-rho", "issue 10 (a gate on the default: amendments 4-5)"])  # fmt: skip


def per_dataset_lines(deltas: dict, candidates: list[str]) -> list[str]:
    out = []
    for size in SIZES:
        for c in candidates:
            d = deltas.get((size, c))
            if not d:
                continue
            for name in sorted({n for n, _ in d["agreement"]}):
                vals = {m: [v for n, v in d[m] if n == name] for m in METRICS}
                out.append([size, name, f"`{c}`", len(vals["agreement"]),
                            *[f"{sum(v) / len(v):+.3f}" for v in vals.values()]])  # fmt: skip
    return harness.markdown_table(out, ["student", "dataset", "candidate", "blocks", "d agreement", "d IG-rho",
                                        "d occ-rho"])  # fmt: skip


def kd_lines(rows: list[dict]) -> list[str]:
    by = defaultdict(list)
    for r in rows:
        if r["candidate"] == "kd":
            by[(r["student"], r["dataset"], r["steps"], r["student_params"], r["teacher_params"])].append(r)
    out = [
        [*k, len(v), *[sum(float(r[m]) for r in v) / len(v) for m in METRICS]] for k, v in sorted(by.items())
    ]
    return harness.markdown_table(out, ["student", "dataset", "steps", "student params", "teacher params",
                                        "blocks", "KD agreement", "KD IG-rho", "KD occ-rho"])  # fmt: skip


def steps_lines(results: Path) -> list[str]:
    """The frozen student step counts beside what the rule gives on all KD curves now."""
    import json

    import regime

    frozen_path = results / "screen_steps.json"
    frozen = json.loads(frozen_path.read_text()) if frozen_path.exists() else {}
    now = regime.chosen_steps()
    line = f"Student steps (frozen at the screen's start, `{frozen_path.name}`): {frozen or 'none'}; the rule on all KD "
    line += f"curves in `regime_curves.csv` now: {now}."
    if frozen and any(now.get(k) not in (None, v) for k, v in frozen.items()):
        line += " **They differ: per the 2026-12-03 amendment, restart the screen at the new count.**"
    elif frozen:
        line += (
            " On 2026-12-03 (session 4) the ArrowHead curves completed the three screen datasets and the rule"
            " moved both counts from 1750 / 1250 to 3000; the screen restarted at 3000, per the amendment."
        )
    return [line, ""]


def pooled_rows(csv_path: Path) -> tuple[list[dict], int, int]:
    """The rows the screen pools (at the frozen step count, each block's latest run), and how many rows
    were left out for an earlier step count and for an earlier run of their block."""
    import json

    rows = harness.read_rows(csv_path)
    steps_file = csv_path.parent / "screen_steps.json"
    frozen = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    current = [r for r in rows if str(frozen.get(r["student"], r["steps"])) == r["steps"]]
    pooled = [r for block in blocks(current).values() for r in block.values()]  # the latest run of each block
    return pooled, len(rows) - len(current), len(current) - len(pooled)


def carried_by_size(csv_path: Path, candidates: list[str], cut: list[str]) -> dict[str, list[str]]:
    """The screening decision: the candidates carried per student size (empty while it is partial)."""
    rows, _, _ = pooled_rows(csv_path)
    deltas = paired_deltas(rows)
    return {
        size: keep
        for size, (_, _, keep) in decisions(deltas, [c for c in candidates if c != "kd"], cut).items()
    }


def write(
    csv_path: Path, candidates: list[str], cut: list[str] = (), pairs: list[tuple[str, str]] = ()
) -> None:
    rows, n_steps, n_old = pooled_rows(csv_path)
    if not rows:
        return
    deltas = paired_deltas(rows)
    env = harness.environment()
    lines = [
        "# Screen of TSD candidates vs KD (issue 9), 3-fold CV of the train splits",
        "",
        f"Generated by `benchmarks/quality/screen.py` from `{csv_path.name}` ({env['date']}, torch {env['torch']}, "
        f"{env['device']}). Rules (written before the run): `benchmarks/quality/selection.md`, 2026-12-03.",
        "",
        "Block = (dataset, CV repeat, fold); the teacher (package InceptionTime, default size) is trained on the "
        "other two folds; every candidate is paired with `kd` in its block (same initialisation, batch order and "
        "step count). Deltas = candidate - kd on the held-out fold, pooled over blocks; 95% t-intervals over "
        "blocks (blocks of one repeat share series, so they are somewhat too narrow). IG-rho: captum IG, 32 "
        "steps; occ-rho: captum Occlusion, windows of T/10; both Spearman over time vs the teacher's map.",
        "",
        *steps_lines(csv_path.parent),
        f"Rows kept in the CSV and not pooled: {n_steps} at an earlier step count (the screen restarted at the "
        f"count above), {n_old} superseded by a later run of their block (another machine or teacher; the `run` "
        "column).",
        "",
        "## Pooled paired deltas vs kd",
        "",
        *pooled_lines(deltas, [c for c in candidates if c != "kd"], rows, list(cut)),
        "## Cheap estimator vs IG-8 (issue 10)",
        "",
        "Each cheap variant minus its IG-8 counterpart on the same blocks (mean, standard error of the mean).",
        "",
        *cheap_lines(rows, list(pairs)),
        "",
        "## KD itself",
        "",
        *kd_lines(rows),
        "",
        "## Per dataset (mean paired delta over blocks)",
        "",
        *per_dataset_lines(deltas, [c for c in candidates if c != "kd"]),
    ]
    (csv_path.parent / "screen.md").write_text("\n".join(lines) + "\n")
