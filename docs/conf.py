"""Sphinx configuration for pytorch_privacy (furo theme, MyST markdown, autodoc)."""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "pytorch_privacy"
author = "the pytorch_privacy authors"
copyright = "2026, the pytorch_privacy authors"  # the footer names the copyright holder
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
# "Attributes:" sections as :ivar: fields: autodoc documents dataclass/attrs fields itself, and a
# second ".. attribute::" from napoleon would be a duplicate object description
napoleon_use_ivar = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
html_theme = "furo"
html_title = "pytorch_privacy"
exclude_patterns = ["_build", "api/generated/*.md"]

# -- one page per object -------------------------------------------------------------------
# The packages re-export the public names of their submodules (``from pytorch_privacy.dp_query
# import PrivacyLedger``).  Each object is documented once, in the submodule that defines it;
# the package pages list the public names with links there (``_templates/autosummary/
# module.rst``), and references written with the package path are redirected to the defining
# module by ``_resolve_reexport`` below.
_PACKAGES = (
    "pytorch_privacy.dp_query",
    "pytorch_privacy.analysis",
    "pytorch_privacy.optimizer",
    "pytorch_privacy.optimizer.engines",
    "pytorch_privacy.auditing",
)


def _canonical(package: str, name: str) -> str | None:
    """``module.qualname`` where the object a package exports as ``name`` is documented."""
    pkg = importlib.import_module(package)
    lazy = getattr(pkg, "_LAZY", {})
    home = f"{package}{lazy[name]}" if name in lazy else package  # PEP 562 lazy exports
    obj = getattr(importlib.import_module(home), name, None)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module == f"{package}.{name}":
        # a function named like its module (analysis.compute_dp_sgd_privacy): autosummary
        # documents it under the package path
        return f"{package}.{name}"
    if module and qualname and module.startswith("pytorch_privacy"):
        return f"{module}.{qualname}"
    return f"{home}.{name}" if home != package else None


def _public_api() -> dict[str, list[str]]:
    out = {}
    for package in _PACKAGES:
        names = getattr(importlib.import_module(package), "__all__", [])
        # relative to the package (the table sits in its module context), shown by last name
        out[package] = [f"~{c[len(package) + 1:]}" for c in (_canonical(package, n) for n in names) if c]
    return out


autosummary_context = {"public_api": _public_api()}


def _resolve_reexport(app, env, node, contnode):
    """Resolve ``pytorch_privacy.<package>.<Name>[.attr]`` to where ``Name`` is documented."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("pytorch_privacy."):
        return None
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:i])
        if package not in _PACKAGES:
            continue
        canonical = _canonical(package, parts[i])
        if canonical is None:
            return None
        new_target = ".".join([canonical, *parts[i + 1 :]])
        if new_target == target:
            return None
        domain = env.get_domain("py")
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], new_target, node, contnode)
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
