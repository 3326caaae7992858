"""Scoring coupled groups: ``attr.run(group)`` (float64, eval mode).

Oracles:
* what is scored is what is pruned: the loss of the Shapley coalition "all but u" equals the loss of
  a copy of the model after ``Pruner.prune_model`` removed u (residual stream, concatenation,
  depthwise-separable block, flatten into Linear);
* Shapley samples telescope to ℓ(no unit) − ℓ(all units), ℓ(no unit) from a hand-written forward;
* Taylor and Sensitivity against a hand-written forward with an explicit gate on every tensor
  that enters the residual stream (the derivative of the loss with respect to the gate), and
  against a finite difference of scaling the unit at the entry points of the real model;
* a single-source group scores like ``run(module, find_best_evaluation_module=True)``;
* WeightNorm of a group, by hand over every weight slice the prune removes;
* the model is left as found, also on error; stale groups and captum are refused clearly.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_attributions_state import Boom, all_hooks, failing_criterion

from torchpruner.attributions import (
    APoZAttributionMetric,
    CaptumAttributionMetric,
    CoupledGroupWarning,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.methods import draw_permutations
from torchpruner.graph import ModelGraph, get_graph, make_example_inputs
from torchpruner.pruner import Pruner

DTYPE = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:APoZ")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters, so zeroing before a BatchNorm ≠ pruning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g, dtype=DTYPE) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=DTYPE) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g, dtype=DTYPE) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g, dtype=DTYPE) - 0.5)
    return model


class Block(nn.Module):
    """The last conv of the block adds into the stream."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualNet(nn.Module):
    def __init__(self, c: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def residual_twin(model: ResidualNet, x, gate):
    """ResidualNet's forward written out, with ``gate(k, t)`` applied to every tensor that a layer
    reads from the stream: the blocks' inputs (read by conv1 and by the addition) and fc's input."""
    h = gate(0, F.relu(model.bn(model.stem(x))))
    for k, block in enumerate(model.blocks):
        h = F.relu(h + block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h))))))
        if k + 1 < len(model.blocks):
            h = gate(k + 1, h)
    return model.fc(gate(len(model.blocks), F.adaptive_avg_pool2d(h, 1).flatten(1)))


