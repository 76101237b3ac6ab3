"""Deprecated in ``lightning_tsd.report``: ``method_kwargs`` and its option ``n_steps``, and the method
``"saliency"`` (moved from tests/test_report.py)."""

from __future__ import annotations

import pytest

from lightning_tsd.report import SubstitutionReportCallback, substitution_report


@pytest.fixture
def models(toy_module):
    module = toy_module(seed=3)
    return module.teacher, module.student


def test_old_option_names_of_the_report_still_work(models, toy_loader):
    loader = toy_loader(n=8, seed=5)
    with pytest.warns(DeprecationWarning):
        old = substitution_report(
            *models, loader, method="integrated_gradients", method_kwargs={"n_steps": 4}
        )
    new = substitution_report(*models, loader, method="integrated_gradients", options={"steps": 4})
    assert old.saliency == new.saliency and old.method == "integrated_gradients"
    with pytest.warns(DeprecationWarning, match="'saliency' is deprecated"):
        assert SubstitutionReportCallback(method="saliency").options["method"] == "gradient"
