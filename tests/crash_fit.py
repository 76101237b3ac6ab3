"""Run by tests/test_reliability.py: the resumable fit of ``resumable_fit``, in its own process.

Usage: python tests/crash_fit.py DIR MODE [SCHEDULER]
  straight   fit to the end; write DIR/straight.pt
  crash      fit, and SIGKILL this process at the start of global step 7 (the second batch of the last
             epoch), after the checkpoint of step 6 is on disk: no exception handler or cleanup runs
  resume     fit from DIR/last.ckpt to the end; write DIR/resumed.pt
Each .pt holds the student, the optimizer and scheduler states, the teacher cache and the logged metrics.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_reliability import resumable_fit  # noqa: E402

KILL_AT_STEP = 7


class SigkillAt(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


def main(directory: str, mode: str, scheduler: str | None) -> None:
    torch.set_num_threads(1)
    ckpt = os.path.join(directory, "last.ckpt") if mode == "resume" else None
    extra = [SigkillAt()] if mode == "crash" else []
    model, trainer = resumable_fit(directory, ckpt_path=ckpt, scheduler=scheduler, extra_callbacks=extra)
    configs = trainer.lr_scheduler_configs
    torch.save(
        {
            "student": model.student.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": configs[0].scheduler.state_dict() if configs else None,
            "cache": model.teacher_cache.state_dict(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "global_step": trainer.global_step,
        },
        os.path.join(directory, f"{'straight' if mode == 'straight' else 'resumed'}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None)
