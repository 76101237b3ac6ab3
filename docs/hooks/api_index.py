"""MkDocs hook: the table of the package's public names on ``api/lightning_tsd.md``, built from ``__all__``.

The page holds the placeholder ``<!-- public-names -->``; this hook replaces it with one row per name in
``lightning_tsd.__all__`` (read statically with griffe, nothing imported): the name, linked to where its
module's page documents it, its kind, and the first paragraph of its docstring. A name added to ``__all__``
appears by itself; one whose module has no API page makes ``mkdocs build --strict`` fail on the link.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

PLACEHOLDER = "<!-- public-names -->"
HERE = Path(__file__).parent
_CODE_SPAN = re.compile(r"(``.*?``|`[^`]*`)")


def _first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph on one line, with pipes outside code spans escaped for a table."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    parts = _CODE_SPAN.split(paragraph)  # code spans at odd positions
    return "".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def public_names_table(root: Path) -> str:
    """A Markdown table of ``lightning_tsd.__all__``: name (linked), kind, one-line summary."""
    extensions = griffe.load_extensions(f"{HERE / 'griffe_docstrings.py'}:ProjectDocstrings")
    package = griffe.load(
        "lightning_tsd", search_paths=[str(root)], extensions=extensions, resolve_aliases=True
    )
    rows = ["| name | kind | summary |", "|---|---|---|"]
    for name in sorted(package.exports or [], key=str.lower):
        member = package[name]
        target = member.final_target if member.is_alias else member
        summary = _first_paragraph(target.docstring.value) if target.docstring else ""
        # an object without a docstring is not rendered on its module's page, so there is nothing to link to
        link = f"[`{name}`][{target.path}]" if target.docstring else f"`{name}`"
        rows.append(f"| {link} | {target.kind.value} | {summary} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Fill the placeholder on the page that has it."""
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, public_names_table(Path(config.config_file_path).parent))
