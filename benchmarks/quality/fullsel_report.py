"""``results/fullsel.md``: the full selection of issue 9 (``selection.md``, 2026-12-03, selection rule and
amendments 2-5): paired deltas vs ``kd`` pooled over the selection's blocks, the rule's four conditions, and
the default it picks once every run candidate has all its blocks."""

from __future__ import annotations

import math
from pathlib import Path

import common
import harness
import screen_report

N_BLOCKS = 30  # 6 datasets x 5 blocks (amendment 2)
N_OFF_SCREEN = 21  # the blocks outside the screen, where the ig1s_* candidates run (amendment 5)


def needed(candidate: str) -> int:
    """How many blocks a candidate pools when complete (amendment 5: ``ig1s_*`` only off the screen)."""
    return N_OFF_SCREEN if candidate.startswith("ig1s_") else N_BLOCKS


def is_cheap(candidate: str) -> bool:
    """A candidate with the 1-sample estimator: on both maps (``ig1u_*``) or the student's only (``ig1s_*``)."""
    return candidate.startswith(("ig1u_", "ig1s_"))


def qualifies(s: dict) -> bool:
    """The selection rule: d agreement >= 0 with the interval's lower end >= -0.01, d occ-rho and d IG-rho
    both >= +0.05."""
    return screen_report.final_conditions(s) == 4


