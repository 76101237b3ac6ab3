"""Shared pieces of the quality studies (regime.py, screen.py): data splits, the cached teachers, the two
students, the paired student fit, and the validation measures (agreement, IG-rho, occlusion-rho).

Teachers are cached outside git under ``benchmarks/.cache/teachers/`` (override with ``TSD_TEACHER_CACHE``);
``.gitignore``'s ``teachers/`` rule covers that folder. Each file is one teacher, written once by
:func:`get_teacher` with ``lightning_tsd.checkpoint.save_teacher``, with a JSON sidecar describing its fit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/harness.py

import harness  # noqa: E402

RESULTS = HERE.parent / "results"
CACHE = Path(os.environ.get("TSD_TEACHER_CACHE", HERE.parent / ".cache" / "teachers"))
BATCH_SIZE = 16
CV_FOLDS = 3
# The teacher recipe of selection.md (2026-12-03): package InceptionTime at its default size, AdamW + cosine.
TEACHER_KW: dict[str, Any] = {}  # InceptionTime defaults: 32 filters, depth 6, kernel 40
TEACHER_LR, TEACHER_WD = 1e-3, 1e-2
TEACHER_MIN_EPOCHS, TEACHER_MIN_STEPS = 300, 1500
STUDENT_LR = 3e-3


def smoke(out: Path) -> None:
    """Shrink everything for a smoke test: tiny teacher fits, results and cache under ``out``."""
    global RESULTS, CACHE, TEACHER_MIN_EPOCHS, TEACHER_MIN_STEPS
    RESULTS, CACHE = out, out / "teachers"
    TEACHER_MIN_EPOCHS, TEACHER_MIN_STEPS = 2, 4


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Split:
    """Where a teacher and its students train: ``kind="full"`` (the whole train split, seed ``seed``; the
    test split evaluates) or ``kind="cv"`` (fold ``fold`` of repeat ``seed`` of 3-fold CV validates)."""

    kind: str
    seed: int
    fold: int = 0

    @property
    def key(self) -> str:
        return f"full_s{self.seed}" if self.kind == "full" else f"cv{CV_FOLDS}_r{self.seed}_f{self.fold}"


RAW = "-raw"  # a dataset name ending in this: the dataset without z-normalisation (selection.md, amendment 8)


def datamodule(name: str, split: Split):
    """The set-up ``UCRDataModule`` of ``split`` (batch 16); ``"<dataset>-raw"``: with ``normalize=False``."""
    from lightning_tsd.data import UCRDataModule

    kw = dict(batch_size=BATCH_SIZE, seed=split.seed, normalize=not name.endswith(RAW))
    name = name.removesuffix(RAW)
    if split.kind == "full":
        dm = UCRDataModule(name, val_fraction=0.0, **kw)
    else:
        dm = UCRDataModule(name, cv_folds=CV_FOLDS, fold=split.fold, **kw)
    dm.setup()
    return dm


def eval_loader(dm, split: Split):
    """The loader a split is measured on: the test split for ``full``, the held-out fold for ``cv``."""
    return dm.test_dataloader() if split.kind == "full" else dm.val_dataloader()


# ----------------------------------------------------------------------------- teachers
def _cosine_classifier(teacher, num_classes: int):
    """``TimeSeriesClassifier`` with AdamW and a per-step cosine schedule to 0 over the fit."""
    from lightning_tsd.classifier import TimeSeriesClassifier

    class CosineClassifier(TimeSeriesClassifier):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=TEACHER_LR, weight_decay=TEACHER_WD)
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return CosineClassifier(model=teacher, num_classes=num_classes, lr=TEACHER_LR, weight_decay=TEACHER_WD)


def teacher_epochs(n_train: int) -> int:
    """``max(300 epochs, 1500 steps)`` at batch 16."""
    return max(TEACHER_MIN_EPOCHS, math.ceil(TEACHER_MIN_STEPS / math.ceil(n_train / BATCH_SIZE)))


def accuracy(model, loader) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``loader``."""
    right = total = 0
    with torch.no_grad():
        for b in loader:
            right += int((model(b["x"], mask=b.get("mask")).argmax(1) == b["y"]).sum())
            total += len(b["y"])
    return right / total


