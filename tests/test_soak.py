"""Soak: many training steps on long series (T=2048); resident memory must not grow step over step
after warm-up. Not in the default run: ``python -m pytest -m soak -s`` (prints the figures)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from test_module import distiller
from test_reliability import fit_trainer
from torch.utils.data import DataLoader

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


class RssProbe(pl.Callback):
    def __init__(self):
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.samples.append((trainer.global_step, rss_mib()))


@pytest.mark.soak
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("cache", [True, False], ids=["teacher-cache", "live-teacher"])
def test_memory_is_flat_over_many_steps_at_t2048(cache):
    torch.manual_seed(0)
    n, length, steps, warmup = 64, 2048, 300, 60
    x = torch.randn(n, 1, length).cumsum(-1) / 30
    y = torch.randint(0, 3, (n,))
    data = [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]
    model = distiller(
        teacher_cache=cache,
        tsd_weight=1.0,
        saliency="integrated_gradients",
        saliency_options={"steps": 4},
        on_bad_batch="skip",
    )
    probe = RssProbe()
    fit_trainer(max_steps=steps, max_epochs=-1, callbacks=[probe]).fit(
        model, DataLoader(data, batch_size=16, shuffle=True)
    )
    after = [rss for step, rss in probe.samples if step > warmup]
    third = len(after) // 3
    early, late = sum(after[:third]) / third, sum(after[-third:]) / third
    print(
        f"\nsoak T={length} cache={cache}: {len(probe.samples)} steps, RSS at step 1 {probe.samples[0][1]:.1f} MiB, "
        f"after warm-up min {min(after):.1f} / max {max(after):.1f} MiB, mean first third {early:.1f}, "
        f"last third {late:.1f} MiB (growth {late - early:+.2f} MiB)"
    )
    assert late - early < 8.0, "resident memory grows step over step"
    assert max(after) - min(after) < 32.0
