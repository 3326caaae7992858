"""Every built-in slicing rule is registered on import of the rules package, in any process, and
the docstring examples of the rules run as written."""

from __future__ import annotations

import doctest
import subprocess
import sys
import textwrap

import torchpruner.rules.registry

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn as nn

    class Block(nn.Module):          # a ViT-like block: attention on [N, T, D] tokens
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)
        def forward(self, x):
            h = self.embed(x)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.head(h.mean(1))

    path = sys.argv[2]
    torch.manual_seed(0)
    model = Block()
    if sys.argv[1] == "save":
        from torchpruner import Pruner, save_pruned
        pruner = Pruner(model, input_size=(5, 6))
        pruner.prune_model(model.embed, [1, 5])   # dim 1 of both heads (head_dim 4 -> 3)
        save_pruned(model, path)
        print(model.attn.embed_dim)
    else:
        from torchpruner import load_pruned       # a fresh interpreter: nothing else imported
        load_pruned(model, path)
        print(model.attn.embed_dim, model.attn.head_dim, tuple(model.attn.in_proj_weight.shape))
""")


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_load_pruned_multihead_attention_in_a_fresh_interpreter(tmp_path):
    path = str(tmp_path / "vit.pt")
    assert run("save", path) == "6"
    assert run("load", path) == "6 3 (18, 6)"


def test_registry_docstring_example_runs():
    result = doctest.testmod(torchpruner.rules.registry, raise_on_error=False)
    assert result.attempted > 5 and result.failed == 0