class ConcatNet(nn.Module):
    """Two branches concatenated, read by a conv and (flattened) by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.b, self.bn_b = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(7, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        x = torch.cat([F.relu(self.bn_a(self.a(x))), torch.tanh(self.bn_b(self.b(x)))], dim=1)
        return self.fc(F.relu(self.mix(x)).flatten(1))


def separable_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 3),
    )


def plain_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3),
    )


ARCHS = {
    "residual": (lambda: ResidualNet(), (2, 4, 4)),
    "concat": (lambda: ConcatNet(), (2, 4, 4)),
    "separable": (separable_net, (2, 4, 4)),
    "plain": (plain_net, (2, 4, 4)),
}


def build(arch: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    make, input_size = ARCHS[arch]
    torch.manual_seed(seed)
    return randomize_batchnorms(make().to(DTYPE), seed).eval(), input_size


def data(input_size, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(input_size), generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def batches(x, y, size=4):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def model_groups(model: nn.Module, input_size) -> list:
    """The prunable coupled groups, as ``Pruner.groups()`` lists them."""
    return Pruner(model, input_size=input_size).groups()


def losses(model, x, y) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y, reduction="none").numpy()


def pruned_copy(model: nn.Module, input_size, group, unit: int) -> nn.Module:
    """A deep copy of ``model`` with group unit ``unit`` pruned by the Pruner (automatic discovery)."""
    source = next(m for m in group.members if m.direction == "out")
    channels = group.unit_channels(source.module)[unit].tolist()
    twin = copy.deepcopy(model)
    layer = dict(twin.named_modules())[source.module_name]
    Pruner(twin, input_size=input_size).prune_model(layer, channels)
    return twin


# --------------------------------------------------------------------------------------------
# What is scored is what is pruned
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pruning_a_unit_equals_the_shapley_coalition_all_but_it(arch):
    """One sampled ordering switches units on one at a time, so the last unit's marginal is
    ℓ(all but it) − ℓ(all): that coalition's loss must be the pruned model's loss."""
    model, input_size = build(arch)
    x, y = data(input_size)
    full = losses(model, x, y)
    groups = model_groups(model, input_size)
    assert groups
    for group in groups:
        lasts: dict[int, int] = {}  # unit -> a seed whose ordering ends with it
        for seed in range(200):
            lasts.setdefault(int(draw_permutations(group.num_units, 1, seed)[0][-1]), seed)
            if len(lasts) == min(group.num_units, 3):
                break
        for unit, seed in lasts.items():
            metric = ShapleyAttributionMetric(
                model, batches(x, y), F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=seed
            )
            all_but_unit = metric.run(group)[:, unit] + full
            pruned = pruned_copy(model, input_size, group, unit)
            np.testing.assert_allclose(
                losses(pruned, x, y), all_but_unit, rtol=1e-10, atol=1e-12, err_msg=f"{arch}: {group!r}, unit {unit}"
            )


def test_torchvision_resnet18_downsample_group_pruned_equals_coalition():
    """Real-world pitfalls: in-place ``out += identity``, one ReLU module called twice per block,
    a 1x1 downsample conv + BatchNorm as a second source of the stream."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18(num_classes=3).to(DTYPE).eval())
    input_size = (3, 16, 16)
    x, y = data(input_size, n=2)
    (group,) = [
        g for g in model_groups(model, input_size) if any(s.label == "layer2.0.downsample.0" for s in g.sources)
    ]
    assert {s.label for s in group.sources} == {"layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    seed = 3
    unit = int(draw_permutations(group.num_units, 1, seed)[0][-1])
    scores = ShapleyAttributionMetric(model, [(x, y)], F.cross_entropy, reduction="none", sv_samples=1, seed=seed).run(
        group
    )
    full = losses(model, x, y)
    np.testing.assert_allclose(
        losses(pruned_copy(model, input_size, group, unit), x, y), scores[:, unit] + full, rtol=1e-10, atol=1e-12
    )


def test_group_scores_drive_prune_groups():
    """``attr.run`` is a score function for ``prune_groups``: the lowest-scored unit of the stream goes."""
    from torchpruner.schedule import prune_groups

    model, input_size = build("residual", seed=10)
    x, y = data(input_size, seed=10)
    metric = ShapleyAttributionMetric(model, batches(x, y), F.cross_entropy, sv_samples=2, seed=0)
    group = stream_group(model, input_size)
    weakest = int(np.argmin(metric.run(group)))
    removed = group.unit_channels(model.stem)[weakest].tolist()
    pruner = Pruner(model, input_size=input_size)
    prune_groups(pruner, fraction=0.25, scores=metric.run)
    assert pruner.kept_units(model.stem) == [c for c in range(4) if c not in removed]


def test_groups_traced_for_another_input_size_score_the_same():
    model, _ = build("residual", seed=8)
    x, y = data((2, 6, 6), n=4, seed=8)
    small, same = stream_group(model, (2, 4, 4)), stream_group(model, (2, 6, 6))
    metric = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy, signed=True)
    np.testing.assert_allclose(metric.run(small), metric.run(same), rtol=1e-12)


def test_residual_group_is_zeroed_where_the_consumers_read_the_stream():
    model, input_size = build("residual")
    (stream,) = [g for g in model_groups(model, input_size) if len(g.sources) > 1]
    assert [site.label for site in stream.sources] == ["stem", "blocks.0.conv2", "blocks.1.conv2"]
    # relu after the stem, relu after block 0 (block 1's input), fc's flattened input
    assert [site.name for site, _ in stream.mask_points()] == ["relu", "relu_2", "flatten"]


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 6) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Tokens [N, L, 5] -> embed -> 2 blocks -> mean over tokens -> head; units on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.Sequential(TransformerBlock(), TransformerBlock())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def transformer():
    torch.manual_seed(0)
    return TinyTransformer().to(DTYPE).eval(), (5, 5)


