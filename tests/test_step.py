"""The training step's parts: the teacher source, the bad-batch guard, gradient surgery, the TSD options,
the class count read from outputs, host syncs per step, damaged checkpoints, the Lightning seams."""

from __future__ import annotations

import contextlib
import types

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import TinyCNN
from torch import nn
from torch.utils.data import DataLoader
from trainers import quiet_trainer

from lightning_tsd import (
    CorruptCheckpointError,
    TeacherCache,
    TemporalSaliencyDistiller,
    TemporalSaliencyLoss,
    _compat,
)
from lightning_tsd._batch import unpack_batch
from lightning_tsd.gradients import combine_gradients, combined_loss, surrogate_loss
from lightning_tsd.guard import BadBatchGuard
from lightning_tsd.losses import saliency_alignment_loss, smooth_saliency
from lightning_tsd.saliency import temporal_saliency
from lightning_tsd.teacher import TeacherSource


def data(n=24, length=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, length, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(n)]


def quiet(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{"limit_val_batches": 0, **kwargs})


def distiller(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("saliency", "gradient")
    return TemporalSaliencyDistiller(TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4), **kwargs)


# ----------------------------------------------------------------------------- gradient surgery
@pytest.mark.parametrize("seed", range(5))
def test_projected_gradient_never_opposes_the_base_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    base = [
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(3, 2, generator=g, dtype=torch.float64),
    ]
    noise = [
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(3, 2, generator=g, dtype=torch.float64),
    ]
    tsd = [-3 * base[0] + noise[0], noise[1]]  # mostly conflicting
    flat = lambda gs: torch.cat([t.flatten() for t in gs])  # noqa: E731
    assert torch.dot(flat(base), flat(tsd)) < 0
    for weight in (0.5, 2.0, 10.0):
        combined = combine_gradients(base, tsd, weight, "project")
        tsd_part = flat(combined) - flat(base)
        assert torch.dot(tsd_part, flat(base)) >= -1e-9  # the TSD part alone has no conflicting component
        assert torch.dot(flat(combined), flat(base)) > 0
    aligned = [b * 2 for b in base]  # no conflict: nothing is removed
    assert torch.allclose(flat(combine_gradients(base, aligned, 1.0, "project")), flat(base) * 3)


def test_balanced_gradient_has_the_requested_norm_ratio():
    base, tsd = [torch.tensor([3.0, 4.0])], [torch.tensor([100.0, 0.0])]
    combined = combine_gradients(base, tsd, 0.3, "balance")
    assert torch.allclose(combined[0] - base[0], torch.tensor([1.5, 0.0]))  # 0.3 * ||g_base|| = 1.5