def costs(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Mean process CPU ms per student step of each (size, candidate) over the selection's rows (the
    rule's stand-in where the speed benchmark has not measured a candidate; it measures estimators, not the
    projected or balanced updates). Rows of several machines mix here: see ``relative_costs``."""
    acc: dict = {}
    for r in rows:
        acc.setdefault((r["student"], r["candidate"]), []).append(float(r["cpu_ms_per_step"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def ratios(rows: list[dict]) -> dict[str, float]:
    """Mean student/teacher parameter ratio of each student size over the selection's rows."""
    acc: dict = {}
    for r in rows:
        acc.setdefault(r["student"], []).append(float(r["student_params"]) / float(r["teacher_params"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def decide(tables: dict[str, dict[str, dict]], cost: dict, ratio: dict[str, float]) -> list[str]:
    """The selection rule's outcome as lines (``tables``: per size, the complete candidates' stats)."""
    qual = {size: [c for c, s in t.items() if qualifies(s)] for size, t in tables.items()}
    both = set.intersection(*(set(q) for q in qual.values())) if len(qual) > 1 else set()

    def total(c: str) -> float:
        return sum(cost.get((size, c), float("inf")) for size in tables)

    if both:
        best = min(both, key=total)
        return [f"**Default: `{best}`**, the cheapest candidate qualifying for both student sizes "
                f"({', '.join(f'`{c}`' for c in sorted(both, key=total))} qualify for both)."]  # fmt: skip
    lines, picks = [], {}
    for size, t in tables.items():
        if qual[size]:
            picks[size] = min(qual[size], key=lambda c, size=size: cost.get((size, c), float("inf")))
            lines.append(f"- `{size}`: `{picks[size]}`, the cheapest of the qualifying {qual[size]}.")
        else:
            picks[size] = max(
                t, key=lambda c, t=t: (screen_report.final_conditions(t[c]), t[c]["agreement"][1])
            )
            s = t[picks[size]]
            lines.append(f"- `{size}`: nothing qualifies; the best candidate is `{picks[size]}` "
                         f"({screen_report.final_conditions(s)}/4 conditions; it fails "
                         f"{'; '.join(screen_report.failed_conditions(s))}).")  # fmt: skip
    if len(set(picks.values())) == 1:
        lines += ["", f"**Default: `{next(iter(picks.values()))}`**, the pick for every student size."]
    else:
        switch = math.sqrt(math.prod(ratio[size] for size in tables))
        lines += ["", "**Default: depends on the student/teacher parameter ratio**, each size's pick, switching at "
                  f"{switch:.4f} (geometric mean of {', '.join(f'{k} {v:.4f}' for k, v in ratio.items() if k in tables)})."]  # fmt: skip
    head = (
        "No single candidate qualifies for both sizes"
        if any(qual.values())
        else "Nothing qualifies for any size"
    )
    return [f"{head}: per size (where nothing qualifies, the README says which condition failed, with the numbers):",
            "", *lines]  # fmt: skip


def write(
    rows: list[dict],
    carried: dict[str, list[str]],
    plan: dict[str, list[str]],
    gate: dict[tuple[str, str], bool],
    comparison: list[dict],
    out: Path,
) -> None:
    """``out`` from the selection's ``rows``, the screen's decision, the selection's ``plan`` (``fullsel.todo``:
    what the rule chooses among), the eligibility ``gate`` of the cheap candidates and amendment 5's
    ``comparison`` (``screen_report.cheap_comparison`` off the screen)."""
    deltas = screen_report.paired_deltas(rows)
    cost, relative = costs(rows), screen_report.relative_costs(rows)
    env = harness.environment()
    lines = [
        "# Full selection of the TSD default (issue 9), CV of the train splits",
        "",
        f"Generated by `benchmarks/quality/fullsel.py` ({env['date']}, torch {env['torch']}, {env['device']}). "
        "Rules, written before the run: `benchmarks/quality/selection.md` (selection rule; amendments 2-5).",
        "",
        f"Blocks: CV repeat 0 folds 0-2 and repeat 1 folds 0-1 of six datasets ({N_BLOCKS} per candidate); the "
        "screen's rows of repeat 0 on its three datasets are reused (the carried candidates were chosen on "
        "those 9 blocks, which favours them). Paired deltas vs `kd` as in `screen.md`; 95% t-intervals over "
        "blocks. Cost: process CPU ms per student step, mean over the rows (the rule's stand-in: the speed "
        "benchmark measures estimators, not the update rules), and the rule ranks by the same time as a "
        "multiple of `kd`'s in the same block (amendment 6: the rows come from machines of different speed). "
        "The IG-8 carried candidates run on every "
        "block (amendments 4-5). A cheap candidate is eligible for the default only if it passes issue 10's "
        "comparison with its IG-8 counterpart: `ig1u_*` (1-sample IG for the student, 1-step IG for the "
        "teacher's map) on the screen's blocks (`screen.md`; amendment 4), `ig1s_*` (1-sample IG for the "
        f"student only, the teacher's map IG-8) on the {N_OFF_SCREEN} blocks outside the screen, the only "
        "blocks where `ig1s_*` runs (amendment 5; table below). An ineligible one is reported, not chosen.",
        "",
        f"Carried by the screen: {carried or 'nothing yet (the screen is partial)'}.",
        "",
    ]
    complete: dict[str, dict] = {}
    pending = False
    for size in screen_report.SIZES:
        names = [c for c in carried.get(size, [])] + sorted(
            {c for s, c in deltas if s == size} - set(carried.get(size, []))
        )
        if not names:
            continue
        body = []
        complete[size] = {}
        # What the rule chooses among: the plan's candidates (the carried ones and their ig1s_* counterparts,
        # amendment 5); the screen rows of the others (on its 9 blocks only) are shown for reading.
        chosen = set(plan.get(size, [])) - {"kd"}
        for c in names:
            if (size, c) not in deltas:
                body.append([f"`{c}`", 0, "", "", "", "", "", "", "", "not run yet"])
                continue
            s = screen_report.stats(deltas[(size, c)])
            datasets = len({d for d, _ in deltas[(size, c)]["agreement"]})
            done = s["n"] >= needed(c) or c not in chosen
            ok = not is_cheap(c) or gate.get((size, c), False)  # amendments 4-5
            decided = ok or not c.startswith("ig1s_") or done  # an ig1s_* gate waits for every block
            if c in chosen and (not decided or ok):
                complete[size][c] = s if done and ok else None
                pending |= not done
            body.append([f"`{c}`", f"{s['n']} ({datasets} datasets)", common.format_ci(s["agreement"]),
                         common.format_ci(s["ig_rho"]), common.format_ci(s["occ_rho"]),
                         f"{screen_report.final_conditions(s)}/4", "yes" if qualifies(s) else "no",
                         cost.get((size, c), float("nan")), relative.get((size, c), float("nan")),
                         "; ".join(x for x in ("" if c in chosen else "not carried (screen blocks only)", "" if done else "partial",
                                               "" if ok or not decided else "not eligible (issue 10)") if x)])  # fmt: skip
        lines += [f"## Student `{size}`", "", f"KD: {cost.get((size, 'kd'), float('nan')):.1f} CPU ms per step.", "",
                  *harness.markdown_table(body, ["candidate", "blocks", "d agreement [95% CI]", "d IG-rho [95% CI]",
                                                 "d occ-rho [95% CI]", "conditions met", "qualifies",
                                                 "CPU ms/step", "x KD (same block)", "status"], digits=1), ""]  # fmt: skip
    lines += ["## Decision", ""]
    ready = {size: {c: s for c, s in t.items() if s is not None} for size, t in complete.items()}
    if pending or not ready or not all(ready.values()):
        lines.append(
            f"**Partial**: not every run candidate has its blocks ({N_BLOCKS}; `ig1s_*` {N_OFF_SCREEN}); no "
            "default is chosen yet."
        )
    else:
        lines += decide(ready, relative, ratios(rows))
    lines += ["", f"## Student-side cheap estimator vs IG-8 (issue 10, amendment 5; {N_OFF_SCREEN} blocks outside the screen)", "",
              "Each `ig1s_X` minus `X` on the same blocks (mean, standard error of the mean); the gate is decided "
              f"once the pair has all {N_OFF_SCREEN} blocks. The `ig1u_X` rows are for reading only (their gate "
              "is the screen's, amendment 4): the same comparison for the candidates cheap on both maps.", "",
              *(screen_report.comparison_lines(comparison) if comparison else ["Not run yet."])]  # fmt: skip
    lines += ["", "## Per dataset (mean paired delta over blocks)", "",
              *screen_report.per_dataset_lines(deltas, sorted({c for _, c in deltas})), "",
              "## KD itself", "", *screen_report.kd_lines(rows)]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
