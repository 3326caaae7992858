"""Whole attention heads on timm ViTs: parameters left after pruning at 0.3, torchpruner and
Torch-Pruning side by side in one process (timm ``pretrained=False``, 64x64 inputs, classifier kept).

Rows:
- ``ours 0.3``: ``prune_groups(fraction=0.3)``: 0.3 of every group, heads included (a group of
  3 heads floors 0.9 to 0 heads);
- ``ours 0.3, heads 1/3``: the same with one head in three per block (``ratios={attn.qkv: 1/3}``);
- ``ours 0.3 nearest``: ``prune_groups(fraction=0.3, rounding="nearest")``: each group's count
  rounded to the nearest (0.9 of a head is one);
- ``TP 0.3``: Torch-Pruning's MagnitudePruner as in zoo_prunability.py (``num_heads`` passed: it
  prunes head_dim), and ``TP 0.3 heads``: with ``prune_num_heads=True, prune_head_dims=False``.
``runs`` says whether the pruned model still runs its forward.

    OMP_NUM_THREADS=2 python benchmarks/vit_heads.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo_prunability import attention_heads, build, num_params, output_tensor  # noqa: E402


def _runs(model, inputs) -> bool:
    try:
        with torch.no_grad():
            model(**inputs)
        return True
    except Exception:  # noqa: BLE001 - a broken pruned model
        return False


def ours(name: str, heads_ratio: float | None, rounding: str = "floor") -> tuple[int, int, bool]:
    from torchpruner import Pruner
    from torchpruner.schedule import prune_groups

    model, inputs, classifier = build(name)
    before = num_params(model)
    ignored = [m for n, m in model.named_modules() if n in classifier]
    pruner = Pruner(model, example_inputs=inputs)
    ratios = None
    if heads_ratio is not None:
        ratios = {block.attn.qkv: heads_ratio for block in model.blocks}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ratios:
            groups = pruner.groups(ignored_layers=ignored)
            ratios.update(
                {g.source_modules[0]: 0.3 for g in groups if not any(g.source_modules[0] is m for m in ratios)}
            )
        prune_groups(pruner, fraction=0.3, ratios=ratios, ignored_layers=ignored, rounding=rounding)
    return before, num_params(model), _runs(model, inputs)


def torch_pruning(name: str, whole_heads: bool) -> tuple[int, int, bool]:
    import torch_pruning as tp

    model, inputs, classifier = build(name)
    before = num_params(model)
    ignored = [m for n, m in model.named_modules() if n in classifier]
    extra = {"prune_num_heads": True, "prune_head_dims": False} if whole_heads else {}
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=next(iter(inputs.values())),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.3,
        ignored_layers=ignored,
        num_heads=attention_heads(model),
        output_transform=lambda out: output_tensor(out).sum(),
        **extra,
    )
    pruner.step()
    return before, num_params(model), _runs(model, inputs)


def main() -> None:
    torch.set_num_threads(2)
    print("| model | run | params before | params after | reduction | runs |")
    print("|---|---|---|---|---|---|")
    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224"):
        rows = [
            ("ours 0.3", lambda: ours(name, None)),
            ("ours 0.3, heads 1/3", lambda: ours(name, 1 / 3)),
            ("ours 0.3 nearest", lambda: ours(name, None, "nearest")),
            ("TP 0.3", lambda: torch_pruning(name, False)),
            ("TP 0.3 heads", lambda: torch_pruning(name, True)),
        ]
        for label, run in rows:
            try:
                before, after, runs = run()
                print(f"| {name} | {label} | {before} | {after} | {1 - after / before:.1%} | {runs} |")
            except Exception as exc:  # noqa: BLE001 - a tool that fails: its error is the row
                print(f"| {name} | {label} | | | | {type(exc).__name__}: {str(exc)[:80]} |")


if __name__ == "__main__":
    main()
