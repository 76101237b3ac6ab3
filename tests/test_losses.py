"""Distillation losses: hand-computed values, DKD against the reference implementation, and the
alignment-loss properties of the spec (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tiny_models import TinyCNN

from lightning_tsd import TemporalSaliencyLoss, dkd_loss, kd_loss, saliency_alignment_loss, temporal_saliency


def test_kd_loss_hand_computed():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax at tau=1: (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kd_loss(student, teacher, temperature=1.0)) == pytest.approx(expected, rel=1e-6)
    # tau^2 scaling and batch mean: a second, identical row changes nothing.
    tau = 2.0
    p = torch.softmax(teacher / tau, 1)
    expected_tau = tau**2 * float((p * (p.log() - math.log(0.5))).sum())
    assert float(kd_loss(student.repeat(2, 1), teacher.repeat(2, 1), tau)) == pytest.approx(
        expected_tau,
        rel=1e-5,  # float32 logs: ~1e-6 relative
    )


def _dkd_reference(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Zhao et al.'s published implementation (mdistiller, dkd.py), transcribed."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(dim=1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * temperature**2
        / target.shape[0]
    )
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference_implementation(alpha, beta, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5) * 3
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = dkd_loss(student, teacher, target, alpha, beta, temperature)
    theirs = _dkd_reference(student, teacher, target, alpha, beta, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_pearson_alignment_hand_computed():
    teacher = torch.tensor([[1.0, 2.0, 3.0]])
    student = torch.tensor([[1.0, 3.0, 2.0]])  # Pearson correlation 0.5
    assert float(saliency_alignment_loss(student, teacher, "pearson")) == pytest.approx(0.5, abs=1e-6)
    # cosine of the raw maps: 13 / 14
    assert float(saliency_alignment_loss(student, teacher, "cosine")) == pytest.approx(1 - 13 / 14, abs=1e-6)


def test_kl_alignment_hand_computed():
    teacher = torch.tensor([[0.0, 2.0]])  # z-scored: (-1, 1)
    student = torch.tensor([[5.0, 5.0]])  # z-scored: (0, 0)
    p = torch.softmax(torch.tensor([-1.0, 1.0]) / 0.5, 0)
    expected = float((p * (p.log() - math.log(0.5))).sum())
    assert float(saliency_alignment_loss(student, teacher, "kl", temperature=0.5)) == pytest.approx(
        expected, rel=1e-5
    )


def test_mask_excludes_padded_steps_from_every_alignment():
    teacher = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0]])
    student = torch.tensor([[2.0, 4.0, 6.0, 9.0, -7.0]])  # = 2 * teacher on the real steps
    mask = torch.tensor([[True, True, True, False, False]])
    for alignment in ("kl", "pearson", "cosine"):
        assert float(saliency_alignment_loss(student, teacher, alignment, mask=mask)) == pytest.approx(
            0.0, abs=1e-6
        )
        assert float(saliency_alignment_loss(student, teacher, alignment)) > 1e-3


maps = arrays(
    "float32", st.tuples(st.integers(1, 4), st.integers(2, 24)), elements=st.floats(0, 100, width=32)
)


@pytest.mark.parametrize("alignment", ["kl", "pearson", "cosine"])
@settings(max_examples=60, deadline=None)
@given(teacher=maps, data=st.data(), scale=st.floats(0.01, 100))
def test_alignment_properties(alignment, teacher, data, scale):
    teacher = torch.from_numpy(teacher)
    student = torch.from_numpy(
        data.draw(arrays("float32", tuple(teacher.shape), elements=st.floats(0, 100, width=32)))
    ).requires_grad_()
    loss = saliency_alignment_loss(student, teacher, alignment)
    assert torch.isfinite(loss) and loss >= 0
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # zero for the teacher's map up to a positive scale (maps that are constant are left out for
    # pearson/kl: they carry no shape to match and give the uniform distribution / zero correlation)
    same = saliency_alignment_loss(teacher * scale, teacher, alignment)
    nonconstant = (teacher.std(1) > 1e-3 * teacher.abs().amax(1).clamp_min(1e-3)).all()
    if alignment == "cosine" and (teacher.norm(dim=1) > 1e-3).all() or alignment != "cosine" and nonconstant:
        assert float(same) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("alignment", ["kl", "pearson", "cosine"])
def test_zero_maps_give_finite_loss_and_gradient(alignment):
    student = torch.zeros(3, 10, requires_grad=True)
    loss = saliency_alignment_loss(student, torch.zeros(3, 10), alignment)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    loss = saliency_alignment_loss(torch.zeros(3, 10, requires_grad=True), torch.rand(3, 10), alignment)
    assert torch.isfinite(loss)


def test_alignment_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown alignment 'mse'"):
        saliency_alignment_loss(torch.rand(2, 4), torch.rand(2, 4), "mse")
    with pytest.raises(ValueError, match=r"student \(2, 4\) and teacher \(2, 5\)"):
        saliency_alignment_loss(torch.rand(2, 4), torch.rand(2, 5), "kl")


def test_temporal_saliency_loss_module_returns_the_same_forward_and_trains_the_student():
    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 3).eval(), TinyCNN(1, 3)
    x = torch.randn(6, 1, 16)
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    out = TemporalSaliencyLoss(saliency="gradient", alignment="pearson")(teacher, student, x)
    assert len(calls) == 1
    torch.testing.assert_close(out.student_logits, student(x))
    expected_teacher = temporal_saliency(teacher, x, method="gradient")
    torch.testing.assert_close(out.teacher_saliency, expected_teacher[1])
    torch.testing.assert_close(
        out.loss, saliency_alignment_loss(out.student_saliency, out.teacher_saliency, "pearson")
    )
    out.loss.backward()
    assert student.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_temporal_saliency_loss_label_target_needs_labels():
    teacher, student = TinyCNN(1, 3).eval(), TinyCNN(1, 3)
    with pytest.raises(ValueError, match="needs the labels y"):
        TemporalSaliencyLoss(saliency_target="label")(teacher, student, torch.randn(2, 1, 8))


def _captum_ig(model, x, target, steps):
    from captum.attr import IntegratedGradients

    attr = IntegratedGradients(model).attribute(x, target=target, n_steps=steps, method="riemann_middle")
    return attr.abs().sum(1)


def test_teacher_saliency_options_give_the_teacher_its_own_estimator():
    """The student's 1-sample IG with the teacher's maps at IG-8 (``teacher_saliency_options``): the target
    is captum's 8-step IG and stays fixed across calls, while the student's map is a fresh random estimate.
    Without the option, the teacher takes the student's options without ``sampling``: a 1-step midpoint IG,
    i.e. ``|x * grad f(x / 2)|`` (the cruder target of the screen's ``ig1u_*`` candidates)."""
    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 3, batchnorm=False).eval(), TinyCNN(1, 3, batchnorm=False)
    x = torch.randn(5, 1, 16)
    target = teacher(x).argmax(1)
    cheap = {"steps": 1, "sampling": "uniform"}
    term = TemporalSaliencyLoss(teacher_saliency_options={"steps": 8}, **cheap)
    assert term.teacher_saliency_options == {"steps": 8} and term.saliency_options == cheap
    g = torch.Generator().manual_seed(1)
    first = term(teacher, student, x, generator=g)
    second = term(teacher, student, x, generator=g)
    torch.testing.assert_close(
        first.teacher_saliency, _captum_ig(teacher, x, target, 8), atol=1e-5, rtol=1e-4
    )
    assert torch.equal(first.teacher_saliency, second.teacher_saliency)
    assert not torch.allclose(first.student_saliency, second.student_saliency)  # other interpolants

    default = TemporalSaliencyLoss(**cheap)
    assert default.teacher_saliency_options == {"steps": 1}
    out = default(teacher, student, x, generator=torch.Generator().manual_seed(1))
    half = (x / 2).requires_grad_()
    grad = torch.autograd.grad(teacher(half).gather(1, target[:, None]).sum(), half)[0]
    torch.testing.assert_close(out.teacher_saliency, (x * grad).abs().sum(1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.teacher_saliency, first.teacher_saliency, atol=1e-3)


def test_the_distiller_caches_the_teacher_maps_of_its_teacher_options():
    """``TemporalSaliencyDistiller(teacher_saliency_options=...)``: the teacher cache holds captum's IG-8 maps
    while the student trains with the 1-sample estimate."""
    from lightning_tsd import TemporalSaliencyDistiller

    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 3, batchnorm=False).eval(), TinyCNN(1, 3, batchnorm=False)
    x = torch.randn(6, 1, 16)
    batch = {"x": x, "y": torch.tensor([0, 1, 2, 0, 1, 2]), "index": torch.arange(6)}
    d = TemporalSaliencyDistiller(
        teacher,
        student,
        teacher_cache=True,
        saliency_options={"steps": 1, "sampling": "uniform"},
        teacher_saliency_options={"steps": 8},
    )
    d.precompute_teacher_cache([batch])
    out = d.source.outputs(x, None, None, torch.arange(6), with_saliency=True)
    assert out.stored is None  # every row came from the cache
    torch.testing.assert_close(
        out.saliency, _captum_ig(teacher, x, teacher(x).argmax(1), 8), atol=1e-5, rtol=1e-4
    )
    assert d.tsd.saliency_options["sampling"] == "uniform" and d.tsd.saliency_options["steps"] == 1
