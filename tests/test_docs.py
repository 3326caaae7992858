"""The documentation: the API reference builds without warnings, every page's Python runs as written.

The ```python blocks of docs/*.md and docs/workflows/*.md run like the README's
(tests/test_readme.py): in order, each page in its own namespace, so a later block may use the
names an earlier one defined. ```py blocks are excerpts (they need a process group or a
framework's loop) and are not run.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([*DOCS.glob("*.md"), *DOCS.glob("workflows/*.md")])
#: pages whose ```python blocks are fragments of the reader's own code (undefined names)
FRAGMENTS = {"migration.md": "its one block shows a call on the reader's model, loader and device"}
#: the pages each module's reference must have
REFERENCE_MODULES = [
    "torchpruner",
    "torchpruner.pruner",
    "torchpruner.attributions",
    "torchpruner.schedule",
    "torchpruner.masking",
    "torchpruner.regularize",
    "torchpruner.distributed",
]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from docs import build as docs_build  # noqa: E402  (the build script, importable from the repository root)


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def _relative(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


RUNNABLE = [
    (_relative(page), index)
    for page in PAGES
    if _relative(page) not in FRAGMENTS
    for index in range(len(_blocks(page)))
]


# -- the pages ---------------------------------------------------------------------------------


def test_every_page_is_linked_from_the_index_and_every_link_resolves():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in PAGES:
        if page.name != "index.md":
            assert f"({_relative(page)})" in index, f"docs/index.md does not link {_relative(page)}"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{_relative(page)} links {target}, which does not exist"


def test_each_workflow_page_has_code_and_the_fragments_list_is_current():
    for page in DOCS.glob("workflows/*.md"):
        text = page.read_text(encoding="utf-8")
        assert "```python\n" in text or "```py\n" in text, f"{_relative(page)} shows no code"
    for name in FRAGMENTS:
        assert (DOCS / name).exists() and _blocks(DOCS / name), f"FRAGMENTS names {name}, which has no python block"
    assert len(RUNNABLE) >= 6


@pytest.mark.parametrize(("page", "index"), RUNNABLE, ids=[f"{p}[{i}]" for p, i in RUNNABLE])
def test_docs_block_runs(page, index, tmp_path, monkeypatch):
    blocks = _blocks(DOCS / page)
    for module in re.findall(r"^(?:import|from) (\w+)", "\n".join(blocks[: index + 1]), flags=re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"docs/{page} needs {module}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHPRUNER_PROGRESS", "0")
    namespace = {"__name__": "__docs__"}
    for number, block in enumerate(blocks[: index + 1]):
        exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)


# -- the API reference -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pytest.importorskip("pdoc")
    output = tmp_path_factory.mktemp("api")
    return output, docs_build.build(output)


def test_the_api_reference_builds_without_warnings(reference):
    output, result = reference
    assert result.warnings == []
    assert result.ok
    for name in REFERENCE_MODULES:
        page = output / f"{name.replace('.', '/')}.html"
        assert page in result.pages and page.stat().st_size > 0, f"no page for {name}"
    assert (output / "index.html").exists()


def test_the_reference_pages_hold_the_docstrings(reference):
    output, _ = reference
    pruner = (output / "torchpruner" / "pruner.html").read_text(encoding="utf-8")
    assert "Pruner" in pruner and "prune_model" in pruner
    distributed = (output / "torchpruner" / "distributed.html").read_text(encoding="utf-8")
    assert "prune_ddp" in distributed and "DistributedPruningError" in distributed
    masking = (output / "torchpruner" / "masking.html").read_text(encoding="utf-8")
    assert "materialize" in masking


def test_only_missing_frameworks_are_skipped(reference):
    _, result = reference
    assert set(result.skipped) <= docs_build.OPTIONAL_MODULES
    for name in docs_build.OPTIONAL_MODULES:
        framework = {
            "torchpruner.integrations.lightning": ("lightning", "pytorch_lightning"),
            "torchpruner.integrations.transformers": ("transformers",),
        }[name]
        installed = any(importlib.util.find_spec(package) is not None for package in framework)
        assert (name in result.skipped) != installed, name
    assert not any(part.startswith("_") for page in result.pages for part in page.parts[-3:])


def test_a_warning_fails_the_build(tmp_path, monkeypatch):
    pytest.importorskip("pdoc")
    package = tmp_path / "src" / "brokendocs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        textwrap.dedent('''\
        """A package whose docstring includes a file that does not exist.

        .. include:: missing.md
        """
        '''),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    result = docs_build.build(tmp_path / "out", ["brokendocs"])
    assert not result.ok and any("missing.md" in text for text in result.warnings)
    assert docs_build.main(["--output", str(tmp_path / "out2"), "brokendocs"]) == 1


def test_an_optional_module_whose_framework_is_missing_is_skipped(tmp_path, monkeypatch):
    pytest.importorskip("pdoc")
    name = "torchpruner.integrations.lightning"
    monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    result = docs_build.build(tmp_path / "out", ["torchpruner.integrations", name])
    assert result.ok and name in result.skipped
    assert (tmp_path / "out" / "torchpruner" / "integrations.html").exists()
    assert not (tmp_path / "out" / "torchpruner" / "integrations" / "lightning.html").exists()


def test_a_broken_package_module_is_not_skipped(monkeypatch, tmp_path):
    pytest.importorskip("pdoc")
    monkeypatch.setitem(sys.modules, "torchpruner.masking", None)
    with pytest.raises(ImportError):
        docs_build.build(tmp_path / "out", ["torchpruner.masking"])
