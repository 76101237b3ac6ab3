"""Packaging and docs-site plumbing: one version, the shipped data files, and the docs hooks' rewriting."""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

import lightning_tsd

ROOT = Path(__file__).resolve().parents[1]


def _hook(name: str):
    """Import ``docs/hooks/<name>.py`` (not a package: MkDocs loads it by path)."""
    spec = importlib.util.spec_from_file_location(
        f"docs_hooks_{name}", ROOT / "docs" / "hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_version_is_written_once_and_read_by_the_metadata():
    import configparser

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert "project" not in tomllib.loads((ROOT / "pyproject.toml").read_text())  # metadata: setup.cfg only
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: lightning_tsd.__version__"
    assert metadata.version("lightning-tsd") == lightning_tsd.__version__


def test_the_package_ships_its_type_marker_and_configs():
    files = resources.files("lightning_tsd")
    assert files.joinpath("py.typed").is_file()
    assert {"gunpoint.yaml", "basicmotions.yaml", "japanesevowels.yaml"} <= {
        f.name for f in files.joinpath("configs").iterdir()
    }


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        ("Sum.\n\nExample:\n    >>> 1 + 1\n    2", "Sum.\n\nExamples:\n    >>> 1 + 1\n    2"),
        (
            "See :func:`substitution_report` and :class:`~lightning_tsd.cache.TeacherCache`.",
            "See `substitution_report` and `TeacherCache`.",
        ),
        (
            "Args:\n    a, b: as in f.\n        x, y: kept\n    c: one.\n\nReturns:\n    d, e: kept",
            "Args:\n    a: as in f.\n    b: as in f.\n        x, y: kept\n    c: one.\n\nReturns:\n    d, e: kept",
        ),
    ],
)
def test_docstrings_are_rewritten_for_the_api_pages(docstring, expected):
    assert _hook("griffe_docstrings").markdown_docstring(docstring) == expected


def test_the_api_index_lists_every_public_name_linked_to_its_module_page():
    table = _hook("api_index").public_names_table(ROOT)
    rows = table.splitlines()[2:]
    assert len(rows) == len(lightning_tsd.__all__)
    assert (
        "| [`TemporalSaliencyDistiller`][lightning_tsd.module.TemporalSaliencyDistiller] | class |" in table
    )
    assert "| [`kd_loss`][lightning_tsd.losses.kd_loss] | function | Hinton KD:" in table
