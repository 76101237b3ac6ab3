"""Does TSD make a student agree with its teacher, and explain its predictions like the teacher?

For each dataset and seed: train an InceptionTime teacher once (cross-entropy, ``TimeSeriesClassifier``),
then distil it into NarrowFCN students with ``TemporalSaliencyDistiller``. The variants of one
(dataset, seed) share the student's initialisation and the batch order (paired comparison).

Measured on the test split: student accuracy, top-1 agreement with the teacher, and saliency alignment
measured independently of the training estimator: captum IntegratedGradients (32 steps, zero baseline,
target = the teacher's predicted class), |attribution| summed over channels, Spearman (and Pearson,
cosine, top-10% overlap) over time per series, averaged over the test set. This is what
``lightning_tsd.report.substitution_report(teacher, student, loader, method="integrated_gradients",
options={"steps": 32})`` computes; the teacher's maps are computed once per (dataset, seed) with the same
function (``lightning_tsd.attribution.temporal_attribution``) and reused for every student, and the first
run checks the numbers against ``substitution_report`` itself.

Results go to ``benchmarks/results/``: appended to ``quality.csv`` one run at a time (runs already there are
skipped, so the script resumes where it stopped); ``quality.md`` and ``quality.png`` are rewritten from the
CSV after every run. ``--split cv`` runs the default selection on cross-validation folds of the train split
instead (``selection.csv`` / ``selection.md``).

Code: ``quality_variants.py`` (variants, columns), ``quality_train.py`` (teachers, students, measures),
``quality_tables.py`` (``quality.md``/``.png``), ``selection_tables.py`` (``selection.md``); shared pieces
(resumable CSV, quiet Trainer) from ``benchmarks/harness.py``.

Usage: ``python benchmarks/quality/bench_quality.py [--seeds 0 1] [--datasets GunPoint ...] [--budget-min 25]
[--student NarrowFCN|GRUClassifier] [--variants ce kd ...]``

``--student`` picks the student family (default NarrowFCN; GRUClassifier with ``hidden_size=16``); it is
recorded in the CSV's ``student`` column (rows written before that column existed are NarrowFCN; the CSV is
rewritten once with the column added) and every summary table is split by it. The ``ce`` variant (the
student alone, cross-entropy only) is not in the default ``--variants``: ask for it by name.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from quality_tables import summarize
from quality_train import run
from quality_variants import DATASETS, DEFAULT_STUDENT, RESULTS, STUDENTS, VARIANTS
from selection_tables import summarize_selection


def summarize_any(args) -> None:
    (summarize if args.split == "test" else summarize_selection)(args.out)


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
    run_study(parser, args)


def run_study(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.split == "cv" and min(args.seeds) < 0:
        parser.error(
            "with --split cv, --seeds are block numbers >= 0 (fold = seed % 3, partition = seed // 3)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    run(args, summarize_any)
    summarize_any(args)


if __name__ == "__main__":
    main()
