"""The README's examples run as written (the blocks between ``<!-- readme-test:NAME -->`` markers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> dict[str, str]:
    text = README.read_text()
    found = re.findall(
        r"<!-- readme-test:(\w+) -->\s*```python\n(.*?)```\s*<!-- /readme-test:\1 -->", text, re.S
    )
    return dict(found)


def test_the_readme_marks_its_runnable_examples():
    assert "byom" in blocks()


def test_bring_your_own_model_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks()["byom"], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "student.onnx").is_file()
    distiller = namespace["distiller"]
    assert type(distiller.teacher).__name__ == "TeacherEnsemble" and len(distiller.teacher.members) == 2
