"""Reliability: bad-batch policy (single process and DDP faults), bit-exact resume after a crash,
determinism, and safe, atomic checkpoints."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_module import distiller, make_data
from torch.utils.data import DataLoader, DistributedSampler
from trainers import quiet_trainer

from lightning_tsd import CorruptCheckpointError, UnsafeCheckpointError, load_teacher, save_teacher
from lightning_tsd._batch import NonFiniteLossError
from lightning_tsd.checkpoint import atomic_torch_save
from lightning_tsd.plugins import AtomicCheckpointIO

FAULTS = Path(__file__).with_name("ddp_faults.py")


def fit_trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{"limit_val_batches": 0, **kwargs})


def batches(n=4, batch_size=8, seed=0):
    return list(DataLoader(make_data(n * batch_size, seed=seed), batch_size=batch_size))


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ bad batches, one process
def test_skip_policy_leaves_no_trace_of_bad_batches():
    good = batches()
    nan = {**good[1], "x": good[1]["x"].clone()}
    nan["x"][0, 0, 3] = float("nan")
    huge = {**good[2], "x": torch.full_like(good[2]["x"], 3e38)}  # finite input, non-finite loss
    poisoned = [good[0], nan, good[1], huge, good[2], good[3]]

    reference = distiller(teacher_cache=True, on_bad_batch="skip")
    fit_trainer().fit(reference, DataLoader(good, batch_size=None))
    # the poisoned batches reuse the good batches' indices with other values: no fill before the fit
    model = distiller(teacher_cache=True, on_bad_batch="skip", teacher_cache_precompute=False)
    t = fit_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, DataLoader(poisoned, batch_size=None))
    skipped = [str(w.message) for w in caught if "on_bad_batch='skip'" in str(w.message)]
    assert len(skipped) == 2 and "1 non-finite value" in skipped[0] and "loss is not finite" in skipped[1]
    assert model.skipped_batches == 2 and float(t.callback_metrics["train/skipped_batches"]) == 2.0
    # the student (BatchNorm statistics included), the optimizer state and the cache equal a run without them
    assert state_equal(model.student.state_dict(), reference.student.state_dict())
    steps = {float(s["step"]) for s in t.optimizers[0].state_dict()["state"].values()}
    assert steps == {4.0} and t.global_step == 6
    assert len(model.teacher_cache) == 32 and bool(torch.isfinite(model.teacher_cache.logits).all())


def test_raise_policy_refuses_a_non_finite_loss_before_the_step():
    good = batches()
    huge = {**good[1], "x": torch.full_like(good[1]["x"], 3e38)}
    model = distiller(teacher_cache=True)
    t = fit_trainer()
    t.fit(model, DataLoader(good[:1], batch_size=None))
    before = copy.deepcopy(model.student.state_dict())
    cached = len(model.teacher_cache)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at batch 0 .*on_bad_batch='skip'"):
        fit_trainer().fit(model, DataLoader([huge], batch_size=None))
    assert state_equal(model.student.state_dict(), before)  # running statistics restored too
    assert len(model.teacher_cache) == cached  # nothing non-finite was cached


def test_unknown_bad_batch_policy_is_named():
    with pytest.raises(ValueError, match="on_bad_batch must be one of"):
        distiller(on_bad_batch="ignore")


# ------------------------------------------------------------------------------ faults under DDP
@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_faults_skip_together_or_fail_without_hanging(tmp_path):
    """Three 2-process fits at once: a NaN on rank 1 only (skip and raise), an error inside rank 0's saliency."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {}
    for port, scenario in enumerate(("skip", "raise", "saliency_error")):
        procs[scenario] = subprocess.Popen(
            [sys.executable, str(FAULTS), str(tmp_path), scenario],
            env={**env, "MASTER_PORT": str(29420 + 7 * port + os.getpid() % 50)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outputs = {}
    for scenario, proc in procs.items():
        try:
            outputs[scenario] = proc.communicate(timeout=200)[0]  # waits for rank 1 too (it holds the pipe)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            pytest.fail(f"DDP scenario {scenario!r} hung")
    assert procs["skip"].returncode == 0, outputs["skip"][-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"skip-rank{r}.pt", weights_only=True) for r in (0, 1))
    # the poisoned batch comes back in epoch 2: 2 of the 4 steps skipped on both ranks, optimizer stepped twice
    assert rank0["skipped"] == rank1["skipped"] == 2 and rank0["global_step"] == 4
    assert rank0["adam_steps"] == rank1["adam_steps"] == [2.0]
    assert state_equal(rank0["student"], rank1["student"])
    assert all(bool(torch.isfinite(v).all()) for v in rank0["student"].values())

    assert procs["raise"].returncode != 0
    assert "1 non-finite value(s)" in outputs["raise"] and "bad batch 1 of epoch 0" in outputs["raise"]
    assert procs["saliency_error"].returncode != 0
    assert "injected failure inside the saliency computation" in outputs["saliency_error"]
    assert not (tmp_path / "raise-rank0.pt").exists() and not (tmp_path / "saliency_error-rank1.pt").exists()


def test_ddp_validation_with_labels_on_one_rank_only_and_the_weight_guard_decide_together(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(29480 + os.getpid() % 50)}
    proc = subprocess.run(
        [sys.executable, str(FAULTS), str(tmp_path), "val"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"val-rank{r}.pt", weights_only=True) for r in (0, 1))
    # accuracy from rank 0's labelled batches, computed on both ranks (no hang: both called compute())
    assert "val/acc" in rank0["metrics"] and rank0["metrics"]["val/acc"] == rank1["metrics"]["val/acc"]
    assert rank0["metrics"]["val/agreement"] == rank1["metrics"]["val/agreement"]
    # rank 0 saw a drop (0.9 -> 0.5), rank 1 a rise: rank 0's cut holds on both ranks (the module owns the scale)
    assert rank0["tsd_weight_scale"] == rank1["tsd_weight_scale"] == 0.5
    assert state_equal(rank0["student"], rank1["student"])


# ------------------------------------------------------------------------------ resume after a crash
class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (``state_dict``/``load_state_dict``): it records the
    batches yielded in the current epoch and skips them on resume. Its sampler must repeat its order for
    an epoch (``DistributedSampler`` + ``set_epoch``, which Lightning calls). torchdata's
    ``StatefulDataLoader`` does the same in general."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded, self._skip, self._resume_epoch = 0, 0, None

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._skip if self._resume_epoch == epoch else 0
        self._skip, self._resume_epoch, self._yielded = 0, None, skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self):
        return {"epoch": getattr(self.sampler, "epoch", 0), "consumed": self._yielded}

    def load_state_dict(self, state):
        self._resume_epoch, self._skip = state["epoch"], state["consumed"]


