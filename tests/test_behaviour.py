"""Behavioural checks (lightning_tsd.behaviour): the perturbations by hand, agreement under them, and the
deletion / keep curves on models that read one step."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN
from torch import nn

from lightning_tsd.behaviour import (
    Behaviour,
    check_behaviour_options,
    deletion_curve,
    measure_behaviour,
    perturb,
    perturbed_agreement,
    random_ranking,
    teacher_ranking,
    top_steps,
)


class StepProbe(nn.Module):
    """Reads one step of channel 0: logits ``(0, x[step])``, so class 1 iff that value is positive (a tie at
    0, e.g. after deleting the step, goes to class 0)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.read = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.read.weight.copy_(torch.tensor([[0.0], [1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(x[:, :1, self.step])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positive(b: int = 8, c: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, t, generator=_gen(seed)) + 0.5


# ----------------------------------------------------------------------------------------------- perturb


def test_noise_level_zero_is_the_identity_and_noise_scales_with_each_series_std():
    x = torch.randn(3, 2, 4000, generator=_gen(1)) * torch.tensor([1.0, 5.0, 0.2]).view(3, 1, 1)
    assert torch.equal(perturb(x, "noise", 0.0, generator=_gen()), x)
    noise = perturb(x, "noise", 0.5, generator=_gen()) - x
    ratio = noise.std(-1) / x.std(-1)  # per series and channel
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), rtol=0.05)


def test_noise_leaves_padded_steps_and_uses_the_std_of_real_steps_only():
    x = torch.randn(2, 1, 2000, generator=_gen(2))
    x[:, :, 1000:] = 1000.0  # padding with a huge value must not inflate the std
    mask = torch.arange(2000) < 1000
    mask = mask.expand(2, 2000)
    out = perturb(x, "noise", 1.0, generator=_gen(), mask=mask)
    assert torch.equal(out[..., 1000:], x[..., 1000:])
    assert float((out - x)[..., :1000].std()) == pytest.approx(float(x[..., :1000].std()), rel=0.1)


@pytest.mark.parametrize("level", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_mask_zeroes_a_window_of_exactly_round_level_times_real_steps(level):
    x = _positive(b=16, c=3, t=20, seed=3)
    lengths = torch.tensor([20, 13, 7, 1] * 4)
    mask = torch.arange(20) < lengths[:, None]
    out = perturb(x, "mask", level, generator=_gen(), mask=mask)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel of a masked step
    zero = zero[:, 0]
    assert not (zero & ~mask).any()  # never a padded step
    assert zero.sum(1).tolist() == [round(level * n) for n in lengths.tolist()]
    for row in zero:  # one contiguous window
        steps = row.nonzero().flatten()
        assert steps.numel() == 0 or steps[-1] - steps[0] + 1 == steps.numel()
    assert torch.equal(out[~zero.unsqueeze(1).expand_as(x)], x[~zero.unsqueeze(1).expand_as(x)])


def test_mask_window_runs_over_real_steps_around_a_hole_and_starts_anywhere():
    x = _positive(b=200, c=1, t=6, seed=4)
    mask = torch.tensor([True, True, False, True, True, True]).expand(200, 6)
    out = perturb(x, "mask", 0.4, generator=_gen(), mask=mask)  # 2 of 5 real steps
    zero = (out == 0)[:, 0]
    assert not zero[:, 2].any() and zero.sum(1).eq(2).all()
    starts = {tuple(row.nonzero().flatten().tolist()) for row in zero}
    assert starts == {(0, 1), (1, 3), (3, 4), (4, 5)}  # every window of 2 consecutive real steps


def test_shift_moves_every_series_by_exactly_k_steps_with_the_edge_value():
    t = 10
    x = torch.arange(t, dtype=torch.float).expand(32, 2, t).clone()
    x[:, 1] *= -1
    out = perturb(x, "shift", 0.3, generator=_gen())  # k = 3
    later = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 5, 6.0])
    earlier = torch.tensor([3, 4, 5, 6, 7, 8, 9, 9, 9, 9.0])
    signs = []
    for row in out:
        assert torch.equal(row[1], -row[0])  # both channels move together
        assert torch.equal(row[0], later) or torch.equal(row[0], earlier)
        signs.append(torch.equal(row[0], later))
    assert 0 < sum(signs) < 32  # random sign per series


def test_shift_stays_within_the_real_steps():
    x = torch.arange(1.0, 9.0).expand(16, 1, 8).clone()
    mask = (torch.arange(8) < 5).expand(16, 8)  # real steps 1..5, padding 6..8
    out = perturb(x, "shift", 0.4, generator=_gen(), mask=mask)  # k = round(0.4 * 5) = 2
    for row in out[:, 0]:
        assert row[5:].tolist() == [6.0, 7.0, 8.0]
        assert row[:5].tolist() in ([1.0, 1.0, 1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 5.0, 5.0])
    assert torch.equal(perturb(x, "shift", 0.0, mask=mask), x)


def test_perturb_keeps_the_shape_of_univariate_input_and_draws_from_the_generator():
    x = torch.randn(4, 12)
    assert perturb(x, "mask", 0.25, generator=_gen()).shape == (4, 12)
    assert torch.equal(
        perturb(x, "noise", 1.0, generator=_gen(7)), perturb(x, "noise", 1.0, generator=_gen(7))
    )
    assert not torch.equal(
        perturb(x, "noise", 1.0, generator=_gen(7)), perturb(x, "noise", 1.0, generator=_gen(8))
    )


@pytest.mark.parametrize(
    ("kind", "level", "match"),
    [
        ("blur", 0.1, "unknown perturbation kind 'blur'; choose one of"),
        ("noise", -0.5, "out of range for kind 'noise': pass a multiple"),
        ("noise", float("inf"), "out of range"),
        ("noise", float("nan"), "out of range"),
        ("mask", 1.5, r"out of range for kind 'mask': pass the fraction .* in \[0, 1\]"),
        ("shift", 2, "out of range for kind 'shift'"),
        ("mask", True, "out of range"),
    ],
)
def test_bad_perturbations_name_the_problem(kind, level, match):
    with pytest.raises(ValueError, match=match):
        perturb(torch.randn(2, 1, 8), kind, level)


# ----------------------------------------------------------------------------------- perturbed agreement


@pytest.mark.parametrize("kind", ["noise", "mask", "shift"])
def test_a_student_identical_to_the_teacher_agrees_everywhere(kind):
    torch.manual_seed(0)
    model = TinyCNN(2, 3, width=4)
    x = torch.randn(16, 2, 20)
    agreement = perturbed_agreement(model, model, x, kind, 0.5, generator=_gen(), repeats=3)
    assert agreement.ndim == 0 and agreement.dtype == torch.float32 and float(agreement) == 1.0


def test_noise_level_zero_gives_the_clean_agreement():
    x = _positive()
    x[:3, 0, 7] = -1.0  # the student (step 7) says class 0 on three series, the teacher (step 2) does not
    agreement = perturbed_agreement(StepProbe(2), StepProbe(7), x, "noise", 0.0, repeats=2)
    assert float(agreement) == 5 / 8


def test_masked_agreement_counts_the_draws_where_one_model_loses_its_step():
    x = _positive(b=64, c=1, t=4)
    teacher, student = StepProbe(0), StepProbe(3)
    got = perturbed_agreement(teacher, student, x, "mask", 0.25, generator=_gen(5), repeats=3)
    g = _gen(5)  # the same draws, by hand: they disagree iff the 1-step window hits step 0 or step 3
    zero = torch.cat([(perturb(x, "mask", 0.25, generator=g) == 0)[:, 0] for _ in range(3)])
    want = 1 - (zero[:, 0] | zero[:, 3]).float().mean()
    assert float(got) == pytest.approx(float(want)) and 0.3 < float(got) < 0.7


def test_perturbed_agreement_restores_modes_and_takes_no_gradients():
    torch.manual_seed(0)
    teacher, student = TinyCNN(1, 2, width=4).train(), TinyCNN(1, 2, width=4).train()
    student.norm.eval()
    running = teacher.norm.running_mean.clone()
    agreement = perturbed_agreement(teacher, student, torch.randn(8, 1, 16), "noise", 0.5)
    assert not agreement.requires_grad
    assert teacher.training and student.training and not student.norm.training
    assert torch.equal(teacher.norm.running_mean, running)  # ran in eval mode
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        perturbed_agreement(teacher, student, torch.randn(8, 1, 16), "noise", 0.5, repeats=0)


# ------------------------------------------------------------------------------------------ deletion curve


def test_top_steps_counts_real_steps_and_never_picks_padding():
    ranking = torch.tensor([[5.0, 4, 3, 2, 1, 0, 9, 9, 9, 9]])
    mask = torch.arange(10).unsqueeze(0) < 6
    assert top_steps(ranking, 0.5, mask).nonzero()[:, 1].tolist() == [0, 1, 2]
    assert top_steps(ranking, 0.01, mask).sum() == 1  # at least one step
    assert top_steps(ranking, 0.2).nonzero()[:, 1].tolist() == [6, 7]  # ties: the earlier steps


def test_deleting_the_one_step_a_model_reads_flips_it():
    x = _positive(b=6, c=2, t=10)
    teacher = StepProbe(4)
    ranking = torch.zeros(6, 10)
    ranking[:, 4] = 1.0  # the teacher's step first, then the others in time order
    fractions = (0.1, 0.3, 0.5)
    assert deletion_curve(teacher, teacher, x, ranking, fractions).tolist() == [0.0, 0.0, 0.0]
    assert deletion_curve(teacher, teacher, x, ranking, fractions, mode="keep").tolist() == [1.0, 1.0, 1.0]
    # a student that reads step 1: deleted once the top 30% (steps 4, 0, 1) go; kept only then too
    student = StepProbe(1)
    assert deletion_curve(teacher, student, x, ranking, fractions).tolist() == [1.0, 0.0, 0.0]
    assert deletion_curve(teacher, student, x, ranking, fractions, mode="keep").tolist() == [0.0, 1.0, 1.0]


def test_deletion_curve_compares_with_the_teachers_clean_prediction():
    x = _positive(b=4, c=1, t=10)
    x[:2, 0, 4] = -1.0  # the teacher says class 0 on the first two series
    teacher, ranking = StepProbe(4), torch.arange(10.0).flip(0).expand(4, 10)  # step 0 first
    # the student (step 0) says 1 everywhere; deleting step 0 turns it to 0 (= the teacher on series 0, 1)
    assert deletion_curve(teacher, StepProbe(0), x, ranking, (0.1,)).tolist() == [0.5]
    assert deletion_curve(teacher, StepProbe(9), x, ranking, (0.1,)).tolist() == [0.5]


def test_deletion_curve_with_padding_and_a_random_ranking():
    x = _positive(b=400, c=1, t=10)
    mask = (torch.arange(10) < 5).expand(400, 10)  # step 9 is padding: deleting never reaches it
    teacher = StepProbe(2)
    ranking = random_ranking(x, generator=_gen(), mask=mask)
    assert ranking.shape == (400, 10) and (ranking[:, 5:] == 0).all()
    curve = deletion_curve(teacher, teacher, x, ranking, (0.2, 0.6), mask=mask)
    assert curve.tolist() == pytest.approx([0.8, 0.4], abs=0.06)  # P(step 2 kept) = 1 - k / 5
    padded = deletion_curve(StepProbe(9), StepProbe(9), x, ranking, (0.2, 0.6), mask=mask)
    assert padded.tolist() == [1.0, 1.0]


def test_teacher_ranking_is_occlusion_and_finds_the_step_the_teacher_reads():
    x = _positive(b=5, c=2, t=20)
    teacher = StepProbe(13)
    ranking = teacher_ranking(teacher, x, window=1)
    assert ranking.argmax(1).tolist() == [13] * 5
    assert torch.allclose(ranking[:, 13], x[:, 0, 13]) and (ranking.abs().sum(1) == ranking[:, 13]).all()
    assert deletion_curve(teacher, teacher, x, ranking, (0.05, 0.5)).tolist() == [0.0, 0.0]
    # default window T // 10 = 2, stride 1: steps 12 and 14 lie in one window of two that holds step 13
    want = torch.zeros(5, 20)
    want[:, 12:15] = x[:, :1, 13] * torch.tensor([0.5, 1.0, 0.5])
    assert torch.allclose(teacher_ranking(teacher, x), want)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": (0.0, 0.5)}, r"fractions must be .* in \(0, 1\)"),
        ({"fractions": (0.5, 1.0)}, r"bad: \[1.0\]"),
        ({"fractions": ()}, "non-empty"),
        ({"mode": "drop"}, "unknown deletion mode 'drop'; choose one of"),
        ({"ranking": torch.zeros(3, 9)}, r"ranking must have shape \(B, T\) = \(3, 10\)"),
    ],
)
def test_bad_deletion_arguments_name_the_problem(kwargs, match):
    args = {"ranking": torch.zeros(3, 10), **kwargs}
    ranking = args.pop("ranking")
    with pytest.raises(ValueError, match=match):
        deletion_curve(StepProbe(0), StepProbe(0), torch.randn(3, 1, 10), ranking, **args)


