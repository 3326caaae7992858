"""Graph capture on the zoo: torch.fx symbolic tracing (what torchpruner uses) next to torch.export
in non-strict mode, per model: does it capture the model, how long does it take, how many call
sites / ops does the graph hold, and does torch.export name every parameter by its state-dict key.

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/zoo_capture.py            # the zoo of zoo_prunability.py
    .venv/bin/python benchmarks/zoo_capture.py resnet18 hf-bert

Writes benchmarks/zoo_capture.md. Same models and inputs as ``zoo_prunability.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from zoo_prunability import HF_MODELS, TIMM_MODELS, build  # noqa: E402


def capture(name: str) -> dict:
    from torchpruner.graph.trace import ModelGraph

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    warnings.filterwarnings("ignore")
    model, inputs, _ = build(name)
    model.eval()
    record: dict = {}
    start = time.perf_counter()
    try:
        graph = ModelGraph(model, (), inputs, method="fx")
        record["fx_s"] = round(time.perf_counter() - start, 2)
        record["fx_sites"] = len(graph.sites)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        record["fx_s"] = round(time.perf_counter() - start, 2)
        record["fx_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    start = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, (), inputs, strict=False)
        record["export_s"] = round(time.perf_counter() - start, 2)
        nodes = [n for n in exported.graph.nodes if n.op == "call_function"]
        record["export_ops"] = len(nodes)
        with_stack = sum(1 for n in nodes if n.meta.get("nn_module_stack"))
        record["export_module_stack"] = f"{with_stack}/{len(nodes)}"
        signature = exported.graph_signature
        named = set(signature.inputs_to_parameters.values()) | set(signature.inputs_to_buffers.values())
        state = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
        record["export_names_params"] = state <= named | {k for k in state if "num_batches_tracked" in k}
    except Exception as exc:  # noqa: BLE001
        record["export_s"] = round(time.perf_counter() - start, 2)
        record["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default=str(HERE / "zoo_capture.md"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(capture(args.one)))
        return
    names = args.models or TIMM_MODELS + HF_MODELS
    records = []
    for name in names:
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=args.timeout
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            record = json.loads(lines[-1]) if lines else {"fx_error": "crash", "export_error": "crash"}
        except subprocess.TimeoutExpired:
            record = {"fx_error": "timeout", "export_error": "timeout"}
        record["model"] = name
        records.append(record)
        print(name, record, flush=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(records, indent=1))
    fx_ok = sum("fx_error" not in r for r in records)
    ex_ok = sum("export_error" not in r for r in records)
    lines = [
        "# Graph capture on the zoo",
        "",
        f"Produced by `benchmarks/zoo_capture.py` (torch {torch.__version__}; CPU, a shared and noisy machine). "
        f"Same models and inputs as `zoo_prunability.py`, eval mode.",
        "",
        f"**torch.fx (torchpruner's tracer): {fx_ok} / {len(records)} captured; torch.export (non-strict): "
        f"{ex_ok} / {len(records)}.**",
        "",
        "| model | fx | fx s | fx call sites | export | export s | export ops | ops with nn_module_stack | "
        "params named by state-dict key |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        fx = "ok" if "fx_error" not in r else r["fx_error"].replace("|", "\\|")[:90]
        ex = "ok" if "export_error" not in r else r["export_error"].replace("|", "\\|")[:90]
        lines.append(
            f"| {r['model']} | {fx} | {r.get('fx_s', '')} | {r.get('fx_sites', '')} | {ex} | "
            f"{r.get('export_s', '')} | {r.get('export_ops', '')} | {r.get('export_module_stack', '')} | "
            f"{r.get('export_names_params', '')} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
