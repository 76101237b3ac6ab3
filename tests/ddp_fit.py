"""Run by tests/test_ddp.py: fits a distiller with the given strategy and writes the student's weights.

Usage: python tests/ddp_fit.py OUT_DIR DEVICES SALIENCY [SALIENCY ...]
With DEVICES=2 Lightning's "ddp" launcher re-runs this script for rank 1 (gloo, CPU).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import TinyCNN  # noqa: E402
from trainers import quiet_trainer  # noqa: E402

from lightning_tsd import TemporalSaliencyDistiller  # noqa: E402


def data(n: int = 32, length: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, length, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


def main(out_dir: str, devices: int, methods: list[str]) -> None:
    torch.set_num_threads(1)
    for method in methods:
        torch.manual_seed(0)
        # "ensemble": two teachers (the log of their mean probability), gradient saliency
        teacher = (
            [TinyCNN(1, 3).eval(), TinyCNN(1, 3).eval()] if method == "ensemble" else TinyCNN(1, 3).eval()
        )
        # No BatchNorm in the student: its batch statistics would differ between 2 x 8 and 1 x 16 samples.
        student = TinyCNN(1, 3, width=4, batchnorm=False)
        options = {"window": 4, "stride": 4} if method == "occlusion" else None
        # "project": CE + KD + TSD, the TSD gradient projected off the base gradient where they conflict
        # (a large weight, so that they do); otherwise the student learns from the TSD term alone
        losses = (
            dict(ce_weight=1.0, kd_weight=1.0, base_loss="kd", tsd_weight=20.0, tsd_gradient="project")
            if method == "project"
            else dict(ce_weight=0.0, kd_weight=0.0, base_loss="none", tsd_weight=1.0)
        )
        model = TemporalSaliencyDistiller(
            teacher,
            student,
            saliency="gradient" if method in ("ensemble", "project") else method,
            saliency_options=options,
            lr=0.05,
            optimizer="sgd",
            teacher_cache=True,
            **losses,
        )
        trainer = quiet_trainer(
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_epochs=2,
            limit_val_batches=0,
            use_distributed_sampler=False,
        )
        # The same 16 samples per optimizer step in both runs: 2 ranks x 8 (rank r takes r, r+2, ...),
        # or 1 process x 16. Lightning's own distributed sampler would shuffle, so we set ours.
        sampler = DistributedSampler(data(), num_replicas=devices, rank=trainer.global_rank, shuffle=False)
        trainer.fit(model, DataLoader(data(), batch_size=16 // devices, sampler=sampler))
        rank = trainer.global_rank
        torch.save(
            {"student": model.student.state_dict(), "cache_size": len(model.teacher_cache)},
            os.path.join(out_dir, f"{method}-devices{devices}-rank{rank}.pt"),
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
