"""Deprecated in ``lightning_tsd.attribution``: the method ``"saliency"``, the option ``n_steps`` and the
argument ``method_kwargs`` (moved from tests/test_attribution.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN

from lightning_tsd.attribution import check_attribution_options, temporal_attribution


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN(2, 3, width=4).eval()


@pytest.fixture
def x():
    return torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1)).cumsum(-1)


def test_old_names_warn_and_map_to_the_new_ones(model, x):
    with pytest.warns(
        DeprecationWarning, match=r"'saliency' is deprecated and will be removed in 0\.3\.0; use 'gradient'"
    ):
        assert check_attribution_options("saliency") == ("gradient", {})
    with pytest.warns(
        DeprecationWarning, match=r"'n_steps' is deprecated and will be removed in 0\.3\.0; use 'steps'"
    ):
        assert check_attribution_options("integrated_gradients", {"n_steps": 4}) == (
            "integrated_gradients",
            {"steps": 4},
        )
    with pytest.warns(
        DeprecationWarning, match=r"method_kwargs is deprecated and will be removed in 0\.3\.0"
    ):
        assert check_attribution_options("occlusion", None, {"window": 3}) == ("occlusion", {"window": 3})
    with pytest.warns(DeprecationWarning):
        old = temporal_attribution(model, x, 0, method="saliency")
    torch.testing.assert_close(old, temporal_attribution(model, x, 0, method="gradient"))
