"""Build the API reference from the docstrings with pdoc, failing on any warning.

    python docs/build.py                 # writes docs/api/ (index.html, torchpruner.html, torchpruner/...)
    python -m docs.build --output DIR    # the same, run from the repository root

Every public module of ``torchpruner`` gets a page (modules whose name has a part starting with an
underscore are private and left out). The callbacks in ``torchpruner.integrations`` import their
framework (Lightning, transformers) when imported; a callback module whose framework is not
installed is skipped with a note instead of failing the build. Any warning pdoc emits (a module it
cannot import, a docstring it cannot convert, an annotation it cannot parse) is printed and the
build exits with status 1, so a broken docstring cannot slip into a release.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "api"
PACKAGE = "torchpruner"
#: modules that import an optional framework when imported; missing framework -> page skipped
OPTIONAL_PREFIX = "torchpruner.integrations."
OPTIONAL_MODULES = {"torchpruner.integrations.lightning", "torchpruner.integrations.transformers"}


@dataclass
class BuildResult:
    """What a build wrote, skipped and warned about."""

    pages: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why
    warnings: list[str] = field(default_factory=list)  # pdoc's and the package's own warnings
    other_warnings: list[str] = field(default_factory=list)  # third-party import noise, reported only

    @property
    def ok(self) -> bool:
        return not self.warnings


def public_modules(package: str = PACKAGE) -> list[str]:
    """Every module of ``package`` without a private (underscore) part, the package first."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _importable(name: str) -> str | None:
    """None when ``name`` imports; otherwise why not (only optional modules may fail)."""
    try:
        importlib.import_module(name)
    except ImportError as error:
        if name in OPTIONAL_MODULES:
            return f"optional framework not installed ({error})"
        raise
    return None


def _is_ours(record: warnings.WarningMessage, pdoc_dir: Path, package_dirs: list[Path]) -> bool:
    """A warning counts when pdoc (code or templates) or the documented package raised it."""
    path = Path(record.filename).resolve()
    return any(path.is_relative_to(d) for d in [pdoc_dir, *package_dirs])


def _clear_pdoc_caches(pdoc_modules: list) -> None:
    """pdoc caches converted docstrings and documented modules per process; a second build in the
    same process would otherwise not see (nor warn about) what the first one already converted."""
    for module in pdoc_modules:
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
    pdoc_modules[0].Module.from_name.cache_clear()


def build(output: Path = DEFAULT_OUTPUT, modules: list[str] | None = None) -> BuildResult:
    """Render ``modules`` (default: every public module of torchpruner) into ``output``."""
    import pdoc  # a documentation tool, not a dependency of the library: imported when building
    import pdoc.doc
    import pdoc.doc_ast
    import pdoc.docstrings
    import pdoc.render
    import pdoc.render_helpers

    _clear_pdoc_caches([pdoc.doc, pdoc.doc_ast, pdoc.docstrings, pdoc.render_helpers])

    result = BuildResult()
    names = public_modules() if modules is None else list(modules)
    pdoc.render.configure(docformat="restructuredtext", show_source=False)
    pdoc_dir = Path(pdoc.__file__).resolve().parent
    package_dirs = sorted({Path(importlib.import_module(n.split(".")[0]).__file__).resolve().parent for n in names})
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documented: dict[str, pdoc.doc.Module] = {}
        for name in names:
            why = _importable(name)
            if why is not None:
                result.skipped[name] = why
                continue
            documented[name] = pdoc.doc.Module.from_name(name)
        for name, module in documented.items():
            page = output / f"{name.replace('.', '/')}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(pdoc.render.html_module(module, documented), encoding="utf-8")
            result.pages.append(page)
        index = pdoc.render.html_index(documented)
        if index:
            (output / "index.html").write_text(index, encoding="utf-8")
        search = pdoc.render.search_index(documented)
        if search:
            (output / "search.js").write_text(search, encoding="utf-8")
    for record in caught:
        text = f"{record.category.__name__}: {record.message} ({record.filename}:{record.lineno})"
        (result.warnings if _is_ours(record, pdoc_dir, package_dirs) else result.other_warnings).append(text)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where the HTML goes (default docs/api)")
    parser.add_argument("modules", nargs="*", help="modules to document (default: every public torchpruner module)")
    args = parser.parse_args(argv)
    result = build(args.output, args.modules or None)
    print(f"{len(result.pages)} pages in {args.output}")
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    for text in result.other_warnings:
        print(f"note (not from pdoc or torchpruner): {text}")
    for text in result.warnings:
        print(f"warning: {text}", file=sys.stderr)
    if not result.ok:
        print(f"{len(result.warnings)} warning(s): the API reference is not clean", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # `python docs/build.py` from anywhere documents this checkout
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