def test_distiller_step_applies_the_projected_gradient():
    batch = next(iter(DataLoader(data(), batch_size=8)))
    grads = {}
    for mode in ("sum", "project"):
        model = distiller(tsd_weight=4.0, tsd_gradient=mode, student_train_mode=False)
        loss = model.training_step(batch, 0)
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.student.parameters()]
    # the same separate gradients, combined by hand
    model = distiller(tsd_weight=4.0, student_train_mode=False)
    b = unpack_batch(batch)
    teacher = model.source.live(b.x, b.y)
    out = model.tsd(model.teacher, model.student, b.x, b.y, None, (teacher.logits, teacher.saliency))
    base = torch.nn.functional.cross_entropy(out.student_logits, b.y) + model.base_loss_value(
        out.student_logits, teacher.logits, b.y
    )
    params = list(model.student.parameters())
    g_base = torch.autograd.grad(base, params, retain_graph=True)
    g_tsd = torch.autograd.grad(out.loss, params, allow_unused=True)  # the head's bias shifts no saliency
    g_tsd = [torch.zeros_like(p) if g is None else g for g, p in zip(g_tsd, params, strict=True)]
    for got, want in zip(grads["project"], combine_gradients(g_base, g_tsd, 4.0, "project"), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    for got, b_, t in zip(grads["sum"], g_base, g_tsd, strict=True):
        assert torch.allclose(got, b_ + 4.0 * t, atol=1e-6)


def test_projection_with_reduce_uses_the_global_batch_gradients():
    """What DDP needs: two shards, each averaging both gradients over the shards before joining them, take
    the step of the whole batch in one process; each joining its own shard's gradients would not."""
    torch.manual_seed(3)
    x, w0 = torch.randn(8, 4), torch.randn(4)

    def shard_grad(rows, reduce=None):
        w = w0.clone().requires_grad_(True)
        z = x[rows] @ w
        base, tsd = (z - 1).square().mean(), (-z).mean()  # opposed on most draws: the projection acts
        combined_loss(base, tsd, 3.0, "project", [w], z, reduce).backward()
        return w.grad

    whole = shard_grad(torch.arange(8))
    shards = [torch.arange(0, 8, 2), torch.arange(1, 8, 2)]
    seen: list[torch.Tensor] = []
    for rows in shards:  # collect what each shard would contribute to the collective
        shard_grad(rows, lambda v: seen.append(v.clone()) or v)
    mean = (seen[0] + seen[1]) / 2
    for rows in shards:
        assert torch.allclose(shard_grad(rows, lambda v: mean.clone()), whole, atol=1e-6)
    local = (shard_grad(shards[0]) + shard_grad(shards[1])) / 2  # DDP's average of per-shard projections
    assert not torch.allclose(local, whole, atol=1e-3)


def test_surrogate_loss_keeps_the_value():
    p = torch.randn(3, requires_grad=True)
    s = surrogate_loss(torch.tensor(2.5), [p], [torch.ones(3)])
    assert float(s.detach()) == 2.5


# ----------------------------------------------------------------------------- TSD options
def test_smoothing_is_a_masked_moving_average():
    s = torch.tensor([[0.0, 3.0, 0.0, 6.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = smooth_saliency(s, 3, mask)
    assert torch.allclose(out, torch.tensor([[1.5, 1.0, 3.0, 3.0, 0.0]]))  # the padded 9 never counts
    noisy = torch.tensor([[0.0, 5.0, 0.0, 5.0, 0.0, 5.0]])
    flat = torch.full((1, 6), 2.5)
    assert (
        float(saliency_alignment_loss(noisy, flat + torch.arange(6.0) * 1e-3, "pearson", smoothing=1)) > 0.5
    )
    # a spiky map and its trend agree once both are smoothed over the spikes' period
    assert float(saliency_alignment_loss(noisy, flat + torch.arange(6.0), "pearson", smoothing=2)) < float(
        saliency_alignment_loss(noisy, flat + torch.arange(6.0), "pearson", smoothing=1)
    )


def test_distribution_target_aligns_every_class_weighted_by_the_teacher():
    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 3).eval(), TinyCNN(1, 3, width=4).eval()
    x = torch.randn(4, 1, 12)
    out = TemporalSaliencyLoss("gradient", "pearson", saliency_target="distribution")(teacher, student, x)
    assert out.teacher_saliency.shape == out.student_saliency.shape == (4, 3, 12)
    probs = torch.softmax(out.teacher_logits, 1)
    expected = 0.0
    for k in range(3):
        _, t_map = temporal_saliency(teacher, x, k, method="gradient")
        _, s_map = temporal_saliency(student, x, k, method="gradient")
        assert torch.allclose(out.teacher_saliency[:, k], t_map, atol=1e-6)
        per_sample = saliency_alignment_loss(s_map, t_map, "pearson", reduction="none")
        expected = expected + probs[:, k] * per_sample
    assert torch.allclose(out.loss, expected.mean(), atol=1e-6)
    out.loss.backward()
    assert student.conv.weight.grad.abs().sum() > 0


def test_distribution_target_trains_with_the_cache():
    model = distiller(tsd_weight=1.0, saliency_target="distribution", teacher_cache=True)
    quiet(max_epochs=2).fit(model, DataLoader(data(), batch_size=8))
    assert (
        len(model.teacher_cache) == 24 and model.teacher_cache.saliency.shape[1] == 3 * 16
    )  # K maps per row


def test_tsd_start_keeps_tsd_off_for_the_first_part_of_the_fit():
    weights = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            weights.append(module.current_tsd_weight())

    model = distiller(tsd_weight=1.0, tsd_start=0.5)
    quiet(max_steps=6, callbacks=[Probe()]).fit(model, DataLoader(data(), batch_size=4))
    assert weights == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="tsd_start"):
        distiller(tsd_start=1.0)
    with pytest.raises(ValueError, match="tsd_gradient"):
        distiller(tsd_gradient="pcgrad")


def test_estimator_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="steps"):
        distiller(saliency="gradient", saliency_options={"steps": 4})
    with pytest.raises(ValueError, match="stpes"):
        TeacherSource(TinyCNN(), "integrated_gradients", {"stpes": 4})


# ----------------------------------------------------------------------------- class count
class HeadFirstTransformer(nn.Module):
    """Declares its head before its encoder: the last declared Linear is the feed-forward layer (16)."""

    def __init__(self, channels=1, classes=3, d=8):
        super().__init__()
        self.inp = nn.Linear(channels, d)
        self.head = nn.Linear(d, classes)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        return self.head(self.enc(self.inp(x.transpose(1, 2))).mean(1))


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_class_count_comes_from_outputs_not_declaration_order(role):
    torch.manual_seed(0)
    models = {"teacher": TinyCNN(1, 3).eval(), "student": TinyCNN(1, 3, width=4)}
    models[role] = HeadFirstTransformer()
    model = TemporalSaliencyDistiller(
        **models, saliency="integrated_gradients", saliency_options={"steps": 2}
    )
    quiet(max_steps=2).fit(model, DataLoader(data(), batch_size=8))
    assert model.num_classes == 3


def test_class_count_mismatch_is_refused_on_the_first_batch():
    model = TemporalSaliencyDistiller(TinyCNN(1, 3).eval(), HeadFirstTransformer(classes=5))
    before = [p.clone() for p in model.student.parameters()]
    with pytest.raises(ValueError, match="teacher 3, student 5"):
        quiet(max_steps=1).fit(model, DataLoader(data(), batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(before, model.student.parameters(), strict=True))


# ----------------------------------------------------------------------------- host syncs
@contextlib.contextmanager
def count_syncs():
    """Count the Tensor methods that read a value back to the host."""
    calls = []
    names = ("item", "__bool__", "tolist", "__int__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return saved[name](self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


class StepSyncs(pl.Callback):
    """Host reads made inside each training_step (the module's own code), per global step."""

    def __init__(self):
        self.per_step = []

    def setup(self, trainer, module, stage):
        step = module.training_step

        def counted(*args, **kwargs):
            with count_syncs() as calls:
                out = step(*args, **kwargs)
            self.per_step.append(list(calls))
            return out

        module.training_step = counted


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("saliency", ["gradient", "integrated_gradients"])
def test_at_most_one_host_sync_per_steady_state_step(cache, saliency):
    probe = StepSyncs()
    model = distiller(tsd_weight=1.0, saliency=saliency, teacher_cache=cache)
    mask_data = [{**d, "mask": torch.arange(16) < 12 + i % 4} for i, d in enumerate(data())]
    quiet(max_epochs=3, callbacks=[probe]).fit(model, DataLoader(mask_data, batch_size=8))
    steady = probe.per_step[3:] if not cache else probe.per_step[6:]  # cached: complete after epoch 2
    assert steady and all(len(calls) <= 1 for calls in steady), steady


def test_a_complete_cache_that_misses_asks_the_teacher_again():
    model = distiller(tsd_weight=1.0, teacher_cache=True)
    for batch in DataLoader(data(), batch_size=8):  # two epochs' worth of lookups: the cache is complete
        model.training_step(batch, 0)
    model.source.end_epoch()
    for batch in DataLoader(data(), batch_size=8):
        model.training_step(batch, 0)
    model.source.end_epoch()
    assert model.source.complete
    live = distiller(tsd_weight=1.0)
    live.load_state_dict(model.state_dict())
    batch = next(iter(DataLoader(data(n=32)[24:], batch_size=8)))  # indices 24..31, never cached
    got, want = model.training_step(batch, 0), live.training_step(batch, 0)
    assert torch.allclose(got, want, atol=1e-6) and not model.source.complete
    assert len(model.teacher_cache) == 32


# ----------------------------------------------------------------------------- guard, checkpoints, seams
def test_guard_names_the_first_problem_in_one_read():
    guard = BadBatchGuard("raise")
    b = unpack_batch(
        {
            "x": torch.tensor([[0.0, float("inf")]]),
            "y": torch.tensor([0]),
            "mask": torch.tensor([[True, True]]),
        },
        deferred=True,
    )
    with count_syncs() as calls:
        verdict = guard.inspect(b, 2, torch.tensor(1.0), {}, None)
    assert "1 non-finite value" in str(verdict.error) and verdict.skippable
    assert calls.count("tolist") == 1
    bad_labels = b._replace(x=torch.zeros(1, 1, 2), y=torch.tensor([5]))
    verdict = guard.inspect(bad_labels, 2, torch.tensor(1.0), {}, None)
    assert "labels must lie in [0, 2)" in str(verdict.error) and not verdict.skippable
    with pytest.raises(ValueError, match="on_bad_batch"):
        BadBatchGuard("ignore")


def test_damaged_checkpoint_is_named_before_lightning_reads_it(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet(enable_checkpointing=True, callbacks=[ckpt]).fit(distiller(), DataLoader(data(), batch_size=8))
    good = (tmp_path / "last.ckpt").read_bytes()
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"damaged\.ckpt is damaged"):
        quiet(max_epochs=2).fit(distiller(), DataLoader(data(), batch_size=8), ckpt_path=str(damaged))
    quiet(max_epochs=2).fit(
        distiller(), DataLoader(data(), batch_size=8), ckpt_path=str(tmp_path / "last.ckpt")
    )


def test_lightning_internals_are_present_and_their_loss_is_loud():
    _compat.check_lightning_internals(quiet())
    fake = types.SimpleNamespace(fit_loop=types.SimpleNamespace(epoch_loop=None))
    with pytest.raises(_compat.LightningInternalsChanged, match="_combined_loader_states_to_load"):
        _compat.check_lightning_internals(fake)


def test_sharded_strategies_are_detected_by_class():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    assert _compat.is_sharded(FSDPStrategy()) and not _compat.is_sharded(DDPStrategy())


def test_teacher_source_serves_the_cache_without_the_teacher():
    torch.manual_seed(0)
    calls = []
    teacher = TinyCNN(1, 3).eval()
    teacher.register_forward_hook(lambda *_: calls.append(1))
    source = TeacherSource(teacher, "gradient", cache=TeacherCache())
    x, index = torch.randn(6, 1, 10), torch.arange(6)
    first = source.outputs(x, index=index)
    source.end_epoch()  # an epoch with misses: not complete yet
    assert not source.complete
    again = source.outputs(x, index=index)
    source.end_epoch()  # an epoch served entirely from the cache
    complete = source.outputs(x, index=index)
    assert len(calls) == 1 and source.complete
    assert torch.equal(first.saliency, again.saliency) and torch.equal(first.logits, complete.logits)
    assert bool(complete.all_cached)


def test_a_precomputed_cache_is_complete_after_one_epoch_served_from_it():
    from lightning_tsd._batch import Batch

    teacher = TinyCNN(1, 3).eval()
    source = TeacherSource(teacher, "gradient", cache=TeacherCache())
    x, index = torch.randn(6, 1, 10), torch.arange(6)
    assert source.precompute([Batch(x, None, None, index)]) == 6
    source.outputs(x, index=index)  # the fit's first epoch: every sample a hit (checked, not yet trusted)
    source.end_epoch()
    assert source.complete  # the precompute's own fills are not misses of the fit
    partial = TeacherSource(teacher, "gradient", cache=TeacherCache())
    partial.precompute([Batch(x[:3], None, None, index[:3])])
    partial.outputs(x, index=index)  # half of the first epoch is not in the cache
    partial.end_epoch()
    assert not partial.complete


def test_uniform_sampling_is_seeded_per_step_and_the_teacher_stays_deterministic():
    options = {"steps": 1, "sampling": "uniform"}
    model = distiller(tsd_weight=1.0, saliency="integrated_gradients", saliency_options=options)
    model.student.eval()  # no BatchNorm statistics moving between the calls compared
    assert model.source.saliency_options == {"steps": 1}  # the teacher's maps: deterministic midpoint
    batch = next(iter(DataLoader(data(), batch_size=8)))
    b = unpack_batch(batch)
    teacher = model.source.live(b.x, b.y)
    maps = []
    for step in (0, 0, 1):
        torch.manual_seed(123)  # the step's generator, not the global RNG's position, decides the draw
        torch.rand(step + 1)
        generator = torch.Generator().manual_seed(torch.initial_seed() + step)
        out = model.tsd(
            model.teacher, model.student, b.x, b.y, None, (teacher.logits, teacher.saliency), True, generator
        )
        maps.append(out.student_saliency.detach())
    assert torch.equal(maps[0], maps[1]) and not torch.equal(maps[0], maps[2])
    with pytest.raises(ValueError, match="sampling"):
        distiller(saliency="integrated_gradients", saliency_options={"sampling": "random"})


def test_a_full_cache_serves_what_does_not_fit_live():
    row = 4 * (3 + 0) + 18  # logits only
    cache = TeacherCache(max_bytes=4 * row)
    cache.put(torch.arange(4), torch.randn(4, 3), None, torch.randn(4, 1, 8))  # fills it, without maps
    cache.put(torch.arange(2), torch.randn(2, 3), torch.rand(2, 8), torch.randn(2, 1, 8))  # maps: no room
    assert cache.saliency is None and len(cache) == 4
    empty = TeacherCache(max_bytes=1)  # rows arriving from another rank or a checkpoint, none fits
    empty.load_state_dict(cache.state_dict())
    assert len(empty) == 0


# ----------------------------------------------------------------------------- cheap steps: sub-batch, every n
def test_tsd_fraction_aligns_a_random_sub_batch_and_keeps_ce_on_the_whole_batch():
    """``tsd_fraction=0.25`` on a batch of 8: the TSD term is the mean of the per-sample terms of 2 rows drawn by
    the step's generator, their maps computed on those rows only (one call of 2 + 2 * 2 rows, BatchNorm in eval
    mode); the CE term and BatchNorm's statistics come from one forward on the whole batch."""
    import copy

    from torch.utils.data import default_collate

    batch = default_collate(data(n=8, length=16))
    x, y = batch["x"], batch["y"]
    options = {"saliency": "integrated_gradients", "saliency_options": {"steps": 2}, "tsd_weight": 1.0}
    model = distiller(seed=3, tsd_fraction=0.25, **options)
    before = copy.deepcopy(model.student)
    sizes: list[int] = []
    model.student.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    trainer = quiet(max_steps=1)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    assert sizes == [2, 8, 6]  # the class count, the whole batch, the 2 rows with their 4 interpolants
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(torch.initial_seed()))[:2]  # step 0
    teacher_logits, teacher_maps = temporal_saliency(model.teacher, x, method="integrated_gradients", steps=2)
    logits = before(x)  # train mode: the step's forward, which moves the running statistics first
    target = teacher_logits.argmax(1)[rows]
    _, maps = temporal_saliency(before.eval(), x[rows], target, method="integrated_gradients", steps=2)
    expected = saliency_alignment_loss(maps, teacher_maps[rows], "pearson")
    torch.testing.assert_close(trainer.logged_metrics["train/tsd"], expected)
    torch.testing.assert_close(
        trainer.logged_metrics["train/ce"], torch.nn.functional.cross_entropy(logits, y)
    )
    plain = distiller(seed=3, **{**options, "tsd_weight": 0.0})
    quiet(max_steps=1).fit(plain, DataLoader([batch], batch_size=None))
    torch.testing.assert_close(model.student.norm.running_mean, plain.student.norm.running_mean)
    torch.testing.assert_close(model.student.norm.running_var, plain.student.norm.running_var)


def test_tsd_fraction_rows_are_uniform_and_follow_the_step_seed():
    """Every row is drawn with probability ``tsd_fraction`` (so the mean over the rows is unbiased for the batch
    mean), and the draw depends on the seed and step only, not on the global RNG's position (a resume is exact)."""
    model = distiller(tsd_weight=1.0, tsd_fraction=0.25)
    counts = torch.zeros(8)
    for seed in range(4000):
        rows = model._tsd_rows(8, torch.Generator().manual_seed(seed))
        assert rows.shape == (2,) and rows.unique().numel() == 2
        counts[rows] += 1
    assert float((counts / 4000 - 0.25).abs().max()) < 0.03  # binomial standard error 0.007
    first = model._tsd_rows(8, model._step_generator(torch.device("cpu")))
    torch.rand(5)  # the global RNG moves; the step's draw does not
    torch.testing.assert_close(model._tsd_rows(8, model._step_generator(torch.device("cpu"))), first)
    assert model._tsd_rows(3, model._step_generator(torch.device("cpu"))) is not None  # ceil(0.75) = 1 row
    assert distiller(tsd_weight=1.0)._step_generator(torch.device("cpu")) is None  # nothing to draw


def test_tsd_every_n_scale_multiplies_the_weight_on_the_grid_by_n():
    weights = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            weights.append(module.current_tsd_weight())

    for scale in (False, True):
        model = distiller(tsd_weight=0.5, tsd_every_n_steps=3, tsd_every_n_scale=scale)
        quiet(max_steps=6, callbacks=[Probe()]).fit(model, DataLoader(data(), batch_size=4))
    assert weights == [0.5, 0.0, 0.0, 0.5, 0.0, 0.0] + [1.5, 0.0, 0.0, 1.5, 0.0, 0.0]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"tsd_fraction": 0.0},
            r"tsd_fraction is the fraction of each batch the TSD term sees, in \(0, 1\], got 0.0",
        ),
        ({"tsd_fraction": 1.5}, r"tsd_fraction .* got 1.5"),
        ({"tsd_fraction": "half"}, r"tsd_fraction .* got 'half'"),
        ({"tsd_every_n_scale": "yes"}, r"tsd_every_n_scale must be True or False, got 'yes'"),
        ({"teacher_cache_precompute": 1}, r"teacher_cache_precompute must be True or False, got 1"),
    ],
)
def test_cheap_step_options_are_checked_in_the_constructor(options, match):
    with pytest.raises(ValueError, match=match):
        distiller(**options)


