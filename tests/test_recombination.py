"""Saliency-guided recombination: which steps are kept, who the partner is, and what the new series hold."""

from __future__ import annotations

import pytest
import torch

from lightning_tsd.recombination import kept_steps, other_class_partners, recombine


def test_kept_steps_are_the_top_fraction_of_real_steps_only():
    saliency = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])  # the 9 is padding: never ranked
    kept = kept_steps(saliency, 0.4, mask)  # round(0.4 * 5) = 2 steps
    assert kept.tolist() == [[True, False, True, False, False, False]]
    assert kept_steps(saliency, 0.01, mask).sum() == 1  # at least one step


def test_kept_steps_smoothing_keeps_segments():
    saliency = torch.tensor([[0.0, 0.0, 4.0, 0.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept_steps(saliency, 3 / 8, smoothing=1).tolist() == [
        [False, False, True, False, True, True, False, False]
    ]
    # a 3-step moving average favours the 3-step block over the isolated peak
    assert kept_steps(saliency, 3 / 8, smoothing=3).tolist() == [
        [False, False, False, True, True, True, False, False]
    ]


def test_partners_have_another_class_whenever_the_batch_has_one():
    classes = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    for seed in range(20):
        partners = other_class_partners(classes, torch.Generator().manual_seed(seed))
        assert (classes[partners] != classes).all()
    drawn = {int(other_class_partners(classes, torch.Generator().manual_seed(s))[0]) for s in range(50)}
    assert drawn == {1, 2, 3, 5, 6}  # every row of another class is drawn
    same = other_class_partners(torch.tensor([3, 3, 3]), torch.Generator().manual_seed(0))
    assert (same != torch.arange(3)).all()  # one class only: another row
    assert other_class_partners(torch.tensor([1])).tolist() == [0]


def test_recombined_series_keep_their_evidence_and_take_the_rest_from_the_partner():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 10)
    classes = torch.tensor([0, 0, 1, 1])
    saliency = torch.rand(4, 10)
    gen = torch.Generator().manual_seed(3)
    out = recombine(x, saliency, classes, 0.3, smoothing=1, generator=gen)
    partners = other_class_partners(classes, torch.Generator().manual_seed(3))
    kept = kept_steps(saliency, 0.3)
    for i in range(4):
        torch.testing.assert_close(out[i][:, kept[i]], x[i][:, kept[i]])
        torch.testing.assert_close(out[i][:, ~kept[i]], x[partners[i]][:, ~kept[i]])
    assert kept.sum(1).tolist() == [3, 3, 3, 3]


def test_padded_steps_stay_the_series_own():
    x = torch.stack([torch.full((1, 6), 1.0), torch.full((1, 6), 2.0)])
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    x[0, :, 4:] = 0.0
    out = recombine(x, torch.ones(2, 6), torch.tensor([0, 1]), 0.5, mask=mask, smoothing=1)
    assert out[0, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 0.0, 0.0]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\)"):
        recombine(torch.zeros(2, 1, 4), torch.zeros(2, 4), torch.tensor([0, 1]), 1.0)
    with pytest.raises(ValueError, match=r"x \(B, C, T\) and saliency \(B, T\)"):
        recombine(torch.zeros(2, 1, 4), torch.zeros(2, 5), torch.tensor([0, 1]))
