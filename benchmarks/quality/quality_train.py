"""The training side of the quality study (``bench_quality.py``): data splits, the reduced teachers (cached),
the paired student runs and the test-split measures (agreement, KL, ECE, IG-rho, occlusion-rho)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from quality_variants import (
    BINARY,
    CV_FOLDS,
    CV_SPLIT_SEED,
    DEFAULT_STUDENT,
    FIELDS,
    STUDENTS,
    TEACHER,
    VAL_FRACTION,
    VARIANTS,
)  # fmt: skip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/harness.py
import harness  # noqa: E402

IG_EVAL = dict(method="integrated_gradients", steps=32)  # captum IG, 32 steps, zero baseline


def student_of(row: dict) -> str:
    """The student family of a CSV row (rows from before the ``student`` column are NarrowFCN)."""
    return row.get("student") or DEFAULT_STUDENT


def done_runs(csv_path: Path) -> set[tuple[str, str, int, str]]:
    """(student, dataset, seed, variant) of every run already in ``csv_path``."""
    return {(student_of(r), r["dataset"], int(r["seed"]), r["variant"]) for r in harness.read_rows(csv_path)}


def append(csv_path: Path, row: dict, fields: list[str] = FIELDS) -> None:
    """One run's row (rows from before the ``student`` column read as NarrowFCN)."""
    harness.append_row(csv_path, row, fields, defaults={"student": DEFAULT_STUDENT})


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
    from lightning_tsd.attribution import temporal_attribution
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
    harness.quiet_trainer(max_epochs=epochs, limit_val_batches=0).fit(
        clf, train_dataloaders=dm.train_dataloader()
    )
    train_s = time.perf_counter() - t0
    teacher.eval().requires_grad_(False)
    maps = []
    for batch in eval_loader(dm, split):
        with torch.no_grad():
            target = teacher(batch["x"], mask=batch.get("mask")).argmax(1)
        maps.append(temporal_attribution(teacher, batch["x"], target, mask=batch.get("mask"), **IG_EVAL))
    maps = torch.cat(maps)
    torch.save({"state_dict": teacher.state_dict(), "maps": maps, "train_s": train_s}, path)
    return teacher, maps, train_s


def occlusion_maps(model, dm, teacher, split: str) -> torch.Tensor:
    """captum Occlusion maps (windows of T/10 steps, half-overlapping, all channels; the package callbacks'
    default) of the teacher's predicted class over the evaluation split: a perturbation measure that shares
    nothing with the gradient-based training estimators."""
    from lightning_tsd.attribution import temporal_attribution

    maps = []
    for batch in eval_loader(dm, split):
        with torch.no_grad():
            target = teacher(batch["x"], mask=batch.get("mask")).argmax(1)
        maps.append(
            temporal_attribution(model, batch["x"], target, mask=batch.get("mask"), method="occlusion")
        )
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
    from lightning_tsd.attribution import temporal_attribution
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
        s_map = temporal_attribution(student, batch["x"], target, mask=batch.get("mask"), **IG_EVAL)
        out = saliency_alignment(s_map, teacher_maps[offset : offset + n], batch.get("mask"))
        for k in parts:
            parts[k].append(out[k])
        offset += n
    res = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
    if check_report:  # the shortcut must equal the package's report
        full = substitution_report(
            teacher, student, loader, method="integrated_gradients", options={"steps": 32}
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


def _student_factory(student: str):
    from lightning_tsd import models

    student_cls, student_kw = getattr(models, student), STUDENTS[student]
    return lambda dm: student_cls(dm.in_channels, dm.num_classes, **student_kw)


def _todo(args, done: set, name: str, seed: int) -> list[str]:
    todo = [v for v in args.variants if (args.student, name, seed, v) not in done]
    if name in BINARY:  # for K=2, DKD (alpha=1) is exactly KD: TCKD is the full KL, NCKD is 0
        todo = [v for v in todo if not v.startswith("dkd")]
    return todo


def _fit_variant(args, variant: str, teacher, student) -> float:
    """Train one student with the variant's distiller options; its fit time in seconds."""
    from lightning_tsd import ReduceTSDWeightOnAgreementDrop, TemporalSaliencyDistiller

    options = dict(VARIANTS[variant])
    guard = options.pop("guard", None)
    callbacks = [ReduceTSDWeightOnAgreementDrop(**guard)] if guard else []
    from common import as_committed  # the teacher's maps as the committed rows had them

    options = as_committed(options)
    distiller = TemporalSaliencyDistiller(teacher, student, teacher_cache=True, lr=args.student_lr, **options)
    t0 = time.perf_counter()
    harness.quiet_trainer(max_steps=args.student_steps, callbacks=callbacks, limit_val_batches=0).fit(
        distiller, train_dataloaders=args.dm.train_dataloader()
    )
    return time.perf_counter() - t0


def _run_block(args, name: str, seed: int, todo: list[str], state: dict) -> None:
    """Every variant still to run of one (dataset, seed): same initialisation and batch order for all."""
    from lightning_tsd.models import count_parameters

    make_student = _student_factory(args.student)
    dm = args.dm = load_data(name, seed, args.batch_size, args.split)
    teacher, maps, teacher_s = get_teacher(dm, name, seed, args.cache_dir, args.teacher_epochs, args.split)
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
        train_s = _fit_variant(args, variant, teacher, student)
        t0 = time.perf_counter()
        check = not state["checked"] and args.check_report
        metrics = evaluate(teacher, student, dm, maps, check_report=check, split=args.split)
        if occ_maps is not None:
            metrics.update(occlusion_alignment(student, teacher, dm, args.split, occ_maps))
        state["checked"] = True
        row = dict(dataset=name, seed=seed, variant=variant, teacher_params=tp, student_params=sp, train_s=train_s,
                   eval_s=time.perf_counter() - t0, steps=args.student_steps, student=args.student,
                   n_eval=len(eval_loader(dm, args.split).dataset), **metrics)  # fmt: skip
        fields = FIELDS + (["occ_spearman", "occ_topk"] if args.occlusion else [])
        append(state["csv"], row, fields if args.split == "test" else fields + ["n_eval"])
        print(
            f"{args.student} {name:16s} seed {seed} {variant:16s} acc {metrics['student_acc']:.3f} agree "
            f"{metrics['agreement']:.3f} IG-rho {metrics['ig_spearman']:.3f} (teacher acc "
            f"{metrics['teacher_acc']:.3f}, teacher fit {teacher_s:.0f}s, student {train_s:.1f}s, "
            f"eval {row['eval_s']:.1f}s, total {time.perf_counter() - state['start']:.0f}s)",
            flush=True,
        )
        state["summarize"](args)


def run(args, summarize_any) -> None:
    """Every (seed, dataset, variant) not yet in the CSV, until the time budget is spent."""
    csv_path = args.out / ("quality.csv" if args.split == "test" else "selection.csv")
    done = done_runs(csv_path)
    state = dict(csv=csv_path, start=time.perf_counter(), checked=False, summarize=summarize_any)
    for seed in args.seeds:
        for name in args.datasets:
            todo = _todo(args, done, name, seed)
            if not todo:
                continue
            if time.perf_counter() - state["start"] > args.budget_min * 60:
                print(
                    f"budget of {args.budget_min} min spent: stopping before {name} seed {seed}", flush=True
                )
                return
            _run_block(args, name, seed, todo, state)