def test_transformer_mlp_group_pruned_equals_coalition_all_but_it():
    model, input_size = transformer()
    x, y = data(input_size)
    full = losses(model, x, y)
    (group,) = [g for g in model_groups(model, input_size) if g.sources[0].module is model.blocks[1].fc1]
    for seed in (0, 1):
        unit = int(draw_permutations(group.num_units, 1, seed)[0][-1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing inexact in this group
            scores = ShapleyAttributionMetric(
                model, batches(x, y), F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=seed
            ).run(group)
        pruned = pruned_copy(model, input_size, group, unit)
        np.testing.assert_allclose(losses(pruned, x, y), scores[:, unit] + full, rtol=1e-10, atol=1e-12)


def test_transformer_stream_group_warns_that_zeroing_is_not_pruning():
    model, input_size = transformer()
    x, y = data(input_size)
    (stream,) = [g for g in model_groups(model, input_size) if len(g.sources) > 1]
    with pytest.warns(
        UserWarning,
        match=r"not exactly pruning them: pruning also changes the statistics of "
        r"'blocks\.0\.ln1' \(LayerNorm\)",
    ) as record:
        scores = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy).run(stream)
    assert record[0].filename == __file__
    assert scores.shape == (stream.num_units,) == (4,)  # 8 dims, equal in both heads of 4


def test_group_weight_norm_by_hand_transformer_stream():
    """Embed dim i is group unit i % 4 (the same dim in both heads); the attention owns in_proj
    column i, rows i, E+i, 2E+i and out_proj row and column i."""
    model, input_size = transformer()
    (stream,) = [g for g in model_groups(model, input_size) if len(g.sources) > 1]
    a = lambda t: t.detach().abs()
    per_dim = [a(model.embed.weight).sum(1), a(model.head.weight).sum(0)]
    for block in model.blocks:
        w_in, w_out = a(block.attn.in_proj_weight), a(block.attn.out_proj.weight)
        attention = w_in.sum(0) + w_in.reshape(3, 8, 8).sum((0, 2)) + w_out.sum(0) + w_out.sum(1)
        per_dim += [
            a(block.ln1.weight),
            attention,
            a(block.ln2.weight),
            a(block.fc1.weight).sum(0),
            a(block.fc2.weight).sum(1),
        ]
    per_unit = [v.reshape(2, 4).sum(0) for v in per_dim]
    expected = sum(v / v.mean() for v in per_unit)
    np.testing.assert_allclose(WeightNormAttributionMetric(model, None, None).run(stream), expected.numpy(), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Against a hand-written forward with a gate on the stream
# --------------------------------------------------------------------------------------------
def stream_group(model, input_size):
    (group,) = [g for g in model_groups(model, input_size) if len(g.sources) > 1]
    return group


@pytest.mark.parametrize("seed, samples", [(0, 1), (1, 1), (2, 3)])
def test_group_shapley_telescopes_to_no_unit_minus_all(seed, samples):
    model, input_size = build("residual", seed)
    x, y = data(input_size, seed=seed)
    group = stream_group(model, input_size)
    scores = ShapleyAttributionMetric(
        model, batches(x, y), F.cross_entropy, "cpu", reduction="none", sv_samples=samples, seed=seed
    ).run(group)
    with torch.no_grad():
        nothing = F.cross_entropy(residual_twin(model, x, lambda k, t: t * 0), y, reduction="none").numpy()
    np.testing.assert_allclose(scores.sum(1), nothing - losses(model, x, y), rtol=1e-10, atol=1e-12)


def gate_on_units(m: torch.Tensor):
    """gate(k, t): multiply unit c of example n by m[n, c] (t is [N, C, ...])."""
    return lambda k, t: t * m.reshape(m.shape + (1,) * (t.dim() - 2))


def residual_entry_twin(model: ResidualNet, x, gate):
    """ResidualNet's forward written out, with ``gate(k, t)`` applied to every tensor that enters
    the stream: the stem's output after BN and ReLU (read by block 0's conv1 and its addition)
    and each block's bn2 output (the addend); the block outputs read by the next block and by fc
    are not gated, they already contain the gated entries."""
    h = gate(0, F.relu(model.bn(model.stem(x))))
    for k, block in enumerate(model.blocks):
        h = F.relu(h + gate(k + 1, block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))))
    return model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_residual_group_enters_the_stream_after_each_sources_batchnorm():
    model, input_size = build("residual")
    stream = stream_group(model, input_size)
    assert [site.name for site, _ in stream.entry_points()] == ["relu", "blocks_0_bn2", "blocks_1_bn2"]


