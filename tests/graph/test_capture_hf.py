"""Graph capture with torch.export for the models torch.fx symbolic tracing cannot trace.

Every Hugging Face model stops fx symbolic tracing ("co_varnames is too small", "Proxy object
cannot be iterated"); :mod:`torchpruner.graph.capture` captures them with torch.export instead and
the one dependency analysis reads that graph. Checked on tiny configs of BERT, GPT-2 (HF
``Conv1D``), Llama (grouped-query attention, 2 KV heads), DistilBERT and ViT:

- the captured graph computes what the model computes, returns its ``ModelOutput``, and runs for
  another batch size;
- the MLP channels form their groups (Llama's gate + up + down together) and pruning them equals
  the zeroed twin (float64), then the optimizer that existed before the prune keeps training every
  parameter;
- a Taylor score on the captured graph equals the derivative of scaling the unit on the real model;
- the groups that cannot be pruned are listed with the op and call site that stops them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import masked_at_mask_points

from torchpruner.attributions import TaylorAttributionMetric
from torchpruner.graph import ModelGraph, get_graph
from torchpruner.graph.capture import ATEN_TO_TORCH, capture
from torchpruner.pruner import Pruner
from torchpruner.pruner.plan import Plan
from torchpruner.rules import UnitSelection, get_slicing_rule

tf = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::torchpruner.graph.dependency.RefusedGroupsWarning", "ignore::UserWarning"
)

SMALL = dict(num_hidden_layers=1, num_attention_heads=4, hidden_size=32, intermediate_size=48, vocab_size=97)


def tiny(kind: str) -> tuple[nn.Module, torch.Tensor, list[tuple[str, ...]]]:
    """A tiny float64 model in eval mode, an example input and its MLP groups' members
    (``(role, module name)`` pairs, sorted)."""
    torch.manual_seed(0)
    tokens = torch.randint(1, 97, (2, 8))
    if kind == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**SMALL, num_labels=3, max_position_embeddings=16))
        mlp = [(("in", "bert.encoder.layer.0.output.dense"), ("out", "bert.encoder.layer.0.intermediate.dense"))]
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_layer=1, n_head=4, n_embd=32, n_inner=48, vocab_size=97, n_positions=16, use_cache=False)
        )
        mlp = [(("in", "transformer.h.0.mlp.c_proj"), ("out", "transformer.h.0.mlp.c_fc"))]
    elif kind == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=16, use_cache=False)
        )
        mlp = [
            (
                ("in", "model.layers.0.mlp.down_proj"),
                ("out", "model.layers.0.mlp.gate_proj"),
                ("out", "model.layers.0.mlp.up_proj"),
            )
        ]
    elif kind == "distilbert":
        model = tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(
                n_layers=1, n_heads=4, dim=32, hidden_dim=48, vocab_size=97, num_labels=3, max_position_embeddings=16
            )
        )
        mlp = [(("in", "distilbert.transformer.layer.0.ffn.lin2"), ("out", "distilbert.transformer.layer.0.ffn.lin1"))]
    elif kind == "vit":
        config = {k: v for k, v in SMALL.items() if k != "vocab_size"}
        model = tf.ViTForImageClassification(tf.ViTConfig(**config, image_size=16, patch_size=8, num_labels=3))
        mlp = (
            [(("in", "vit.layers.0.mlp.fc2"), ("out", "vit.layers.0.mlp.fc1"))]
            if hasattr(model.vit, "layers")
            else [(("in", "vit.encoder.layer.0.output.dense"), ("out", "vit.encoder.layer.0.intermediate.dense"))]
        )
        tokens = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return model.double().eval(), tokens, mlp


def logits(output) -> torch.Tensor:
    return output.logits


def members(group) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((m.direction, m.module_name) for m in group.members))


def mlp_groups(pruner: Pruner, expected: list[tuple[str, ...]]) -> list:
    found = [g for g in pruner.groups() if members(g) in expected]
    assert sorted(members(g) for g in found) == sorted(expected)
    return found


KINDS = ["bert", "gpt2", "llama", "distilbert", "vit"]
#: the kinds that torch.fx traces with the example inputs at hand (the others: torch.export)
FX_TRACED = {"gpt2": "symbolic_trace", "llama": "symbolic_trace", "vit": "symbolic_trace"}


@pytest.mark.parametrize("kind", KINDS)
def test_capture_computes_the_model_and_returns_its_output_structure(kind):
    model, x, _ = tiny(kind)
    traced = capture(model, (x,))
    with torch.no_grad():
        expected, got = model(x), traced(x)
        assert type(got) is type(expected)
        torch.testing.assert_close(logits(got), logits(expected), rtol=0, atol=1e-12)
        # the batch dimension is dynamic
        x3 = torch.cat([x, x[:1]])
        torch.testing.assert_close(logits(traced(x3)), logits(model(x3)), rtol=0, atol=1e-12)
    graph = get_graph(model, (x,))
    # fx traces GPT-2, Llama and ViT with the example inputs (graph.concrete); BERT and DistilBERT
    # slice their position buffers by the sequence length as an int: torch.export
    assert graph.method == "fx" and graph.capture == FX_TRACED.get(kind, "export")
    if graph.capture == "symbolic_trace":
        return
    assert graph.fx_error is not None
    assert not any(
        n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target.overloadpacket in ATEN_TO_TORCH
        for n in graph.traced.graph.nodes
    )


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_channels_prune_like_the_zeroed_twin_and_keep_training(kind):
    model, x, expected_groups = tiny(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, optimizer=optimizer, example_inputs=(x,))
    groups = mlp_groups(pruner, expected_groups)
    units = {group.index: [0, 3, 7, 11] for group in groups}
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), units) as forward, torch.no_grad():
        expected = logits(forward(x))
    parameters_before = {name: p for name, p in model.named_parameters()}
    count_before = sum(p.numel() for p in model.parameters())
    plan = pruner.plan_groups({group: units[group.index] for group in groups})
    plan.apply(model, optimizer)
    assert sum(p.numel() for p in model.parameters()) < count_before
    for name, p in model.named_parameters():
        assert p is parameters_before[name]
    with torch.no_grad():
        torch.testing.assert_close(logits(model(x)), expected, rtol=1e-9, atol=1e-9)
    # the live AdamW keeps updating every parameter after the prune
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        optimizer.zero_grad()
        logits(model(x)).square().mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[name]), f"{name} did not update"
    model.eval()
    # the pruned model is captured again (a new graph) and its groups are smaller
    regrouped = mlp_groups(Pruner(model, example_inputs=(x,)), expected_groups)
    assert [g.num_units for g in regrouped] == [g.num_units - 4 for g in groups]


@pytest.mark.parametrize(
    "kind, read_at",
    [
        # a single GELU op after the layer: the unit is read (and zeroed) after it, like torch.nn.GELU
        ("bert", "bert.encoder.layer.0.intermediate.intermediate_act_fn"),
        # GPT-2's tanh-GELU is several ops: the unit is read at the layer's output
        ("gpt2", "transformer.h.0.mlp.c_fc"),
    ],
)
def test_taylor_on_the_captured_graph_is_the_derivative_of_scaling_the_unit(kind, read_at):
    """Signed Taylor of an MLP unit = -dℓₙ/dm at m = 1 for the unit scaled by m where the group
    reads it, on the real model (a forward hook, no graph), by autograd."""
    model, x, expected_groups = tiny(kind)
    y = torch.tensor([1, 2]) if kind == "bert" else torch.randint(0, 97, (2, 8))

    def criterion(output, target, reduction="mean"):
        out = output.logits
        if out.dim() == 3:  # per-token language modelling loss, summed over the tokens
            loss = F.cross_entropy(out.transpose(1, 2), target, reduction="none").sum(1)
            return loss if reduction == "none" else loss.mean()
        return F.cross_entropy(out, target, reduction=reduction)

    (group,) = mlp_groups(Pruner(model, example_inputs=(x,)), expected_groups)
    scores = TaylorAttributionMetric(model, [(x, y)], criterion, "cpu", reduction="none", signed=True).run(group)
    source = model.get_submodule(read_at)
    gate = torch.ones(len(x), group.num_units, dtype=torch.float64, requires_grad=True)
    handle = source.register_forward_hook(lambda _m, _i, out: out * gate[:, None, :])
    try:
        loss = criterion(model(x), y, reduction="none").sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, gate)
    np.testing.assert_allclose(scores, -grad.numpy(), rtol=1e-7, atol=1e-10)


def test_refused_groups_name_the_op_and_call_site():
    model, x, _ = tiny("llama")  # its rotary embedding's inverse frequencies broadcast against the heads' dims
    pruner = Pruner(model, example_inputs=(x,))
    refused = pruner.refused_groups()
    assert refused
    for group in refused:
        assert group.refusal and "call site" in group.refusal
        assert group.refusal_site is not None


def test_integer_buffers_are_not_units():
    """Hugging Face's ``position_ids`` buffer (int64 [1, max_positions]) indexes the position
    embedding: it is not a layer whose units could be pruned."""
    model, x, _ = tiny("bert")
    pruner = Pruner(model, example_inputs=(x,))
    every = pruner.groups(include_outputs=True) + pruner.refused_groups()
    assert every
    assert not any(m.parameter == "position_ids" for g in every for m in g.members)


def test_hf_conv1d_rule_slices_like_the_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 5).double()
    nn.init.normal_(layer.bias)
    rule = get_slicing_rule(layer)
    assert rule is not None and rule.out_units(layer) == 6 and rule.in_units(layer) == 5
    x = torch.randn(3, 5, dtype=torch.float64)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    Plan("out", rule.prune_out(layer, UnitSelection.from_remove(torch.tensor([1, 4]), 6))).apply(layer)
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(layer(x), x @ weight[:, keep] + bias[keep])
    assert layer.nf == 4
    Plan("in", rule.prune_in(layer, UnitSelection.from_remove(torch.tensor([0]), 5))).apply(layer)
    torch.testing.assert_close(layer(x[:, 1:]), x[:, 1:] @ weight[1:, keep] + bias[keep])
    assert layer.nx == 4


def test_export_failure_falls_back_to_hooks_and_says_why():
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, pair):
            a, b = pair
            if a.sum() > 0:  # fx cannot trace the branch
                return self.fc(a) + b
            return self.fc(b)

    x = (torch.ones(2, 4), torch.ones(2, 4))
    graph = ModelGraph(Nested(), (x,))
    assert graph.method == "hooks" and graph.capture == "hooks"
    assert graph.export_error is not None and "torch.export failed too" in graph.fx_failure


def test_a_model_returning_a_cache_is_captured_with_use_cache_false():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=97, n_positions=16)).eval()
    ids = torch.randint(0, 97, (2, 8))
    graph = ModelGraph(model, (ids,))
    assert graph.capture == "hooks" and "use_cache=False" in graph.fx_failure
    graph = ModelGraph(model, (), {"input_ids": ids, "use_cache": False})
    assert graph.capture == "symbolic_trace"  # fx with the example (use_cache fixed to False)
    with torch.no_grad():
        torch.testing.assert_close(graph.traced(input_ids=ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_subclass_of_a_torch_layer_that_computes_otherwise_is_not_taken_for_it():
    """Hugging Face ConvNext's LayerNorm subclass normalizes channels first ([N, C, H, W]); taken
    for an nn.LayerNorm call it was left unsliced and the pruned model failed. Its ops are kept."""
    from torchpruner.schedule import prune_groups

    torch.manual_seed(0)
    model = tf.ConvNextForImageClassification(
        tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    )
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = sum(p.numel() for p in model.parameters())
    pruner = Pruner(model, example_inputs=(x,))
    prune_groups(pruner, fraction=0.3)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        assert model(x).logits.shape == (2, 3)


#: the tiny models whose attention heads prune under torch.export, and their head counts
HEADS = {"bert": 4, "distilbert": 4, "vit": 4}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_attention_heads_of_a_captured_model_prune_like_the_zeroed_twin(kind):
    """Under torch.export the head count reaches the graph as ``-1`` in ``view(B, L, -1, head_dim)``
    (the module attribute is gone), so whole heads are units; a padding mask built from positions
    carries no head units and does not stop them. (Llama's grouped-query heads, whose ``repeat_kv``
    sizes are literals in an exported graph: tests/graph/test_capture_hf_heads.py.)"""
    model, x, _ = tiny(kind)
    name, query = next(
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("query", "q_lin", "q_proj"))
    )
    pruner = Pruner(model, example_inputs=(x,))
    found = [g for g in pruner.groups() if query in g.source_modules]
    assert len(found) == 1 and found[0].num_units == HEADS[kind], [str(g) for g in pruner.refused_groups()]
    group = found[0]
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [1]}) as forward, torch.no_grad():
        expected = logits(forward(x))
    width = query.out_features
    pruner.plan_groups({group: [1]}).apply(model)
    assert query.out_features == width - width // HEADS[kind], name
    with torch.no_grad():
        torch.testing.assert_close(logits(model(x)), expected, rtol=1e-9, atol=1e-9)
        assert logits(model(torch.cat([x, x[:1]]))).shape[0] == 3


def tiny_vision(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        return tf.ResNetForImageClassification(config).double().eval()
    config = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    return tf.ConvNextForImageClassification(config).double().eval()


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_hf_vision_models_are_traced_by_fx_and_prune_like_the_zeroed_twin(kind):
    """Hugging Face ResNet and ConvNeXt stopped fx at ``if num_channels != self.num_channels`` in
    their embeddings and at the ``(*args, **kwargs)`` wrapper of their forward: torch.export took
    ~1 s of their trace + prune time. fx now decides the shape check on the example (guarded in
    the graph), traces the wrapped forward with a ``pixel_values`` placeholder and returns the
    ``ModelOutput``; the analysis and a prune are the same."""
    model = tiny_vision(kind)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = ModelGraph(model, (), {"pixel_values": x})
    assert graph.capture == "symbolic_trace", graph.fx_failure
    with torch.no_grad():
        got, expected = graph.traced(x), model(pixel_values=x)
        assert type(got) is type(expected)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-12)
    pruner = Pruner(model, example_inputs={"pixel_values": x})
    groups = pruner.groups()
    assert len(groups) >= 3 and pruner.refused_groups() == []
    group = max(groups, key=lambda g: g.num_units)
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [0, 2]}) as forward, torch.no_grad():
        want = forward(x).logits
    before = sum(p.numel() for p in model.parameters())
    pruner.plan_groups({group: [0, 2]}).apply(model)
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, want, rtol=1e-9, atol=1e-9)
