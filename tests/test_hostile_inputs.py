"""Hostile inputs: each gives a clear error (before any optimizer step, with no state changed) or is
handled, and hypothesis-generated shapes/values for temporal_saliency and the losses."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_module import distiller
from test_reliability import batches, fit_trainer, state_equal
from tiny_models import TinyCNN
from torch import nn
from torch.utils.data import DataLoader

from lightning_tsd import InvalidBatchError, TeacherCache, TeacherCacheError, temporal_saliency
from lightning_tsd._batch import NonFiniteLossError
from lightning_tsd.losses import ALIGNMENTS, kd_loss, saliency_alignment_loss


def fit_one(model, batch, **trainer_kwargs):
    fit_trainer(max_steps=1, **trainer_kwargs).fit(model, DataLoader([batch], batch_size=None))


def refused_untouched(batch, error, match, **kwargs):
    """The batch raises ``error`` matching ``match``; the student and the cache are unchanged."""
    model = distiller(teacher_cache=True, **kwargs)
    before = copy.deepcopy(model.student.state_dict())
    with pytest.raises(error, match=match):
        fit_one(model, batch)
    assert state_equal(model.student.state_dict(), before)
    assert len(model.teacher_cache) == 0
    return model


GOOD = batches(n=1)[0]  # x (8, 1, 20), y, index


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"x": torch.zeros(0, 1, 20), "y": torch.zeros(0, dtype=torch.long)}, "empty batch"),
        ({**GOOD, "x": torch.zeros(8, 1, 0)}, "no timesteps"),
        ({**GOOD, "x": GOOD["x"].long()}, "floating-point tensor, got dtype torch.int64"),
        (
            {**GOOD, "mask": torch.zeros(8, 20, dtype=torch.bool).index_fill(0, torch.tensor([0]), True)},
            r"mask has no real step for sample\(s\) at batch position\(s\) \[1, 2, 3, 4, 5, 6, 7\]",
        ),
        ({**GOOD, "y": GOOD["y"] + 3}, r"labels must lie in \[0, 3\)"),
        ({**GOOD, "y": GOOD["y"] - 1 - GOOD["y"]}, r"labels must lie in \[0, 3\), got values in \[-1"),
        ({**GOOD, "y": GOOD["y"].float()}, "labels y must be an integer tensor"),
        ({**GOOD, "index": GOOD["index"].float()}, "index must be an integer tensor"),
        ({"x": torch.randn(1, 1, 1), "y": torch.tensor([0])}, "one sample of one step"),
    ],
    ids=[
        "empty",
        "no-steps",
        "int64",
        "mask-no-real-step",
        "label-high",
        "label-negative",
        "float-labels",
        "float-index",
        "batchnorm-one-value",
    ],
)
def test_bad_batches_are_refused_with_clear_errors_and_no_state_change(batch, match):
    refused_untouched(batch, InvalidBatchError, match)


def test_batch_of_one_with_batchnorm_trains_over_time_and_eval_mode_takes_one_step():
    model = distiller()
    fit_one(model, {"x": torch.randn(1, 1, 20), "y": torch.tensor([1])})  # BatchNorm averages over T
    assert all(bool(torch.isfinite(v.float()).all()) for v in model.student.state_dict().values())
    model = distiller(student_train_mode=False)
    fit_one(model, {"x": torch.randn(1, 1, 1), "y": torch.tensor([1])})


def test_series_of_one_step_and_shorter_than_the_receptive_field():
    fit_one(distiller(tsd_weight=1.0), {"x": torch.randn(4, 1, 1), "y": torch.tensor([0, 1, 2, 0])})
    refused_untouched(
        {"x": torch.randn(4, 1, 1), "y": torch.tensor([0, 1, 2, 0])},
        ValueError,
        r"occlusion window must lie in \[1, T=1\]",
        saliency="occlusion",
    )

    class Unpadded(nn.Module):  # receptive field 5, no padding
        def __init__(self, width):
            super().__init__()
            self.num_classes = 3
            self.conv = nn.Conv1d(1, width, 5)
            self.head = nn.Linear(width, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(-1))

    torch.manual_seed(0)
    model = distiller(teacher=Unpadded(6).eval(), student=Unpadded(4), teacher_cache=True)
    before = copy.deepcopy(model.student.state_dict())
    with pytest.raises(RuntimeError, match="Kernel size can't be greater") as info:
        fit_one(model, {"x": torch.randn(4, 1, 3), "y": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)})
    assert any(
        "while training on batch 0 of epoch 0" in note and "(4, 1, 3)" in note
        for note in info.value.__notes__
    )
    assert state_equal(model.student.state_dict(), before) and len(model.teacher_cache) == 0


def test_huge_values_train_or_are_refused_cleanly():
    big = {**GOOD, "x": GOOD["x"] * 1e30}  # the loss stays finite, but BatchNorm running_var overflows
    model = distiller(teacher_cache=True)
    before = copy.deepcopy(model.student.state_dict())
    with pytest.raises(NonFiniteLossError, match="running statistics"):
        fit_one(model, big)
    assert state_equal(model.student.state_dict(), before)
    assert bool(torch.isfinite(model.teacher_cache.logits).all())
    fit_one(distiller(student_train_mode=False), big)  # no running statistics to overflow: it trains
    # beyond the teacher's range (fp32 and bf16 top out near 3.4e38): refused, or skipped with "skip"
    overflow = {**GOOD, "x": torch.full_like(GOOD["x"], 3e38)}
    for precision in ("32-true", "bf16-mixed"):
        model = distiller(teacher_cache=True)
        before = copy.deepcopy(model.student.state_dict())
        with pytest.raises(NonFiniteLossError, match="non-finite loss"):
            fit_one(model, overflow, precision=precision)
        assert state_equal(model.student.state_dict(), before) and len(model.teacher_cache) == 0
        skipper = distiller(on_bad_batch="skip")
        before = copy.deepcopy(skipper.student.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_one(skipper, overflow, precision=precision)
        assert skipper.skipped_batches == 1 and state_equal(skipper.student.state_dict(), before)


def test_float64_input_is_cast_to_the_students_dtype():
    model = distiller(tsd_weight=1.0, teacher_cache=True)
    fit_one(model, {**GOOD, "x": GOOD["x"].double()})
    assert all(p.dtype == torch.float32 for p in model.student.parameters())
    assert model.teacher_cache.logits.dtype == torch.float32


def test_teacher_returning_a_dict_and_student_a_tuple():
    class DictTeacher(TinyCNN):
        def forward(self, x, mask=None):
            return {"logits": super().forward(x, mask), "features": x.mean(-1)}

    class TupleStudent(TinyCNN):
        def forward(self, x, mask=None):
            return super().forward(x, mask), x.mean(-1)

    torch.manual_seed(0)
    model = distiller(
        teacher=DictTeacher(1, 3).eval(),
        student=TupleStudent(1, 3, width=4),
        tsd_weight=1.0,
        saliency="integrated_gradients",
    )
    fit_one(model, GOOD)
    assert torch.isfinite(model.trainer.callback_metrics["train/tsd"])

    class Opaque(TinyCNN):
        def forward(self, x, mask=None):
            return {"scores": super().forward(x, mask)}

    torch.manual_seed(0)
    with pytest.raises(TypeError, match="dict with key 'logits'"):
        fit_one(distiller(teacher=Opaque(1, 3).eval()), GOOD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_and_student_on_different_devices_end_up_together():
    torch.manual_seed(0)
    model = distiller(teacher=TinyCNN(1, 3).cuda().eval(), student=TinyCNN(1, 3, width=4), teacher_cache=True)
    fit_trainer(max_steps=2, accelerator="gpu", devices=1).fit(model, DataLoader(batches(), batch_size=None))
    assert next(model.teacher.parameters()).device == next(model.student.parameters()).device
    assert model.teacher_cache.logits.device.type == "cpu"


def test_repeated_index_is_refused_and_oversized_index_is_served_live():
    repeated = {**GOOD, "index": torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])}
    refused_untouched(repeated, TeacherCacheError, "same sample index twice")
    refused_untouched({**GOOD, "index": GOOD["index"] - 3}, TeacherCacheError, "indices must be >= 0")

    model = distiller(teacher_cache=TeacherCache(max_bytes=64 * 1024))
    far = {**GOOD, "index": GOOD["index"] + 10**12}  # one row at 10^12 would need terabytes
    with pytest.warns(UserWarning, match="teacher cache is full"):
        fit_trainer(max_steps=2).fit(model, DataLoader([far, GOOD], batch_size=None))
    assert len(model.teacher_cache) == 8 and model.teacher_cache.nbytes <= 64 * 1024


# ------------------------------------------------------------------------------ hypothesis
class SmallNet(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv1d(channels, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        return self.head(torch.tanh(self.conv(x)).mean(-1))


NETS = {c: SmallNet(c).eval() for c in (1, 2, 3)}
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 3),
    t=st.integers(1, 40),
    scale=st.sampled_from([0.0, 1e-30, 1.0, 1e6, 1e30]),
    method=st.sampled_from(["gradient", "input_x_gradient", "integrated_gradients", "occlusion"]),
    seed=st.integers(0, 2**16),
    pad=st.booleans(),
)
def test_temporal_saliency_on_generated_shapes_and_values(b, c, t, scale, method, seed, pad):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, t, generator=g) * scale
    mask = None
    if pad:
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = torch.arange(t) < lengths[:, None]
    options = {"window": min(4, t), "stride": 2} if method == "occlusion" else {}
    logits, saliency = temporal_saliency(NETS[c], x, method=method, mask=mask, **options)
    assert logits.shape == (b, 3) and saliency.shape == (b, t) and saliency.dtype == torch.float32
    assert bool(torch.isfinite(saliency).all()) and bool(torch.isfinite(logits).all())
    if method != "occlusion":
        assert bool((saliency >= 0).all())
    if mask is not None:
        assert bool((saliency[~mask] == 0).all())


maps = st.integers(1, 4).flatmap(
    lambda b: st.integers(1, 30).flatmap(
        lambda t: st.tuples(
            st.just((b, t)),
            st.sampled_from([0.0, 1e-30, 1.0, 1e6, 1e30]),
            st.integers(0, 2**16),
            st.booleans(),
        )
    )
)


@FUZZ
@given(spec=maps, alignment=st.sampled_from(list(ALIGNMENTS)), temperature=st.sampled_from([0.1, 1.0, 10.0]))
def test_alignment_loss_is_finite_non_negative_with_finite_gradients(spec, alignment, temperature):
    (b, t), scale, seed, pad = spec
    g = torch.Generator().manual_seed(seed)
    student = (torch.rand(b, t, generator=g) * scale).requires_grad_(True)
    teacher = torch.rand(b, t, generator=g) * scale
    mask = None
    if pad:
        mask = torch.arange(t) < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    loss = saliency_alignment_loss(student, teacher, alignment, temperature, mask)
    assert bool(torch.isfinite(loss)) and float(loss) >= 0
    loss.backward()
    assert bool(torch.isfinite(student.grad).all())


@FUZZ
@given(
    b=st.integers(1, 8),
    k=st.integers(2, 10),
    scale=st.sampled_from([0.0, 1.0, 1e3, 1e6]),
    seed=st.integers(0, 2**16),
    temperature=st.sampled_from([1.0, 4.0]),
)
def test_kd_loss_is_finite_and_non_negative(b, k, scale, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, k, generator=g) * scale, torch.randn(b, k, generator=g) * scale
    loss = kd_loss(s, t, temperature)
    assert bool(torch.isfinite(loss)) and float(loss) >= -1e-6


def test_float64_student_trains_with_tsd_in_its_own_dtype():
    """A float64 student (precision="64-true" or .double()) gets its saliency in float64, maps returned fp32."""
    from lightning_tsd import temporal_saliency

    torch.manual_seed(0)
    model = TinyCNN(1, 3).double()
    x = torch.randn(4, 1, 16)
    logits, saliency = temporal_saliency(model, x, method="integrated_gradients", create_graph=True)
    assert logits.dtype == torch.float64 and saliency.dtype == torch.float32
    saliency.sum().backward()
    assert model.conv.weight.grad is not None and torch.isfinite(model.conv.weight.grad).all()


def test_cache_holding_saliency_refuses_rows_without_and_logits_only_cache_grows_saliency():
    from lightning_tsd import TeacherCache, TeacherCacheError

    x = torch.randn(2, 1, 8)
    logits_only = TeacherCache()
    logits_only.put(torch.tensor([0, 1]), torch.randn(2, 3), None, x)
    logits_only.put(torch.tensor([0, 1]), torch.randn(2, 3), torch.rand(2, 8), x)  # saliency now needed
    hit, _, saliency = logits_only.get(torch.tensor([0, 1]), x)
    assert hit.all() and saliency is not None and saliency.shape == (2, 8)
    with pytest.raises(TeacherCacheError, match="store rows with their saliency"):
        logits_only.put(torch.tensor([1]), torch.randn(1, 3), None, x[:1])
