"""The screen of issue 9 (rules: ``benchmarks/quality/selection.md``, 2026-12-03): TSD candidates vs KD on
repeated 3-fold CV of the train splits, both student sizes, paired (same initialisation, batch order and
step count), measured on the held-out fold: agreement, IG-rho and occlusion-rho.

A block is (dataset, repeat, fold); its teacher (cached, ``common.get_teacher``) is trained on the other
folds only. One CSV row per (block, student size, candidate) in ``results/screen.csv``; rows already there
are skipped, so the script resumes. ``report`` writes ``results/screen.md``. A candidate whose distiller
option the installed package lacks is skipped with a message.

Usage::

    python benchmarks/quality/screen.py run [--repeats 0 1 2] [--datasets ...] [--students tiny tenth]
    python benchmarks/quality/screen.py report
    python benchmarks/quality/screen.py run --smoke /tmp/screen_smoke --steps 50 --folds 0 1   # smoke test
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import common
import harness
import screen_report
import torch

DATASETS = ["ItalyPowerDemand", "GunPoint", "ArrowHead"]
IG = dict(saliency="integrated_gradients", saliency_options={"steps": 8})
PROJECT = dict(IG, tsd_gradient="project")
IG1U = {"sampling": "uniform", "steps": 1}
CANDIDATES: dict[str, dict] = {
    "kd": dict(tsd_weight=0.0),
    "sum_w0.25": dict(IG, tsd_weight=0.25),
    "sum_w0.5": dict(IG, tsd_weight=0.5),
    "project_w0.5": dict(PROJECT, tsd_weight=0.5),
    "project_w1": dict(PROJECT, tsd_weight=1.0),
    "project_w2": dict(PROJECT, tsd_weight=2.0),
    "balance_w0.1": dict(IG, tsd_gradient="balance", tsd_weight=0.1),
    "balance_w0.3": dict(IG, tsd_gradient="balance", tsd_weight=0.3),
    "smooth5_project_w1": dict(PROJECT, saliency_smoothing=5, tsd_weight=1.0),
    "dist_project_w1": dict(PROJECT, saliency_target="distribution", tsd_weight=1.0),
    "occlusion_w0.5": dict(saliency="occlusion", tsd_weight=0.5),
    "start0.5_project_w1": dict(PROJECT, tsd_start=0.5, tsd_weight=1.0),
    "ig1u_project_w1": dict(PROJECT, saliency_options=IG1U, tsd_weight=1.0),
    # Added by amendment 2 (selection.md): the cheap estimator on the other screened methods.
    "ig1u_project_w0.5": dict(PROJECT, saliency_options=IG1U, tsd_weight=0.5),
    "ig1u_balance_w0.3": dict(IG, tsd_gradient="balance", saliency_options=IG1U, tsd_weight=0.3),
}
# Amendment 2: the candidates screened from then on; the others are cut (their rows are reported, not carried).
SCREENED = ["kd", "project_w0.5", "project_w1", "balance_w0.3", "ig1u_project_w0.5", "ig1u_project_w1",
            "ig1u_balance_w0.3"]  # fmt: skip
CUT = [c for c in CANDIDATES if c not in SCREENED]
# Amendment 5: the cheap estimator on the student side only (the teacher's maps stay IG-8); run by the full
# selection on its non-screen blocks, not by the screen.
IG1S = dict(saliency_options=IG1U, teacher_saliency_options={"steps": 8})
STUDENT_SIDE = {
    "ig1s_project_w0.5": dict(PROJECT, **IG1S, tsd_weight=0.5),
    "ig1s_project_w1": dict(PROJECT, **IG1S, tsd_weight=1.0),
}
ALL = {**CANDIDATES, **STUDENT_SIDE}
# The issue-10 pairs: (cheap estimator, its IG-8 counterpart).
CHEAP_PAIRS = [("ig1u_project_w0.5", "project_w0.5"), ("ig1u_project_w1", "project_w1"),
               ("ig1u_balance_w0.3", "balance_w0.3")]  # fmt: skip
FIELDS = ["dataset", "split", "repeat", "fold", "student", "candidate", "steps", "student_params",
          "teacher_params", "n_val", "agreement", "ig_rho", "occ_rho", "fit_s", "cpu_ms_per_step", "run"]  # fmt: skip
KEY = ["dataset", "split", "student", "candidate", "steps", "run"]
# Rows written before the "run" column (session 3, 2026-12-03, on an Intel Xeon; teacher files since lost).
OLD_RUN = "session 3 (Intel Xeon; teacher not kept)"


def csv_path() -> Path:
    return common.RESULTS / "screen.csv"


def steps_for(size: str, fixed: int | None) -> int:
    """The student step count: ``--steps`` if given, else the one regime.py's KD curves chose."""
    if fixed:
        return fixed
    import json

    import regime

    frozen = common.RESULTS / "screen_steps.json"
    steps = json.loads(frozen.read_text()) if frozen.exists() else {}
    if size not in steps:
        steps[size] = regime.chosen_steps()[size]
        if steps[size] is None:
            raise SystemExit(
                f"no KD curves for the {size!r} student yet: run `regime.py curves` first (or --steps)"
            )
        frozen.write_text(json.dumps(steps, indent=1) + "\n")
        print(
            f"student steps for {size!r} frozen at {steps[size]} (from the KD curves so far): {frozen}",
            flush=True,
        )
    return steps[size]