@pytest.mark.filterwarnings("ignore::torchpruner.attributions.CoupledGroupWarning")
@pytest.mark.parametrize("signed", [True, False])
def test_group_taylor_is_the_first_order_term_of_scaling_each_entry_once(signed):
    """Taylor of a group unit = dℓₙ/dt at t = 0 for scaling unit c by (1 − t) once at every
    tensor that enters the stream (one gate m_c shared by the entries), by autograd on a
    hand-written forward."""
    model, input_size = build("residual", seed=3)
    x, y = data(input_size, n=5, seed=3)
    group = stream_group(model, input_size)
    scores = TaylorAttributionMetric(
        model, batches(x, y, 2), F.cross_entropy, "cpu", reduction="none", signed=signed
    ).run(group)
    m = torch.ones(len(x), group.num_units, dtype=DTYPE, requires_grad=True)
    loss = F.cross_entropy(residual_entry_twin(model, x, gate_on_units(m)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, m)
    expected = -grad.numpy()
    np.testing.assert_allclose(scores, expected if signed else np.abs(expected), rtol=1e-9, atol=1e-12)
    # the read points are chained: gating every tensor a layer reads compounds (the stem counted
    # once per block), which is not the first-order term of the joint removal
    m = torch.ones(len(x), group.num_units, dtype=DTYPE, requires_grad=True)
    loss = F.cross_entropy(residual_twin(model, x, gate_on_units(m)), y, reduction="sum")
    (compounded,) = torch.autograd.grad(loss, m)
    assert not np.allclose(expected, -compounded.numpy(), rtol=1e-3)
    # not the same as summing each source's local score either
    local = sum(
        TaylorAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu", signed=True).run(layer)
        for layer in (model.stem, model.blocks[0].conv2, model.blocks[1].conv2)
    )
    assert not np.allclose(local, expected.mean(0))


def test_group_taylor_is_the_derivative_of_the_joint_removal_along_the_straight_path():
    """Signed Taylor = dℓ/dt at t = 0 for the model with unit c scaled by (1 − t) at the entries;
    t = 1 is the pruned model. Central finite difference on the zeroing functions of the real model."""
    model, input_size = build("residual", seed=8)
    x, y = data(input_size, n=4, seed=8)
    group = stream_group(model, input_size)
    scores = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu", reduction="none", signed=True).run(
        group
    )
    graph = get_graph(model, (x,))
    by_name = {site.name: site for site in graph.sites}
    eps = 1e-6
    for unit in range(group.num_units):

        def scaled(t):
            fns = {}
            for site, positions_fn in group.entry_points():
                axis, positions = positions_fn([unit])

                def fn(z, axis=axis, positions=torch.as_tensor(positions)):
                    factor = torch.ones(z.shape[axis], dtype=z.dtype)
                    factor[positions] = 1 - t
                    return z * factor.reshape([-1 if d == axis else 1 for d in range(z.dim())])

                fns[by_name[site.name]] = fn
            with graph.intercept(fns) as forward, torch.no_grad():
                return F.cross_entropy(forward(x), y, reduction="none").numpy()

        derivative = (scaled(eps) - scaled(-eps)) / (2 * eps)
        np.testing.assert_allclose(scores[:, unit], derivative, rtol=1e-5, atol=1e-8)
        # t = 1 is pruning: the zeroed entries give the pruned model's loss
        pruned = pruned_copy(model, input_size, group, unit)
        np.testing.assert_allclose(scaled(1.0), losses(pruned, x, y), rtol=1e-10, atol=1e-12)


def test_group_sensitivity_sums_gradient_magnitudes_over_the_entry_tensors():
    model, input_size = build("residual", seed=4)
    x, y = data(input_size, n=5, seed=4)
    group = stream_group(model, input_size)
    scores = SensitivityAttributionMetric(model, batches(x, y, 3), F.cross_entropy, "cpu", reduction="none").run(group)
    np.testing.assert_allclose(scores, gradient_magnitudes(residual_entry_twin, model, x, y), rtol=1e-9, atol=1e-12)


def gradient_magnitudes(twin, model, x, y) -> np.ndarray:
    """``Σ_e Σ_s |dℓₙ/dz_e|`` per example and unit over the tensors ``twin`` gates, by autograd."""
    perturbations = []

    def gate(k, t):
        e = torch.zeros_like(t, requires_grad=True)
        perturbations.append(e)
        return t + e

    loss = F.cross_entropy(twin(model, x, gate), y, reduction="sum")
    grads = torch.autograd.grad(loss, perturbations)
    return sum(g.abs().reshape(g.shape[0], g.shape[1], -1).sum(2) for g in grads).numpy()