# ----------------------------------------------------------------------------- saliency-guided recombination
def test_recombination_term_is_kd_on_the_teachers_recombined_series():
    """``recombination_weight``: KD on series that keep the teacher's top half of steps and take the rest from a
    series of another teacher class, with the teacher queried on them; BatchNorm statistics see real samples
    only (they end as in the run without the term)."""
    import copy

    from torch.utils.data import default_collate

    from lightning_tsd.losses import kd_loss
    from lightning_tsd.recombination import recombine

    batch = default_collate(data(n=12, length=16))
    loader = DataLoader([batch], batch_size=None)
    model = distiller(seed=3, tsd_weight=0.0, recombination_weight=2.0, recombination_keep=0.25)
    student_before = copy.deepcopy(model.student)
    trainer = quiet(max_steps=1)
    trainer.fit(model, loader)
    teacher = model.teacher
    logits, maps = temporal_saliency(teacher, batch["x"], method="gradient")
    generator = torch.Generator().manual_seed(torch.initial_seed())  # global step 0
    x = recombine(batch["x"], maps, logits.argmax(1), 0.25, generator=generator)
    assert not torch.equal(x, batch["x"])
    with torch.no_grad():
        student_before(batch["x"])  # the step's own forward moves the running statistics first
        expected = kd_loss(student_before.eval()(x), teacher(x), 4.0)
    torch.testing.assert_close(trainer.logged_metrics["train/recombined"], expected)
    plain = distiller(seed=3, tsd_weight=0.0)
    quiet(max_steps=1).fit(plain, loader)
    torch.testing.assert_close(model.student.norm.running_mean, plain.student.norm.running_mean)
    torch.testing.assert_close(model.student.norm.running_var, plain.student.norm.running_var)
    assert not torch.equal(model.student.conv.weight, plain.student.conv.weight)  # the term trained it


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"recombination_weight": -1.0}, r"recombination_weight must be a finite number >= 0"),
        ({"recombination_keep": 1.0}, r"recombination_keep is the fraction .* in \(0, 1\)"),
    ],
)
def test_recombination_options_are_checked_in_the_constructor(options, match):
    with pytest.raises(ValueError, match=match):
        distiller(**options)