def build(teacher, student, name: str):
    """The distiller of candidate ``name``, or None (with a message) when the package lacks an option."""
    try:
        return common.distiller(teacher, student, ALL[name])
    except (TypeError, ValueError) as err:
        print(f"  skipped {name}: the installed package does not take {ALL[name]} ({err})", flush=True)
        return None


def run_candidate(name: str, teacher, init: dict, make, dm, ref, steps: int, seed: int) -> dict | None:
    student = make()
    student.load_state_dict(init)
    model = build(teacher, student, name)
    if model is None:
        return None
    fit = common.fit_student(model, dm, steps, seed)
    return dict(fit, **common.measure(student, ref))


def run_id(teacher) -> str:
    """Which machine and teacher a row comes from: the CPU model and a hash of the teacher's weights. Fits
    are deterministic on one machine but not across CPUs (a re-trained teacher can differ), so rows pair
    with ``kd`` only within one run id, and a block re-run elsewhere does not mix with its old rows."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(teacher.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return f"{harness.cpu_model()}; teacher {h.hexdigest()[:12]}"


def run_block(
    name: str,
    split: common.Split,
    todo: dict[str, list[str]],
    fixed_steps: int | None,
    done: set,
    csv: Path | None = None,
) -> None:
    """Every missing run of one block: ``todo`` maps a student size to its candidates; rows go to ``csv``
    (default: the screen's), and a row in ``done`` (keys of ``KEY``) is skipped."""
    from lightning_tsd.models import count_parameters

    csv = csv or csv_path()
    dm = common.datamodule(name, split)
    teacher, _ = common.get_teacher(name, split, dm)
    run = run_id(teacher)
    todo = {s: [c for c in cands if (name, split.key, s, c, str(steps_for(s, fixed_steps)), run) not in done]
            for s, cands in todo.items()}  # fmt: skip
    if not any(todo.values()):
        return
    ref = common.reference(teacher, common.eval_loader(dm, split))
    tp = count_parameters(teacher)
    for size, names in todo.items():
        steps = steps_for(size, fixed_steps)
        torch.manual_seed(1000 * split.seed + split.fold)
        init = common.make_student(size, dm, tp).state_dict()
        make = functools.partial(common.make_student, size, dm, tp)
        for cand in names:
            if not harness.claim(csv, KEY, (name, split.key, size, cand, str(steps), run), csv.stem):
                continue  # done meanwhile, or running in another process
            res = run_candidate(cand, teacher, init, make, dm, ref, steps, split.seed)
            if res is None:
                continue
            row = dict(dataset=name, split=split.key, repeat=split.seed, fold=split.fold, student=size,
                       candidate=cand, steps=steps, student_params=count_parameters(make()), teacher_params=tp,
                       n_val=sum(len(b["y"]) for b in ref.batches), run=run, **res)  # fmt: skip
            harness.append_row(csv, row, FIELDS, defaults={"run": OLD_RUN})
            print(f"{name} {split.key} {size} {cand:20s} agree {res['agreement']:.3f} IG-rho {res['ig_rho']:.3f} "
                  f"occ-rho {res['occ_rho']:.3f} ({res['fit_s']:.0f}s)", flush=True)  # fmt: skip


def cmd_run(args) -> None:
    done = harness.done_keys(csv_path(), KEY)
    for repeat in args.repeats:
        for name in args.datasets:
            for fold in args.folds:
                todo = {size: list(args.candidates) for size in args.students}
                run_block(name, common.Split("cv", repeat, fold), todo, args.steps, done)
                screen_report.write(csv_path(), list(CANDIDATES), CUT, CHEAP_PAIRS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--repeats", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, nargs="+", default=list(range(common.CV_FOLDS)))
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--students", nargs="+", default=["tiny", "tenth"])
    p.add_argument("--candidates", nargs="+", default=SCREENED, choices=list(CANDIDATES))
    p.add_argument("--steps", type=int, default=None, help="student steps (default: regime.py's KD curves)")
    common.add_run_options(p)
    args = p.parse_args()
    common.apply_run_options(args)
    if "kd" not in args.candidates:
        args.candidates = ["kd"] + args.candidates
    if args.command == "run":
        cmd_run(args)
    screen_report.write(csv_path(), list(CANDIDATES), CUT, CHEAP_PAIRS)


if __name__ == "__main__":
    main()
