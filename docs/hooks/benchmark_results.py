"""MkDocs hook: serve the committed benchmark results (``benchmarks/results/``) as part of the site.

The result files stay where the benchmark scripts write them; this hook adds each one to the build under the
same relative path (``benchmarks/results/quality.md`` -> ``<site>/benchmarks/results/quality/``), so the
docs link to the files themselves and ``mkdocs build --strict`` checks those links.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path("benchmarks") / "results"
SUFFIXES = {".md", ".png", ".csv"}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add every result table, figure and CSV under ``benchmarks/results/`` to the site's files."""
    root = Path(config.config_file_path).parent
    for path in sorted((root / RESULTS).rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            src_uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files
