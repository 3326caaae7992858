"""Automatic dependency discovery: ``prune_model(module, indices)`` with ``cascading_modules=None``.

Oracle (float64, eval mode): the pruned model equals its unpruned twin with the pruned units
zeroed where the group's consumers read them (``group.mask_points()``): every source of a residual
addition, the branch of a concatenation at its offset, the H*W inputs after a flatten... LayerNorm
over the pruned axis changes the statistics of the remaining units, so that case is compared with
an explicitly rebuilt smaller model instead.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from torchpruner.graph import get_graph
from torchpruner.graph.dependency import DependencyError, get_dependency_graph
from torchpruner.pruner import Pruner

from oracles import (
    assert_prune_equals_zeroed_twin,
    assert_state_matches,
    assert_unchanged,
    kept,
    masked_at_mask_points,
    rebuilt,
    snapshot,
    train,
    twin_of,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, non-trivial BatchNorm statistics and affine terms (f(0) != 0)."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen, dtype=torch.float64) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=torch.float64) - 0.5)
    return model


def check_zeroed_twin(model: nn.Module, x: torch.Tensor, module_name: str, indices, atol: float = 1e-10):
    """Zeroed twin with the group's units masked where its consumers read them."""
    model = randomize(model)
    params_before = sum(p.numel() for p in model.parameters())
    plan = assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, example_inputs=x).prune_model(model.get_submodule(module_name), indices),
        lambda twin: masked_at_mask_points(twin, (x,), (twin.get_submodule(module_name), indices)),
        x,
        rtol=0,
        atol=atol,
    )
    assert sum(p.numel() for p in model.parameters()) < params_before
    # a second forward/backward after the prune works
    model.train()
    model(x).sum().backward()
    return model, plan


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class ResNetTiny(nn.Module):
    def __init__(self, width=6, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = BasicBlock(width, width)  # identity shortcut
        self.block2 = BasicBlock(width, width)  # identity shortcut
        self.block3 = BasicBlock(width, 2 * width, 2)  # downsample shortcut
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv, then flatten into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.conv = nn.Conv2d(9, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([torch.sigmoid(self.a(x)), F.gelu(self.b(x))], dim=1)
        y = F.max_pool2d(F.relu(self.bn2(self.conv(torch.tanh(self.bn(y))))), 2)
        return self.fc(y.flatten(1))


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 1)
        self.bn1 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # channel multiplier 2
        self.bn2 = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = nn.functional.hardswish(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.fc(self.pw(x).mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(6)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(6, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, x):
        x = self.pool(F.elu(self.bn1(self.conv1(x))))
        return self.fc(self.drop(torch.flatten(F.relu(self.conv2(x)), 1)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv3(F.relu(self.bn(self.grouped(F.relu(self.conv1(x))))))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.se = SqueezeExcite(6, 3)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.se(F.silu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


class MixerBlock(nn.Module):
    """Token model: embedding, class token, position embedding, LayerNorms, MLP, residuals."""

    def __init__(self, d_in=5, d=8, hidden=12, tokens=4, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d))
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        return self.head(self.ln2(h)[:, 0])


# --------------------------------------------------------------------------------------------
# Zeroed twin
# --------------------------------------------------------------------------------------------


def image(c=3, hw=8, seed=1):
    return torch.randn(2, c, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "module_name, indices",
    [
        ("stem", [0, 3]),  # residual stream through two identity shortcuts
        ("block1.conv2", [1, 4, 5]),  # same stream, named through another source
        ("block1.conv1", [0, 2]),  # inside a block
        ("block3.conv2", [0, 7, 11]),  # downsample shortcut stream into the classifier
        ("block3.downsample.0", [3]),
    ],
)
def test_zeroed_twin_residual(module_name, indices):
    model, plan = check_zeroed_twin(ResNetTiny(), image(), module_name, indices)
    if module_name in ("stem", "block1.conv2"):
        # the whole stream: every source and every consumer
        text = str(plan)
        for name in (
            "stem.weight",
            "bn.weight",
            "block1.conv2.weight",
            "block2.conv2.weight",
            "block1.conv1.weight",
            "block3.conv1.weight",
            "block3.downsample.0.weight",
        ):
            assert name in text
        assert (
            model.stem.out_channels
            == model.block1.conv2.out_channels
            == model.block2.conv2.out_channels
            == 6 - len(indices)
        )


def test_zeroed_twin_concat_offset_and_flatten():
    model, plan = check_zeroed_twin(ConcatNet(), image(), "b", [0, 4])
    assert model.bn.num_features == 7 and model.conv.in_channels == 7 and model.a.out_channels == 4
    model, _ = check_zeroed_twin(ConcatNet(), image(), "a", [1])
    assert model.b.out_channels == 5
    model, _ = check_zeroed_twin(ConcatNet(), image(), "conv", [2])
    assert model.fc.in_features == 3 * 16  # channel -> its H*W flattened inputs


def test_zeroed_twin_depthwise_separable():
    model, _ = check_zeroed_twin(DepthwiseSeparable(), image(), "conv1", [1, 5])
    assert model.dw.groups == 4 and model.dw.out_channels == 8 and model.pw.in_channels == 8
    model, _ = check_zeroed_twin(DepthwiseSeparable(), image(), "pw", [0, 2])
    assert model.fc.in_features == 3


def test_zeroed_twin_conv1d_dropout():
    model, _ = check_zeroed_twin(Conv1dNet(), torch.randn(2, 2, 10, dtype=torch.float64), "conv2", [1])
    assert model.fc.in_features == 15
    assert model.drop.p == pytest.approx(0.3 * (1 - 5 / 20))
    model, _ = check_zeroed_twin(Conv1dNet(), torch.randn(2, 2, 10, dtype=torch.float64), "conv1", [0, 3, 5])
    assert model.conv2.in_channels == 3


def test_zeroed_twin_grouped_conv_equal_per_group():
    model, _ = check_zeroed_twin(GroupedNet(), image(), "conv1", [1, 5])  # local unit 1 of both groups
    assert model.grouped.in_channels == 6 and model.grouped.groups == 2
    model, _ = check_zeroed_twin(GroupedNet(), image(), "grouped", [0, 3])
    assert model.conv3.in_channels == 4


def test_grouped_conv_unequal_refused_before_any_change():
    model = randomize(GroupedNet())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'grouped'.*groups=2.*\[1, 0\] units per group"):
        Pruner(model, input_size=(3, 8, 8)).prune_model(model.conv1, [0])
    assert_unchanged(before, model)


def test_zeroed_twin_squeeze_excitation():
    model, plan = check_zeroed_twin(SENet(), image(), "conv1", [0, 4])
    # the gate's producer loses the same channels as the gated tensor
    assert model.se.fc2.out_channels == 4 and model.se.fc1.in_channels == 4 and model.conv2.in_channels == 4
    model, _ = check_zeroed_twin(SENet(), image(), "se.fc1", [1])
    assert model.se.fc2.in_channels == 2


def test_zeroed_twin_token_mlp_hidden():
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    model, _ = check_zeroed_twin(MixerBlock(), x, "fc1", [0, 3, 7])
    assert model.fc2.in_features == 9


def test_layernorm_stream_against_rebuilt_model():
    """Pruning the token stream (Linear outputs, class token, position embedding, LayerNorms,
    residual) equals a smaller model built by hand from the kept entries."""
    torch.manual_seed(0)
    model = MixerBlock().double().eval()
    with torch.no_grad():
        for ln in (model.ln1, model.ln2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    remove = [1, 6]
    keep = [i for i in range(8) if i not in remove]
    stream = {
        name: kept(keep)
        for name in (
            "embed.weight",
            "embed.bias",
            "ln1.weight",
            "ln1.bias",
            "ln2.weight",
            "ln2.bias",
            "fc2.weight",
            "fc2.bias",
        )
    }
    small = rebuilt(
        MixerBlock(d=len(keep)),
        model,
        {
            **stream,
            "cls": kept(None, None, keep),
            "pos": kept(None, None, keep),
            "fc1.weight": kept(None, keep),
            "head.weight": kept(None, keep),
        },
    )
    with torch.no_grad():
        expected = small(x)
    plan = Pruner(model, example_inputs=x).prune_model(model.embed, remove)
    assert "cls" in str(plan) and "pos" in str(plan) and "ln2.weight" in str(plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)
    assert model.ln1.normalized_shape == (6,) and model.cls.shape == (1, 1, 6)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).view(-1, 16 * 4 * 4))


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.conv2(y)


class LiteralChannelShuffle(ChannelShuffle):
    def forward(self, x):
        y = self.conv(x)
        n, _, h, w = y.shape
        y = y.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)  # sizes written in the code
        return self.conv2(y)


@pytest.mark.parametrize(
    "model_cls, layer, match",
    [
        (HardCodedView, "conv", r"'conv'.*hard-coded shape in view at call site 'view'"),
        (LiteralChannelShuffle, "conv", r"'conv'.*view at call site 'view' spreads the units over several axes"),
    ],
)
def test_unfollowable_ops_are_refused_before_any_change(model_cls, layer, match):
    model = randomize(model_cls())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        Pruner(model, input_size=(3, 8, 8), optimizer=optimizer).prune_model(model.get_submodule(layer), [0, 1])
    assert_unchanged(before, model, optimizer)


def test_flatten_with_batch_derived_view_is_followed():
    class SizeView(HardCodedView):
        def forward(self, x):
            y = F.relu(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    model, _ = check_zeroed_twin(SizeView(), image(hw=8), "conv", [2, 9])
    assert model.fc.in_features == 14 * 16


def test_classifier_outputs_excluded_from_groups_unless_asked():
    model = ResNetTiny()
    graph = get_graph(model, (torch.randn(2, 3, 8, 8),))
    dep = get_dependency_graph(graph)
    groups = dep.groups()
    assert all(model.fc not in g.source_modules for g in groups)
    assert any(model.fc in g.source_modules for g in dep.groups(include_outputs=True))
    stream = dep.group_of(model.stem)
    assert stream in groups and model.block2.conv2 in stream.source_modules
    assert sum(1 for g in groups if g is stream) == 1  # each group once
    assert stream not in dep.groups(ignored_layers=[model.block1.conv2])


# --------------------------------------------------------------------------------------------
# Hypothesis: random residual widths and indices
# --------------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(width=st.integers(2, 6), data=st.data())
def test_zeroed_twin_random_residual(width, data):
    names = ["stem", "block1.conv1", "block2.conv2", "block3.conv1", "block3.conv2"]
    name = data.draw(st.sampled_from(names))
    model = ResNetTiny(width=width)
    count = model.get_submodule(name).out_channels
    indices = data.draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=count - 1, unique=True))
    check_zeroed_twin(model, image(hw=6), name, indices)


# --------------------------------------------------------------------------------------------
# Masked trajectory: residual net, Adam, live optimizer
# --------------------------------------------------------------------------------------------


def test_masked_trajectory_residual_adam():
    torch.manual_seed(0)
    model = ResNetTiny(width=4).double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, [(x, y)] * 3)
    twin, twin_opt = twin_of(model, optimizer, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2))
    indices = [1, 2]
    plan = Pruner(model, example_inputs=x, optimizer=optimizer).prune_model(model.stem, indices)
    assert plan.optimizer_slices

    model.train()
    twin.train()
    train(model, optimizer, [(x, y)] * 3)
    with masked_at_mask_points(twin, (x,), (twin.stem, indices)) as twin_forward:
        train(twin_forward, twin_opt, [(x, y)] * 3)
    # every tensor, sliced where the stream runs: the stem, the identity blocks' last convs and
    # BatchNorms (rows), the convs that read the stream (columns); block3 and fc are kept whole
    keep = [i for i in range(4) if i not in indices]
    rows, cols = kept(keep), kept(None, keep)
    slices = {"stem.weight": rows, "stem.bias": rows}
    for bn in ("bn", "block1.bn2", "block2.bn2"):
        slices.update({f"{bn}.{t}": rows for t in ("weight", "bias", "running_mean", "running_var")})
    for conv in ("block1.conv2", "block2.conv2"):
        slices[f"{conv}.weight"] = rows
    for conv in ("block1.conv1", "block2.conv1", "block3.conv1", "block3.downsample.0"):
        slices[f"{conv}.weight"] = cols
    assert_state_matches(model, twin, slices, optimizer=optimizer, reference_optimizer=twin_opt, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------
# Transformer block with nn.MultiheadAttention (embed-dim pruning) vs a rebuilt smaller model
# --------------------------------------------------------------------------------------------


class AttentionBlock(nn.Module):
    def __init__(self, d_in=5, d=8, heads=2, hidden=6, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        y = self.ln1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


def rebuilt_attention_block(model, keep, keep3):
    """An explicitly rebuilt smaller AttentionBlock holding ``model``'s kept embedding dims."""
    rows, cols = kept(keep), kept(None, keep)
    return rebuilt(
        AttentionBlock(d=len(keep)),
        model,
        {
            "embed.weight": rows,
            "embed.bias": rows,
            "ln1.weight": rows,
            "ln1.bias": rows,
            "ln2.weight": rows,
            "ln2.bias": rows,
            "attn.in_proj_weight": kept(keep3, keep),
            "attn.in_proj_bias": kept(keep3),
            "attn.out_proj.weight": kept(keep, keep),
            "attn.out_proj.bias": rows,
            "fc1.weight": cols,
            "fc2.weight": rows,
            "fc2.bias": rows,
            "head.weight": cols,
        },
    )


def test_attention_embed_dim_against_rebuilt_model():
    torch.manual_seed(0)
    model = AttentionBlock().double().eval()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    remove = [1, 5]  # local dim 1 of both heads (head_dim 4)
    keep = torch.tensor([i for i in range(8) if i not in remove])
    keep3 = torch.cat([keep, keep + 8, keep + 16])
    expected = rebuilt_attention_block(model, keep, keep3)(x)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    before = snapshot(model, optimizer)
    with pytest.raises(DependencyError, match=r"coupled with its units \[5\]"):
        Pruner(model, example_inputs=x, optimizer=optimizer).prune_model(model.embed, [1])
    assert_unchanged(before, model, optimizer)
    # the optimizer step changed the weights: rebuild the reference from the stepped model
    expected = rebuilt_attention_block(model, keep, keep3)(x)
    exp_avg_in_proj = optimizer.state[model.attn.in_proj_weight]["exp_avg"][keep3][:, keep].clone()
    plan = Pruner(model, example_inputs=x, optimizer=optimizer).prune_model(model.embed, remove)
    assert "attn.in_proj_weight" in str(plan) and "attn.out_proj.weight" in str(plan)
    assert model.attn.embed_dim == 6 and model.attn.head_dim == 3 and model.attn.out_proj.in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)
    assert torch.equal(optimizer.state[model.attn.in_proj_weight]["exp_avg"], exp_avg_in_proj)
    model.train()
    model(x).sum().backward()
    optimizer.step()


# --------------------------------------------------------------------------------------------
# Group numbers
# --------------------------------------------------------------------------------------------


class ShuffledStem(nn.Module):
    """A refused group (channel_shuffle) and the model input come before the prunable groups in
    data-flow order; the classifier output comes last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.body = nn.Conv2d(4, 6, 3)
        self.head = nn.Conv2d(6, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.channel_shuffle(self.stem(x), 2)
        x = self.head(torch.relu(self.body(x))).mean((2, 3))
        return self.fc(x)


def test_printed_group_number_is_the_position_users_index_with():
    pruner = Pruner(ShuffledStem(), input_size=(3, 12, 12))
    with pytest.warns(UserWarning, match="channel_shuffle"):
        groups = pruner.groups()
    dependencies = get_dependency_graph(pruner.graph())
    for listing in (groups, pruner.groups(include_outputs=True), dependencies.groups(prunable_only=False)):
        for position, group in enumerate(listing):
            assert group.index == position
            assert str(group).startswith(f"Group {position}: ")
            assert repr(group).startswith(f"Group({position}, ")
    assert [g.members[0].module_name for g in groups] == ["body", "head"]
    refused = pruner.refused_groups()
    assert len(refused) == 1 and refused[0].index >= len(pruner.groups(include_outputs=True))
    # the number in a message is the one to index with
    with pytest.raises(ValueError, match=r"group 1\b"):
        pruner.plan_groups({groups[1]: [9]})
