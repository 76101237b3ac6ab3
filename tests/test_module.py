"""TemporalSaliencyDistiller: the invariants of a fit, the cache, errors, precision, checkpoints."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tiny_models import FAMILIES, TinyCNN
from torch.utils.data import DataLoader
from trainers import quiet_trainer

from lightning_tsd import InvalidBatchError, TemporalSaliencyDistiller, UnsafeCheckpointError, save_teacher
from lightning_tsd.saliency import IG_CHUNK_ROWS, temporal_saliency


def make_data(n: int = 48, length: int = 20, channels: int = 1, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, length, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[torch.arange(n), 0, (y * 5 + 2).clamp_max(length - 1)] += 4.0  # a class-dependent spike
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


def loader(data, batch_size=16, shuffle=False, seed=0):
    return DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )


def trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**kwargs)


def distiller(teacher=None, student=None, seed=0, **kwargs) -> TemporalSaliencyDistiller:
    torch.manual_seed(seed)
    teacher = teacher or TinyCNN(1, 3).eval()
    student = student or TinyCNN(1, 3, width=4)
    kwargs.setdefault("saliency", "gradient")
    return TemporalSaliencyDistiller(teacher, student, **kwargs)


class TeacherModeProbe(Callback):
    def __init__(self):
        self.modes = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.modes.append(module.teacher.training or any(m.training for m in module.teacher.modules()))

    on_validation_batch_start = on_train_batch_start


def test_teacher_frozen_in_eval_mode_and_bit_identical_after_fit():
    model = distiller(tsd_weight=1.0, saliency="integrated_gradients")
    before = copy.deepcopy(model.teacher.state_dict())
    probe = TeacherModeProbe()
    data = make_data()
    trainer(max_epochs=2, callbacks=[probe]).fit(model, loader(data, shuffle=True), loader(data))
    assert probe.modes and not any(probe.modes)
    after = model.teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm buffers
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    optimizer = model.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.teacher.parameters()}
    assert in_optimizer == {id(p) for p in model.student.parameters()}


def count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("saliency", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_one_student_and_one_teacher_forward_per_step(saliency):
    # a student without BatchNorm: integrated gradients then runs x and its interpolants in one call
    model = distiller(student=TinyCNN(1, 3, width=4, batchnorm=False), tsd_weight=1.0, saliency=saliency)
    student_calls, teacher_calls = count_forwards(model.student), count_forwards(model.teacher)
    trainer(max_steps=3, limit_val_batches=0).fit(model, loader(make_data()))
    # one training forward per step, plus one no-grad forward of each model on the first batch, which reads
    # the class count from the outputs
    assert len(student_calls) == 3 + 1
    # the teacher needs no graph: integrated gradients runs its interpolants in chunks of bounded memory
    chunks = 0 if saliency != "integrated_gradients" else math.ceil(16 * 8 / max(16, IG_CHUNK_ROWS))
    assert len(teacher_calls) == 3 * (1 + chunks) + 1


def test_tsd_gradient_alone_reaches_the_student():
    model = distiller(ce_weight=0.0, kd_weight=0.0, tsd_weight=1.0, base_loss="none")
    batch = next(iter(loader(make_data())))
    loss = model.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad for n, p in model.student.named_parameters()}
    assert grads["conv.weight"].abs().sum() > 0 and grads["head.weight"].abs().sum() > 0


def test_tsd_weight_zero_computes_no_saliency(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    model = distiller(tsd_weight=0.0)
    trainer(max_steps=3, limit_val_batches=0).fit(model, loader(make_data()))
    assert calls == []
    # ... and with TSD on, the same counter sees the student's and the teacher's gradient every step
    model = distiller(tsd_weight=1.0, tsd_gradient="sum")
    trainer(max_steps=3, limit_val_batches=0).fit(model, loader(make_data()))
    assert len(calls) == 6
    # the default projected update takes the base and TSD gradients apart: two more per step
    calls.clear()
    model = distiller(tsd_weight=1.0)
    trainer(max_steps=3, limit_val_batches=0).fit(model, loader(make_data()))
    assert len(calls) == 12


def test_tsd_weight_zero_is_exactly_the_base_method():
    data = make_data()
    a = distiller(tsd_weight=0.0)
    trainer(max_epochs=2, limit_val_batches=0).fit(a, loader(data, shuffle=True))
    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4)
    b = TemporalSaliencyDistiller(
        teacher, student, tsd_weight=0.0, saliency="integrated_gradients", alignment="kl"
    )
    trainer(max_epochs=2, limit_val_batches=0).fit(b, loader(data, shuffle=True))
    for (name, p), q in zip(a.student.named_parameters(), b.student.parameters()):
        assert torch.equal(p, q), name


def test_teacher_cache_runs_teacher_only_before_the_first_epoch_and_trains_the_same_student():
    data = make_data()
    cached = distiller(
        tsd_weight=1.0,
        teacher_cache=True,
        saliency="integrated_gradients",
        teacher_saliency_options={"steps": 32},
    )
    calls = count_forwards(cached.teacher)
    per_epoch = []

    class EpochCalls(Callback):
        def on_train_epoch_end(self, trainer, module):
            per_epoch.append(len(calls))

    trainer(max_epochs=3, limit_val_batches=0, callbacks=[EpochCalls()]).fit(
        cached, loader(data, shuffle=True)
    )
    # the fill before the first epoch: 3 batches (x, then 16 * 32 interpolants in chunks); the cache then
    # answers every step and even the class count
    per_batch = 1 + math.ceil(16 * 32 / max(16, IG_CHUNK_ROWS))
    assert per_epoch == [3 * per_batch] * 3
    assert len(cached.teacher_cache) == len(data)

    # the same teacher maps live: the same student (the fill left the shuffle's random state alone)
    live = distiller(tsd_weight=1.0, saliency="integrated_gradients", teacher_saliency_options={"steps": 32})
    trainer(max_epochs=3, limit_val_batches=0).fit(live, loader(data, shuffle=True))
    for (name, p), q in zip(cached.student.named_parameters(), live.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_cached_teacher_maps_are_filled_before_the_first_step(capsys):
    data = make_data()
    cheap = {"saliency": "integrated_gradients", "saliency_options": {"steps": 2, "sampling": "antithetic"}}
    default = distiller(tsd_weight=1.0, teacher_cache=True, **cheap)
    assert default.source.saliency_options == {"steps": 2}  # the student's options, deterministic
    model = distiller(tsd_weight=1.0, teacher_cache=True, teacher_saliency_options={"steps": 32}, **cheap)
    assert (
        model.source.saliency_options == {"steps": 32}
        and model.tsd.saliency_options == cheap["saliency_options"]
    )
    seen = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((len(module.teacher_cache), len(calls)))

    calls = count_forwards(model.teacher)
    trainer(max_epochs=1, limit_val_batches=0, callbacks=[FirstStep()], enable_progress_bar=True).fit(
        model, loader(data, shuffle=True)
    )
    assert "teacher cache: 100%" in capsys.readouterr().err  # the fill's progress bar
    assert seen[0][0] == len(data) and {c for _, c in seen} == {len(calls)}  # no teacher call in the epoch
    x = torch.stack([d["x"] for d in data])
    _, maps = temporal_saliency(model.teacher, x, method="integrated_gradients", steps=32)
    torch.testing.assert_close(model.teacher_cache.saliency[: len(data)], maps)

    off = distiller(tsd_weight=1.0, teacher_cache=True, teacher_cache_precompute=False, **cheap)
    seen.clear()
    trainer(max_epochs=1, limit_val_batches=0, callbacks=[FirstStep()]).fit(off, loader(data))
    assert [n for n, _ in seen] == [0, 16, 32]  # the first epoch fills it, batch by batch


def test_teacher_cache_refuses_augmented_inputs():
    data = make_data()

    class Jitter(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            item = dict(data[i])
            item["x"] = item["x"] + 0.1 * torch.randn_like(item["x"])
            return item

    model = distiller(tsd_weight=1.0, teacher_cache=True)
    with pytest.raises(ValueError, match="changed since the teacher cache stored them"):
        trainer(max_epochs=2, limit_val_batches=0).fit(model, loader(Jitter()))


def test_precompute_teacher_cache_fills_everything_before_the_fit():
    data = make_data()
    model = distiller(tsd_weight=1.0, teacher_cache=True)
    assert model.precompute_teacher_cache(loader(data, batch_size=10)) == len(data)
    calls = count_forwards(model.teacher)
    trainer(max_epochs=1, limit_val_batches=0).fit(model, loader(data, shuffle=True))
    assert calls == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("saliency", ["gradient", "integrated_gradients", "occlusion"])
def test_every_family_as_teacher_and_student(family, saliency):
    torch.manual_seed(1)
    options = {"window": 4, "stride": 4} if saliency == "occlusion" else {}
    model = TemporalSaliencyDistiller(
        FAMILIES[family](1, 3), FAMILIES[family](1, 3), saliency=saliency, saliency_options=options or None
    )
    before = copy.deepcopy(model.student.state_dict())
    trainer(max_steps=2, limit_val_batches=1).fit(
        model, loader(make_data(n=16, length=12), batch_size=8), loader(make_data(n=8, length=12))
    )
    assert torch.isfinite(model.trainer.callback_metrics["train/tsd"])
    assert any(not torch.equal(before[k], v) for k, v in model.student.state_dict().items())


def test_student_eval_mode_option_keeps_student_in_eval():
    model = distiller(student_train_mode=False)
    running = model.student.norm.running_mean.clone()
    trainer(max_steps=2, limit_val_batches=0).fit(model, loader(make_data()))
    assert not model.student.training
    assert torch.equal(model.student.norm.running_mean, running)


def test_bf16_mixed_on_cpu_gives_finite_losses():
    model = distiller(tsd_weight=1.0, saliency="integrated_gradients")
    trainer(max_steps=3, precision="bf16-mixed", limit_val_batches=1).fit(
        model, loader(make_data()), loader(make_data())
    )
    metrics = model.trainer.callback_metrics
    for key in ("train/loss", "train/tsd", "train/ce", "train/kd", "val/acc"):
        assert torch.isfinite(metrics[key]), key


def test_dkd_and_callable_base_losses():
    data = make_data()
    for base in ("dkd", lambda s, t, y: (s - t).pow(2).mean()):
        model = distiller(base_loss=base)
        trainer(max_steps=2, limit_val_batches=0).fit(model, loader(data))
        assert torch.isfinite(model.trainer.callback_metrics["train/kd"])


def test_validation_logs_accuracy_agreement_and_kl_equal_to_direct_computation():
    data = make_data()
    model = distiller()
    trainer(max_epochs=1, limit_train_batches=2).fit(model, loader(data), loader(data, batch_size=7))
    metrics = model.trainer.callback_metrics
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([d["y"] for d in data])
    with torch.no_grad():
        model.eval()
        s, t = model.student(x), model.teacher(x)
    assert float(metrics["val/acc"]) == pytest.approx(float((s.argmax(1) == y).float().mean()), abs=1e-6)
    assert float(metrics["val/agreement"]) == pytest.approx(
        float((s.argmax(1) == t.argmax(1)).float().mean()), abs=1e-6
    )
    kl = torch.nn.functional.kl_div(
        s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean"
    )
    assert float(metrics["val/kl"]) == pytest.approx(float(kl), rel=1e-4)
    # the mean over samples (batches of 7 leave a last batch of 6: a per-batch mean would differ)
    assert float(metrics["val/loss"]) == pytest.approx(
        float(torch.nn.functional.cross_entropy(s, y)), rel=1e-5
    )


# ---------------------------------------------------------------------------------- errors
def test_class_count_mismatch_is_refused_on_the_first_batch_not_from_declarations():
    model = TemporalSaliencyDistiller(TinyCNN(1, 3), TinyCNN(1, 5))  # declared counts are hints: no error yet
    with pytest.raises(ValueError, match="teacher 3, student 5"):
        trainer(max_steps=1).fit(model, loader(make_data()))


def test_teacher_must_be_a_module():
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        TemporalSaliencyDistiller(42, TinyCNN(1, 3))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: {**b, "x": b["x"].unsqueeze(0)}, r"rank 4 with shape \(1, 16, 1, 20\)"),
        (lambda b: {**b, "x": b["x"].long()}, "floating-point tensor, got dtype torch.int64"),
        (
            lambda b: {**b, "x": b["x"].index_put((torch.tensor([0, 3]),), torch.tensor(float("nan")))},
            "40 non-finite value",
        ),
        (lambda b: {**b, "y": b["y"] + 7}, r"labels must lie in \[0, 3\)"),
        (lambda b: {**b, "mask": torch.zeros(16, 20, dtype=torch.bool)}, "mask has no real step"),
    ],
    ids=["rank", "dtype", "nan", "labels", "empty-mask"],
)
def test_bad_batches_raise_before_any_optimizer_step(mutate, message):
    model = distiller()
    before = copy.deepcopy(model.student.state_dict())
    batches = [mutate(b) for b in loader(make_data())]
    with pytest.raises(InvalidBatchError, match=message) as info:
        trainer(max_steps=1, limit_val_batches=0).fit(model, DataLoader(batches, batch_size=None))
    assert "bad batch 0 of epoch 0 (global step 0)" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.student.state_dict().items())


def test_unknown_options_are_named():
    with pytest.raises(ValueError, match="unknown base_loss 'kdd'"):
        distiller(base_loss="kdd")
    with pytest.raises(ValueError, match="unknown alignment"):
        distiller(alignment="l2")
    with pytest.raises(ValueError, match="tsd_weight must be"):
        distiller(tsd_weight=-1)


# ---------------------------------------------------------------------------------- checkpoints
def test_teacher_from_safe_file_and_unsafe_file_refused(tmp_path):
    torch.manual_seed(0)
    teacher = TinyCNN(1, 3).eval()
    path = tmp_path / "teacher.pt"
    save_teacher(teacher, path)
    model = TemporalSaliencyDistiller(str(path), TinyCNN(1, 3, width=4))
    assert all(
        torch.equal(a, b) for a, b in zip(model.teacher.state_dict().values(), teacher.state_dict().values())
    )
    assert not model.teacher.training

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "lightning-tsd-teacher/1", "payload": Evil()}, unsafe)
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError, match="unsafe to load"):
        TemporalSaliencyDistiller(str(unsafe), TinyCNN(1, 3))
    assert not marker.exists()  # the pickled code never ran


def test_resume_from_last_checkpoint_and_load_without_arguments(tmp_path):
    data = make_data()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = distiller(teacher_cache=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(
        model, loader(data)
    )
    assert (tmp_path / "last.ckpt").exists()

    resumed = distiller(teacher_cache=True)
    t = trainer(
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path)],
        limit_val_batches=0,
    )
    calls = count_forwards(resumed.teacher)
    t.fit(resumed, loader(data), ckpt_path=str(tmp_path / "last.ckpt"))
    assert t.current_epoch == 2 and calls == []  # the cache survived the resume

    restored = TemporalSaliencyDistiller.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert restored.hparams.tsd_weight == model.hparams.tsd_weight
    for a, b in zip(restored.teacher.state_dict().values(), model.teacher.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_at_setup_naming_the_supported_ones(strategy_name):
    import types

    import lightning.pytorch.strategies as strategies

    model = distiller()
    # Lightning's own classes, recognised by isinstance (built without __init__: DeepSpeed is not installed)
    strategy = object.__new__(getattr(strategies, strategy_name))
    model._trainer = types.SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match=f"{strategy_name} is not supported.*'ddp'"):
        model.setup("fit")


def test_sync_batchnorm_student_is_refused():
    student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TinyCNN(1, 3, width=4))
    model = distiller(student=student, tsd_weight=1.0)
    with pytest.raises(ValueError, match="SyncBatchNorm layers, which have no double backward"):
        trainer(max_steps=1, limit_val_batches=0).fit(model, loader(make_data()))


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_configurable_optimizer_and_scheduler(scheduler):
    model = distiller(optimizer="adamw", weight_decay=0.01, scheduler=scheduler, lr=0.01)
    t = trainer(max_steps=3, limit_val_batches=0)
    t.fit(model, loader(make_data()))
    assert isinstance(t.optimizers[0], torch.optim.AdamW)
    assert t.optimizers[0].param_groups[0]["weight_decay"] == 0.01
    assert t.lr_scheduler_configs[0].interval == "step"
    assert t.optimizers[0].param_groups[0]["lr"] != 0.01  # the schedule moved it
