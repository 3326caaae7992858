"""Attention heads of Llama-family models under torch.export (grouped-query attention).

An exported graph keeps only the numbers of the sizes the code computed: Hugging Face's
``repeat_kv`` (``hidden[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)`` then
``reshape(batch, kv_heads * n_rep, length, head_dim)``) reaches it as ``expand(x, B, 2, 2, 8, 16)``.
The analysis follows such a literal as if computed, and checks it by capturing the model again
with a unit removed (:mod:`torchpruner.graph.recapture`): a KV head then goes with its group of
query heads (q_proj rows of those query heads, k_proj/v_proj rows of the KV head, o_proj columns
of the query heads), and pruning it equals the zeroed twin. A literal that does not follow the
units (written in the code) still refuses the group, naming the op.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import assert_reduction_refused, assert_unchanged, kept, masked_at_mask_points, rebuilt, snapshot

from torchpruner.pruner import Pruner

tf = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::torchpruner.graph.dependency.RefusedGroupsWarning", "ignore::UserWarning"
)

HEAD_DIM = 16


def tiny_decoder(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """Hidden 64, 4 query heads, 2 KV heads, 2 layers, float64, eval mode."""
    torch.manual_seed(0)
    config_class, model_class = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[kind]
    config = config_class(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=96,
        vocab_size=97,
        max_position_embeddings=16,
        use_cache=False,
    )
    model = model_class(config).double().eval()
    return model, torch.randint(1, 97, (2, 8))


def head_groups(pruner: Pruner, model: nn.Module) -> list:
    """The head group of each layer: the one holding k_proj's output units."""
    found = []
    for layer in model.model.layers:
        attention = layer.self_attn
        (group,) = [g for g in pruner.groups() if attention.k_proj in g.source_modules]
        found.append(group)
    return found


def assert_every_parameter_steps(model, optimizer, x):
    """One training step with ``optimizer`` (the one that existed before the prune) moves every
    parameter of ``model``."""
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad()
    model(x).logits.square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and not torch.equal(p.detach(), before[name]), f"{name} did not update"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_a_kv_head_goes_with_its_query_heads_and_prunes_like_the_zeroed_twin(kind):
    model, x = tiny_decoder(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, optimizer=optimizer, example_inputs=(x,))
    groups = head_groups(pruner, model)
    for layer, group in zip(model.model.layers, groups):
        attention = layer.self_attn
        members = {(m.module_name.rsplit(".", 1)[-1], m.direction) for m in group.members}
        assert members == {("q_proj", "out"), ("k_proj", "out"), ("v_proj", "out"), ("o_proj", "in")}
        assert group.num_units == 2  # the KV heads
        # KV head 1 holds query heads 2 and 3
        assert group.unit_channels(attention.q_proj)[1].tolist() == list(range(2 * HEAD_DIM, 4 * HEAD_DIM))
        assert group.unit_channels(attention.k_proj)[1].tolist() == list(range(HEAD_DIM, 2 * HEAD_DIM))
        assert group.unit_channels(attention.v_proj)[1].tolist() == list(range(HEAD_DIM, 2 * HEAD_DIM))
    group = groups[0]
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [0]}) as forward, torch.no_grad():
        expected = forward(x).logits
    parameters = dict(model.named_parameters())
    pruner.plan_groups({group: [0]}).apply(model, optimizer)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * HEAD_DIM and attention.o_proj.in_features == 2 * HEAD_DIM
    assert attention.k_proj.out_features == HEAD_DIM and attention.v_proj.out_features == HEAD_DIM
    assert attention.num_key_value_groups == 2 and attention.head_dim == HEAD_DIM
    assert all(p is parameters[name] for name, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-9, atol=1e-9)
        assert model(torch.cat([x, x[:1]])).logits.shape[0] == 3
    # the optimizer that existed before the prune updates every parameter
    assert_every_parameter_steps(model, optimizer, x)


