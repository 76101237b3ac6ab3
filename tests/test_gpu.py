"""GPU-only paths: cuDNN RNNs (no double backward, no eval-mode backward) and fp16 with a GradScaler
(the inner autograd.grad is not loss-scaled). Skipped where CUDA does not exist."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import FAMILIES, TinyCNN
from torch.utils.data import DataLoader

from lightning_tsd import TemporalSaliencyDistiller, temporal_saliency

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _data(n=32, length=24):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, length, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_cudnn_rnn_teacher_in_eval_and_student_double_backward(family):
    torch.manual_seed(0)
    teacher = FAMILIES[family](1, 3).cuda().eval()
    student = FAMILIES[family](1, 3).cuda()
    x = torch.randn(4, 1, 16, device="cuda")
    # the trap itself: a cuDNN RNN in eval mode refuses backward
    with pytest.raises(RuntimeError, match="cudnn RNN backward can only be called in training mode"):
        xi = x.clone().requires_grad_()
        teacher(xi)[:, 0].sum().backward()
    _, teacher_map = temporal_saliency(teacher, x, method="gradient")
    logits, student_map = temporal_saliency(student, x, method="integrated_gradients", create_graph=True)
    (student_map - teacher_map).pow(2).mean().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for n, p in student.named_parameters()
        if "weight" in n
    )


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_fit_on_gpu_has_finite_losses_and_frozen_teacher(precision):
    torch.manual_seed(0)
    model = TemporalSaliencyDistiller(
        TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4), saliency="integrated_gradients"
    )
    before = copy.deepcopy(model.teacher.state_dict())
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(_data(), batch_size=8), DataLoader(_data(), batch_size=16))
    for key in ("train/loss", "train/tsd", "val/acc", "val/kl"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert trainer.callback_metrics["train/tsd"] > 0
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v.cpu(), before[k]), k


def test_fp16_saliency_matches_fp32_saliency_under_autocast():
    """Under autocast the saliency path stays fp32: the map equals the fp32 map (no fp16 underflow)."""
    torch.manual_seed(0)
    model = TinyCNN(1, 3).cuda().eval()
    x = torch.randn(8, 1, 64, device="cuda") * 1e-3  # small inputs: fp16 gradients would underflow
    _, reference = temporal_saliency(model, x, method="input_x_gradient")
    with torch.autocast("cuda", dtype=torch.float16):
        _, mixed = temporal_saliency(model, x, method="input_x_gradient")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference)


def test_steady_state_step_makes_at_most_one_device_sync():
    """The lean step on a real device: CUDA's sync debug mode warns on every synchronising call."""
    import warnings

    from lightning_tsd import TeacherCache

    class SyncsPerStep(pl.Callback):
        def __init__(self):
            self.per_step = []

        def setup(self, trainer, module, stage):
            step = module.training_step

            def counted(*args, **kwargs):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        out = step(*args, **kwargs)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                self.per_step.append([str(w.message) for w in caught if "synchroniz" in str(w.message)])
                return out

            module.training_step = counted

    torch.manual_seed(0)
    probe = SyncsPerStep()
    cache = TeacherCache(device="cuda")  # on the device: the lookup needs no copy
    model = TemporalSaliencyDistiller(
        TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4), saliency="gradient", tsd_weight=1.0, teacher_cache=cache
    )
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(model, DataLoader(_data(), batch_size=8))
    steady = probe.per_step[8:]  # epoch 3: the cache is complete after an epoch served from it
    assert steady and all(len(syncs) <= 1 for syncs in steady), steady
