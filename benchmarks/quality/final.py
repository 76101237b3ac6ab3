"""The test-split tables of issue 9, item 4: the chosen TSD candidate on top of KD and of DKD, both student
sizes, paired, measured on the test split: student accuracy, agreement, IG-rho and occlusion-rho.

Per (dataset, seed) the teacher is trained on the whole train split (``common.Split("full", seed)``, the
regime recipe), recorded in ``results/regime_teachers.csv`` and cached (``regime.record_teacher``; a teacher
another process is training is skipped for now, so ``regime.py teachers`` can run beside this). Per student
size, one initialisation and one batch order are shared by four variants: ``kd`` (tsd_weight 0), ``kd+C``
(the candidate's options), ``dkd`` (``base_loss="dkd"``, tsd_weight 0) and ``dkd+C`` (the candidate's options
with ``base_loss="dkd"``). The candidate is a key of ``screen.ALL`` or ``package-default`` (the distiller's own defaults). On
two-class datasets DKD equals KD (the non-target distribution has one class), so only ``kd`` and ``kd+C`` run.

One CSV row per (dataset, seed, student, variant) in ``results/final.csv``; rows already there are skipped,
and several processes can share the work (claims). JapaneseVowels runs without z-normalisation, as
``JapaneseVowels-raw`` (``selection.md``, amendment 8). ``report`` writes ``results/final.md`` and ``final.png``.

Usage::

    python benchmarks/quality/final.py run --candidate project_w0.5 [--seeds 0 1 2 3 4] [--students tiny tenth]
    python benchmarks/quality/final.py report
    python benchmarks/quality/final.py run --smoke /tmp/final_smoke --candidate project_w0.5 \\
        --datasets ItalyPowerDemand --seeds 0 1 --students tiny --steps 20   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import common
import final_report
import harness
import regime
import screen
import torch

PACKAGE_DEFAULT = "package-default"
VARIANTS = {"kd": ("kd", False), "kd+C": ("kd", True), "dkd": ("dkd", False), "dkd+C": ("dkd", True)}
FIELDS = ["dataset", "split", "seed", "student", "candidate", "variant", "base", "steps", "student_params",
          "teacher_params", "n_test", "teacher_acc", "student_acc", "agreement", "ig_rho", "occ_rho", "fit_s",
          "cpu_ms_per_step", "options", "run"]  # fmt: skip
KEY = ["dataset", "seed", "student", "candidate", "variant", "steps", "run"]


def csv_path() -> Path:
    return common.RESULTS / "final.csv"


def candidate_options(name: str) -> dict:
    """The distiller options of candidate ``name`` (``package-default``: none, the distiller's defaults)."""
    return {} if name == PACKAGE_DEFAULT else dict(screen.ALL[name])


def variant_options(variant: str, candidate: str) -> dict:
    """The distiller options of one variant: the base loss, with or without the candidate's TSD options."""
    base, with_tsd = VARIANTS[variant]
    options = candidate_options(candidate) if with_tsd else dict(tsd_weight=0.0)
    return dict(options, base_loss=base) if base != "kd" else options


def run_variant(ctx: dict, init: dict, make, steps: int, options: dict) -> dict | None:
    """Fit one variant from the shared initialisation and batch order, and measure it on the test split
    (None, with a message, when the installed package lacks an option)."""
    student = make()
    student.load_state_dict(init)
    try:
        model = common.distiller(ctx["teacher"], student, options)
    except (TypeError, ValueError) as err:
        print(f"  skipped: the installed package does not take {options} ({err})", flush=True)
        return None
    fit = common.fit_student(model, ctx["dm"], steps, ctx["split"].seed)
    res = dict(fit, **common.measure(student, ctx["ref"]))
    student.eval()
    return dict(res, student_acc=common.accuracy(student, ctx["loader"]))


def run_student(ctx: dict, size: str, args) -> None:
    """Every missing variant of one (dataset, seed, student size)."""
    from lightning_tsd.models import count_parameters

    name, split, run = ctx["dataset"], ctx["split"], ctx["run"]
    steps = screen.steps_for(size, args.steps)
    tp = count_parameters(ctx["teacher"])
    torch.manual_seed(5000 + 100 * split.seed)  # distinct from the CV blocks' seeds (screen.run_block)
    init = common.make_student(size, ctx["dm"], tp).state_dict()
    make = functools.partial(common.make_student, size, ctx["dm"], tp)
    for variant, (base, _) in VARIANTS.items():
        if base == "dkd" and ctx["dm"].num_classes == 2:
            continue  # with two classes DKD is KD (no non-target distribution): its rows would repeat kd's
        key = (name, str(split.seed), size, args.candidate, variant, str(steps), run)
        if not harness.claim(csv_path(), KEY, key, "final"):
            continue  # done meanwhile, or running in another process
        options = variant_options(variant, args.candidate)
        res = run_variant(ctx, init, make, steps, options)
        if res is None:
            continue
        row = dict(dataset=name, split=split.key, seed=split.seed, student=size, candidate=args.candidate,
                   variant=variant, base=base, steps=steps, student_params=count_parameters(make()),
                   teacher_params=tp, n_test=ctx["n_test"], teacher_acc=ctx["teacher_acc"],
                   options=json.dumps(options, sort_keys=True), run=run, **res)  # fmt: skip
        harness.append_row(csv_path(), row, FIELDS)
        print(f"{name} {split.key} {size} {variant:6s} acc {res['student_acc']:.3f} agree {res['agreement']:.3f} "
              f"IG-rho {res['ig_rho']:.3f} occ-rho {res['occ_rho']:.3f} ({res['fit_s']:.0f}s)", flush=True)  # fmt: skip


def run_seed(name: str, seed: int, args) -> None:
    """Every missing row of one (dataset, seed): the teacher and its reference once, then each student size."""
    split = common.Split("full", seed)
    if not regime.record_teacher(name, split, refill=True):
        print(f"{name} {split.key}: teacher being trained by another process; skipped for now", flush=True)
        return
    dm = common.datamodule(name, split)
    teacher, _ = common.get_teacher(name, split, dm)  # trained and recorded above (regime_teachers.csv)
    run = screen.run_id(teacher)
    done = harness.done_keys(csv_path(), KEY)
    keys = [(name, str(seed), s, args.candidate, v, str(screen.steps_for(s, args.steps)), run)
            for s in args.students for v in VARIANTS if dm.num_classes > 2 or VARIANTS[v][0] == "kd"]  # fmt: skip
    if all(k in done for k in keys):
        return
    loader = common.eval_loader(dm, split)  # the test split
    ref = common.reference(teacher, loader)
    ctx = dict(dataset=name, split=split, dm=dm, teacher=teacher, run=run, ref=ref, loader=loader,
               n_test=sum(len(b["y"]) for b in ref.batches), teacher_acc=common.accuracy(teacher, loader))  # fmt: skip
    for size in args.students:
        run_student(ctx, size, args)


def cmd_run(args) -> None:
    candidate_options(args.candidate)  # an unknown name fails here, before any fit
    for seed in args.seeds:
        for name in args.datasets:
            run_seed(name, seed, args)
            final_report.write(csv_path())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--candidate", default=None, choices=[*screen.ALL, PACKAGE_DEFAULT])
    p.add_argument("--datasets", nargs="+", default=regime.FINAL_DATASETS, choices=regime.FINAL_DATASETS,
                   help="default: the six of the tables (JapaneseVowels as JapaneseVowels-raw, amendment 8)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--students", nargs="+", default=["tiny", "tenth"], choices=["tiny", "tenth", "gru"])
    p.add_argument(
        "--steps", type=int, default=None, help="student steps (default: results/screen_steps.json)"
    )
    common.add_run_options(p)
    args = p.parse_args()
    common.apply_run_options(args)
    if args.command == "run":
        if args.candidate is None:
            p.error("run needs --candidate")
        cmd_run(args)
    final_report.write(csv_path())


if __name__ == "__main__":
    main()