# --------------------------------------------------------------------------------------- measure_behaviour


def test_measure_behaviour_of_the_teacher_itself_and_a_student_on_another_step():
    batches = [_positive(b=4, c=1, t=20, seed=s) for s in range(3)]
    teacher = StepProbe(5)
    same = measure_behaviour(teacher, teacher, batches, max_series=10, options={"window": 1})
    assert isinstance(same, Behaviour) and same.num_series == 10 and same.method == "occlusion"
    assert same.noise_agreement == 1.0 and same.mask_agreement == 1.0
    assert same.curves["student"] == same.curves["teacher"]
    assert same.curves["teacher"]["delete"]["teacher"] == [0.0] * 5  # the teacher's step goes first
    assert same.curves["teacher"]["keep"]["teacher"] == [1.0] * 5
    assert same.gap("delete") == same.gap("delete", "teacher") > 0.5
    other = measure_behaviour(teacher, StepProbe(15), batches, max_series=10, options={"window": 1})
    assert (
        other.curves["student"]["delete"]["teacher"] == [1.0] * 5
    )  # step 15 is never in the teacher's top 50%
    assert other.gap("delete") < 0 < other.gap("delete", "teacher")
    assert other.mask_agreement < 1.0  # a 2-step window hits one of the two steps sometimes


