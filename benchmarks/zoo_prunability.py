"""Zoo: prune timm models and tiny Hugging Face transformers as a new user would, next to Torch-Pruning.

Protocol, per model (CPU, float32):

- build it: timm with ``pretrained=False, num_classes=10`` at 64x64 (``img_size=64`` where the
  architecture fixes it), Hugging Face from a tiny config (hidden 64, 2 layers, 4 heads);
- one training step with AdamW (so the optimizer has state), then
  ``Pruner(model, example_inputs=..., optimizer=adamw)`` -> ``prune_groups(fraction=0.3)`` (L1
  scores) -> forward + backward + ``step`` with the same AdamW;
- record: pruned / refused (reason) / silent no-op (nothing pruned, nothing said) / crash, the
  parameters before and after, the groups (prunable / refused), the zeroed-twin error where masking
  is exact (``WS``: a pruned group holds the input channels of a weight-standardised convolution;
  ``LN``: a pruned group holds a LayerNorm/GroupNorm/RMSNorm over the pruned axis, also one
  written out, where it is not), whether every parameter was updated by the step after the prune,
  trace and prune time;
- the same with Torch-Pruning (``MagnitudePruner``, L1, ratio 0.3, the classifier ignored) in the
  same process on a fresh copy: its result, whether its pruned model still runs, and whether the
  optimizer that existed before its prune still updates every parameter of the pruned model.

What is timed is what a user runs, nothing of the benchmark's own bookkeeping: ours ``trace_s`` =
``Pruner(...)`` + ``pruner.graph()``, ``prune_s`` = ``prune_groups(pruner, fraction=0.3,
ignored_layers=...)`` (groups, scores, plan, validation, apply, optimizer surgery); the group
counts, the refusals and the zeroed twin's selection are computed afterwards on the unpruned copy.
Torch-Pruning's ``prune_s`` = its ``MagnitudePruner(...)`` construction (which traces) + ``step()``.
Both are one run by default, in a fresh worker process per tool (the first model of a worker also
pays the lazy imports of its tool), after ``gc.collect()`` (for both tools: the heap the earlier
models of the worker left is not collected inside a timed span); ``--repeat N`` reports the median
of N runs, each on a freshly built model.

Each tool runs in its own worker process (the two side by side), each model with a time limit; a
worker that dies costs only the model it was on. Usage::

    OMP_NUM_THREADS=2 nice .venv/bin/python benchmarks/zoo_prunability.py            # the whole zoo
    .venv/bin/python benchmarks/zoo_prunability.py resnet18 hf-bert --no-tp           # a few, ours only

Writes benchmarks/zoo_prunability.md (and .json next to it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(os.environ.get("TORCHPRUNER_ROOT", ROOT)))

HERE = Path(__file__).resolve().parent

#: ``prune_groups(rounding=...)``: "floor" (the protocol: never more than 0.3 of a group) unless
#: ``--rounding`` says otherwise (passed to the workers through the environment).
ROUNDING = os.environ.get("ZOO_ROUNDING", "floor")
#: ``--repeat``: the timed spans are the median of this many runs, each on a freshly built model
#: (the first run also gives every other column); only for models whose first run took < 20 s.
REPEAT = int(os.environ.get("ZOO_REPEAT", "1"))

TIMM_MODELS = [
    # family: models (pretrained=False, 64x64)
    "resnet18",
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "res2net50_26w_4s",
    "resnest14d",
    "efficientnet_b0",
    "tf_efficientnet_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "ghostnet_050",
    "rexnet_100",
    "lcnet_050",
    "mnasnet_050",
    "regnetx_002",
    "regnety_002",
    "densenet121",
    "dpn68",
    "cspresnet50",
    "cspdarknet53",
    "inception_v3",
    "repvgg_a0",
    "ese_vovnet19b_dw",
    "convnext_atto",
    "convnextv2_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "pvt_v2_b0",
    "mixer_s16_224",
    "resmlp_12_224",
    "poolformer_s12",
    "edgenext_xx_small",
    "mobilevit_xxs",
    "nf_resnet26",
    "vgg11",
    "dla34",
    "hrnet_w18_small",
    "selecsls42b",
    "skresnet18",
    "ecaresnet26t",
    "fastvit_t8",
    "hgnetv2_b0",
    "mobileone_s0",
]
#: timm models whose image size is part of the architecture
TIMM_KWARGS = {
    name: {"img_size": 64}
    for name in ("vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixer_s16_224", "resmlp_12_224")
}
TIMM_KWARGS["swin_tiny_patch4_window7_224"] = {"img_size": 64, "window_size": 4}
TIMM_SIZE = {"inception_v3": 96, "swin_tiny_patch4_window7_224": 64}

HF_MODELS = [
    "hf-bert",
    "hf-roberta",
    "hf-distilbert",
    "hf-albert",
    "hf-gpt2",
    "hf-t5",
    "hf-vit",
    "hf-llama",
    "hf-qwen2",
    "hf-mistral",
    "hf-resnet",
    "hf-convnext",
]


def build(name: str) -> tuple[nn.Module, dict, set[str]]:
    """The model, its example inputs (keyword arguments) and the names of the classifier layers
    (ignored by both pruners: their outputs are the classes)."""
    torch.manual_seed(0)
    if not name.startswith("hf-"):
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **TIMM_KWARGS.get(name, {}))
        size = TIMM_SIZE.get(name, 64)
        head = model.get_classifier()
        heads = {n for n, m in model.named_modules() if m is head}
        return model, {"x": torch.randn(2, 3, size, size)}, heads
    import transformers as tf

    kind = name[3:]
    tokens = {"input_ids": torch.randint(1, 1000, (2, 16))}
    image = {"pixel_values": torch.randn(2, 3, 32, 32)}
    small = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=1000)
    if kind in ("bert", "roberta", "albert"):
        config = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "albert": tf.AlbertConfig}[kind](
            **small, num_labels=10, max_position_embeddings=64
        )
        model = {
            "bert": tf.BertForSequenceClassification,
            "roberta": tf.RobertaForSequenceClassification,
            "albert": tf.AlbertForSequenceClassification,
        }[kind](config)
        return model, tokens, {"classifier"}
    if kind == "distilbert":
        model = tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(
                n_layers=2,
                n_heads=4,
                dim=64,
                hidden_dim=128,
                vocab_size=1000,
                num_labels=10,
                max_position_embeddings=64,
            )
        )
        return model, tokens, {"classifier"}
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=64, use_cache=False)
        )
        return model, tokens, {"lm_head"}
    if kind == "t5":
        model = tf.T5EncoderModel(
            tf.T5Config(num_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=128, vocab_size=1000)
        )
        return model, tokens, set()
    if kind == "vit":
        model = tf.ViTForImageClassification(
            tf.ViTConfig(
                **{k: v for k, v in small.items() if k != "vocab_size"}, image_size=32, patch_size=8, num_labels=10
            )
        )
        return model, image, {"classifier"}
    if kind in ("llama", "qwen2", "mistral"):
        config_class, model_class = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[kind]
        model = model_class(config_class(**small, num_key_value_heads=2, max_position_embeddings=64, use_cache=False))
        return model, tokens, {"lm_head"}
    if kind == "resnet":
        model = tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], num_labels=10)
        )
        return model, image, {"classifier.1"}
    if kind == "convnext":
        model = tf.ConvNextForImageClassification(
            tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1], num_labels=10)
        )
        return model, image, {"classifier"}
    raise ValueError(f"unknown model {name}")


def output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    return output_tensor(model(**inputs)).float().logsumexp(-1).mean()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> list[str]:
    """One step; returns the names of the parameters with a gradient that the step did not change
    (should be none; a BatchNorm bias before another BatchNorm in train mode has a zero gradient)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_of(model, inputs).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and bool(p.grad.any()) and torch.equal(before[n], p.detach())
    ]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zeroed_twin_error(model: nn.Module, twin: nn.Module, selection: dict, inputs: dict) -> str:
    from torchpruner.graph import get_graph
    from torchpruner.graph.dependency import get_dependency_graph, zeroing_functions

    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    if any(isinstance(m.module, norms) for g in selection for m in g.members) or any(
        getattr(g, "normalizations", lambda: [])() for g in selection
    ):
        return "LN"  # the statistics of a norm over the pruned axis change: not masking
    from torchpruner.rules import get_slicing_rule
    from torchpruner.rules.layers import StandardizedConvRule

    if any(
        m.direction == "in" and isinstance(get_slicing_rule(m.module), StandardizedConvRule)
        for g in selection
        for m in g.members
    ):
        return "WS"  # a weight-standardised conv's fan-in shrinks: its statistics change, not masking
    graph = get_graph(twin, (), inputs)
    twin_groups = {g.index: g for g in get_dependency_graph(graph).all_groups}
    fns = zeroing_functions({twin_groups[group.index]: units for group, units in selection.items()})
    model.eval()
    twin.eval()
    with torch.no_grad(), graph.intercept(fns) as forward:
        expected = output_tensor(forward(**inputs))
        out = output_tensor(model(**inputs))
    return f"{float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12)):.1e}"