def test_concat_branch_enters_after_its_own_activation():
    """A concatenated branch enters at its offset after its own BN and activation; the read point
    is the concatenation. First order at either is the same, the positions differ."""
    model, input_size = build("concat", seed=2)
    x, y = data(input_size, n=4, seed=2)
    for source, act in ((model.a, F.relu), (model.b, torch.tanh)):
        (group,) = [g for g in model_groups(model, input_size) if g.sources[0].module is source]
        scores = TaylorAttributionMetric(
            model, batches(x, y), F.cross_entropy, "cpu", reduction="none", signed=True
        ).run(group)
        bn = model.bn_a if source is model.a else model.bn_b
        z = act(bn(source(x))).detach().requires_grad_(True)
        other = torch.tanh(model.bn_b(model.b(x))) if source is model.a else F.relu(model.bn_a(model.a(x)))
        parts = [z, other] if source is model.a else [other, z]
        out = model.fc(F.relu(model.mix(torch.cat(parts, 1))).flatten(1))
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), z)
        np.testing.assert_allclose(scores, (-g * z).sum((2, 3)).detach().numpy(), rtol=1e-9, atol=1e-12)


def test_group_apoz_counts_every_tensor_the_consumers_read():
    model, input_size = build("residual", seed=5)
    x, y = data(input_size, n=5, seed=5)
    group = stream_group(model, input_size)
    scores = APoZAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu", reduction="none").run(group)
    tensors = []
    with torch.no_grad():
        residual_twin(model, x, lambda k, t: tensors.append(t) or t)
    positive = sum((t > 0).double().reshape(t.shape[0], t.shape[1], -1).sum(2) for t in tensors)
    count = sum(t[0, 0].numel() for t in tensors)
    np.testing.assert_allclose(scores, (positive / count).numpy(), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# A single-source group scores like the layer at its best evaluation point
# --------------------------------------------------------------------------------------------
SAME_AS_MODULE = {
    "taylor": lambda m, d: TaylorAttributionMetric(m, d, F.cross_entropy, "cpu", reduction="none"),
    "signed_taylor": lambda m, d: TaylorAttributionMetric(m, d, F.cross_entropy, "cpu", signed=True),
    "sensitivity": lambda m, d: SensitivityAttributionMetric(m, d, F.cross_entropy, "cpu", reduction="none"),
    "apoz": lambda m, d: APoZAttributionMetric(m, d, F.cross_entropy, "cpu", reduction="none"),
    "shapley": lambda m, d: ShapleyAttributionMetric(
        m, d, F.cross_entropy, "cpu", reduction="none", sv_samples=2, seed=5
    ),
    "random": lambda m, d: RandomAttributionMetric(m, d, F.cross_entropy, "cpu", seed=3),
}


@pytest.mark.parametrize("name", list(SAME_AS_MODULE))
@pytest.mark.parametrize("arch, layer", [("plain", 0), ("plain", 3), ("mlp", 0)])
def test_single_source_group_equals_module_at_its_best_evaluation_point(name, arch, layer):
    """A layer whose units only it produces is zeroed after its BatchNorm and activation, where
    the next layer reads them: ``find_best_evaluation_module=True`` is that point."""
    if arch == "mlp":
        torch.manual_seed(1)
        model, input_size = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE).eval(), (5,)
    else:
        model, input_size = build(arch, seed=1)
    x, y = data(input_size, n=5, seed=1)
    module = model[layer]
    (group,) = [g for g in model_groups(model, input_size) if any(s.module is module for s in g.sources)]
    graph = get_graph(model, *make_example_inputs(model, input_size))
    (point,) = [site for site, _ in group.mask_points()]
    if isinstance(point.module, nn.Flatten):  # the Linear reads the flattened tensor: same values
        point = point.inputs[0]
    assert point is graph.evaluation_point(module, find_best=True)
    metric = SAME_AS_MODULE[name](model, batches(x, y, 2))
    np.testing.assert_allclose(metric.run(group), metric.run(module, True), rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------------------------
# WeightNorm and Random
# --------------------------------------------------------------------------------------------
def test_group_weight_norm_by_hand_residual():
    """Σ over every weight slice removed with unit c, each layer divided by its mean over c."""
    model, input_size = build("residual", seed=6)
    group = stream_group(model, input_size)
    l1 = lambda w, dims: w.detach().abs().sum(dims)
    per_layer = [l1(model.stem.weight, (1, 2, 3)), model.bn.weight.detach().abs(), l1(model.fc.weight, 0)]
    for block in model.blocks:
        per_layer += [
            l1(block.conv1.weight, (0, 2, 3)),
            l1(block.conv2.weight, (1, 2, 3)),
            block.bn2.weight.detach().abs(),
        ]
    expected = sum(v / v.mean() for v in per_layer)
    scores = WeightNormAttributionMetric(model, None, F.cross_entropy).run(group)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-12)