def test_behaviour_options_are_checked():
    assert check_behaviour_options()["fractions"] == (0.05, 0.1, 0.2, 0.3, 0.5)
    for options, match in [
        ({"max_series": 0}, "max_series must be an integer >= 1"),
        ({"repeats": 1.5}, "repeats must be an integer >= 1"),
        ({"masked": 2.0}, "kind 'mask'"),
        ({"fractions": (0.5, 1.5)}, "fractions must be"),
        ({"method": "lime"}, "unknown attribution method 'lime'"),
        ({"options": {"steps": 4}}, r"do not apply to attribution method 'occlusion'"),
        ({"windows": 3}, r"unknown behaviour option\(s\) \['windows'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_behaviour_options(options)
    with pytest.raises(ValueError, match="got no series"):
        measure_behaviour(StepProbe(0), StepProbe(0), [])


def test_measure_behaviour_takes_batches_of_different_lengths_and_masks():
    x16, x20 = _positive(b=4, c=1, t=16), _positive(b=3, c=1, t=20, seed=1)
    mask = torch.arange(20) < torch.tensor([20, 15, 10])[:, None]
    teacher = StepProbe(3)
    b = measure_behaviour(teacher, teacher, [x16, {"x": x20, "mask": mask}], fractions=(0.5,))
    assert b.num_series == 7 and b.curves["teacher"]["delete"]["teacher"] == [0.0]