def group_counts(twin: nn.Module, inputs: dict, heads: set[str]) -> dict:
    """The benchmark's own bookkeeping, on the unpruned ``twin`` (outside the timed spans): the
    prunable and refused groups, whether a refusal warning was given, and the units that
    ``prune_groups(fraction=0.3)`` removes (the same weights and graph as the pruned model, so
    the same groups and the same choice), keyed by the twin's groups for the zeroed twin."""
    from torchpruner import Pruner
    from torchpruner.schedule import select_units

    pruner = Pruner(twin, example_inputs=inputs)
    ignored = [m for n, m in twin.named_modules() if n in heads]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = pruner.groups(ignored_layers=ignored)
    refused = pruner.refused_groups(ignored_layers=ignored)
    return {
        "groups": groups,
        "refused": refused,
        "warned": any("cannot be pruned" in str(w.message) for w in caught),
        "selection": select_units(groups, 0.3, rounding=ROUNDING) if groups else {},
    }


def run_ours(name: str) -> dict:
    """One model with torchpruner. Timed, as a user runs it: ``trace_s`` =
    ``Pruner(model, example_inputs=..., optimizer=adamw)`` + ``pruner.graph()`` (the trace),
    ``prune_s`` = ``prune_groups(pruner, fraction=0.3, ignored_layers=...)`` (dependency analysis,
    groups, L1 scores, selection, plan, validation, apply, optimizer surgery). The group counts,
    the refusals and the selection for the zeroed twin are computed afterwards on the unpruned
    copy, outside both spans."""
    from torchpruner import Pruner
    from torchpruner.schedule import prune_groups

    record: dict = {}
    model, inputs, heads = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, inputs)
    record["params_before"] = num_params(model)
    twin = copy.deepcopy(model)
    ignored = [m for n, m in model.named_modules() if n in heads]
    failure: Exception | None = None
    try:
        gc.collect()  # the heap the previous models left: collected outside the timed spans
        start = time.perf_counter()
        pruner = Pruner(model, example_inputs=inputs, optimizer=optimizer)
        graph = pruner.graph()
        record["trace_s"] = round(time.perf_counter() - start, 2)
        record["capture"] = getattr(graph, "capture", graph.method).replace("symbolic_trace", "fx")
        start = time.perf_counter()
        plan = prune_groups(pruner, fraction=0.3, ignored_layers=ignored, rounding=ROUNDING)
        record["prune_s"] = round(time.perf_counter() - start, 2)
    except Exception as exc:  # noqa: BLE001 - a refusal (ValueError) or a crash: recorded below
        failure = exc
        record["traceback"] = traceback.format_exc()[-1500:]
    try:
        try:
            counts: dict | None = group_counts(twin, inputs, heads)
        except Exception:  # the twin fails as the model did: the model's own failure is the record
            if failure is None:
                raise
            counts = None
        if counts is not None:
            record["groups"], record["refused_groups"] = len(counts["groups"]), len(counts["refused"])
            record["warned"] = counts["warned"]
            if counts["refused"]:
                record["note"] = counts["refused"][0].refusal
        if failure is not None:
            raise failure
        assert counts is not None
        groups, refused = counts["groups"], counts["refused"]
        if not groups:
            record.pop("prune_s", None)  # nothing was pruned: no time to compare
            record["status"] = "refused"
            record["reason"] = refused[0].refusal if refused else "no prunable group"
            return record
        record["params_after"] = num_params(model)
        record["twin_error"] = zeroed_twin_error(model, twin, counts["selection"], inputs)
        stale = train_step(model, optimizer, inputs)
        record["optimizer_ok"] = not stale
        if stale:
            record["note"] = f"not updated after the prune: {stale[:3]}"
        record["status"] = "pruned" if record["params_after"] < record["params_before"] else "no-op"
        record["removed_by_plan"] = plan.removed_parameters
    except Exception as exc:  # noqa: BLE001 - a refusal (ValueError) or a crash: record it
        refusal = isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, IndexError)
        record["status"] = "refused" if refusal else "crash"
        record["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if exc is not failure:
            record["traceback"] = traceback.format_exc()[-1500:]
        try:
            loss_of(model, inputs)
        except Exception as after:  # noqa: BLE001
            record["status"] = "crash"
            record["reason"] += f" / model broken afterwards: {type(after).__name__}"
    return record


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """The head count of each q/k/v projection, as Torch-Pruning's examples pass it (timm's fused
    ``qkv``, Hugging Face's ``query``/``key``/``value`` and ``q_proj``/``k_proj``/``v_proj``)."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        count = (
            getattr(module, "num_heads", None)
            or getattr(module, "num_attention_heads", None)
            or getattr(module, "n_heads", None)
        )
        config = getattr(module, "config", None)
        if count is None and config is not None and hasattr(module, "q_proj"):
            count = config.num_attention_heads
        if not isinstance(count, int):
            continue
        kv = getattr(config, "num_key_value_heads", None) or count if config is not None else count
        for child_name, child in module.named_children():
            if child_name in ("qkv", "query", "q_proj", "q", "q_lin"):
                heads[child] = count
            elif child_name in ("key", "value", "k_proj", "v_proj", "k", "v", "k_lin", "v_lin"):
                heads[child] = kv if child_name in ("k_proj", "v_proj") else count
    return heads


def run_tp(name: str) -> dict:
    import torch_pruning as tp

    record: dict = {}
    model, inputs, heads = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, inputs)
    record["params_before"] = num_params(model)
    ignored = [m for n, m in model.named_modules() if n in heads]
    try:
        gc.collect()  # the heap the previous models left: collected outside the timed span
        start = time.perf_counter()
        example = inputs if len(inputs) > 1 else next(iter(inputs.values()))
        if name.startswith("hf-"):
            example = inputs
        pruner = tp.pruner.MagnitudePruner(
            model,
            example_inputs=example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.3,
            ignored_layers=ignored,
            num_heads=attention_heads(model),
            output_transform=lambda out: output_tensor(out).sum(),
        )
        pruner.step()
        record["prune_s"] = round(time.perf_counter() - start, 2)
        record["params_after"] = num_params(model)
        try:
            loss_of(model, inputs)
            record["runs_after"] = True
        except Exception as exc:  # noqa: BLE001
            record["runs_after"] = False
            record["reason"] = f"pruned model fails: {type(exc).__name__}: {str(exc)[:200]}"
        if record["runs_after"]:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            lost = [n for n, p in model.named_parameters() if id(p) not in held]
            try:
                stale = train_step(model, optimizer, inputs)
                record["optimizer_ok"] = not lost and not stale
                if lost:
                    record["reason"] = f"{len(lost)} parameters are new objects the old optimizer does not step"
            except Exception as exc:  # noqa: BLE001
                record["optimizer_ok"] = False
                record["reason"] = f"old optimizer fails: {type(exc).__name__}: {str(exc)[:150]}"
        record["status"] = (
            "broken"
            if not record["runs_after"]
            else "pruned"
            if record["params_after"] < record["params_before"]
            else "no-op"
        )
    except Exception as exc:  # noqa: BLE001
        record["status"] = "failed"
        record["reason"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return record


def run_one(name: str, tool: str) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    warnings.filterwarnings("ignore", category=FutureWarning)
    run = run_ours if tool == "ours" else run_tp
    record = run(name)
    spans = [key for key in ("trace_s", "prune_s") if key in record]
    if REPEAT > 1 and record.get("status") == "pruned" and sum(record[k] for k in spans) < 20:
        runs = [{k: record[k] for k in spans}]
        for _ in range(REPEAT - 1):
            again = run(name)
            runs.append({k: again[k] for k in spans})
        record["first_run"] = runs[0]
        for key in spans:
            record[key] = round(statistics.median(r[key] for r in runs), 2)
        record["runs"] = len(runs)
    return record


class _Timeout(BaseException):  # not caught by the runs' own `except Exception`
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def work(names: list[str], tool: str, timeout: float) -> None:
    """Worker: run ``tool`` on each model in turn, one JSON line per model; ``timeout`` seconds each."""
    import signal

    signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        start = time.perf_counter()
        signal.alarm(int(timeout))
        try:
            record = run_one(name, tool)
        except _Timeout:
            record = {"status": "timeout", "reason": f"over {timeout:.0f} s"}
        except Exception as exc:  # noqa: BLE001
            record = {"status": "crash", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            signal.alarm(0)
        record.pop("traceback", None)
        record["model"], record["seconds"] = name, round(time.perf_counter() - start, 1)
        print(json.dumps(record), flush=True)


def run_tool(
    names: list[str], tool: str, timeout: float, results: dict[str, dict], progress: Path | None = None
) -> None:
    """Run a worker for ``tool`` over ``names``; a worker that dies (a segfault, out of memory) costs
    the model it was on (``crash``) and is restarted on the rest. Each result is also appended to
    ``progress`` (one JSON line), so an interrupted run keeps what it measured."""
    remaining = list(names)
    while remaining:
        command = [sys.executable, __file__, "--worker", "--tool", tool, "--timeout", str(timeout), *remaining]
        worker = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy()
        )
        assert worker.stdout is not None
        for line in worker.stdout:
            if line.startswith("{"):
                record = json.loads(line)
                name = record.pop("model")
                results[name] = record
                remaining.remove(name)
                if progress is not None:
                    with progress.open("a") as file:
                        file.write(json.dumps({"tool": tool, "model": name, **record}) + "\n")
        worker.wait()
        if remaining:  # the worker died on remaining[0]
            results[remaining.pop(0)] = {"status": "crash", "reason": f"the process died (exit {worker.returncode})"}


def render(records: list[dict], tp_version: str | None) -> str:
    ours = [r["ours"] for r in records]
    theirs = [r.get("tp") for r in records]
    pruned = sum(r["status"] == "pruned" for r in ours)
    rounding = "" if ROUNDING == "floor" else f", rounding={ROUNDING!r}"
    lines = [
        "# Zoo prunability: timm and Hugging Face",
        "",
        f"Produced by `benchmarks/zoo_prunability.py` (torch {torch.__version__}; CPU, a shared and noisy machine, "
        f"{os.environ.get('OMP_NUM_THREADS', '2')} thread(s) per tool, the two tools side by side). Protocol in the script's docstring: one AdamW step, `prune_groups(fraction=0.3{rounding})` (L1), "
        f"forward + backward + step with the same AdamW."
        + (f" Times: the median of {REPEAT} runs per model and tool, each on a fresh model." if REPEAT > 1 else ""),
        "",
        f"**torchpruner: {pruned} / {len(ours)} pruned**, "
        f"{sum(r['status'] == 'refused' for r in ours)} refused (with the reason), "
        f"{sum(r['status'] == 'crash' for r in ours)} crashed, {sum(r['status'] == 'no-op' for r in ours)} silent "
        f"no-ops, {sum(r['status'] == 'timeout' for r in ours)} timed out.",
    ]
    if any(theirs):
        lines += [
            f"**Torch-Pruning {tp_version}: {sum(t['status'] == 'pruned' for t in theirs if t)} / {len(ours)} "
            f"pruned**, of which {sum(1 for t in theirs if t and t['status'] == 'pruned' and not t.get('optimizer_ok'))}"
            f" leave the old optimizer unable to step every parameter; "
            f"{sum(1 for t in theirs if t and t['status'] == 'broken')} broken (prune, then forward fails), "
            f"{sum(1 for t in theirs if t and t['status'] == 'failed')} failed, "
            f"{sum(1 for t in theirs if t and t['status'] == 'timeout')} timed out."
        ]
    lines += [
        "",
        "| model | capture | groups (prunable / refused) | params before | after (ours) | after (TP) | zeroed twin | "
        "optimizer after prune (ours / TP) | time s (ours trace+prune / TP) | ours | TP | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        o, t = record["ours"], record.get("tp") or {}
        ours_time = (o.get("trace_s") or 0) + (o.get("prune_s") or 0)
        ratio = f" ({ours_time / t['prune_s']:.1f}x)" if o.get("prune_s") is not None and t.get("prune_s") else ""
        note = o.get("reason") or o.get("note") or ""
        if t.get("reason"):
            note += f" / TP: {t['reason']}"
        note = note.replace("|", "\\|").replace("\n", " ")[:260]
        flag = lambda value: "" if value is None else ("ok" if value else "STALE")  # noqa: E731
        lines.append(
            f"| {record['model']} | {o.get('capture', '')} | {o.get('groups', '')} / {o.get('refused_groups', '')} | "
            f"{o.get('params_before', '')} | {o.get('params_after', '')} | {t.get('params_after', '')} | "
            f"{o.get('twin_error', '')} | {flag(o.get('optimizer_ok'))} / {flag(t.get('optimizer_ok'))} | "
            f"{ours_time:.1f} / {t.get('prune_s', '')}{ratio} | {o['status']} | {t.get('status', '')} | {note} |"
        )
    lines += [
        "",
        "Zeroed twin: the pruned model (eval mode, float32) against the unpruned copy with the pruned units "
        "zeroed where the consumers read them, relative to the output scale; `LN` = a pruned group holds a "
        "LayerNorm/GroupNorm/RMSNorm (or an RMSNorm written out) over the pruned axis (statistics change: not "
        "comparable by construction); `WS` = a pruned group holds the input channels of a weight-standardised "
        "convolution (its fan-in statistics change; tests/rules/test_standardized_conv.py compares with a "
        "rebuilt smaller model).",
        "Optimizer: `ok` = the AdamW created before the prune changed every parameter of the pruned model in "
        "the step after it; `STALE` = some were not (new Parameter objects, or state it cannot use).",
        "Time: our trace + prune, Torch-Pruning's graph build + prune (its `MagnitudePruner` construction and "
        "`step()`), one run each; the ratio is ours / theirs.",
    ]
    reruns = sorted({r["ours"]["rerun"] for r in records if r["ours"].get("rerun")})
    for commit in reruns:
        rows = ", ".join(r["model"] for r in records if r["ours"].get("rerun") == commit)
        kept = [r["model"] for r in records if r["ours"].get("rerun") == commit and (r.get("tp") or {}).get("earlier")]
        lines.append(
            f"Rows measured again at commit {commit}, after a fix the first run showed the need for: {rows}"
            + (
                f" (torchpruner only; Torch-Pruning's columns of {', '.join(kept)} are from the earlier run)"
                if kept
                else " (both tools)"
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    global ROUNDING, REPEAT
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--no-tp", action="store_true", help="run torchpruner only")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default=str(HERE / "zoo_prunability.md"))
    parser.add_argument("--render", action="store_true", help="only write the .md from the .json next to it")
    parser.add_argument(
        "--rounding",
        default=ROUNDING,
        choices=["floor", "nearest", "ceil"],
        help="prune_groups(rounding=...) for torchpruner (default floor: at most 0.3 of each group)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=REPEAT,
        help="time each model this many times (median; each run on a fresh model), default 1",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured rows in the existing .json (marked as measured again at "
        "the current commit) and keep the others",
    )
    args = parser.parse_args()
    os.environ["ZOO_ROUNDING"] = ROUNDING = args.rounding  # the workers inherit it
    os.environ["ZOO_REPEAT"] = str(args.repeat)
    REPEAT = args.repeat
    if args.render:  # from the .json, or from the progress lines of an interrupted run
        import torch_pruning

        json_path = Path(args.out).with_suffix(".json")
        if json_path.exists():
            records = json.loads(json_path.read_text())
        else:
            lines = [json.loads(line) for line in json_path.with_suffix(".progress.jsonl").read_text().splitlines()]
            by_model: dict[str, dict] = {}
            for line in lines:
                by_model.setdefault(line.pop("model"), {})[line.pop("tool")] = line
            records = [{"model": name, **tools} for name, tools in by_model.items() if "ours" in tools]
        Path(args.out).write_text(render(records, torch_pruning.__version__))
        return
    if args.worker:
        work(args.models, args.tool, args.timeout)
        return
    if args.one:
        record = run_one(args.one, args.tool)
        print(
            json.dumps({k: v for k, v in record.items() if k != "traceback"} | {"traceback": record.get("traceback")})
        )
        return
    names = args.models or TIMM_MODELS + HF_MODELS
    json_path = Path(args.out).with_suffix(".json")
    tp_version = None
    tools = ["ours"]
    if not args.no_tp:
        import torch_pruning

        tp_version = torch_pruning.__version__
        tools.append("tp")
    results: dict[str, dict[str, dict]] = {tool: {} for tool in tools}
    progress = json_path.with_suffix(".progress.jsonl")
    progress.unlink(missing_ok=True)
    threads = [
        threading.Thread(target=run_tool, args=(names, tool, args.timeout, results[tool], progress)) for tool in tools
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [
        {"model": name, **{tool: results[tool].get(name, {"status": "missing"}) for tool in tools}} for name in names
    ]
    for record in records:
        o, t = record["ours"], record.get("tp") or {}
        print(
            f"{record['model']:32s} ours {o['status']:8s} {o.get('groups', '')}/{o.get('refused_groups', '')} "
            f"{o.get('params_before', '')}->{o.get('params_after', '')} {o.get('twin_error', '')} | "
            f"TP {t.get('status', '')} {t.get('params_after', '')} | {(o.get('reason') or o.get('note') or '')[:120]}"
        )
    if args.merge and json_path.exists():
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
            ).stdout.strip()
            or "unknown"
        )
        fresh = {record["model"]: record for record in records}
        for record in fresh.values():
            record["ours"]["rerun"] = commit
        old = {r["model"]: r for r in json.loads(json_path.read_text())}
        for name, record in fresh.items():  # a tool not run this time keeps its earlier record
            for tool, value in old.get(name, {}).items():
                if tool not in record:
                    record[tool] = {**value, "earlier": True} if isinstance(value, dict) else value
        records = [fresh.pop(name, r) for name, r in old.items()] + list(fresh.values())
        if tp_version is None:  # the version the kept Torch-Pruning records were measured with
            import torch_pruning

            tp_version = torch_pruning.__version__
    json_path.write_text(json.dumps(records, indent=1))
    Path(args.out).write_text(render(records, tp_version))


if __name__ == "__main__":
    main()
