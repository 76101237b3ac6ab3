"""Run by tests/test_reliability.py: a 2-process DDP fit (CPU, gloo) with a fault injected on one rank.

Usage: python tests/ddp_faults.py OUT_DIR SCENARIO
  skip            rank 1 sees a NaN in its batch of global step 1; on_bad_batch="skip"
  raise           the same with on_bad_batch="raise": the run must fail, not hang
  saliency_error  rank 0 raises inside the student's saliency computation at global step 1
Each rank writes OUT_DIR/SCENARIO-rank{r}.pt with its student, optimizer state and skip count.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import TinyCNN  # noqa: E402

import lightning_tsd.saliency as saliency_module  # noqa: E402
from lightning_tsd import TemporalSaliencyDistiller  # noqa: E402


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
    model = TemporalSaliencyDistiller(
        teacher, student, saliency="gradient", tsd_weight=1.0, lr=0.01, optimizer="adam", teacher_cache=True,
        on_bad_batch="raise" if scenario == "raise" else "skip",
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
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
    trainer.fit(model, DataLoader(batches, batch_size=None))
    optimizer = trainer.optimizers[0].state_dict()
    torch.save(
        {
            "student": model.student.state_dict(),
            "skipped": model.skipped_batches,
            "adam_steps": sorted({float(s["step"]) for s in optimizer["state"].values()}),
            "global_step": trainer.global_step,
        },
        os.path.join(out_dir, f"{scenario}-rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