class EagerResumableLoader(ResumableLoader):
    """Like torchdata's ``StatefulDataLoader``: a loaded state is applied when the next iterator is
    created (``iter()``), not lazily at the first batch."""

    def __iter__(self):
        skip, self._skip, self._yielded = self._skip, 0, self._skip  # whatever state was loaded last
        return self._batches(skip)

    def _batches(self, skip):
        for i, batch in enumerate(DataLoader.__iter__(self)):
            if i >= skip:
                self._yielded += 1
                yield batch


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at global step {self.step}")


def resumable_fit(
    dirpath, crash_at=None, ckpt_path=None, scheduler=None, extra_callbacks=(), loader=ResumableLoader
):
    pl.seed_everything(0)
    data = make_data(48)
    model = distiller(teacher_cache=True, tsd_weight=1.0, scheduler=scheduler)
    callbacks = [
        pl.callbacks.ModelCheckpoint(dirpath=dirpath, save_last=True, every_n_train_steps=1, save_top_k=0)
    ]
    callbacks += list(extra_callbacks)
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    t = fit_trainer(
        max_epochs=3,
        callbacks=callbacks,
        enable_checkpointing=True,
        deterministic=True,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
    )
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    t.fit(model, loader(data, batch_size=16, sampler=sampler), ckpt_path=ckpt_path)
    return model, t


@pytest.mark.parametrize(
    "scheduler,loader",
    [
        (None, ResumableLoader),
        ("cosine", ResumableLoader),
        ("onecycle", ResumableLoader),
        (None, EagerResumableLoader),
        ("cosine", EagerResumableLoader),
    ],
    ids=["lazy", "lazy-cosine", "lazy-onecycle", "eager", "eager-cosine"],
)
def test_resume_after_a_crash_mid_epoch_is_bit_exact(tmp_path, scheduler, loader):
    # With a scheduler, Lightning builds the train loader early (estimated_stepping_batches) and would not
    # restore its mid-epoch state; the distiller hands the state over in on_train_start and makes a new
    # iterator, so loaders that apply their state at iter() time (StatefulDataLoader) resume too.
    straight, t_straight = resumable_fit(tmp_path / "straight", scheduler=scheduler, loader=loader)
    with pytest.raises(RuntimeError, match="simulated crash at global step 4"):
        resumable_fit(
            tmp_path / "crashed", crash_at=4, scheduler=scheduler, loader=loader
        )  # epoch 2, 2nd batch
    last = tmp_path / "crashed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed, t_resumed = resumable_fit(
        tmp_path / "crashed", ckpt_path=str(last), scheduler=scheduler, loader=loader
    )
    assert t_resumed.global_step == t_straight.global_step == 9
    assert state_equal(resumed.student.state_dict(), straight.student.state_dict())
    opt_a, opt_b = t_straight.optimizers[0].state_dict(), t_resumed.optimizers[0].state_dict()
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[k], opt_b["state"][key][k]) for k in state)
    if scheduler is not None:
        lr_a, lr_b = (t.lr_scheduler_configs[0].scheduler.state_dict() for t in (t_straight, t_resumed))
        assert lr_a["last_epoch"] == lr_b["last_epoch"] == 9 and lr_a["_last_lr"] == lr_b["_last_lr"]
    assert len(resumed.teacher_cache) == 48
    assert torch.equal(resumed.teacher_cache.saliency, straight.teacher_cache.saliency)


