"""Griffe extension: Sphinx roles in metalab's docstrings (:class:`~a.b.C`) become mkdocstrings cross-references,
which `mkdocs build --strict` then checks. Roles to the standard library or third-party packages stay code."""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([\w.]+)(\(\))?`")
EXTERNAL = {"logging", "torch", "numpy", "np", "gymnasium", "gym", "math", "random", "typing", "dataclasses"}


def _crossref(m: re.Match) -> str:
    short, target = m.group(1), m.group(2)
    title = (target.rsplit(".", 1)[-1] if short else target) + (m.group(3) or "")
    if target.split(".", 1)[0] in EXTERNAL:
        return f"`{title}`"
    return f"[`{title}`][{target}]"


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_crossref, obj.docstring.value)