def test_the_model_is_left_as_it_was_by_the_second_capture():
    model, x = tiny_decoder("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = snapshot(model, optimizer)
    parameters = dict(model.named_parameters())
    assert head_groups(Pruner(model, optimizer=optimizer, example_inputs=(x,)), model)
    assert_unchanged(before, model, optimizer)
    assert all(p is parameters[name] for name, p in model.named_parameters())


class LiteralRepeat(nn.Module):
    """Grouped-query attention whose ``repeat_kv`` writes the KV head count as a literal (and
    ``int(...)`` of a size, which stops fx, so the model is captured with torch.export)."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.embed = nn.Linear(8, 16)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o_proj, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n = h.shape[0], int(h.shape[1])
        q = self.q_proj(h).view(b, n, -1, 4).transpose(1, 2)
        k = self.k_proj(h).view(b, n, -1, 4).transpose(1, 2)
        v = self.v_proj(h).view(b, n, -1, 4).transpose(1, 2)
        kv_heads = 2 if self.literal else k.shape[1]
        k = k[:, :, None].expand(b, kv_heads, 2, n, 4).reshape(b, kv_heads * 2, n, 4)
        v = v[:, :, None].expand(b, kv_heads, 2, n, 4).reshape(b, kv_heads * 2, n, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.head(h + self.o_proj(y.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("literal", [False, True], ids=["read-from-shape", "literal-in-code"])
def test_a_literal_of_the_exported_graph_is_checked_by_capturing_again(literal):
    torch.manual_seed(0)
    model = LiteralRepeat(literal).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example_inputs=(x,))
    assert pruner.graph().capture == "export"
    found = [g for g in pruner.groups() if model.k_proj in g.source_modules]
    if literal:
        assert not found
        (refused,) = [g for g in pruner.refused_groups() if model.k_proj in g]
        assert "expand" in refused.refusal and "literal" in refused.refusal and refused.refusal_site is not None
        return
    (group,) = found
    assert group.num_units == 2 and model.q_proj in group and model.o_proj in group
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [1]}) as forward, torch.no_grad():
        expected = forward(x)
    pruner.plan_groups({group: [1]}).apply(model)
    assert model.k_proj.out_features == 4 and model.q_proj.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The hidden size through a hand-written RMSNorm
# --------------------------------------------------------------------------------------------


def test_the_hidden_size_prunes_through_llamas_rmsnorm_like_a_rebuilt_smaller_model():
    """Llama's RMSNorm is written out (``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w``): the
    hidden size is one group (embedding, every norm weight, every projection's inputs, o_proj /
    down_proj outputs, lm_head's inputs), pruned like nn.RMSNorm (the statistic is over the kept
    units: not masking, so the oracle is the model built smaller by hand)."""
    model, x = tiny_decoder("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, optimizer=optimizer, example_inputs=(x,))
    (group,) = [g for g in pruner.groups() if model.model.embed_tokens in g.source_modules]
    assert group.num_units == 64
    norms = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
    assert sorted(group.normalizations()) == sorted(norms + ["model.norm"])
    removed = [3, 10, 40]
    keep = [c for c in range(64) if c not in removed]
    small_config = copy.deepcopy(model.config)
    small_config.hidden_size, small_config.head_dim = 61, HEAD_DIM
    slices = {
        "model.embed_tokens.weight": kept(None, keep),
        "lm_head.weight": kept(None, keep),
        "model.norm.weight": kept(keep),
    }
    for i in range(2):
        prefix = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            slices[prefix + name + ".weight"] = kept(None, keep)
        for name in ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            slices[prefix + name + ".weight"] = kept(keep)
    expected_model = rebuilt(type(model)(small_config), model, slices)
    with torch.no_grad():
        expected = expected_model(x).logits
    pruner.plan_groups({group: removed}).apply(model, optimizer)
    assert model.model.norm.weight.shape == (61,) and model.model.layers[1].mlp.down_proj.out_features == 61
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-9, atol=1e-9)
    assert_every_parameter_steps(model, optimizer, x)


class WrittenNorm(nn.Module):
    """RMSNorm written out (``kind="rms"``), or look-alikes that are not one."""

    def __init__(self, kind: str, dim: int = 8) -> None:
        super().__init__()
        self.kind, self.weight = kind, nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        if self.kind == "cube":  # not a mean square
            return self.weight * (x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + 1e-6))
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.kind == "unweighted":  # the weight scales x, not the normalised tensor
            return torch.addcmul(normed, self.weight, x)
        if self.kind == "other_axis":  # the weight runs along the tokens (as many as the units)
            return normed * self.weight.view(-1, 1)
        # centred: a LayerNorm written out
        centred = x - x.mean(-1, keepdim=True)
        return self.weight * (centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-6))


class NormBlock(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(5, 8), WrittenNorm(kind), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def test_a_written_out_rmsnorm_prunes_like_the_rebuilt_model():
    torch.manual_seed(0)
    model = NormBlock("rms").double().eval()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=(x,))
    (group,) = [g for g in pruner.groups() if model.embed in g.source_modules]
    assert group.normalizations() == ["norm"] and model.head in group
    keep = [0, 1, 3, 4, 6]
    small = NormBlock("rms")
    small.embed, small.head = nn.Linear(5, 5), nn.Linear(5, 3)
    small.norm.weight = nn.Parameter(torch.ones(5))
    expected_model = rebuilt(
        small,
        model,
        {
            "embed.weight": kept(keep),
            "embed.bias": kept(keep),
            "norm.weight": kept(keep),
            "head.weight": kept(None, keep),
        },
    )
    pruner.plan_groups({group: [2, 5, 7]}).apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["cube", "centred", "unweighted", "other_axis"])
def test_a_reduction_over_the_units_that_is_not_an_rmsnorm_is_refused(kind):
    model = NormBlock(kind).eval()
    assert_reduction_refused(model, torch.randn(4, 8, 5), model.embed)  # 8 tokens, 8 units


# --------------------------------------------------------------------------------------------
# GPT-2: Conv1D c_attn split into q, k, v with split(self.split_size)
# --------------------------------------------------------------------------------------------


def test_gpt2_heads_prune_like_the_zeroed_twin_with_split_size_updated():
    """GPT-2's ``c_attn(h).split(self.split_size, dim=2)`` is ``split(x, 64, 2)`` once exported: the
    three pieces are equal, and capturing again finds the size in ``split_size`` (not
    ``embed_dim``, which holds the same number), which the prune updates."""
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_positions=16, use_cache=False)
    )
    model = model.double().eval()
    x = torch.randint(1, 97, (2, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, optimizer=optimizer, example_inputs=(x,))
    attention = model.transformer.h[0].attn
    (group,) = [g for g in pruner.groups() if attention.c_attn in g.source_modules]
    assert group.num_units == 4 and attention.c_proj in group
    # the hidden size would slice wte.weight, which is lm_head.weight: listed as refused, not planned
    (hidden,) = [g for g in pruner.refused_groups() if model.transformer.wte in g.source_modules]
    assert "tied" in hidden.refusal and "lm_head.weight" in hidden.refusal
    # head 1: its 16 dims of q, of k and of v
    assert group.unit_channels(attention.c_attn)[1].tolist() == [
        c for piece in range(3) for c in range(piece * 64 + 16, piece * 64 + 32)
    ]
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [1]}) as forward, torch.no_grad():
        expected = forward(x).logits
    plan = pruner.plan_groups({group: [1]})
    plan.apply(model, optimizer)
    assert attention.split_size == 48 and attention.embed_dim == 64 and attention.c_attn.nf == 144
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-9, atol=1e-9)
    assert_every_parameter_steps(model, optimizer, x)


# --------------------------------------------------------------------------------------------
# T5: the heads of every block go with the columns of the one position-bias embedding
# --------------------------------------------------------------------------------------------


def test_t5_heads_of_every_block_go_with_the_position_bias_and_prune_like_the_zeroed_twin():
    """T5's position bias is an embedding of one column per head, made in the first block and
    reused by every block through the SDPA mask (``where(mask, bias, -inf)``): head ``h`` of every
    block and column ``h`` of the embedding are one unit (a prune used to leave the bias with every
    head and break the model)."""
    torch.manual_seed(0)
    config = tf.T5Config(num_layers=2, num_heads=4, d_model=64, d_kv=16, d_ff=96, vocab_size=97)
    model, x = tf.T5EncoderModel(config).double().eval(), torch.randint(1, 97, (2, 8))
    pruner = Pruner(model, example_inputs=(x,))
    first = model.encoder.block[0].layer[0].SelfAttention
    (group,) = [g for g in pruner.groups() if first.q in g.source_modules]
    assert group.num_units == 4 and first.relative_attention_bias in group
    for block in model.encoder.block:
        attention = block.layer[0].SelfAttention
        assert attention.q in group and attention.k in group and attention.v in group and attention.o in group
    twin = copy.deepcopy(model)
    with masked_at_mask_points(twin, (x,), {group.index: [2]}) as forward, torch.no_grad():
        expected = forward(x).last_hidden_state
    pruner.plan_groups({group: [2]}).apply(model)
    assert first.relative_attention_bias.weight.shape[1] == 3
    assert all(block.layer[0].SelfAttention.o.in_features == 48 for block in model.encoder.block)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, expected, rtol=1e-9, atol=1e-9)


class FixedHeadMask(nn.Module):
    """Attention whose SDPA mask has one slice per head, built in the code (not from the heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        q, k, v = (layer(h).view(b, n, -1, 4).transpose(1, 2) for layer in (self.q, self.k, self.v))
        mask = torch.arange(n, dtype=h.dtype).view(1, 1, 1, n).expand(1, 4, n, n)  # a bias per key position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head(h + self.o(y.transpose(1, 2).reshape(b, n, -1)))


def test_heads_are_refused_when_the_attention_mask_has_heads_of_its_own():
    model = FixedHeadMask().eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example_inputs=(x,))
    assert not [g for g in pruner.groups() if model.q in g.source_modules]
    (refused,) = [g for g in pruner.refused_groups() if model.q in g.source_modules]
    assert "attention mask" in refused.refusal and "4 heads" in refused.refusal
