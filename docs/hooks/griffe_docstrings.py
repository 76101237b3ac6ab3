"""Griffe extension: read the package's docstrings as the project writes them, for the API reference.

The docstrings are Google style, with two habits griffe's Google parser does not know:

* an ``Example:`` section (singular, as Napoleon reads it): griffe would take it for an admonition and render
  its doctest as prose, so it is renamed ``Examples:``, which griffe renders as a code block;
* Sphinx roles (``:func:`name```, ``:class:`~pkg.Name```): shown as code spans (the ``~`` form by its last
  component), since the names they point to are not all on a page of the site;
* several arguments described at once (``a, b: as in f``) in an ``Args:`` section: one entry per name.

The source files are not changed; only what the API pages show.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Module, Object

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_ARGS = re.compile(r"^(\s*)(?:Args|Arguments|Parameters):\s*$")
_SHARED_ARG = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s+(.*)$")


def _role_to_code(match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


def _split_shared_args(text: str) -> str:
    out: list[str] = []
    section: int | None = None  # indentation of the current Args header
    item: int | None = None  # indentation of its entries
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if header := _ARGS.match(line):
            section, item = len(header.group(1)), None
        elif line.strip() and section is not None:
            if indent <= section:
                section = item = None  # the section ended
            elif item is None:
                item = indent
        shared = _SHARED_ARG.match(line) if item is not None and indent == item else None
        if shared:
            prefix, names, description = shared.groups()
            out.extend(f"{prefix}{name.strip()}: {description}" for name in names.split(","))
        else:
            out.append(line)
    return "\n".join(out)


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with ``Example:`` sections renamed, Sphinx roles turned into code spans and
    arguments described together split into one entry each."""
    return _split_shared_args(_ROLE.sub(_role_to_code, _EXAMPLE.sub(r"\1Examples:", text)))


class ProjectDocstrings(Extension):
    """Rewrite each object's docstring with :func:`markdown_docstring` once the object tree is loaded."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # griffe runs on_object for the package's members, not for the package
