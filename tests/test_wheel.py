"""The wheel is what a user installs: built from a copy of the source tree, installed into an empty
folder, imported from outside the repository, it runs the README quickstart; and it ships the
package only (no tests, figures, results, experiments or benchmarks)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".ci-venv",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    "results",
    ".pytest_cache",
    ".hypothesis",
    "lightning_logs",
)


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def local_setuptools_builds() -> bool:
    """The running interpreter's setuptools can build the project without the package index."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)  # pip builds in the tree: keep the checkout clean
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)]
    if local_setuptools_builds():
        command.insert(4, "--no-build-isolation")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (built,) = (work / "dist").glob("torchpruner_onthefly-*.whl")
    return built


def test_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"torchpruner", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "torchpruner/py.typed" in names and "torchpruner/integrations/lightning.py" in names
    for forbidden in ("tests/", "figures/", "results/", "experiments/", "benchmarks/", "examples/"):
        assert not [n for n in names if forbidden in n], forbidden
    assert not [n for n in names if n.endswith((".png", ".csv", ".pt", ".pyc"))]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Name: torchpruner-onthefly" in metadata
    assert "Provides-Extra: lightning" in metadata and "Provides-Extra: transformers" in metadata


def test_installed_wheel_runs_the_quickstart_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "quickstart.py"
    script.write_text(
        "import torchpruner\nprint('imported from', torchpruner.__file__)\n" + quickstart(), encoding="utf-8"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", TORCHPRUNER_PROGRESS="0")
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"imported from {site / 'torchpruner' / '__init__.py'}" in run.stdout
    assert "Linear(in_features=64, out_features=24" in run.stdout
