"""DDP on CPU (gloo): gradients that reach the student only through the TSD term's double backward are
averaged across ranks, so a 2-process fit equals a 1-process fit on the same global batches; with the
projected update, the projection sees the global batch's gradients on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TinyCNN

METHODS = [
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "occlusion",
    "ensemble",
    "project",
]  # ensemble: 2 teachers; project: CE + KD + TSD with the projected update
SCRIPT = Path(__file__).with_name("ddp_fit.py")


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_two_processes_equal_one_process(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for devices in (2, 1):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), str(devices), *METHODS],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for method in METHODS:
        torch.manual_seed(0)
        for _ in range(2 if method == "ensemble" else 1):
            TinyCNN(1, 3)  # same draws as the script: the teacher(s) first
        initial = TinyCNN(1, 3, width=4, batchnorm=False).state_dict()
        rank0 = torch.load(tmp_path / f"{method}-devices2-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{method}-devices2-rank1.pt", weights_only=True)
        single = torch.load(tmp_path / f"{method}-devices1-rank0.pt", weights_only=True)
        # every rank cached every sample after the epoch-end sync, though each saw only half
        assert rank0["cache_size"] == rank1["cache_size"] == single["cache_size"] == 32
        for name, value in single["student"].items():
            assert torch.equal(rank0["student"][name], rank1["student"][name]), (method, name)
            torch.testing.assert_close(
                rank0["student"][name], value, rtol=1e-4, atol=1e-6, msg=f"{method} {name}"
            )
        # the TSD term alone moved every weight (biases before a ReLU get no second-order signal)
        moved = [not torch.equal(initial[n], v) for n, v in single["student"].items() if n.endswith("weight")]
        assert all(moved), method


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_wandb_offline_only_rank_zero_logs_and_nothing_hangs(tmp_path):
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("ddp_wandb.py")), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 0 only
    images = list((runs[0] / "files" / "media" / "images").glob("saliency_maps_*.png"))
    assert len(images) == 4  # 2 samples x 2 epochs, from rank 0 alone
    rank0 = torch.load(tmp_path / "metrics-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "metrics-rank1.pt", weights_only=True)
    # metrics are synchronised: both ranks hold the same epoch values
    for key in ("val/agreement", "val/kl", "val/saliency_spearman", "val/acc"):
        assert rank0[key] == pytest.approx(rank1[key], abs=1e-6), key
