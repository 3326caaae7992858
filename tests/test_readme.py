"""The README's Python blocks run as written (a newcomer copies them verbatim)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_a_quickstart():
    assert any("prune_model" in block for block in _python_blocks())


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    blocks = _python_blocks()
    # later blocks may use names defined by the quickstart (e.g. `model`)
    for block in blocks[:index]:
        exec(compile(block, f"README block {blocks.index(block)}", "exec"), namespace)
    exec(compile(blocks[index], f"README block {index}", "exec"), namespace)
