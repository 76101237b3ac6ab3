"""The full selection of issue 9 (rules: ``benchmarks/quality/selection.md``, 2026-12-03, amendments 2-3):
``kd`` and the candidates the screen carried, per student size, on five CV blocks per dataset (repeat 0
folds 0-2, repeat 1 folds 0-1) of the six regime datasets, with the screen's protocol and step counts.

The screen's rows of those blocks (repeat 0 of its three datasets) are reused; the other rows go to
``results/fullsel.csv`` (resumable; several processes share the work: rows and teachers are claimed).
Candidates with the cheap estimator (``ig1u_*``) run first; the IG-8 carried candidates only with ``--ig8``,
which amendment 3 calls for only when no single cheap candidate qualifies for both sizes (the report says
whether it does), or at once for a size where no carried cheap candidate passes issue 10's comparison
(amendment 4: only a passing one is eligible for the default). ``report`` writes ``results/fullsel.md`` with the selection rule's outcome.

Usage::

    python benchmarks/quality/fullsel.py run [--datasets ...] [--ig8]
    python benchmarks/quality/fullsel.py teachers   # the blocks' teachers only (no decision needed)
    python benchmarks/quality/fullsel.py report
    python benchmarks/quality/fullsel.py run --smoke /tmp/fs --steps 20 --datasets GunPoint \
        --candidates ig1u_project_w0.5   # smoke test
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


def is_cheap(candidate: str) -> bool:
    return candidate.startswith("ig1u_")


def eligible() -> dict[tuple[str, str], bool]:
    """Amendment 4: ``(size, cheap candidate)`` -> whether it passes issue 10's comparison on the screen."""
    return screen_report.cheap_gate(screen.csv_path(), screen.CHEAP_PAIRS)


def todo(ig8: bool) -> dict[str, list[str]]:
    """Per student size: ``kd`` and the carried candidates to run. The IG-8 ones only with ``ig8``
    (amendment 3), or at once for a size where no carried cheap candidate is eligible (amendment 4)."""
    gate = eligible()
    plan = {}
    for size, keep in carried().items():
        if not keep:
            continue
        now = ig8 or not any(is_cheap(c) and gate.get((size, c), False) for c in keep)
        plan[size] = ["kd"] + [c for c in keep if is_cheap(c)] + [c for c in keep if now and not is_cheap(c)]
    return plan


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
    plan = {size: ["kd"] + args.candidates for size in args.students} if args.candidates else todo(args.ig8)
    if not plan:
        raise SystemExit(
            "the screen has not carried anything yet (results/screen.md): nothing to select among"
        )
    print(f"full selection: {plan}", flush=True)
    for _ in range(2):  # a second pass picks up blocks whose teacher another process was training
        for name in args.datasets:
            for repeat, fold in BLOCKS:
                split = common.Split("cv", repeat, fold)
                done = harness.done_keys(screen.csv_path(), screen.KEY) | harness.done_keys(
                    csv_path(), screen.KEY
                )
                if complete(name, split, plan, args.steps, done):
                    continue  # e.g. the screen's blocks: their teachers need not be re-trained here
                if not regime.record_teacher(name, split, refill=True):
                    print(f"{name} {split.key}: teacher being trained by another process; later", flush=True)
                    continue
                screen.run_block(name, split, plan, args.steps, done, csv_path())
                fullsel_report.write(selection_rows(), carried(), eligible(), fullsel_report_path())


def fullsel_report_path() -> Path:
    return common.RESULTS / "fullsel.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "teachers", "report"])
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--ig8", action="store_true", help="also the IG-8 carried candidates (amendment 3)")
    p.add_argument(
        "--steps", type=int, default=None, help="student steps (default: the screen's frozen counts)"
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=None,
        choices=list(screen.CANDIDATES),
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
    fullsel_report.write(selection_rows(), carried(), eligible(), fullsel_report_path())


if __name__ == "__main__":
    main()
