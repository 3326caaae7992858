"""Sweep: prune 30% of every prunable coupled group of every torchvision classification model.

For each model in ``torchvision.models.list_models(module=torchvision.models)`` (weights=None):
trace, list the coupled groups, prune 30% of every prunable group (per-layer normalised L1 scores)
in one plan, then run a forward and a backward pass and check that the parameter count fell.

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/torchvision_prunability.py          # all models
    .venv/bin/python benchmarks/torchvision_prunability.py resnet18 vit_b_16             # a few

Writes benchmarks/torchvision_prunability.md (and .json next to it). Status per model:
``pass`` (pruned, forward+backward fine, fewer parameters), ``refused`` (no prunable group; the
reasons are the analysis' messages), ``failed`` (an exception: a bug).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import copy  # noqa: E402

from torchpruner.graph import get_graph, invalidate_graph  # noqa: E402
from torchpruner.graph.dependency import get_dependency_graph, zeroing_functions  # noqa: E402
from torchpruner.schedule import select_units  # noqa: E402
from torchpruner.pruner import Pruner  # noqa: E402

HERE = Path(__file__).resolve().parent

#: input sizes: small where the architecture allows it (CPU, 2 shared cores)
IMAGE_SIZE = {"inception_v3": 96, "maxvit_t": 224}
MODEL_KWARGS = {}
for _name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"):
    MODEL_KWARGS[_name] = {"image_size": 28 if _name.endswith("14") else 32}
    IMAGE_SIZE[_name] = MODEL_KWARGS[_name]["image_size"]


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zeroed_twin_error(model, twin, selection, x) -> str:
    """Relative max error of the pruned model against the unpruned twin with the pruned units
    zeroed where the groups' consumers read them (eval mode); "LN" when a pruned group holds a
    LayerNorm/GroupNorm over the pruned axis (not equivalent to masking by construction)."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    if any(isinstance(m.module, norms) for g in selection for m in g.members):
        return "LN"
    graph = get_graph(twin, (x,))
    twin_groups = {g.index: g for g in get_dependency_graph(graph).all_groups}
    fns = zeroing_functions({twin_groups[group.index]: units for group, units in selection.items()})
    model.eval()
    twin.eval()
    with torch.no_grad(), graph.intercept(fns) as forward:
        expected = forward(x)
        out = model(x)
    scale = expected.abs().max().clamp_min(1e-12)
    return f"{float((out - expected).abs().max() / scale):.1e}"


def run_one(name: str, fraction: float) -> dict:
    import torchvision

    size = IMAGE_SIZE.get(name, 64)
    record = {"model": name, "image": size}
    start = time.perf_counter()
    try:
        kwargs = dict(MODEL_KWARGS.get(name, {}))
        if name.startswith(("googlenet", "inception")):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        record["params_before"] = num_params(model)
        pruner = Pruner(model, input_size=(3, size, size))
        dep = get_dependency_graph(pruner.graph())
        groups = dep.groups()
        record["groups"] = len(groups)
        record["groups_total"] = len([g for g in dep.all_groups if g.source_roles])
        if not groups:
            reasons = Counter(g.why_not_prunable() for g in dep.all_groups if g.source_roles)
            record["status"] = "refused"
            record["reason"] = "; ".join(f"{r} (x{c})" for r, c in reasons.most_common(3))
            return record
        refused = Counter(g.refusal.split(":")[0] for g in dep.all_groups if g.refusal and g.source_roles)
        if refused:
            record["note"] = "; ".join(f"{r} (x{c})" for r, c in refused.most_common(2))
        twin = copy.deepcopy(model) if record["params_before"] < 150_000_000 else None
        selection = select_units(groups, fraction)
        plan = pruner.plan_groups(selection, f"prune {len(selection)} groups")
        plan.apply(model, None)
        record["plan_s"] = round(time.perf_counter() - start, 2)
        x = torch.randn(2, 3, size, size)
        if twin is not None:
            record["twin_error"] = zeroed_twin_error(model, twin, selection, x)
        model.train()
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        out.float().pow(2).mean().backward()
        record["params_after"] = num_params(model)
        if record["params_after"] >= record["params_before"]:
            record["status"] = "failed"
            record["reason"] = "parameter count did not fall"
        else:
            record["status"] = "pass"
        record["removed_by_plan"] = plan.removed_parameters
    except Exception as exc:  # a bug: record it and go on
        record["status"] = "failed"
        record["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        record["traceback"] = traceback.format_exc()[-2000:]
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
        # the tracer's cache holds each model through its graph: drop it, or the sweep runs out of memory
        for obj in (locals().get("model"), locals().get("twin")):
            if obj is not None:
                invalidate_graph(obj)
        gc.collect()
    return record


def render(records: list, fraction: float) -> str:
    passed = sum(r["status"] == "pass" for r in records)
    refused = sum(r["status"] == "refused" for r in records)
    failed = sum(r["status"] == "failed" for r in records)
    lines = [
        "# torchvision prunability",
        "",
        f"Produced by `benchmarks/torchvision_prunability.py` (torch {torch.__version__}). Every classification "
        f"model of `torchvision.models.list_models(module=torchvision.models)`, `weights=None`, CPU: trace, "
        f"prune {fraction:.0%} of every prunable coupled group (per-layer normalised L1 scores, one plan), then "
        f"one forward + backward pass in train mode; `pass` = that worked and the parameter count fell.",
        "",
        f"**{passed} / {len(records)} pruned ({passed / max(1, len(records)):.0%})**, {refused} refused, {failed} failed.",
        "",
        "| model | image | groups (prunable / all) | params before | params after | ratio | zeroed-twin rel. error | status | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        before, after = r.get("params_before"), r.get("params_after")
        ratio = f"{after / before:.2f}" if before and after else ""
        note = (r.get("reason") or r.get("note") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['model']} | {r.get('image', '')} | {r.get('groups', '')} / {r.get('groups_total', '')} | "
            f"{before or ''} | {after or ''} | {ratio} | {r.get('twin_error', '')} | {r['status']} | {note[:220]} |"
        )
    lines += [
        "",
        "Zeroed-twin error: the pruned model (eval mode, float32) against the unpruned copy with the "
        "pruned units zeroed where the consumers read them, relative to the output scale; `LN` = a pruned "
        "group holds a LayerNorm/GroupNorm over the pruned axis (its statistics change: not comparable).",
        "",
        "A note names the most common reason why some groups of a passing model were left unpruned "
        "(the op and call site are in the full message).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--out", default=str(HERE / "torchvision_prunability.md"))
    parser.add_argument("--resume", action="store_true", help="keep the models already in the .json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    json_path = Path(args.out).with_suffix(".json")
    records = []
    if args.resume and json_path.exists():
        records = [r for r in json.loads(json_path.read_text()) if r["model"] in names]
    done = {r["model"] for r in records}
    for name in names:
        if name in done:
            continue
        record = run_one(name, args.fraction)
        records.append(record)
        print(
            f"{name:28s} {record['status']:8s} {record.get('seconds', 0):7.1f}s {record.get('twin_error', '')} "
            f"{record.get('reason', record.get('note', ''))[:150]}",
            flush=True,
        )
        json_path.write_text(json.dumps(records, indent=1))
    Path(args.out).write_text(render(records, args.fraction))


if __name__ == "__main__":
    main()
