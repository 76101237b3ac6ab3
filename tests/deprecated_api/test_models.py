"""Deprecated: ``infer_num_classes`` (``lightning_tsd.module``), removed in 0.3.0."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_tsd.adapters import declared_num_classes
from lightning_tsd.models import FCN
from lightning_tsd.module import infer_num_classes


@pytest.mark.parametrize("model", [FCN(in_channels=1, num_classes=4), nn.Linear(3, 2)])
def test_infer_num_classes_is_the_declared_count_with_a_warning(model):
    with pytest.warns(
        DeprecationWarning, match="infer_num_classes is deprecated and will be removed in 0.3.0"
    ) as w:
        assert infer_num_classes(model) == declared_num_classes(model)
    assert w[0].filename == __file__
