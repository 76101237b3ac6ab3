"""Deprecated in ``lightning_tsd.cli``: the demo's names, which moved to ``lightning_tsd.demo`` (moved from
tests/test_cli.py)."""

from __future__ import annotations

import pytest

from lightning_tsd import cli as cli_module
from lightning_tsd import demo as demo_module


def test_moved_demo_names_still_work_from_cli_with_a_deprecation_warning():
    for name in ("run_demo", "DemoRow", "results_table", "train_teacher", "TEACHER_KWARGS"):
        with pytest.warns(DeprecationWarning, match=f"lightning_tsd.cli.{name} moved to lightning_tsd.demo"):
            assert getattr(cli_module, name) is getattr(demo_module, name)
    assert cli_module.ConfigError is demo_module.ConfigError
    with pytest.raises(AttributeError, match="no_such_name"):
        cli_module.no_such_name  # noqa: B018


def test_names_new_to_the_demo_are_not_served_from_cli():
    """Only the names that really moved are served (with their warning); the demo's new ones are not."""
    for name in ("checks_table", "tsd_verdict", "tenth_filters"):
        assert hasattr(demo_module, name)
        with pytest.raises(AttributeError, match=name):
            getattr(cli_module, name)
