"""The full selection of issue 9 (rules: ``benchmarks/quality/selection.md``, 2026-12-03, amendments 2-5):
``kd`` and the candidates the screen carried, per student size, on five CV blocks per dataset (repeat 0
folds 0-2, repeat 1 folds 0-1) of the six regime datasets, with the screen's protocol and step counts.

The screen's rows of those blocks (repeat 0 of its three datasets) are reused; the other rows go to
``results/fullsel.csv`` (resumable; several processes share the work: rows and teachers are claimed).
Per size and block: ``kd``, the carried candidates with the cheap estimator on both maps (``ig1u_*``), the
carried IG-8 ones (amendments 4-5: on every block), and on the 21 blocks outside the screen the
student-side-cheap counterparts of the IG-8 ones (``ig1s_*``: student 1-sample IG, teacher IG-8; amendment 5).
A cheap candidate is eligible for the default only where it passes issue 10's comparison with its IG-8
counterpart (``ig1u_*`` on the screen's blocks, ``ig1s_*`` on the full selection's own). ``report`` writes
``results/fullsel.md`` with the selection rule's outcome.

Usage::

    python benchmarks/quality/fullsel.py run [--datasets ...]
    python benchmarks/quality/fullsel.py teachers   # the blocks' teachers only (no decision needed)
    python benchmarks/quality/fullsel.py report
    python benchmarks/quality/fullsel.py run --smoke /tmp/fs --steps 20 --datasets GunPoint \
        --candidates ig1s_project_w0.5   # smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import fullsel_report
import harness
import regime
import screen
import screen_report

# From the cheapest teacher to the dearest (amendment 3).
DATASETS = ["ItalyPowerDemand", "GunPoint", "ArrowHead", "BasicMotions", "JapaneseVowels", "OSULeaf"]
BLOCKS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # (repeat, fold): amendment 2


def csv_path() -> Path:
    return common.RESULTS / "fullsel.csv"


def carried() -> dict[str, list[str]]:
    """The screening decision per student size (empty lists while the screen is partial)."""
    return screen_report.carried_by_size(screen.csv_path(), list(screen.CANDIDATES), screen.CUT)


def student_side(candidate: str) -> str:
    """Amendment 5: the student-side-cheap counterpart ``ig1s_X`` of an IG-8 candidate ``X``."""
    return f"ig1s_{candidate}"


def on_screen(name: str, repeat: int | str) -> bool:
    """Whether a block of dataset ``name`` and CV repeat ``repeat`` is one of the screen's (repeat 0 of its
    three datasets)."""
    return name in screen.DATASETS and int(repeat) == 0


def student_side_pairs(plan: dict[str, list[str]]) -> list[tuple[str, str]]:
    """``(ig1s_X, X)`` for every IG-8 candidate ``X`` of the plan (issue 10's pairs of amendment 5)."""
    return sorted({(c, c[len("ig1s_") :]) for cands in plan.values() for c in cands if c.startswith("ig1s_")})


def off_screen_comparison(rows: list[dict], plan: dict[str, list[str]]) -> list[dict]:
    """Issue 10's comparison of each ``ig1s_X`` with ``X`` over the selection ``rows`` outside the screen
    (amendment 5), as ``screen_report.cheap_comparison`` gives it; beside them, for reading only, the
    screen's ``ig1u_X`` pairs on the same blocks (their gate stays the screen's, amendment 4)."""
    off = [r for r in rows if not on_screen(r["dataset"], r["repeat"])]
    return screen_report.cheap_comparison(off, student_side_pairs(plan) + screen.CHEAP_PAIRS)


def eligible(comparison: list[dict]) -> dict[tuple[str, str], bool]:
    """``(size, cheap candidate)`` -> whether it passes issue 10's comparison: ``ig1u_*`` on the screen's
    blocks (amendment 4), ``ig1s_*`` in ``comparison`` once the pair has all the blocks outside the screen
    (amendment 5; until then not eligible)."""
    gate = screen_report.cheap_gate(screen.csv_path(), screen.CHEAP_PAIRS)
    for c in comparison:
        if c["cheap"].startswith("ig1s_"):
            gate[(c["size"], c["cheap"])] = c["passes"] and c["n"] >= fullsel_report.N_OFF_SCREEN
    return gate


def todo(kept: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Per student size: ``kd``, the carried cheap candidates (``kept``, default ``carried()``), the carried
    IG-8 ones and their student-side counterparts (amendment 5; only on blocks outside the screen, see
    ``block_plan``)."""
    plan = {}
    for size, keep in (carried() if kept is None else kept).items():
        if not keep:
            continue
        ig8 = [c for c in keep if not fullsel_report.is_cheap(c)]
        sides = [student_side(c) for c in ig8 if student_side(c) in screen.STUDENT_SIDE]
        plan[size] = ["kd"] + [c for c in keep if fullsel_report.is_cheap(c)] + ig8 + sides
    return plan


def block_plan(plan: dict[str, list[str]], name: str, split: common.Split) -> dict[str, list[str]]:
    """``plan`` for one block: the ``ig1s_*`` candidates only outside the screen's blocks (amendment 5)."""
    if not on_screen(name, split.seed):
        return plan
    return {size: [c for c in cands if not c.startswith("ig1s_")] for size, cands in plan.items()}


def selection_rows() -> list[dict]:
    """The rows the selection pools: the screen's rows of the selection's blocks, then ``fullsel.csv``'s
    (at the frozen step counts; each block's latest run)."""
    keys = {common.Split("cv", r, f).key for r, f in BLOCKS}
    pooled, _, _ = screen_report.pooled_rows(screen.csv_path())
    ours = harness.read_rows(csv_path())
    rows = [r for r in pooled if r["split"] in keys] + [r for r in ours if r["split"] in keys]
    return [r for block in screen_report.blocks(rows).values() for r in block.values()]


def cmd_teachers(args) -> None:
    """Only the teachers of the selection's blocks (they need no screening decision; processes share them)."""
    for name in args.datasets:
        for repeat, fold in BLOCKS:
            regime.record_teacher(name, common.Split("cv", repeat, fold), refill=True)


def complete(
    name: str, split: common.Split, plan: dict[str, list[str]], steps: int | None, done: set
) -> bool:
    """Whether one run (one teacher) of ``(name, split)`` already has every row of ``plan`` among ``done``
    (keys of ``screen.KEY``); checked before the block's teacher is loaded or re-trained."""
    want = {(s, c, str(screen.steps_for(s, steps))) for s, cands in plan.items() for c in cands}
    by_run: dict[str, set] = {}
    for dataset, key, student, candidate, n_steps, run in done:
        if (dataset, key) == (name, split.key):
            by_run.setdefault(run, set()).add((student, candidate, n_steps))
    return any(want <= have for have in by_run.values())


def cmd_run(args) -> None:
    plan = {size: ["kd"] + args.candidates for size in args.students} if args.candidates else todo()
    if not plan:
        raise SystemExit(
            "the screen has not carried anything yet (results/screen.md): nothing to select among"
        )
    print(f"full selection: {plan}", flush=True)
    for _ in range(2):  # a second pass picks up blocks whose teacher another process was training
        for name in args.datasets:
            for repeat, fold in BLOCKS:
                split = common.Split("cv", repeat, fold)
                here = block_plan(plan, name, split)
                done = harness.done_keys(screen.csv_path(), screen.KEY) | harness.done_keys(
                    csv_path(), screen.KEY
                )
                if complete(name, split, here, args.steps, done):
                    continue  # e.g. the screen's blocks: their teachers need not be re-trained here
                if not regime.record_teacher(name, split, refill=True):
                    print(f"{name} {split.key}: teacher being trained by another process; later", flush=True)
                    continue
                screen.run_block(name, split, here, args.steps, done, csv_path())
                write_report()


def write_report() -> None:
    kept, rows = carried(), selection_rows()
    plan = todo(kept)
    comparison = off_screen_comparison(rows, plan)
    fullsel_report.write(rows, kept, plan, eligible(comparison), comparison, common.RESULTS / "fullsel.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "teachers", "report"])
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument(
        "--steps", type=int, default=None, help="student steps (default: the screen's frozen counts)"
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        choices=list(screen.ALL),
        help="run these instead of the screen's decision (smoke tests; the report still follows it)",
    )
    p.add_argument("--students", nargs="+", default=["tiny", "tenth"], help="with --candidates")
    common.add_run_options(p)
    args = p.parse_args()
    common.apply_run_options(args)
    if args.command == "run":
        cmd_run(args)
    if args.command == "teachers":
        cmd_teachers(args)
    write_report()


if __name__ == "__main__":
    main()