def train_teacher(name: str, split: Split, dm) -> tuple[torch.nn.Module, dict]:
    """Fit the teacher of ``split`` (seeded by dataset, split and fold) and describe the fit."""
    from lightning_tsd.models import InceptionTime, count_parameters

    torch.manual_seed(10_000 + 100 * split.seed + split.fold + (0 if split.kind == "full" else 50))
    teacher = InceptionTime(dm.in_channels, dm.num_classes, **TEACHER_KW)
    n_train = len(dm.train_dataloader().dataset)
    epochs = teacher_epochs(n_train)
    t0, c0 = time.perf_counter(), time.process_time()
    harness.quiet_trainer(max_epochs=epochs, limit_val_batches=0).fit(
        _cosine_classifier(teacher, dm.num_classes), train_dataloaders=dm.train_dataloader()
    )
    teacher.eval().requires_grad_(False)
    info = dict(
        dataset=name, split=split.key, params=count_parameters(teacher), epochs=epochs, n_train=n_train,
        fit_s=time.perf_counter() - t0, fit_cpu_s=time.process_time() - c0,
        train_acc=accuracy(teacher, dm.train_dataloader()), eval_acc=accuracy(teacher, eval_loader(dm, split)),
        eval_on="test" if split.kind == "full" else "held-out fold", config=TEACHER_KW or "defaults",
    )  # fmt: skip
    return teacher, info


def teacher_path(name: str, split: Split) -> Path:
    return CACHE / f"{name}_{split.key}.pt"


def get_teacher(name: str, split: Split, dm, train: bool = True) -> tuple[torch.nn.Module | None, dict]:
    """The cached teacher of ``(name, split)`` (frozen, eval mode) and its fit description; trained and
    cached first when missing (``train=False``: ``(None, {})`` instead)."""
    from lightning_tsd.checkpoint import load_teacher, save_teacher

    path = teacher_path(name, split)
    if path.exists():
        info = json.loads(path.with_suffix(".json").read_text())
        return load_teacher(path).eval().requires_grad_(False), info
    if not train:
        return None, {}
    teacher, info = train_teacher(name, split, dm)
    save_teacher(teacher, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return teacher, info


# ----------------------------------------------------------------------------- students
def tenth_filters(dm, teacher_params: int) -> int:
    """FCN filters whose parameter count is closest to a tenth of the teacher's."""
    from lightning_tsd.models import FCN, count_parameters

    def gap(f: int) -> float:
        return abs(math.log(count_parameters(FCN(dm.in_channels, dm.num_classes, f)) * 10 / teacher_params))

    return min(range(4, 129), key=gap)


def make_student(size: str, dm, teacher_params: int) -> torch.nn.Module:
    """``size="tiny"``: NarrowFCN (8 filters); ``size="tenth"``: FCN at ~1/10 of the teacher's parameters;
    ``size="gru"``: the recurrent student of issue 9, the package's GRUClassifier at its defaults (hidden 32,
    one layer, mean pooling; ~3.4k parameters for one channel)."""
    from lightning_tsd.models import FCN, GRUClassifier, NarrowFCN

    if size == "tiny":
        return NarrowFCN(dm.in_channels, dm.num_classes)
    if size == "tenth":
        return FCN(dm.in_channels, dm.num_classes, tenth_filters(dm, teacher_params))
    if size == "gru":
        return GRUClassifier(dm.in_channels, dm.num_classes)
    raise ValueError(f"student size must be 'tiny', 'tenth' or 'gru', got {size!r}")


def distiller(teacher, student, options: dict):
    """The ``TemporalSaliencyDistiller`` of one run (teacher cache on, Adam 3e-3), with the teacher's maps as
    the committed studies computed them: the student's estimator options without sampling (not the cache's
    32-step default of 2026-12-08), filled batch by batch (no fill before the fit)."""
    from lightning_tsd import TemporalSaliencyDistiller

    return TemporalSaliencyDistiller(
        teacher, student, teacher_cache=True, lr=STUDENT_LR, **as_committed(options)
    )


def as_committed(options: dict) -> dict:
    """``options`` with the teacher-cache settings of the studies committed before 2026-12-08 made explicit."""
    from lightning_tsd.teacher import teacher_options

    pinned = dict(options)
    pinned.setdefault("teacher_saliency_options", teacher_options(options.get("saliency_options")))
    pinned.setdefault("teacher_cache_precompute", False)
    return pinned


def fit_student(model, dm, steps: int, seed: int, callbacks=()) -> dict:
    """Fit ``model`` for ``steps`` steps with the batch order of ``seed``; wall and CPU seconds."""
    torch.manual_seed(20_000 + seed)  # the shuffle of the train loader: the same for every paired run
    t0, c0 = time.perf_counter(), time.process_time()
    harness.quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=list(callbacks)).fit(
        model, train_dataloaders=dm.train_dataloader()
    )
    return dict(fit_s=time.perf_counter() - t0, cpu_ms_per_step=1000 * (time.process_time() - c0) / steps)