def test_group_weight_norm_by_hand_flatten_and_depthwise():
    model, input_size = build("separable", seed=7)
    groups = model_groups(model, input_size)
    l1 = lambda w, dims: w.detach().abs().sum(dims)
    (first,) = [g for g in groups if g.sources[0].module is model[0]]
    per_layer = [
        l1(model[0].weight, (1, 2, 3)),
        model[1].weight.detach().abs(),
        l1(model[3].weight, (1, 2, 3)),
        model[4].weight.detach().abs(),
        l1(model[6].weight, (0, 2, 3)),
    ]
    np.testing.assert_allclose(
        WeightNormAttributionMetric(model, None, None).run(first),
        sum(v / v.mean() for v in per_layer).numpy(),
        rtol=1e-12,
    )
    (last,) = [g for g in groups if g.sources[0].module is model[6]]
    columns = l1(model[9].weight, 0).reshape(5, 16).sum(1)  # a channel owns its 4x4 flattened inputs
    rows = l1(model[6].weight, (1, 2, 3))
    np.testing.assert_allclose(
        WeightNormAttributionMetric(model, None, None).run(last),
        (rows / rows.mean() + columns / columns.mean()).numpy(),
        rtol=1e-12,
    )


def test_group_random_is_per_unit_and_seeded():
    model, input_size = build("residual")
    group = stream_group(model, input_size)
    metric = RandomAttributionMetric(model, None, F.cross_entropy, seed=4)
    scores = metric.run(group)
    assert scores.shape == (group.num_units,) and ((0 <= scores) & (scores < 1)).all()
    np.testing.assert_array_equal(scores, metric.run(group))
    assert not np.array_equal(scores, metric.run(group, seed=5))


# --------------------------------------------------------------------------------------------
# run(module) inside a larger group
# --------------------------------------------------------------------------------------------
def test_run_module_warns_when_the_layer_shares_its_units_and_traces_once(monkeypatch):
    model, input_size = build("residual")
    x, y = data(input_size)
    builds = []
    original = ModelGraph.__init__
    monkeypatch.setattr(ModelGraph, "__init__", lambda self, *a, **k: (builds.append(1), original(self, *a, **k))[1])
    metric = TaylorAttributionMetric(model, batches(x, y), F.cross_entropy, "cpu")
    with pytest.warns(
        CoupledGroupWarning,
        match=r"'blocks\.0\.conv2' \(Conv2d\) belongs to a coupled group "
        r"of 3 layers sharing 4 units",
    ) as record:
        local = metric.run(model.blocks[0].conv2)
    assert record[0].filename == __file__  # points at the caller
    assert len(builds) == 1  # the dependency analysis reuses the traced graph
    with pytest.warns(CoupledGroupWarning, match="'stem'"):
        metric.run(model.stem, find_best_evaluation_module=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.run(model.blocks[0].conv1)  # its units are its own
        metric.run(model.blocks[0].bn2)  # not a source: the local meaning, silently
        group = stream_group(model, input_size)  # the Pruner's graph is the tracer's cached graph
        metric.run(group)
    assert len(builds) == 1
    assert local.shape == (4,)


def test_run_module_without_fx_trace_does_not_warn():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x) + self.b(x)
            if h.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                h = -h
            return self.head(torch.relu(h))

    torch.manual_seed(0)
    model = DataDependent().to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = TaylorAttributionMetric(model, [(x, y)], F.cross_entropy).run(model.a)
    assert scores.shape == (4,)


# --------------------------------------------------------------------------------------------
# The model is left as found; clear refusals
# --------------------------------------------------------------------------------------------
GROUP_METRICS = {
    "random": lambda m, d, c: RandomAttributionMetric(m, d, c, "cpu", seed=0),
    "weight_norm": lambda m, d, c: WeightNormAttributionMetric(m, d, c, "cpu"),
    "apoz": lambda m, d, c: APoZAttributionMetric(m, d, c, "cpu"),
    "sensitivity": lambda m, d, c: SensitivityAttributionMetric(m, d, c, "cpu"),
    "taylor": lambda m, d, c: TaylorAttributionMetric(m, d, c, "cpu"),
    "shapley": lambda m, d, c: ShapleyAttributionMetric(m, d, c, "cpu", sv_samples=1, seed=0),
}


