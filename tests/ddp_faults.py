"""Run by tests/test_reliability.py: a 2-process DDP fit (CPU, gloo) with a fault injected on one rank.

Usage: python tests/ddp_faults.py OUT_DIR SCENARIO
  skip            rank 1 sees a NaN in its batch of global step 1; on_bad_batch="skip"
  raise           the same with on_bad_batch="raise": the run must fail, not hang
  saliency_error  rank 0 raises inside the student's saliency computation at global step 1
  val             rank 1's validation batches have no labels (rank 0's have), and a
                  ReduceTSDWeightOnAgreementDrop monitors a value each rank logs differently (unsynced)
Each rank writes OUT_DIR/SCENARIO-rank{r}.pt with its student, optimizer state and skip count (and, for
"val", its validation metrics and the callback's scale).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import TinyCNN  # noqa: E402
from trainers import quiet_trainer  # noqa: E402

import lightning_tsd.saliency as saliency_module  # noqa: E402
from lightning_tsd import ReduceTSDWeightOnAgreementDrop, TemporalSaliencyDistiller  # noqa: E402


class RankDependentValue(TemporalSaliencyDistiller):
    """Logs ``val/rank_value``, unsynced: rank 0 sees a drop after epoch 0, rank 1 a rise."""

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        values = {0: [0.9, 0.5], 1: [0.5, 0.9]}[self.global_rank]
        self.log("val/rank_value", values[self.current_epoch])


def rank_batches(rank: int, poison: bool, n_batches: int = 2, batch_size: int = 4, length: int = 16):
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for i in range(n_batches):
        x = torch.randn(batch_size, 1, length, generator=g)
        y = torch.randint(0, 3, (batch_size,), generator=g)
        index = torch.arange(batch_size) + batch_size * (2 * i + rank)
        batches.append({"x": x, "y": y, "index": index})
    if poison and rank == 1:
        batches[1]["x"][2, 0, 5] = float("nan")  # epoch 0, batch 1: global step 1
    return batches


def main(out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = TinyCNN(1, 3).eval()
    student = TinyCNN(1, 3, width=4, batchnorm=False)
    model = (RankDependentValue if scenario == "val" else TemporalSaliencyDistiller)(
        teacher,
        student,
        saliency="gradient",
        tsd_weight=1.0,
        lr=0.01,
        optimizer="adam",
        teacher_cache=True,
        on_bad_batch="raise" if scenario == "raise" else "skip",
    )
    guard = ReduceTSDWeightOnAgreementDrop(monitor="val/rank_value", tolerance=0.1)
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=2,
        use_distributed_sampler=False,
        limit_val_batches=None if scenario == "val" else 0,
        num_sanity_val_steps=0,
        callbacks=[guard] if scenario == "val" else None,
    )
    rank = trainer.global_rank
    if scenario == "saliency_error" and rank == 0:
        original, calls = saliency_module.ESTIMATORS["gradient"], []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:  # teacher + student per step: the student's call of step 1
                raise RuntimeError("injected failure inside the saliency computation on rank 0")
            return original(*args, **kwargs)

        saliency_module.ESTIMATORS["gradient"] = failing
    batches = rank_batches(rank, poison=scenario in ("skip", "raise"))
    val = None
    if scenario == "val":
        val = rank_batches(rank, poison=False)
        if rank == 1:
            val = [{"x": b["x"], "index": b["index"]} for b in val]  # no labels on this rank
    trainer.fit(
        model, DataLoader(batches, batch_size=None), DataLoader(val, batch_size=None) if val else None
    )
    optimizer = trainer.optimizers[0].state_dict()
    torch.save(
        {
            "student": model.student.state_dict(),
            "skipped": model.skipped_batches,
            "adam_steps": sorted({float(s["step"]) for s in optimizer["state"].values()}),
            "global_step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "tsd_weight_scale": model.tsd_weight_scale,
        },
        os.path.join(out_dir, f"{scenario}-rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
