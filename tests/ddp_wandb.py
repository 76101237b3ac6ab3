"""Run by tests/test_ddp.py: a 2-process CPU DDP distillation logging to an offline W&B run, with the
saliency callbacks. Usage: python tests/ddp_wandb.py OUT_DIR"""

from __future__ import annotations

import os
import sys

import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from ddp_fit import data  # noqa: E402
from tiny_models import TinyCNN  # noqa: E402
from trainers import quiet_trainer  # noqa: E402

from lightning_tsd import SaliencyAlignmentMonitor, SaliencyMapLogger, TemporalSaliencyDistiller  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TemporalSaliencyDistiller(TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4), saliency="gradient")
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp",
        max_epochs=2,
        num_sanity_val_steps=2,
        logger=WandbLogger(offline=True, save_dir=out_dir, project="tsd-ddp"),
        callbacks=[
            SaliencyAlignmentMonitor(method="gradient", max_batches=2),
            SaliencyMapLogger(num_samples=2, method="gradient"),
        ],
    )
    trainer.fit(model, DataLoader(data(), batch_size=8), DataLoader(data(), batch_size=8))
    torch.save(
        {k: float(v) for k, v in trainer.callback_metrics.items()},
        os.path.join(out_dir, f"metrics-rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
