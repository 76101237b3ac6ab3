"""``lightning_tsd.losses.teacher_outputs``: deprecated, removed in 0.3.0; it still answers as TeacherSource."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN

from lightning_tsd.losses import teacher_outputs
from lightning_tsd.saliency import temporal_saliency


def test_teacher_outputs_warns_with_its_removal_version_and_matches_temporal_saliency():
    torch.manual_seed(0)
    teacher, x = TinyCNN(1, 3).eval(), torch.randn(4, 1, 16)
    with pytest.warns(DeprecationWarning, match=r"removed in 0\.3\.0"):
        logits, saliency = teacher_outputs(teacher, x, saliency="gradient")
    expected_logits, expected = temporal_saliency(teacher, x, method="gradient")
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(saliency, expected)
    with pytest.warns(DeprecationWarning):
        logits_only, none = teacher_outputs(teacher, x, saliency=None)
    assert none is None
    torch.testing.assert_close(logits_only, expected_logits)