CRASH = Path(__file__).with_name("crash_fit.py")


def test_sigkill_mid_epoch_then_resume_in_a_new_process_is_bit_exact(tmp_path):
    """A process killed with SIGKILL (no handler, no cleanup) in the last epoch, resumed by a fresh process
    from last.ckpt, ends bit-identical to an uninterrupted process: student, Adam and cosine-schedule state,
    teacher cache, and the last epoch's train/agreement (whose metric state is checkpointed)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(directory, mode):
        directory.mkdir(exist_ok=True)
        return subprocess.run(
            [sys.executable, str(CRASH), str(directory), mode, "cosine"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    straight = run(tmp_path / "straight", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = run(tmp_path / "crashed", "crash")
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr[-3000:])  # killed by SIGKILL
    assert not (tmp_path / "crashed" / "resumed.pt").exists()  # it never got to write its results
    killed = torch.load(tmp_path / "crashed" / "last.ckpt", weights_only=True)
    assert killed["global_step"] == 7
    assert int(killed["tsd_train_agreement"]["count"]) == 16  # the last epoch's running agreement: 1 batch
    resumed = run(tmp_path / "crashed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(tmp_path / "straight" / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed" / "resumed.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    assert state_equal(a["student"], b["student"])
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][key][k]) for k in state)
    assert a["scheduler"] == b["scheduler"]
    assert all(torch.equal(a["cache"][k], b["cache"][k]) for k in a["cache"])
    assert a["metrics"] == b["metrics"]  # incl. train/agreement over the whole last epoch


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("cache", [False, True], ids=["live-teacher", "teacher-cache"])
def test_two_seeded_deterministic_runs_are_identical(cache):
    def run():
        pl.seed_everything(123)
        data = make_data(32)
        model = distiller(seed=123, teacher_cache=cache, saliency="integrated_gradients", tsd_weight=1.0)
        t = fit_trainer(max_epochs=2, deterministic=True, limit_val_batches=1)
        t.fit(model, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=32))
        return model.student.state_dict(), {k: v.clone() for k, v in t.callback_metrics.items()}

    (student_a, metrics_a), (student_b, metrics_b) = run(), run()
    assert state_equal(student_a, student_b)
    assert metrics_a.keys() == metrics_b.keys() and "val/acc" in metrics_a
    assert all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)


# ------------------------------------------------------------------------------ checkpoints
def test_interrupted_lightning_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def dies_half_way(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert io.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_checkpoint_io_refuses_corrupt_and_unsafe_files(tmp_path):
    model = distiller(teacher_cache=True)
    t = fit_trainer(
        max_steps=1,
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    t.fit(model, DataLoader(batches()[:1], batch_size=None))
    good = (tmp_path / "last.ckpt").read_bytes()
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 1

    for name, content in {
        "truncated": good[: len(good) // 2],
        "garbage": random.Random(0).randbytes(256),
        "empty": b"",
    }.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
        with pytest.raises(CorruptCheckpointError, match="truncated or corrupt|cannot read"):
            io.load_checkpoint(tmp_path / f"{name}.ckpt")
        with pytest.raises(CorruptCheckpointError):
            fit_trainer(max_steps=2, plugins=[AtomicCheckpointIO()]).fit(
                distiller(teacher_cache=True),
                DataLoader(batches()[:1], batch_size=None),
                ckpt_path=str(tmp_path / f"{name}.ckpt"),
            )
        with pytest.raises(CorruptCheckpointError):
            load_teacher(tmp_path / f"{name}.ckpt")

    # an intact file that fails for another reason (here map_location) shows that reason, not "corrupt"
    def bad_location(storage, location):
        raise ZeroDivisionError("map_location failed")

    with pytest.raises(ZeroDivisionError, match="map_location failed"):
        io.load_checkpoint(tmp_path / "last.ckpt", map_location=bad_location)

    # Any damaged file is refused with one of our two errors, never an unpickler internal (IndexError, ...).
    # A random file whose first byte happens to be a GLOBAL opcode names code to import: "unsafe" is right.
    for seed in range(300):
        junk = random.Random(seed).randbytes(random.Random(seed).randint(1, 512))
        (tmp_path / "junk.ckpt").write_bytes(junk)
        with pytest.raises((CorruptCheckpointError, UnsafeCheckpointError)):
            io.load_checkpoint(tmp_path / "junk.ckpt")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {}, "evil": Evil()}, tmp_path / "evil.ckpt")
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError, match="unsafe to load"):
        io.load_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        io.load_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    assert not marker.exists()


def test_truncated_teacher_file_is_corrupt_and_rewrite_is_atomic(tmp_path):
    from tiny_models import TinyCNN

    path = tmp_path / "teacher.pt"
    save_teacher(TinyCNN(1, 3), path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        load_teacher(path)
    save_teacher(TinyCNN(1, 3), path)
    assert type(load_teacher(path)).__name__ == "TinyCNN"
