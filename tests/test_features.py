"""Feature distillation (FitNets): the loss against a hand-written one (features computed by hand, projector
applied by hand) on the reference models, time resampling, (B, T, C) features, a raw Hugging Face teacher and
student; in the distiller: the logged term, the projector trained and checkpointed, the same student with and
without the teacher cache; clear errors; a 2-process CPU DDP fit equal to a 1-process fit."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tiny_models import TinyRNN
from torch import nn
from torch.utils.data import DataLoader
from trainers import quiet_trainer

from lightning_tsd import FeatureDistillation, TemporalSaliencyDistiller, fitnets_loss
from lightning_tsd.models import FCN, GRUClassifier, InceptionTime, NarrowFCN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

T = 24


def _models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = InceptionTime(1, 3, num_filters=4, depth=3, kernel_size=8).eval()  # blocks output 16 channels
    student = NarrowFCN(1, 3)  # blocks: 8, 16, 8 channels
    return teacher, student


def _by_hand_fcn(student: FCN, x: torch.Tensor, upto: int) -> torch.Tensor:
    h = x
    for block in student.blocks[: upto + 1]:
        h = block(h)
    return h


def _by_hand_inception(teacher: InceptionTime, x: torch.Tensor, upto: int) -> torch.Tensor:
    h = x
    for block in teacher.blocks[: upto + 1]:  # no shortcut before block 2's output
        h = block(h)
    return h


def _data(n: int = 16, length: int = T) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, length, generator=g).cumsum(-1)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


# ----------------------------------------------------------------------------- the loss
def test_fitnets_equals_a_hand_written_loss_on_the_reference_models():
    teacher, student = _models()
    student.eval()
    hints = FeatureDistillation(student, teacher, {"blocks.0": "blocks.2"}, torch.zeros(2, 1, T))
    (projector,) = hints.projectors
    assert isinstance(projector, nn.Conv1d) and (projector.in_channels, projector.out_channels) == (8, 16)
    x = torch.randn(5, 1, T)
    with hints.capture(batch_size=5) as features:
        student(x)
        teacher(x)
    loss = hints(features)
    with torch.no_grad():
        s, t = _by_hand_fcn(student, x, 0), _by_hand_inception(teacher, x, 2)
        projected = torch.einsum("oc,bct->bot", projector.weight[:, :, 0], s) + projector.bias[None, :, None]
        expected = ((projected - t) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # reaches the student and the projector, not the teacher
    assert student.blocks[0][0].weight.grad.abs().sum() > 0 and projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_equal_widths_need_no_projector_and_pairs_sum():
    teacher, student = _models()
    hints = FeatureDistillation(
        student, teacher.requires_grad_(False), {"blocks.1": "blocks.0", "student.blocks.2": "teacher.blocks.1"},
        torch.zeros(2, 1, T),
    )  # fmt: skip
    assert isinstance(hints.projectors[0], nn.Identity) and isinstance(hints.projectors[1], nn.Conv1d)
    x = torch.randn(3, 1, T)
    student.eval()
    with hints.capture(3) as features:
        student(x)
        teacher(x)
    first = F.mse_loss(_by_hand_fcn(student, x, 1), _by_hand_inception(teacher, x, 0))
    second = fitnets_loss(_by_hand_fcn(student, x, 2), _by_hand_inception(teacher, x, 1), hints.projectors[1])
    torch.testing.assert_close(hints(features), first + second)


def test_lengths_are_resampled_to_the_teachers_and_first_rows_are_kept():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.AvgPool1d(2), nn.Flatten(), nn.Linear(6 * 8, 3))
    student = NarrowFCN(1, 3).eval()
    hints = FeatureDistillation(student, teacher, {"blocks.0": "1"}, torch.zeros(2, 1, 16))
    x = torch.randn(4, 1, 16)
    with hints.capture(4) as features:
        student(torch.cat([x, torch.zeros(8, 1, 16)]))  # the batch at the head of a concatenation
        student(torch.ones(4, 1, 16))  # a later call is ignored
        teacher(x)
    conv = hints.projectors[0]
    s = _by_hand_fcn(student, x, 0)
    t = teacher[1](teacher[0](x))
    expected = F.mse_loss(F.interpolate(conv(s), size=8, mode="linear", align_corners=False), t)
    torch.testing.assert_close(hints(features), expected)


def test_btc_features_of_a_recurrent_student():
    teacher, _ = _models()
    torch.manual_seed(0)
    student = GRUClassifier(1, 3, hidden_size=5)
    hints = FeatureDistillation(
        student, teacher, {"gru": "blocks.1"}, torch.zeros(2, 1, T), layout=["BTC", "BCT"]
    )
    x = torch.randn(3, 1, T)
    with hints.capture(3) as features:
        student(x)
        teacher(x)
    states, _ = student.gru(x.transpose(1, 2))  # (B, T, H): the first tensor of the GRU's tuple
    expected = fitnets_loss(states.transpose(1, 2), _by_hand_inception(teacher, x, 1), hints.projectors[0])
    torch.testing.assert_close(hints(features), expected)


def test_raw_hugging_face_teacher_and_student():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(num_input_channels=2, context_length=32, patch_length=8, patch_stride=8, num_targets=3)
    teacher = transformers.PatchTSTForClassification(
        transformers.PatchTSTConfig(
            **common, d_model=16, num_attention_heads=2, num_hidden_layers=1, ffn_dim=32
        )
    ).eval()
    student = transformers.PatchTSMixerForTimeSeriesClassification(
        transformers.PatchTSMixerConfig(**common, d_model=8, num_layers=1)
    )
    distiller = TemporalSaliencyDistiller(
        teacher,
        student,
        saliency="gradient",
        feature_pairs={"head.flatten": "head.flatten"},
        student_train_mode=False,
    )  # names relative to the raw models; the input shape (2, 32) is read from the student's config
    (projector,) = distiller.features.projectors
    assert isinstance(projector, nn.Linear) and (projector.in_features, projector.out_features) == (16, 32)
    x = torch.randn(4, 2, 32)
    with distiller.features.capture(4) as features:
        distiller.student(x)
        distiller.teacher(x)
    by_hand = {}
    hooks = [
        m.head.flatten.register_forward_hook(lambda _, __, out, key=key: by_hand.setdefault(key, out))
        for key, m in (("student", student), ("teacher", teacher))
    ]
    student(past_values=x.transpose(1, 2))
    teacher(past_values=x.transpose(1, 2))
    for hook in hooks:
        hook.remove()
    expected = ((by_hand["student"] @ projector.weight.T + projector.bias - by_hand["teacher"]) ** 2).mean()
    torch.testing.assert_close(distiller.features(features), expected)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 4, 8\).*'head.flatten'"):
        FeatureDistillation(student, teacher, {"model.encoder": "head.flatten"}, torch.zeros(2, 32, 2))


def test_clear_errors():
    teacher, student = _models()
    x = torch.zeros(2, 1, T)
    with pytest.raises(
        ValueError, match=r"the student has no module named 'blocks.9'.*named_modules.*'blocks.0'"
    ):
        FeatureDistillation(student, teacher, {"blocks.9": "blocks.0"}, x)
    with pytest.raises(ValueError, match="the teacher has no module named 'stem'"):
        FeatureDistillation(student, teacher, {"blocks.0": "stem"}, x)
    with pytest.raises(ValueError, match=r"different ranks: pair two \(B, D\) layers or two \(B, C, T\)"):
        FeatureDistillation(student, teacher, {"head": "blocks.0"}, x)
    with pytest.raises(ValueError, match="non-empty"):
        FeatureDistillation(student, teacher, {}, x)
    with pytest.raises(ValueError, match="layout must be one of"):
        FeatureDistillation(student, teacher, {"blocks.0": "blocks.0"}, x, layout="TBC")
    with pytest.raises(ValueError, match="feature_weight must be > 0"):
        TemporalSaliencyDistiller(
            teacher, student, feature_pairs={"blocks.0": "blocks.0"}, feature_weight=0.0
        )
    with pytest.raises(ValueError, match=r"pass feature_input_shape=\(C, T\)"):
        TemporalSaliencyDistiller(teacher, TinyRNN(1, 3), feature_pairs={"rnn": "blocks.0"})
    distiller = TemporalSaliencyDistiller(
        teacher,
        TinyRNN(1, 3),
        feature_pairs={"rnn": "blocks.0"},
        feature_input_shape=(1, T),
        feature_layout=["BTC", "BCT"],
    )
    assert distiller.features.projectors[0].in_channels == 6
    hints = FeatureDistillation(student, teacher, {"blocks.0": "blocks.0"}, x)
    with hints.capture(2) as features:
        student(x)  # the teacher never runs
    with pytest.raises(RuntimeError, match="the teacher's module 'blocks.0' did not run on the batch"):
        hints(features)


# ----------------------------------------------------------------------------- in the distiller
class _Record(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train/feature"]))


def _distiller(teacher, student, **kwargs) -> TemporalSaliencyDistiller:
    return TemporalSaliencyDistiller(
        teacher,
        student,
        saliency="gradient",
        feature_pairs={"blocks.0": "blocks.2"},
        feature_weight=2.0,
        **kwargs,
    )


def _fit(distiller, epochs=1, batch_size=16):
    record = _Record()
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[record])
    trainer.fit(distiller, DataLoader(_data(), batch_size=batch_size))
    return trainer, record.values


@pytest.mark.parametrize("tsd_gradient", ["project", "sum"])
def test_distiller_logs_the_hand_written_term_and_trains_the_projector(tsd_gradient, tmp_path):
    teacher, student = _models()
    distiller = _distiller(teacher, student, tsd_gradient=tsd_gradient, lr=0.01)
    initial_student, conv = copy.deepcopy(student), copy.deepcopy(distiller.features.projectors[0])
    trainer, logged = _fit(distiller)
    batch = torch.stack([d["x"] for d in _data()])
    with torch.no_grad():  # the student trains in train mode: its features use the batch's statistics
        s, t = _by_hand_fcn(initial_student.train(), batch, 0), _by_hand_inception(teacher, batch, 2)
        expected = ((conv(s) - t) ** 2).mean()
    assert logged[0] == pytest.approx(float(expected), rel=1e-5)
    trained = distiller.features.projectors[0]
    assert not torch.equal(trained.weight, conv.weight)  # the distiller's optimizer trains it
    path = tmp_path / "distiller.ckpt"
    trainer.save_checkpoint(path)
    assert "features.projectors.0.weight" in torch.load(path, weights_only=True)["state_dict"]
    loaded = TemporalSaliencyDistiller.load_from_checkpoint(
        path, teacher=teacher, student=NarrowFCN(1, 3), weights_only=True
    )
    assert torch.equal(loaded.features.projectors[0].weight, trained.weight)


def test_the_teacher_cache_gives_the_same_student_with_features():
    runs = []
    for cache in (False, True):
        teacher, student = _models()
        distiller = _distiller(teacher, student, teacher_cache=cache)
        _, logged = _fit(distiller, epochs=2, batch_size=8)
        runs.append((distiller.student.state_dict(), distiller.features.state_dict(), logged))
    (live_student, live_proj, live_logged), (cached_student, cached_proj, cached_logged) = runs
    assert len(live_logged) == 4 and live_logged == pytest.approx(cached_logged, rel=1e-5)
    for name, value in {**live_student, **live_proj}.items():
        torch.testing.assert_close({**cached_student, **cached_proj}[name], value, msg=name)


# ----------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import os, sys
import torch
from torch.utils.data import DataLoader, DistributedSampler
sys.path.insert(0, {tests!r})
from tiny_models import TinyCNN
from trainers import quiet_trainer
from lightning_tsd import TemporalSaliencyDistiller

out, devices = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
teacher = TinyCNN(1, 3, width=6).eval()
student = TinyCNN(1, 3, width=4, batchnorm=False)
model = TemporalSaliencyDistiller(
    teacher, student, saliency="gradient", optimizer="sgd", lr=0.05, teacher_cache=True,
    feature_pairs={{"conv2": "norm"}}, feature_weight=5.0, feature_input_shape=(1, 16),
)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 1, 16, generator=g), torch.randint(0, 3, (32,), generator=g)
data = [{{"x": x[i], "y": y[i], "index": torch.tensor(i)}} for i in range(32)]
trainer = quiet_trainer(devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                        limit_val_batches=0, use_distributed_sampler=False)
sampler = DistributedSampler(data, num_replicas=devices, rank=trainer.global_rank, shuffle=False)
trainer.fit(model, DataLoader(data, batch_size=16 // devices, sampler=sampler))
state = {{k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}}
torch.save(state, os.path.join(out, f"devices{{devices}}-rank{{trainer.global_rank}}.pt"))
"""


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_two_processes_equal_one_process(tmp_path):
    script = tmp_path / "ddp_features.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for devices in (2, 1):
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(devices)],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1, single = (
        torch.load(tmp_path / name, weights_only=True)
        for name in ("devices2-rank0.pt", "devices2-rank1.pt", "devices1-rank0.pt")
    )
    assert "features.projectors.0.weight" in single
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6, msg=name)
