"""Packaging: ``setup.cfg`` (what the package is and ships) and ``pyproject.toml`` (build system and tool
settings) split without overlap, and the wheel built from them holds the metadata, entry point, extras and
package data it always did. The wheel is built offline from a copy of the sources (no build isolation)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

import lightning_tsd

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {
    "data": {"aeon>=1.0"},
    "hf": {"transformers>=4.40"},
    "deploy": {"onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"},
    "docs": {"mkdocs-material>=9.5", "mkdocstrings[python]>=0.25"},
    "types": {"mypy>=1.10"},
}


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("setuptools").split(".")[:2] if p.isdigit())
    except metadata.PackageNotFoundError:
        return (0,)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "lightning_tsd", src / "lightning_tsd", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    # Offline with the environment's setuptools when it is recent enough (this venv); else pip's isolated build
    # environment, which fetches pyproject's build requirements (a fresh CI venv)
    offline = ["--no-build-isolation"] if _setuptools_version() >= (77,) else []
    command = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out), *offline]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lightning_tsd-*.whl")
    return zipfile.ZipFile(path)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    return wheel.read(f"lightning_tsd-{lightning_tsd.__version__}.dist-info/{name}").decode()


def test_setup_cfg_and_pyproject_declare_nothing_twice():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "project" not in pyproject and "setuptools" not in pyproject["tool"]  # metadata: setup.cfg only
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"
    assert cfg["metadata"]["name"] == "lightning-tsd"
    assert cfg["metadata"]["version"] == "attr: lightning_tsd.__version__"
    tools = set(pyproject["tool"])  # mypy, pytest, ruff, coverage: their settings live in pyproject only
    assert {"mypy", "pytest", "ruff", "coverage"} <= tools
    assert not [s for s in cfg.sections() if s.split(":")[0] in tools or s.startswith("tool:")]
    # the version is written once, in lightning_tsd/__init__.py, and read by the installed metadata
    assert (
        lightning_tsd.__version__
        not in (ROOT / "setup.cfg").read_text() + (ROOT / "pyproject.toml").read_text()
    )
    assert metadata.version("lightning-tsd") == lightning_tsd.__version__


def test_wheel_metadata(wheel):
    meta = Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert meta["Name"] == "lightning-tsd"
    assert meta["Version"] == lightning_tsd.__version__
    assert meta["Summary"].startswith("Temporal Saliency Distillation (TSD)")
    assert meta["License-Expression"] == "Apache-2.0" and meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# lightning-tsd")  # the README is the long description
    assert "Typing :: Typed" in meta.get_all("Classifier")
    requires = meta.get_all("Requires-Dist")
    core = {r for r in requires if "extra ==" not in r}
    assert {"torch<3,>=2.4", "lightning<2.7,>=2.4", "jsonargparse[signatures]>=4.27"} <= core
    assert set(meta.get_all("Provides-Extra")) == {*EXTRAS, "dev"}
    for extra, wanted in EXTRAS.items():
        assert {r.split(";")[0] for r in requires if r.endswith(f'extra == "{extra}"')} == wanted, extra
    dev = {r.split(";")[0] for r in requires if r.endswith('extra == "dev"')}
    assert {"pytest>=8", "ruff==0.17.6", "mypy==2.4.1"} <= dev and set().union(*EXTRAS.values()) - {
        "mypy>=1.10"
    } <= dev


def test_wheel_entry_point_and_contents(wheel):
    assert "[console_scripts]\nlightning-tsd = lightning_tsd.cli:main" in _dist_info(
        wheel, "entry_points.txt"
    )
    names = set(wheel.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_tsd").rglob("*.py")}
    sources = {s for s in sources if "__pycache__" not in s}
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_tsd" / "configs").glob("*.yaml")}
    assert {"lightning_tsd/configs/gunpoint.yaml", "lightning_tsd/py.typed"} <= names
    assert configs and configs <= names and sources <= names
    package = {n for n in names if not n.startswith("lightning_tsd-")}
    assert package == sources | configs | {"lightning_tsd/py.typed"}  # nothing else (tests, benchmarks)
    assert (
        wheel.read("lightning_tsd/configs/gunpoint.yaml")
        == (ROOT / "lightning_tsd/configs/gunpoint.yaml").read_bytes()
    )
    assert f"lightning_tsd-{lightning_tsd.__version__}.dist-info/licenses/LICENSE" in names
