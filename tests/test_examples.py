"""Every script in examples/ runs (CPU, a few seconds each) and prints what it promises."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: script -> (packages it needs beyond the test extra, text its output must contain)
SCRIPTS = {
    "train_and_prune.py": ((), ["pruned a quarter of every hidden layer", "Linear(in_features=64, out_features=36"]),
    "prune_torchvision.py": (
        ("torchvision",),
        ["coupled groups", "more changes", "parameters 11,181,642 ->", "output: (2, 10)"],
    ),
    "compare_criteria.py": ((), ["taylor", "random", "mean loss increase"]),
    "lightning_callback.py": (("lightning",), ["epoch 1: 6570 -> 5028 parameters", "epoch 3:", "logged to"]),
    "transformers_callback.py": (("transformers", "accelerate"), ["epoch 1: 6570 -> 5028 parameters", "epoch 3:"]),
    "prune_tiny_llama.py": (
        ("transformers",),
        [
            "captured by symbolic_trace: 5 prunable groups",
            "parameters 90,432 -> 26,784; hidden size 64 -> 32; KV heads [1, 1] query heads [2, 2]",
            "every parameter updated",
            "save_pretrained -> from_pretrained: hidden 32, heads 2, KV heads 1, MLP 64; same logits: True",
        ],
    ),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script, tmp_path):
    needs, expected = SCRIPTS[script]
    pytest.importorskip("sklearn")
    for package in needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{script} needs {package}")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TORCHPRUNER_PROGRESS="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout, f"{text!r} not in the output of {script}:\n{result.stdout[-2000:]}"