def state_of(model):
    return {
        "training": [m.training for m in model.modules()],
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy()),
        "hooks": all_hooks(model),
    }


def assert_same_state(before, after):
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"] == []
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    for k, v in before["grads"].items():
        assert (after["grads"][k] is None) if v is None else torch.equal(after["grads"][k], v), k
    assert torch.equal(after["rng"][0], before["rng"][0])
    np.testing.assert_array_equal(after["rng"][1], before["rng"][1])


@pytest.mark.parametrize("name", list(GROUP_METRICS))
def test_group_run_leaves_the_model_as_found(name):
    model, input_size = build("residual")
    group = stream_group(model, input_size)
    x, y = data(input_size, n=8)
    model.train()
    model.blocks[0].eval()  # a mixed state
    model.stem.weight.grad = torch.ones_like(model.stem.weight)  # an existing grad; others stay None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    modes = []
    criterion = lambda out, t, reduction="mean": (
        modes.append(model.bn.training),
        F.cross_entropy(out, t, reduction=reduction),
    )[1]
    before = state_of(model)
    GROUP_METRICS[name](model, loader, criterion).run(group)
    assert_same_state(before, state_of(model))
    assert not any(modes)  # every forward in eval mode (BatchNorm statistics cannot move)


@pytest.mark.parametrize("name", ["sensitivity", "taylor", "shapley"])
def test_group_run_leaves_the_model_as_found_on_error(name):
    model, input_size = build("residual")
    group = stream_group(model, input_size)
    x, y = data(input_size, n=8)
    model.train()
    before = state_of(model)
    with pytest.raises(Boom):
        GROUP_METRICS[name](model, batches(x, y), failing_criterion(1)).run(group)
    assert_same_state(before, state_of(model))


def test_group_scores_independent_of_batch_size_and_reductions():
    model, input_size = build("concat", seed=2)
    x, y = data(input_size, n=7, seed=2)
    for group in model_groups(model, input_size):
        for make in (GROUP_METRICS["taylor"], GROUP_METRICS["shapley"], GROUP_METRICS["apoz"]):
            one = make(model, batches(x, y, 7), F.cross_entropy).run(group)
            many = make(model, batches(x, y, 2), F.cross_entropy).run(group)
            np.testing.assert_allclose(many, one, rtol=1e-10, atol=1e-13)
        metric = TaylorAttributionMetric(model, batches(x, y, 3), F.cross_entropy, reduction="none")
        per_example = metric.run(group)
        assert per_example.shape == (7, group.num_units)
        metric.reduction = "sum"
        np.testing.assert_allclose(metric.run(group), per_example.sum(0), rtol=1e-12)


def test_classifier_output_group_has_nothing_to_zero():
    model, input_size = build("plain")
    x, y = data(input_size)
    (output,) = [
        g for g in Pruner(model, input_size=input_size).groups(include_outputs=True) if g.sources[0].module is model[6]
    ]
    with pytest.raises(ValueError, match="only reach the model output"):
        TaylorAttributionMetric(model, batches(x, y), F.cross_entropy).run(output)
    rows = model[6].weight.detach().abs().sum(1)
    np.testing.assert_allclose(WeightNormAttributionMetric(model, None, None).run(output), rows / rows.mean())


def test_captum_refuses_groups_clearly():
    from captum.attr import LayerGradientXActivation

    model, input_size = build("residual")
    x, y = data(input_size)
    metric = CaptumAttributionMetric(model, batches(x, y), F.cross_entropy, method=LayerGradientXActivation)
    with pytest.raises(TypeError, match="CaptumAttributionMetric cannot score a coupled group"):
        metric.run(stream_group(model, input_size))


