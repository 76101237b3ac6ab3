"""Does TSD make a student agree with its teacher, and explain its predictions like the teacher?

For each dataset and seed: train an InceptionTime teacher once (cross-entropy, ``TimeSeriesClassifier``),
then distil it into NarrowFCN students with ``TemporalSaliencyDistiller``. The variants of one
(dataset, seed) share the student's initialisation and the batch order (paired comparison).

Measured on the test split: student accuracy, top-1 agreement with the teacher, and saliency alignment
measured independently of the training estimator: captum IntegratedGradients (32 steps, zero baseline,
target = the teacher's predicted class), |attribution| summed over channels, Spearman (and Pearson,
cosine, top-10% overlap) over time per series, averaged over the test set. This is what
``lightning_tsd.report.substitution_report(teacher, student, loader, method="integrated_gradients",
method_kwargs={"n_steps": 32})`` computes; the teacher's maps are computed once per (dataset, seed) with
the same function (``_temporal_attribution``) and reused for every student, and the first run checks
the numbers against ``substitution_report`` itself.

Results go to ``benchmarks/results/``: appended to ``quality.csv`` one run at a time (runs already there are
skipped, so the script resumes where it stopped); ``quality.md`` and ``quality.png`` are rewritten from the
CSV after every run. ``--split cv`` runs the default selection on cross-validation folds of the train split
instead (``selection.csv`` / ``selection.md``).

Usage: ``python benchmarks/quality/bench_quality.py [--seeds 0 1] [--datasets GunPoint ...] [--budget-min 25]
[--student NarrowFCN|GRUClassifier] [--variants ce kd ...]``

``--student`` picks the student family (default NarrowFCN; GRUClassifier with ``hidden_size=16``); it is
recorded in the CSV's ``student`` column (rows written before that column existed are NarrowFCN; the CSV is
rewritten once with the column added) and every summary table is split by it. The ``ce`` variant (the
student alone, cross-entropy only) is not in the default ``--variants``: ask for it by name.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATASETS = ["GunPoint", "ArrowHead", "ItalyPowerDemand", "BasicMotions", "JapaneseVowels", "OSULeaf"]
# The TSD settings of ``kd+tsd`` / ``dkd+tsd``: the package's defaults (checked against
# ``TemporalSaliencyDistiller``'s signature at start-up, so the tables cannot silently describe old defaults).
DEFAULT_TSD = dict(
    saliency="integrated_gradients", alignment="pearson", tsd_weight=0.25, saliency_target="teacher"
)
# The reference point of the default selection (``--split cv``): the default before that run (w=0.5); every
# other candidate changes one of its settings. The run chose w=0.25, which became DEFAULT_TSD.
SELECTION_BASE = {**DEFAULT_TSD, "tsd_weight": 0.5}
VARIANTS: dict[str, dict] = {
    # the student alone: cross-entropy on the labels only (no KD term, no TSD term)
    "ce": dict(base_loss="none", kd_weight=0.0, tsd_weight=0.0),
    "kd": dict(base_loss="kd", tsd_weight=0.0),
    "kd+tsd": dict(base_loss="kd", **DEFAULT_TSD),  # package defaults: IG 8 steps, pearson, w=0.25
    "kd+tsd_grad": dict(base_loss="kd", **{**DEFAULT_TSD, "saliency": "gradient"}),
    "dkd": dict(base_loss="dkd", tsd_weight=0.0),
    "dkd+tsd": dict(base_loss="dkd", **DEFAULT_TSD),
    # the same at w=0.5 (the default before the selection run)
    "kd+tsd_w0.5": dict(base_loss="kd", **SELECTION_BASE),
    "kd+tsd_grad_w0.5": dict(base_loss="kd", **{**SELECTION_BASE, "saliency": "gradient"}),
    "dkd+tsd_w0.5": dict(base_loss="dkd", **SELECTION_BASE),
    # selection candidates: each changes one setting of SELECTION_BASE
    "kd+tsd_w0.25": dict(base_loss="kd", **{**SELECTION_BASE, "tsd_weight": 0.25}),
    "kd+tsd_w1": dict(base_loss="kd", **{**SELECTION_BASE, "tsd_weight": 1.0}),
    "kd+tsd_cos_w0.5": dict(base_loss="kd", **{**SELECTION_BASE, "alignment": "cosine"}),
    "kd+tsd_label_w0.5": dict(base_loss="kd", **{**SELECTION_BASE, "saliency_target": "label"}),
    "kd+tsd_evalmode_w0.5": dict(base_loss="kd", **SELECTION_BASE, student_train_mode=False),
    "kd+tsd_warm_w0.5": dict(base_loss="kd", **SELECTION_BASE, tsd_warmup=0.3),
    # the weight halved whenever the epoch's training agreement falls 0.02 below its best (callback)
    "kd+tsd_guard_w0.5": dict(
        base_loss="kd", **SELECTION_BASE, guard=dict(monitor="train/agreement", factor=0.5, tolerance=0.02)
    ),
}
BASELINE_OF = {"kd": "ce", "dkd": "kd"}
BASELINE_OF.update({v: "dkd" for v in VARIANTS if v.startswith("dkd+tsd")})
BASELINE_OF.update({v: "kd" for v in VARIANTS if v.startswith("kd+tsd")})
# Candidates of the default-selection run (``--split cv``): the rule is applied over these.
SELECTION_VARIANTS = [
    "kd",
    "kd+tsd_w0.5",
    "kd+tsd_w0.25",
    "kd+tsd_w1",
    "kd+tsd_grad_w0.5",
    "kd+tsd_cos_w0.5",
    "kd+tsd_label_w0.5",
    "kd+tsd_evalmode_w0.5",
    "kd+tsd_warm_w0.5",
    "kd+tsd_guard_w0.5",
]
SELECTION_MAX_AGREEMENT_LOSS = 0.01  # pooled mean d agreement vs kd must be >= -0.01
CV_FOLDS = 3  # ``--split cv``: stratified folds of the train split (fold = the --seeds value)
CV_SPLIT_SEED = 0
VAL_FRACTION = 0.25
BINARY = {"GunPoint", "ItalyPowerDemand"}
TEACHER = dict(num_filters=16, depth=3, kernel_size=40)  # reduced InceptionTime for the CPU budget
# Student families (``--student``); rows written before the ``student`` column existed are NarrowFCN.
STUDENTS: dict[str, dict] = {"NarrowFCN": {}, "GRUClassifier": dict(hidden_size=16)}
DEFAULT_STUDENT = "NarrowFCN"
FIELDS = [
    "dataset",
    "seed",
    "variant",
    "teacher_params",
    "student_params",
    "teacher_acc",
    "student_acc",
    "agreement",
    "kl",
    "ig_spearman",
    "ig_pearson",
    "ig_cosine",
    "ig_topk",
    "teacher_ece",
    "student_ece",
    "train_s",
    "eval_s",
    "steps",
    "student",
]
METRICS = ["student_acc", "agreement", "ig_spearman", "ig_topk", "kl", "student_ece"]
RESULTS = HERE.parent / "results"


def check_defaults() -> None:
    """``DEFAULT_TSD`` must be what ``TemporalSaliencyDistiller`` does by default."""
    import inspect

    from lightning_tsd import TemporalSaliencyDistiller

    params = inspect.signature(TemporalSaliencyDistiller).parameters
    actual = {k: params[k].default for k in DEFAULT_TSD}
    assert actual == DEFAULT_TSD, (
        f"package defaults {actual} != DEFAULT_TSD {DEFAULT_TSD}: update the benchmark"
    )


def trainer(**kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


def student_of(row: dict) -> str:
    """The student family of a CSV row (rows from before the ``student`` column are NarrowFCN)."""
    return row.get("student") or DEFAULT_STUDENT


def done_runs(csv_path: Path) -> set[tuple[str, str, int, str]]:
    if not csv_path.exists():
        return set()
    with csv_path.open() as f:
        return {(student_of(r), r["dataset"], int(r["seed"]), r["variant"]) for r in csv.DictReader(f)}


def _ensure_columns(csv_path: Path, fields: list[str]) -> list[str]:
    """Header of ``csv_path``, extended (file rewritten) with any of ``fields`` it lacks; old rows get
    ``student=NarrowFCN`` and an empty value for other new columns. Returns the header to write with."""
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [k for k in fields if k not in header]
        if not missing:
            return header
        rows = list(reader)
    header += missing
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) or (DEFAULT_STUDENT if k == "student" else "") for k in header})
    tmp.replace(csv_path)
    return header


def append(csv_path: Path, row: dict, fields: list[str] = FIELDS) -> None:
    new = not csv_path.exists()
    if not new:
        fields = _ensure_columns(csv_path, fields)
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fields)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})


def load_data(name: str, seed: int, batch_size: int, split: str = "test"):
    """``split="test"``: the whole train split trains, the test split evaluates. ``split="cv"`` (default
    selection): fold ``seed`` of ``CV_FOLDS`` stratified folds of the train split evaluates, the other folds
    train. ``split="val"`` (the earlier protocol): a stratified ``VAL_FRACTION`` is held out per seed."""
    from lightning_tsd.data import UCRDataModule

    if split == "cv":
        # repeated k-fold: seeds 0..k-1 are the folds of partition 0, seeds k..2k-1 those of partition 1, ...
        dm = UCRDataModule(
            name,
            batch_size=batch_size,
            cv_folds=CV_FOLDS,
            fold=seed % CV_FOLDS,
            seed=CV_SPLIT_SEED + seed // CV_FOLDS,
        )
        dm.setup()
        return dm
    val_fraction = VAL_FRACTION if split == "val" else 0.0
    dm = UCRDataModule(name, batch_size=batch_size, val_fraction=val_fraction, seed=seed)
    dm.setup()
    return dm


def eval_loader(dm, split: str):
    return dm.test_dataloader() if split == "test" else dm.val_dataloader()


def get_teacher(dm, name: str, seed: int, cache_dir: Path, epochs: int, split: str = "test"):
    """Train (or load) the teacher; return it frozen in eval mode with its IG maps on the evaluation split
    (test, or the held-out validation part for ``split="val"``) and its train time. For ``split="val"`` the
    teacher is trained on the reduced train part only (cached separately), so it never sees validation."""
    from lightning_tsd.callbacks import _temporal_attribution
    from lightning_tsd.classifier import TimeSeriesClassifier
    from lightning_tsd.models import InceptionTime

    suffix = {"test": "", "val": f"_val{int(VAL_FRACTION * 100)}", "cv": f"_cv{CV_FOLDS}rr"}[split]
    path = cache_dir / f"teacher_{name}_{seed}{suffix}.pt"
    torch.manual_seed(10_000 + seed)
    teacher = InceptionTime(dm.in_channels, dm.num_classes, **TEACHER)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        teacher.load_state_dict(saved["state_dict"])
        return teacher.eval().requires_grad_(False), saved["maps"], saved["train_s"]
    t0 = time.perf_counter()
    clf = TimeSeriesClassifier(model=teacher, num_classes=dm.num_classes, lr=1e-3)
    trainer(max_epochs=epochs).fit(clf, train_dataloaders=dm.train_dataloader())
    train_s = time.perf_counter() - t0
    teacher.eval().requires_grad_(False)
    maps = []
    for batch in eval_loader(dm, split):
        with torch.no_grad():
            target = teacher(batch["x"], mask=batch.get("mask")).argmax(1)
        maps.append(
            _temporal_attribution(
                teacher, batch["x"], target, batch.get("mask"), "integrated_gradients", {"n_steps": 32}
            )
        )
    maps = torch.cat(maps)
    torch.save({"state_dict": teacher.state_dict(), "maps": maps, "train_s": train_s}, path)
    return teacher, maps, train_s


def occlusion_maps(model, dm, teacher, split: str) -> torch.Tensor:
    """captum Occlusion maps (windows of T/10 steps, half-overlapping, all channels; the package callbacks'
    default) of the teacher's predicted class over the evaluation split: a perturbation measure that shares
    nothing with the gradient-based training estimators."""
    from lightning_tsd.callbacks import _temporal_attribution

    maps = []
    for batch in eval_loader(dm, split):
        with torch.no_grad():
            target = teacher(batch["x"], mask=batch.get("mask")).argmax(1)
        maps.append(_temporal_attribution(model, batch["x"], target, batch.get("mask"), "occlusion"))
    return torch.cat(maps)


def occlusion_alignment(student, teacher, dm, split: str, teacher_maps: torch.Tensor) -> dict[str, float]:
    """Spearman and top-10% overlap of student vs teacher Occlusion maps, per series over real steps."""
    from lightning_tsd.functional import saliency_alignment

    student_maps = occlusion_maps(student.eval(), dm, teacher, split)
    masks = [b.get("mask") for b in eval_loader(dm, split)]
    mask = None if masks[0] is None else torch.cat(masks)
    out = saliency_alignment(student_maps, teacher_maps, mask)
    return dict(occ_spearman=float(out["spearman"].mean()), occ_topk=float(out["topk_overlap"].mean()))


def teacher_occlusion_maps(teacher, dm, name: str, seed: int, cache_dir: Path, split: str) -> torch.Tensor:
    suffix = {"test": "", "val": f"_val{int(VAL_FRACTION * 100)}", "cv": f"_cv{CV_FOLDS}rr"}[split]
    path = cache_dir / f"teacher_{name}_{seed}{suffix}_occlusion.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    maps = occlusion_maps(teacher, dm, teacher, split)
    torch.save(maps, path)
    return maps


def evaluate(teacher, student, dm, teacher_maps, check_report: bool, split: str = "test") -> dict:
    """Accuracy, agreement, KL from ``substitution_report(method=None)``; IG alignment from captum maps."""
    from lightning_tsd.callbacks import _temporal_attribution
    from lightning_tsd.functional import saliency_alignment
    from lightning_tsd.report import substitution_report

    student.eval()
    loader = eval_loader(dm, split)
    rep = substitution_report(teacher, student, loader, method=None)
    parts = {k: [] for k in ("spearman", "pearson", "cosine", "topk_overlap")}
    offset = 0
    for batch in loader:
        n = len(batch["y"])
        with torch.no_grad():
            target = teacher(batch["x"], mask=batch.get("mask")).argmax(1)
        s_map = _temporal_attribution(
            student, batch["x"], target, batch.get("mask"), "integrated_gradients", {"n_steps": 32}
        )
        out = saliency_alignment(s_map, teacher_maps[offset : offset + n], batch.get("mask"))
        for k in parts:
            parts[k].append(out[k])
        offset += n
    res = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
    if check_report:  # the shortcut must equal the package's report
        full = substitution_report(
            teacher, student, loader, method="integrated_gradients", method_kwargs={"n_steps": 32}
        )
        for k in parts:
            assert abs(full.saliency[k] - res[k]) < 1e-4, (k, full.saliency[k], res[k])
        print(
            f"  check: substitution_report saliency == shortcut ({full.saliency['spearman']:.4f})", flush=True
        )
    return dict(
        teacher_acc=rep.teacher_accuracy,
        student_acc=rep.student_accuracy,
        teacher_ece=rep.teacher_ece,
        student_ece=rep.student_ece,
        agreement=rep.agreement,
        kl=rep.kl,
        ig_spearman=res["spearman"],
        ig_pearson=res["pearson"],
        ig_cosine=res["cosine"],
        ig_topk=res["topk_overlap"],
    )


def run(args) -> None:
    from lightning_tsd import ReduceTSDWeightOnAgreementDrop, TemporalSaliencyDistiller, models
    from lightning_tsd.models import count_parameters

    student_cls, student_kw = getattr(models, args.student), STUDENTS[args.student]

    def make_student(dm):
        return student_cls(dm.in_channels, dm.num_classes, **student_kw)

    csv_path = args.out / ("quality.csv" if args.split == "test" else "selection.csv")
    done = done_runs(csv_path)
    start = time.perf_counter()
    checked = False
    for seed in args.seeds:
        for name in args.datasets:
            todo = [v for v in args.variants if (args.student, name, seed, v) not in done]
            if name in BINARY:  # for K=2, DKD (alpha=1) is exactly KD: TCKD is the full KL, NCKD is 0
                todo = [v for v in todo if not v.startswith("dkd")]
            if not todo:
                continue
            if time.perf_counter() - start > args.budget_min * 60:
                print(
                    f"budget of {args.budget_min} min spent: stopping before {name} seed {seed}", flush=True
                )
                return
            dm = load_data(name, seed, args.batch_size, args.split)
            teacher, maps, teacher_s = get_teacher(
                dm, name, seed, args.cache_dir, args.teacher_epochs, args.split
            )
            occ_maps = (
                teacher_occlusion_maps(teacher, dm, name, seed, args.cache_dir, args.split)
                if args.occlusion
                else None
            )
            torch.manual_seed(seed)
            init = make_student(dm).state_dict()
            tp, sp = count_parameters(teacher), count_parameters(make_student(dm))
            assert sp * 10 <= tp, (sp, tp)
            for variant in todo:
                student = make_student(dm)
                student.load_state_dict(init)
                options = dict(VARIANTS[variant])
                guard = options.pop("guard", None)
                callbacks = [ReduceTSDWeightOnAgreementDrop(**guard)] if guard else []
                distiller = TemporalSaliencyDistiller(
                    teacher, student, teacher_cache=True, lr=args.student_lr, **options
                )
                t0 = time.perf_counter()
                trainer(max_steps=args.student_steps, callbacks=callbacks).fit(
                    distiller, train_dataloaders=dm.train_dataloader()
                )
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                metrics = evaluate(
                    teacher,
                    student,
                    dm,
                    maps,
                    check_report=not checked and args.check_report,
                    split=args.split,
                )
                if occ_maps is not None:
                    metrics.update(occlusion_alignment(student, teacher, dm, args.split, occ_maps))
                checked = True
                row = dict(
                    dataset=name,
                    seed=seed,
                    variant=variant,
                    teacher_params=tp,
                    student_params=sp,
                    train_s=train_s,
                    eval_s=time.perf_counter() - t0,
                    steps=args.student_steps,
                    student=args.student,
                    n_eval=len(eval_loader(dm, args.split).dataset),
                    **metrics,
                )
                fields = FIELDS + (["occ_spearman", "occ_topk"] if args.occlusion else [])
                append(csv_path, row, fields if args.split == "test" else fields + ["n_eval"])
                print(
                    f"{args.student} {name:16s} seed {seed} {variant:16s} acc {metrics['student_acc']:.3f} agree "
                    f"{metrics['agreement']:.3f} IG-rho {metrics['ig_spearman']:.3f} (teacher acc "
                    f"{metrics['teacher_acc']:.3f}, teacher fit {teacher_s:.0f}s, student {train_s:.1f}s, "
                    f"eval {row['eval_s']:.1f}s, total {time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
                summarize_any(args)


def summarize_any(args) -> None:
    (summarize if args.split == "test" else summarize_selection)(args.out)


# ----------------------------------------------------------------------------- summary
def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def summarize(out: Path) -> None:
    csv_path = out / "quality.csv"
    if not csv_path.exists():
        return
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    # key: (student, dataset, seed, variant); rows from before the student column are NarrowFCN
    by_all = {(student_of(r), r["dataset"], int(r["seed"]), r["variant"]): r for r in rows}
    students = [s for s in STUDENTS if any(k[0] == s for k in by_all)]
    datasets = [d for d in DATASETS if any(k[1] == d for k in by_all)] + sorted(
        {k[1] for k in by_all} - set(DATASETS)
    )
    variants = [v for v in VARIANTS if any(k[3] == v for k in by_all)]
    has_occ = bool(rows) and all(r.get("occ_spearman") for r in rows)
    metrics = METRICS + (["occ_spearman", "occ_topk"] if has_occ else [])
    lines = [
        "# Quality: does TSD improve the student's agreement with the teacher and its saliency alignment?",
        "",
        f"Generated by `benchmarks/quality/bench_quality.py` from `quality.csv` "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, CPU).",
        "",
        f"Teacher: InceptionTime({', '.join(f'{k}={v}' for k, v in TEACHER.items())}) (reduced for the CPU budget),",
        "trained once per dataset and seed with `TimeSeriesClassifier` (AdamW 1e-3, batch 16) on the whole train split.",
        "Students (column *student*; every table is split by student family, pairs never mix families):",
        "NarrowFCN (8/16/8 filters) and GRUClassifier (`hidden_size=16`, one layer, mean pooling), both",
        "<= 1/10 of the teacher's parameters; `TemporalSaliencyDistiller`",
        "with `teacher_cache=True`, Adam 3e-3, batch 16, CE + base loss (+ w * L_TSD); the variants of one",
        "(student, dataset, seed) share the student's initialisation and batch order.",
        "Variants: `ce` (the student alone: cross-entropy only, base_loss='none', kd_weight=0, tsd_weight=0);",
        "`kd` (Hinton KD, tau 4, tsd_weight=0); `kd+tsd` (the package defaults, chosen in `selection.md`:",
        "integrated gradients 8 steps, pearson alignment, w=0.5, target = the teacher's class);",
        "`kd+tsd_grad` (the same with the `gradient` estimator); `dkd` / `dkd+tsd` (decoupled KD base, alpha 1,",
        "beta 8, with the default TSD term); other `kd+tsd_*` rows, if any, are single-setting changes of the default.",
        "Test split: accuracy, top-1 agreement with the teacher, KL(teacher || student), student and teacher ECE",
        "(torchmetrics `MulticlassCalibrationError`, 15 bins, as in the substitution report), and IG-rho: captum",
        "IntegratedGradients (32 steps, zero baseline, teacher's class) Spearman between teacher and student maps",
        'over time, per series, averaged (as `substitution_report(..., method="integrated_gradients")`).',
        "Values are mean ± std over seeds (n = number of seeds).",
        *(
            [
                "occ-rho (`--occlusion`): the same Spearman with captum Occlusion maps (windows of T/10 steps,",
                "half-overlapping, zero baseline), a perturbation measure independent of every training estimator.",
            ]
            if has_occ
            else []
        ),
        "",
        "## Per dataset and variant",
        "",
        "| student | dataset | variant | n | teacher acc | student acc | agreement | IG-rho | top-k overlap | KL "
        "| student ECE | teacher ECE |" + (" occ-rho |" if has_occ else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_occ else ""),
    ]
    for st in students:
        for d in datasets:
            for v in variants:
                rs = [r for k, r in by_all.items() if k[0] == st and k[1] == d and k[3] == v]
                if not rs:
                    continue
                get = lambda key, rs=rs: [float(r[key]) for r in rs]  # noqa: E731
                lines.append(
                    f"| {st} | {d} | {v} | {len(rs)} | {_ms(get('teacher_acc'))} | {_ms(get('student_acc'))} | "
                    f"{_ms(get('agreement'))} | {_ms(get('ig_spearman'))} | {_ms(get('ig_topk'))} | {_ms(get('kl'))} | "
                    f"{_ms(get('student_ece'))} | {_ms(get('teacher_ece'))} |"
                    + (f" {_ms(get('occ_spearman'))} |" if has_occ else "")
                )
    lines += [
        "",
        "## Paired deltas vs the base method (variant − base, same seed; mean ± std over seeds)",
        "",
        "Base: `ce` for `kd`; `kd` for every `kd+tsd*` variant and `dkd`; `dkd` for every `dkd+tsd*` variant;",
        "always the same student family. Verdict: *helps* = the mean",
        "delta of IG-rho exceeds its std over seeds and agreement drops by no more than 0.02 on average;",
        "*alignment up, agreement down* = IG-rho up but agreement down by more than 0.02; *hurts* = IG-rho down.",
        "With 2-3 seeds these verdicts are indicative only. DKD variants are not run on the binary sets",
        "(GunPoint, ItalyPowerDemand): with K=2 and alpha=1, DKD is exactly KD (TCKD is the full KL, NCKD is 0).",
        "",
        "| student | dataset | variant | base | n | d student acc | d agreement | d IG-rho | d top-k | d KL "
        "| d student ECE | verdict |" + (" d occ-rho |" if has_occ else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_occ else ""),
    ]
    deltas_of: dict[str, dict[tuple[str, str], dict[str, list[float]]]] = {}
    for st in students:
        by = {k[1:]: r for k, r in by_all.items() if k[0] == st}
        deltas = deltas_of.setdefault(st, {})
        for d in datasets + ["all"]:
            for v in variants:
                base = BASELINE_OF.get(v)
                if base is None:
                    continue
                pairs = [
                    (r, by[(k[0], k[1], base)])
                    for k, r in by.items()
                    if (d == "all" or k[0] == d) and k[2] == v and (k[0], k[1], base) in by
                ]
                if not pairs:
                    continue
                dd = {m: [float(a[m]) - float(b[m]) for a, b in pairs] for m in metrics}
                deltas[(d, v)] = dd
                rho, agr = dd["ig_spearman"], dd["agreement"]
                sd = np.std(rho, ddof=1) if len(rho) > 1 else float("inf")
                rho_up = np.mean(rho) > sd
                rho_down = np.mean(rho) < -sd
                agr_down = np.mean(agr) < -0.02
                if rho_up:
                    verdict = "alignment up, agreement down" if agr_down else "helps"
                elif rho_down:
                    verdict = "hurts"
                else:
                    verdict = "no clear effect" + (", agreement down" if agr_down else "")
                label = "**all (pooled)**" if d == "all" else d
                lines.append(
                    f"| {st} | {label} | {v} | {base} | {len(pairs)} | {_ms(dd['student_acc'])} | {_ms(dd['agreement'])} | "
                    f"{_ms(dd['ig_spearman'])} | {_ms(dd['ig_topk'])} | {_ms(dd['kl'])} | {_ms(dd['student_ece'])} | "
                    f"{verdict} |" + (f" {_ms(dd['occ_spearman'])} |" if has_occ else "")
                )
    times = [float(r["train_s"]) for r in rows]
    lines += [
        "",
        f"{len(rows)} student runs; student fit time {sum(times):.0f}s in all "
        f"(median per student and variant: "
        + ", ".join(
            f"{st} {v} {np.median(ts):.1f}s"
            for st in students
            for v in variants
            if (ts := [float(r["train_s"]) for r in rows if r["variant"] == v and student_of(r) == st])
        )
        + ").",
        "",
        "![paired deltas](quality.png)",
        "",
    ]
    lines += _win_tie_loss(datasets, deltas_of)
    lines += _wilcoxon(deltas_of)
    (out / "quality.md").write_text("\n".join(lines))
    plot(out, datasets, deltas_of)


TIE = 0.01  # |delta| below this counts as a tie


def _wtl(vals: list[float]) -> str:
    w = sum(v >= TIE for v in vals)
    lo = sum(v <= -TIE for v in vals)
    return f"{w}/{len(vals) - w - lo}/{lo}"


def _win_tie_loss(datasets: list[str], deltas_of) -> list[str]:
    """Wins/ties/losses of each X+TSD variant vs its base X, per student, dataset (over seeds) and pooled."""
    lines = [
        "## Wins / ties / losses of X+TSD vs X (per seed pair)",
        "",
        "Counts over the paired (dataset, seed) runs of each TSD variant vs its base (same seed): win = delta",
        f">= {TIE}, tie = |delta| < {TIE}, loss = delta <= -{TIE}, written W/T/L. *all (pairs)* sums the",
        "per-dataset counts; *all (datasets)* counts datasets by their mean delta over seeds.",
        "",
        "| student | dataset | variant | base | n | agreement W/T/L | IG-rho W/T/L |",
        "|---|---|---|---|---|---|---|",
    ]
    for st, deltas in deltas_of.items():
        tsd = [v for v in BASELINE_OF if "tsd" in v and any(k[1] == v for k in deltas)]
        for v in tsd:
            for d in datasets + ["all"]:
                dd = deltas.get((d, v))
                if not dd:
                    continue
                label = "**all (pairs)**" if d == "all" else d
                lines.append(
                    f"| {st} | {label} | {v} | {BASELINE_OF[v]} | {len(dd['agreement'])} | {_wtl(dd['agreement'])} | "
                    f"{_wtl(dd['ig_spearman'])} |"
                )
            per_ds = [deltas[(d, v)] for d in datasets if (d, v) in deltas]
            if per_ds:
                agr = [float(np.mean(dd["agreement"])) for dd in per_ds]
                rho = [float(np.mean(dd["ig_spearman"])) for dd in per_ds]
                lines.append(
                    f"| {st} | **all (datasets)** | {v} | {BASELINE_OF[v]} | {len(per_ds)} | {_wtl(agr)} | {_wtl(rho)} |"
                )
    return lines + [""]


def _wilcoxon(deltas_of) -> list[str]:
    """Paired Wilcoxon signed-rank test over all (dataset, seed) pairs of each variant vs its base."""
    from scipy.stats import wilcoxon

    lines = [
        "## Paired Wilcoxon signed-rank tests (all dataset x seed pairs)",
        "",
        "`scipy.stats.wilcoxon(variant - base)`, two-sided, `zero_method='wilcox'` (pairs with a zero",
        "difference are dropped: *n* = all pairs, *n != 0* = the pairs the test uses); statistic = the smaller",
        "of the signed-rank sums; p from scipy's default `method='auto'` (exact for small n without zeros",
        "or ties, else the normal approximation). No correction for the multiple tests (2 metrics x variants).",
        "",
        "| student | variant | base | n | metric | n != 0 | median delta | statistic | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for st, deltas in deltas_of.items():
        for v in BASELINE_OF:
            dd = deltas.get(("all", v))
            if not dd:
                continue
            for metric, name in (
                ("agreement", "agreement"),
                ("ig_spearman", "IG-rho"),
                ("occ_spearman", "occ-rho"),
            ):
                if metric not in dd:
                    continue
                vals = np.asarray(dd[metric])
                nz = int(np.count_nonzero(vals))
                if nz == 0:
                    stat, p = "–", "–"
                else:
                    res = wilcoxon(vals, zero_method="wilcox", alternative="two-sided")
                    stat, p = f"{res.statistic:.1f}", f"{res.pvalue:.2g}"
                lines.append(
                    f"| {st} | {v} | {BASELINE_OF[v]} | {len(vals)} | {name} | {nz} | {np.median(vals):+.3f} | {stat} | {p} |"
                )
    return lines + [""]


def select_default(pooled: dict[str, dict[str, list[float]]]) -> tuple[str | None, str]:
    """The selection rule: highest pooled mean d IG-rho among the candidates whose pooled mean d agreement
    vs kd is >= -SELECTION_MAX_AGREEMENT_LOSS; if none qualifies, the smallest agreement loss."""
    if not pooled:
        return None, "no paired runs yet"
    ok = {v: d for v, d in pooled.items() if np.mean(d["agreement"]) >= -SELECTION_MAX_AGREEMENT_LOSS}
    if ok:
        best = max(ok, key=lambda v: np.mean(ok[v]["ig_spearman"]))
        return best, (
            f"{len(ok)} of {len(pooled)} candidates keep pooled mean d agreement >= "
            f"-{SELECTION_MAX_AGREEMENT_LOSS}; `{best}` has the highest pooled mean d IG-rho among them"
        )
    best = max(pooled, key=lambda v: np.mean(pooled[v]["agreement"]))
    return best, (
        f"no candidate keeps pooled mean d agreement >= -{SELECTION_MAX_AGREEMENT_LOSS}; `{best}` has the "
        "smallest agreement loss (fallback of the rule)"
    )


def summarize_selection(out: Path) -> None:
    """``selection.md`` from ``selection.csv`` (validation split): paired deltas vs kd and the rule."""
    csv_path = out / "selection.csv"
    if not csv_path.exists():
        return
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    by = {(r["dataset"], int(r["seed"]), r["variant"]): r for r in rows}
    datasets = [d for d in DATASETS if any(k[0] == d for k in by)]
    cands = [v for v in SELECTION_VARIANTS if v != "kd" and any(k[2] == v for k in by)]
    seeds = sorted({k[1] for k in by})

    def paired(v: str, d: str | None) -> list[tuple[dict, dict]]:
        return [
            (r, by[(k[0], k[1], "kd")])
            for k, r in by.items()
            if k[2] == v and (d is None or k[0] == d) and (k[0], k[1], "kd") in by
        ]

    def fmt(x: list[float]) -> str:
        if not x:
            return "–"
        se = np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
        return f"{np.mean(x):+.3f} ± {np.std(x, ddof=1) if len(x) > 1 else 0:.3f} (se {se:.3f})"

    # only complete blocks count for the rule: (dataset, seed) pairs where every candidate ran
    blocks = {(k[0], k[1]) for k in by if k[2] == "kd"}
    complete = {b for b in blocks if all((b[0], b[1], v) in by for v in cands)}
    pooled = {}
    for v in cands:
        pr = [(a, b) for a, b in paired(v, None) if (a["dataset"], int(a["seed"])) in complete]
        if pr:
            pooled[v] = {m: [float(a[m]) - float(b[m]) for a, b in pr] for m in METRICS}
    chosen, why = select_default(pooled)
    n_val = {}
    for r in rows:
        n_val.setdefault(r["dataset"], r.get("n_eval", ""))
    lines = [
        "# Choosing the default TSD settings on validation data (cross-validation folds)",
        "",
        f"Generated by `benchmarks/quality/bench_quality.py --split cv` from `selection.csv` "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, CPU).",
        "",
        "**Protocol.** The UCR train splits are tiny (36-200 series), so a single hold-out is noisy: repeated",
        f"{CV_FOLDS}-fold cross-validation. Each train split is cut into {CV_FOLDS} stratified, disjoint folds",
        f"(`UCRDataModule(cv_folds={CV_FOLDS}, fold=f, seed=p)`); fold f validates while the other folds train, so",
        f"every training series is validated once per partition p. Block *seed* s is fold s % {CV_FOLDS} of partition",
        f"{CV_SPLIT_SEED} + s // {CV_FOLDS} (seeds 0-2: partition 0; 3-5: partition 1). Per",
        "(dataset, block), the teacher (the reduced InceptionTime and recipe of `quality.md`) is trained **on the",
        f"other folds only** (cached as `teacher_<dataset>_<block>_cv{CV_FOLDS}rr.pt`), so neither teacher nor student",
        "sees its validation fold; the test split is not touched. Students: NarrowFCN, 200 steps, Adam 3e-3,",
        "batch 16, `teacher_cache=True`, each candidate paired with `kd` (same initialisation and batch order).",
        "Agreement, accuracy and IG-rho (captum IG 32 steps, teacher's class, Spearman over time) are measured",
        "on the validation fold.",
        "",
        "Candidates: KD base (tau 4) plus a TSD term; `kd+tsd_w0.5` (the package default before this run) is",
        "integrated gradients (8 steps), pearson alignment, w=0.5, saliency of the teacher's class, student in",
        "train mode; every other candidate changes",
        "one of these (column *change*): the weight (0.25, 1), the estimator (`gradient`), the alignment (`cosine`),",
        "the target class (`label`: the true label instead of the teacher's prediction), the student's mode",
        "(`evalmode`: the student trained in eval mode, `student_train_mode=False`), the schedule (`warm`: a",
        "linear warm-up over the first 30% of the steps), or an adaptive weight (`guard`: the callback",
        "`ReduceTSDWeightOnAgreementDrop(monitor='train/agreement', factor=0.5, tolerance=0.02)` halves the",
        "weight whenever the epoch's training agreement falls 0.02 below its best; training data only, so the",
        "validation fold stays unseen).",
        "",
        "**Rule (fixed before the run).** Choose the candidate with the highest pooled mean d IG-rho among those",
        f"whose pooled mean d agreement vs `kd` is >= -{SELECTION_MAX_AGREEMENT_LOSS} (validation, paired, pooled over",
        "datasets and seeds; only (dataset, seed) blocks where every candidate ran). If none qualifies, choose",
        "the one with the smallest agreement loss and say so.",
        "",
        f"Seeds run: {seeds}; complete blocks: {len(complete)} of {len(blocks)}.",
        "",
        "## Pooled paired deltas vs kd (validation) — the selection table",
        "",
        "mean ± std over (dataset, seed) pairs, with the standard error of the mean.",
        "",
        "| variant | change | n | d agreement | d student acc | d IG-rho | d top-k | qualifies (d agr >= -0.01) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_cfg = VARIANTS["kd+tsd_w0.5"]
    for v, dd in pooled.items():
        cfg = VARIANTS[v]
        change = (
            ", ".join(
                "ReduceTSDWeightOnAgreementDrop (train/agreement, x0.5 below best - 0.02)"
                if k == "guard"
                else f"{k}={cfg[k]}"
                for k in cfg
                if cfg[k] != base_cfg.get(k)
            )
            or "(the reference)"
        )
        q = np.mean(dd["agreement"]) >= -SELECTION_MAX_AGREEMENT_LOSS
        mark = " **(chosen)**" if v == chosen else ""
        lines.append(
            f"| `{v}`{mark} | {change} | {len(dd['agreement'])} | "
            f"{fmt(dd['agreement'])} | {fmt(dd['student_acc'])} | {fmt(dd['ig_spearman'])} | {fmt(dd['ig_topk'])} | "
            f"{'yes' if q else 'no'} |"
        )
    lines += ["", f"**Chosen: `{chosen}`** — {why}.", ""]
    if chosen is not None:
        settings = {k: v for k, v in VARIANTS[chosen].items() if k in DEFAULT_TSD}
        now = "are" if settings == DEFAULT_TSD else "are NOT (update the package or this table)"
        lines += [f"The chosen settings ({settings}) {now} the package default now.", ""]
    if pooled:
        agr = {v: np.mean(d["agreement"]) for v, d in pooled.items()}
        ses = [np.std(d["agreement"], ddof=1) / np.sqrt(len(d["agreement"])) for d in pooled.values()]
        lines += [
            f"How decisive: the candidates' pooled mean d agreement spans {min(agr.values()):+.3f} to "
            f"{max(agr.values()):+.3f}, against standard errors of {min(ses):.3f}-{max(ses):.3f} each; validation",
            f"sets hold {min(int(r['n_eval']) for r in rows)}-{max(int(r['n_eval']) for r in rows)} series "
            "(one series moves agreement by 1/n). Pooled mean d IG-rho spans "
            f"{min(np.mean(d['ig_spearman']) for d in pooled.values()):+.3f} to "
            f"{max(np.mean(d['ig_spearman']) for d in pooled.values()):+.3f} (standard errors "
            f"{min(np.std(d['ig_spearman'], ddof=1) / np.sqrt(len(d['ig_spearman'])) for d in pooled.values()):.3f}-"
            f"{max(np.std(d['ig_spearman'], ddof=1) / np.sqrt(len(d['ig_spearman'])) for d in pooled.values()):.3f}).",
            "",
        ]
    lines += [
        "## Per dataset (validation; paired deltas vs kd, mean ± std over blocks)",
        "",
        "| dataset | n val series (per fold) | variant | n | kd agreement | d agreement | kd IG-rho | d IG-rho |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        for v in cands:
            pr = paired(v, d)
            if not pr:
                continue
            da = [float(a["agreement"]) - float(b["agreement"]) for a, b in pr]
            dr = [float(a["ig_spearman"]) - float(b["ig_spearman"]) for a, b in pr]
            ka = [float(b["agreement"]) for _, b in pr]
            kr = [float(b["ig_spearman"]) for _, b in pr]
            lines.append(
                f"| {d} | {n_val.get(d, '')} | {v} | {len(pr)} | {_ms(ka)} | {_ms(da)} | {_ms(kr)} | {_ms(dr)} |"
            )
    times = [float(r["train_s"]) for r in rows]
    lines += [
        "",
        f"{len(rows)} student runs; student fit time {sum(times):.0f}s in all.",
        "",
    ]
    (out / "selection.md").write_text("\n".join(lines))


def plot(out: Path, datasets: list[str], deltas_of) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one bar series per (student, variant); the label names the family unless it is the default one
    deltas, variants, labels = {}, [], {}
    for st, dd in deltas_of.items():
        for v in BASELINE_OF:
            if not any(k[1] == v for k in dd):
                continue
            key = v if st == DEFAULT_STUDENT else f"{v} [{st}]"
            variants.append(key)
            labels[key] = f"{v} − {BASELINE_OF[v]}" + ("" if st == DEFAULT_STUDENT else f" ({st})")
            deltas.update({(d, key): x for (d, vv), x in dd.items() if vv == v})
    if not variants:
        return
    cols = datasets + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    width = 0.8 / len(variants)
    for ax, metric, title in zip(axes, ("ig_spearman", "agreement"), ("Δ IG-rho (Spearman)", "Δ agreement")):
        for i, v in enumerate(variants):
            xs, ms, ss = [], [], []
            for j, d in enumerate(cols):
                vals = deltas.get((d, v), {}).get(metric)
                if vals:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ms.append(np.mean(vals))
                    ss.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            ax.bar(xs, ms, width, yerr=ss, capsize=2, label=labels[v], color=plt.cm.tab20(i % 20))
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_title(title + " vs base, paired, mean ± std over seeds")
    # legend below the panels (inside, it hid bars once the GRU series were added)
    handles, names = axes[0].get_legend_handles_labels()
    ncol = min(4, len(names))
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=ncol)
    fig.tight_layout(rect=(0, 0.06 * (-(-len(names) // ncol)), 1, 1))
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; with --split cv, folds"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["ce", "kd", "kd+tsd", "kd+tsd_grad", "dkd", "dkd+tsd"],
        choices=list(VARIANTS),
    )
    parser.add_argument(
        "--student",
        default=DEFAULT_STUDENT,
        choices=list(STUDENTS),
        help="student family (GRUClassifier: hidden_size=16); recorded in the CSV's student column",
    )
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget-min", type=float, default=25.0, help="start no new (dataset, seed) after this"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/lightning_tsd_quality_teachers"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-check-report", dest="check_report", action="store_false")
    parser.add_argument(
        "--split",
        choices=["test", "cv", "val"],
        default="test",
        help="test: the report (quality.*); cv: default selection on stratified folds of the train split "
        "(selection.*; --seeds are the folds; teachers trained on the other folds); val: the earlier protocol, "
        "a held-out 25%% per seed",
    )
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument(
        "--occlusion",
        action="store_true",
        help="also measure alignment with captum Occlusion (occ_spearman, occ_topk): independent of the "
        "gradient-based training estimators",
    )
    args = parser.parse_args()
    if args.summarize_only:
        summarize_any(args)
        return
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    check_defaults()
    if args.split == "cv" and min(args.seeds) < 0:
        parser.error(
            "with --split cv, --seeds are block numbers >= 0 (fold = seed % 3, partition = seed // 3)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    run(args)
    summarize_any(args)


if __name__ == "__main__":
    main()