# ----------------------------------------------------------------------------- measures
IG = dict(method="integrated_gradients", steps=32)
OCCLUSION = dict(method="occlusion")  # window T/10, stride half a window (the module's defaults)


def maps(model, batches: list[dict], targets: list[torch.Tensor], spec: dict) -> list[torch.Tensor]:
    """Attribution maps of ``model`` for the given targets, one ``(B, T)`` tensor per batch."""
    from lightning_tsd.attribution import temporal_attribution

    options = {k: v for k, v in spec.items() if k != "method"}
    return [
        temporal_attribution(model, b["x"], t, mask=b.get("mask"), method=spec["method"], **options)
        for b, t in zip(batches, targets)
    ]


@dataclass
class Reference:
    """The teacher's side of a validation set: batches, predicted classes and its IG / occlusion maps."""

    batches: list[dict]
    targets: list[torch.Tensor]
    ig: list[torch.Tensor]
    occ: list[torch.Tensor]


def reference(teacher, loader, with_maps: bool = True) -> Reference:
    """The teacher's side of ``loader``; ``with_maps=False``: predicted classes only (empty map lists),
    enough for :func:`agreement`."""
    batches = list(loader)
    with torch.no_grad():
        targets = [teacher(b["x"], mask=b.get("mask")).argmax(1) for b in batches]
    if not with_maps:
        return Reference(batches, targets, [], [])
    return Reference(
        batches, targets, maps(teacher, batches, targets, IG), maps(teacher, batches, targets, OCCLUSION)
    )


def agreement(student, ref: Reference) -> float:
    student.eval()
    with torch.no_grad():
        same = [
            (student(b["x"], mask=b.get("mask")).argmax(1) == t) for b, t in zip(ref.batches, ref.targets)
        ]
    return float(torch.cat(same).float().mean())


def rho(student, ref: Reference, spec: dict, teacher_maps: list[torch.Tensor]) -> float:
    """Mean per-series Spearman between the student's and the teacher's maps (real steps only)."""
    from lightning_tsd.functional import saliency_alignment

    student.eval()
    values = [
        saliency_alignment(s, t, b.get("mask"))["spearman"]
        for s, t, b in zip(maps(student, ref.batches, ref.targets, spec), teacher_maps, ref.batches)
    ]
    return float(torch.cat(values).mean())


def measure(student, ref: Reference) -> dict:
    """Agreement, IG-rho and occlusion-rho of a trained student on the reference's series."""
    return dict(
        agreement=agreement(student, ref),
        ig_rho=rho(student, ref, IG, ref.ig),
        occ_rho=rho(student, ref, OCCLUSION, ref.occ),
    )


# ----------------------------------------------------------------------------- statistics
def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% t-interval (NaN bounds for fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def format_ci(ci: tuple[float, float, float]) -> str:
    """``mean [lo, hi]`` of :func:`mean_ci` (the mean alone when there is no interval)."""
    mean, lo, hi = ci
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo == lo else f"{mean:+.3f}"


def latest_runs(rows: list[dict], block, member, run) -> dict:
    """``{block(row): {member(row): row}}``, each block from its latest run only: ``run(row)`` of the block's
    last row in the CSV. Rows of an earlier run of a block (another machine, teacher or step count) are
    superseded, never pooled with the new ones."""
    from collections import defaultdict

    latest = {block(r): run(r) for r in rows}
    out: dict = defaultdict(dict)
    for r in rows:
        if run(r) == latest[block(r)]:
            out[block(r)][member(r)] = r
    return out


# ----------------------------------------------------------------------------- command lines
def add_run_options(p) -> None:
    """The ``--threads`` and ``--smoke`` options of the screen and test-split scripts."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--smoke", type=Path, default=None, help="smoke test: tiny teachers, everything in this folder"
    )


def apply_run_options(args) -> None:
    torch.set_num_threads(args.threads)
    if args.smoke:
        smoke(args.smoke)