def test_stale_group_and_group_of_another_model_refused():
    model, input_size = build("residual")
    x, y = data(input_size)
    group = stream_group(model, input_size)
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="not part of the model"):
        TaylorAttributionMetric(other, batches(x, y), F.cross_entropy).run(group)
    Pruner(model, input_size=input_size).prune_model(model.stem, [1])
    for make in (GROUP_METRICS["taylor"], GROUP_METRICS["weight_norm"]):
        with pytest.raises(ValueError, match="compute the groups again"):
            make(model, batches(x, y), F.cross_entropy).run(group)
    fresh = stream_group(model, input_size)
    assert TaylorAttributionMetric(model, batches(x, y), F.cross_entropy).run(fresh).shape == (3,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_group_scores_on_cuda_equal_cpu():
    model, input_size = build("residual", seed=9)
    x, y = data(input_size, seed=9)
    group = stream_group(model, input_size)
    expected = {
        name: GROUP_METRICS[name](model, batches(x, y), F.cross_entropy).run(group)
        for name in ("taylor", "sensitivity", "shapley", "apoz")
    }
    model.cuda()
    group = stream_group(model, input_size)
    for name, cpu in expected.items():
        cuda = GROUP_METRICS[name](model, batches(x, y), F.cross_entropy).run(group)  # batches moved to cuda
        np.testing.assert_allclose(cuda, cpu, rtol=1e-9, atol=1e-12, err_msg=name)


# --------------------------------------------------------------------------------------------
# A multiplicative gate on the units (squeeze-excitation)
# --------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    """``y = x * s`` with ``s = sigmoid(fc2(relu(fc1(pool(x)))))``: fc2 writes the gate of unit c,
    so conv and fc2 are both sources of one group, merged by a product."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.head(h * s)), 1).flatten(1))


def squeeze_excite_twin(model: SqueezeExcite, x, gate):
    """SqueezeExcite's forward written out with ``gate`` on the conv's units after BN and ReLU: the
    gated tensor is read by the pool of the gate branch and by the product, so the product loses
    the unit once; fc2's gate of unit c only ever multiplies the gated unit."""
    h = gate(0, F.relu(model.bn(model.conv(x))))
    s = torch.sigmoid(model.fc2(F.relu(model.fc1(F.adaptive_avg_pool2d(h, 1)))))
    return model.fc(F.adaptive_avg_pool2d(F.relu(model.head(h * s)), 1).flatten(1))


def squeeze_excite(seed: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    return randomize_batchnorms(SqueezeExcite().to(DTYPE), seed).eval(), (3, 6, 6)


def test_squeeze_excite_gate_enters_once_through_the_gated_tensor():
    model, input_size = squeeze_excite(0)
    group = stream_group(model, input_size)
    assert {m.module_name for m in group.members if m.direction == "out"} == {"conv", "fc2"}
    assert [site.name for site, _ in group.entry_points()] == ["relu"]


@pytest.mark.parametrize("seed", [0, 1])
def test_group_taylor_counts_a_multiplicative_gate_once(seed):
    """Scaling the conv's unit and fc2's gate of it by (1 − t) both would scale the product by
    (1 − t)²: twice the first-order term of the joint removal, which is dℓ/dt for the gated
    tensor scaled once (t = 1 is pruning)."""
    model, input_size = squeeze_excite(seed)
    x, y = data(input_size, n=5, seed=seed)
    group = stream_group(model, input_size)
    scores = TaylorAttributionMetric(
        model, batches(x, y, 2), F.cross_entropy, "cpu", reduction="none", signed=True
    ).run(group)
    m = torch.ones(len(x), group.num_units, dtype=DTYPE, requires_grad=True)
    loss = F.cross_entropy(squeeze_excite_twin(model, x, gate_on_units(m)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, m)
    np.testing.assert_allclose(scores, -grad.numpy(), rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # t = 1 is the pruned model
        for unit in (0, 4):
            off = torch.ones(len(x), group.num_units, dtype=DTYPE)
            off[:, unit] = 0
            gated = F.cross_entropy(squeeze_excite_twin(model, x, gate_on_units(off)), y, reduction="none")
            np.testing.assert_allclose(
                gated.numpy(), losses(pruned_copy(model, input_size, group, unit), x, y), rtol=1e-10, atol=1e-12
            )


def test_group_sensitivity_reads_a_multiplicative_gate_once():
    model, input_size = squeeze_excite(2)
    x, y = data(input_size, n=5, seed=2)
    group = stream_group(model, input_size)
    scores = SensitivityAttributionMetric(model, batches(x, y, 3), F.cross_entropy, "cpu", reduction="none").run(group)
    np.testing.assert_allclose(scores, gradient_magnitudes(squeeze_excite_twin, model, x, y), rtol=1e-9, atol=1e-12)
