"""Attribution metrics against independent references (float64 where exactness is asserted).

Oracles: captum's LayerGradientXActivation for Taylor, plain autograd for sensitivity, direct
computations for APoZ and weight norm, telescoping and brute-force enumeration for Shapley, and a
hand-built network (y = max(x1, x2) from ReLU units) whose scores are derived in its docstring.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchpruner.attributions import (
    APoZAttributionMetric,
    CaptumAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.methods.weight_norm import unit_weight_norms
from torchpruner.graph import get_graph

DTYPE = torch.float64


def batches(x, y, batch_size):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def classification_data(shape, n=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=g, dtype=DTYPE), torch.randint(0, classes, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(DTYPE)


def convnet(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).to(DTYPE)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return model


def captum_layer(name):
    import captum.attr

    return getattr(captum.attr, name)


def captum_gxa(model, layer, x, y, attribute_to_layer_input=False):
    """captum's gradient × activation of the per-example negative loss, summed over positions."""
    from captum.attr import LayerGradientXActivation

    def forward(inputs, target):
        return -F.cross_entropy(model(inputs), target, reduction="none")

    attribution = LayerGradientXActivation(forward, layer).attribute(
        x, additional_forward_args=(y,), attribute_to_layer_input=attribute_to_layer_input
    )
    return attribution.detach().reshape(attribution.shape[0], attribution.shape[1], -1).sum(2).numpy()


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, layer_index, shape", [("mlp", 0, (5,)), ("conv", 1, (2, 6, 6)), ("conv", 3, (2, 6, 6))])
@pytest.mark.parametrize("signed", [True, False])
def test_taylor_equals_captum_gradient_x_activation(arch, layer_index, shape, signed):
    model = mlp() if arch == "mlp" else convnet()
    model.eval()
    x, y = classification_data(shape)
    layer = model[layer_index]
    reference = captum_gxa(model, layer, x, y)  # [N, C], signed
    if not signed:
        reference = np.abs(reference)
    metric = TaylorAttributionMetric(model, batches(x, y, 5), F.cross_entropy, "cpu", reduction="none")
    per_example = metric.run(layer, signed=signed)
    np.testing.assert_allclose(per_example, reference, rtol=1e-10, atol=1e-12)
    mean = TaylorAttributionMetric(model, batches(x, y, 5), F.cross_entropy, "cpu", signed=signed).run(layer)
    np.testing.assert_allclose(mean, reference.mean(0), rtol=1e-10, atol=1e-12)
    assert signed or (mean >= 0).all()
    if signed:
        assert (per_example < 0).any() and (per_example > 0).any()  # the sign really is kept


@settings(max_examples=10)
@given(
    widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    layer=st.integers(0, 10),
    batch_size=st.integers(1, 7),
    find_best=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_taylor_equals_captum_on_random_conv_stacks(widths, layer, batch_size, find_best, seed):
    """Random Conv → BN → ReLU stacks; any conv; any batch size; with or without moving past BN/ReLU."""
    torch.manual_seed(seed)
    layers, channels = [], 2
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 3)).to(DTYPE).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
    x, y = classification_data((2, 4, 4), n=7, seed=seed)
    conv_index = 3 * (layer % len(widths))
    expected_layer = model[conv_index + 2] if find_best else model[conv_index]
    reference = captum_gxa(model, expected_layer, x, y)
    metric = TaylorAttributionMetric(
        model, batches(x, y, batch_size), F.cross_entropy, "cpu", reduction="none", signed=True
    )
    np.testing.assert_allclose(metric.run(model[conv_index], find_best), reference, rtol=1e-9, atol=1e-13)


def test_sensitivity_equals_per_example_autograd():
    """Each example alone through the network, gradient by plain autograd: also checks that the
    one-backward per-example trick of the library is exact in eval mode (BatchNorm included)."""
    model = convnet().eval()
    x, y = classification_data((2, 6, 6), n=7)
    head, tail = model[:2], model[2:]  # evaluation point: the BatchNorm output
    expected = []
    for n in range(len(x)):
        z = head(x[n : n + 1]).detach().requires_grad_(True)
        loss = F.cross_entropy(tail(z), y[n : n + 1])
        (g,) = torch.autograd.grad(loss, z)
        expected.append(g.abs().sum(dim=(2, 3))[0])
    expected = torch.stack(expected).numpy()
    model.train()  # the metric must switch to eval mode itself
    metric = SensitivityAttributionMetric(model, batches(x, y, 4), F.cross_entropy, "cpu", reduction="none")
    np.testing.assert_allclose(metric.run(model[1]), expected, rtol=1e-10, atol=1e-13)


def test_apoz_equals_direct_count():
    model = convnet().eval()
    x, y = classification_data((2, 6, 6))
    with torch.no_grad():
        z = model[:3](x)  # after the ReLU
    expected = (z > 0).double().mean(dim=(2, 3)).numpy()
    metric = APoZAttributionMetric(model, batches(x, y, 5), F.cross_entropy, "cpu", reduction="none")
    with pytest.warns(UserWarning, match="not a ReLU-like"):
        metric.run(model[0])  # the conv output: APoZ is not meaningful there
    with warnings_as_errors():
        scores = metric.run(model[0], find_best_evaluation_module=True)  # moves past BN and ReLU
    np.testing.assert_array_equal(scores, expected)
    assert ((scores >= 0) & (scores <= 1)).all()


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def owned_weight_norms(layer: nn.Module, input_shape) -> np.ndarray:
    """Σ|W| over the weights that reach output unit o, found from the gradient's support:
    the weights owned by o are those the sum of output channel o depends on."""
    x = torch.randn((2,) + tuple(input_shape), dtype=DTYPE)
    out = layer(x)
    norms = []
    for o in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, o].sum(), layer.weight, retain_graph=True)
        norms.append(layer.weight.detach().abs()[g != 0].sum().item())
    return np.array(norms)


@settings(max_examples=12)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    transposed=st.booleans(),
)
def test_weight_norm_equals_owned_weights(groups, in_per_group, out_per_group, kernel, transposed):
    torch.manual_seed(groups * 100 + in_per_group * 10 + out_per_group + kernel)
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = cls(groups * in_per_group, groups * out_per_group, kernel, groups=groups).to(DTYPE)
    np.testing.assert_allclose(
        unit_weight_norms(layer).numpy(), owned_weight_norms(layer, (groups * in_per_group, 4, 4)), rtol=1e-12
    )


def test_weight_norm_metric_linear_norms_and_embedding():
    model = mlp()
    x, y = classification_data((5,))
    metric = WeightNormAttributionMetric(model, batches(x, y, 4), F.cross_entropy, "cpu")
    np.testing.assert_allclose(metric.run(model[0]), model[0].weight.detach().abs().sum(1).numpy())
    # no data needed at all: an empty data generator is fine
    assert WeightNormAttributionMetric(model, [], F.cross_entropy).run(model[2]).shape == (3,)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 0.0, 1.0]))
    np.testing.assert_allclose(unit_weight_norms(bn).numpy(), [2.0, 0.5, 0.0, 1.0])
    emb = nn.Embedding(10, 3)
    np.testing.assert_allclose(unit_weight_norms(emb).numpy(), emb.weight.detach().abs().sum(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="no weight"):
        unit_weight_norms(nn.BatchNorm1d(3, affine=False))
    with pytest.raises(ValueError, match="no weight"):
        WeightNormAttributionMetric(model, [], F.cross_entropy).run(model[1])


# --------------------------------------------------------------------------------------------
# Shapley
# --------------------------------------------------------------------------------------------
def loss_with_units_zeroed(head, tail, x, y, zeroed):
    with torch.no_grad():
        z = head(x).clone()
        z[:, list(zeroed)] = 0
        return F.cross_entropy(tail(z), y, reduction="none").numpy()


@settings(max_examples=8)
@given(hidden=st.integers(1, 6), n=st.integers(1, 7), samples=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_shapley_samples_telescope_to_loss_difference(hidden, n, samples, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2)).to(DTYPE)
    x, y = classification_data((3,), n=n, classes=2, seed=seed)
    scores = ShapleyAttributionMetric(
        model, batches(x, y, 3), F.cross_entropy, "cpu", reduction="none", sv_samples=samples, seed=seed
    ).run(model[0])
    assert scores.shape == (n, hidden)
    nothing = loss_with_units_zeroed(model[:1], model[1:], x, y, range(hidden))
    everything = loss_with_units_zeroed(model[:1], model[1:], x, y, [])
    np.testing.assert_allclose(scores.sum(1), nothing - everything, rtol=1e-9, atol=1e-12)


def test_shapley_sample_equals_marginals_along_its_permutation():
    """One sample = the marginals v(S ∪ c) − v(S) along the drawn ordering, computed by hand."""
    from torchpruner.attributions.methods import draw_permutations

    model = mlp(seed=4)
    x, y = classification_data((5,), n=5)
    scores = ShapleyAttributionMetric(
        model, batches(x, y, 2), F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=11
    ).run(model[0], True)
    (order,) = draw_permutations(7, 1, seed=11)
    expected = np.zeros((5, 7))
    active: list[int] = []
    for unit in order.tolist():
        before = -loss_with_units_zeroed(model[:2], model[2:], x, y, [u for u in range(7) if u not in active])
        active.append(unit)
        after = -loss_with_units_zeroed(model[:2], model[2:], x, y, [u for u in range(7) if u not in active])
        expected[:, unit] = after - before
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-14)


def brute_force_shapley(head, tail, x, y):
    """Exact Shapley values of v(S) = −ℓ(only S active), enumerating all 2^n coalitions."""
    units = head(x).shape[1]
    value = {}
    for size in range(units + 1):
        for coalition in itertools.combinations(range(units), size):
            zeroed = [u for u in range(units) if u not in coalition]
            value[frozenset(coalition)] = -loss_with_units_zeroed(head, tail, x, y, zeroed)
    phi = np.zeros((len(x), units))
    for c in range(units):
        for coalition, v in value.items():
            if c in coalition:
                continue
            s = len(coalition)
            weight = math.factorial(s) * math.factorial(units - s - 1) / math.factorial(units)
            phi[:, c] += weight * (value[coalition | {c}] - v)
    return phi


def test_shapley_converges_to_brute_force():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE)
    x, y = classification_data((4,), n=6)
    exact = brute_force_shapley(model[:2], model[2:], x, y).mean(0)  # units after the ReLU
    metric = ShapleyAttributionMetric(model, batches(x, y, 6), F.cross_entropy, "cpu", seed=0)
    few = metric.run(model[0], find_best_evaluation_module=True, sv_samples=3)
    many = metric.run(model[0], find_best_evaluation_module=True, sv_samples=300)
    error_few, error_many = np.abs(few - exact).max(), np.abs(many - exact).max()
    assert error_many < 0.05 * np.abs(exact).max(), (many, exact)
    assert error_many < error_few
    assert np.argsort(many).tolist() == np.argsort(exact).tolist()


def test_shapley_same_permutations_every_batch_and_seeded():
    model = mlp()
    x, y = classification_data((5,), n=10)
    run = lambda bs, seed: ShapleyAttributionMetric(
        model, batches(x, y, bs), F.cross_entropy, "cpu", reduction="none", sv_samples=2, seed=seed
    ).run(model[0])
    one_batch, small_batches = run(10, 7), run(3, 7)
    np.testing.assert_allclose(small_batches, one_batch, rtol=1e-12, atol=1e-14)
    assert not np.allclose(run(10, 8), one_batch)  # another seed draws other permutations


# --------------------------------------------------------------------------------------------
# A network whose answer is derived by hand
# --------------------------------------------------------------------------------------------
def max_network():
    """y = max(x1, x2) = relu(x1 − x2) + relu(x2) − relu(−x2), plus a dead unit."""
    hidden = nn.Linear(2, 4)
    out = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]]))
        hidden.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0]))
        out.weight.copy_(torch.tensor([[1.0, 1.0, -1.0, 1.0]]))
    return nn.Sequential(hidden, nn.ReLU(), out).to(DTYPE)


def offset_mse(output, target, reduction="mean"):
    return F.mse_loss(output[:, 0], target, reduction=reduction)


def test_max_network_rankings_derived_by_hand():
    """Units: u0 = relu(x1 − x2), u1 = relu(x2), u2 = relu(−x2), u3 = relu(−1) (always dead).
    y = u0 + u1 − u2 + u3 = max(x1, x2). Data: x in [0.1, 1]² (so u2 is dead too: it only matters
    for negative x2), target t = max(x1, x2) + 1, loss ℓ = (y − t)², so ∂ℓ/∂y = −2 everywhere and
    ∂ℓ/∂u_c = −2·w_c with w = (1, 1, −1, 1). Per example, a_c = w_c·u_c = (x1 − x2)⁺, x2, 0, 0.

    * Taylor (signed, after the ReLU): −∂ℓ/∂u_c · u_c = 2·a_c → u1 > u0 > u2 = u3 = 0.
    * Sensitivity before the ReLU: 2·|w_c|·[pre-activation > 0] → 2·P(x1 > x2), 2, 0, 0.
    * APoZ after the ReLU: P(active) → P(x1 > x2), 1, 0, 0.
    * Shapley: v(S) = −(Σ_S a − t)² is quadratic, φ_c = a_c·(2t − Σ a) = a_c·(max + 2): null
      players (u2, u3) get exactly 0 in every permutation; u1 > u0 > 0.
    * WeightNorm ignores the data: Σ|W| = 2, 1, 1, 0 → u0 first, the dead-on-data u2 ties u1.
    """
    grid = torch.linspace(0.1, 1.0, 5, dtype=DTYPE)
    x = torch.cartesian_prod(grid, grid)
    x1, x2 = x[:, 0], x[:, 1]
    t = torch.maximum(x1, x2) + 1
    model = max_network()
    with torch.no_grad():
        assert torch.allclose(model(x)[:, 0], torch.maximum(x1, x2))
    data = batches(x, t, 8)
    p_x1_wins = (x1 > x2).double().mean().item()
    a = torch.stack([(x1 - x2).clamp(min=0), x2, 0 * x1, 0 * x1], 1).numpy()

    taylor = TaylorAttributionMetric(model, data, offset_mse, "cpu", reduction="none", signed=True)
    np.testing.assert_allclose(taylor.run(model[0], find_best_evaluation_module=True), 2 * a, atol=1e-12)

    sensitivity = SensitivityAttributionMetric(model, data, offset_mse, "cpu").run(model[0])
    np.testing.assert_allclose(sensitivity, [2 * p_x1_wins, 2, 0, 0], atol=1e-12)

    apoz = APoZAttributionMetric(model, data, offset_mse, "cpu").run(model[0], find_best_evaluation_module=True)
    np.testing.assert_allclose(apoz, [p_x1_wins, 1, 0, 0])

    shapley = ShapleyAttributionMetric(model, data, offset_mse, "cpu", reduction="none", sv_samples=6, seed=0)
    per_example = shapley.run(model[0], find_best_evaluation_module=True)
    assert (per_example[:, 2:] == 0).all()
    scores = per_example.mean(0)
    assert scores[1] > scores[0] > 0
    exact = a * (torch.maximum(x1, x2) + 2).numpy()[:, None]
    exhaustive = ShapleyAttributionMetric(model, data, offset_mse, "cpu", sv_samples=400, seed=1)
    np.testing.assert_allclose(exhaustive.run(model[0], find_best_evaluation_module=True), exact.mean(0), atol=0.03)

    weight_norm = WeightNormAttributionMetric(model, data, offset_mse, "cpu").run(model[0])
    np.testing.assert_allclose(weight_norm, [2, 1, 1, 0])


# --------------------------------------------------------------------------------------------
# Evaluation points on real architectures
# --------------------------------------------------------------------------------------------
class Functional(nn.Module):
    """Activations and pooling as functions, not modules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = F.gelu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_functional_model_evaluation_point_after_f_relu():
    torch.manual_seed(0)
    model = Functional().to(DTYPE).eval()
    x, y = classification_data((2, 8, 8), n=6)
    graph = get_graph(model, (x[:2],))
    site = graph.evaluation_point(model.conv1, find_best=True)
    assert site.kind == "function" and site.is_relu_like
    with torch.no_grad():
        z = F.relu(model.conv1(x))
    apoz = APoZAttributionMetric(model, batches(x, y, 4), F.cross_entropy, "cpu").run(model.conv1, True)
    np.testing.assert_array_equal(apoz, (z > 0).double().mean(dim=(0, 2, 3)).numpy())
    # Shapley zeroes units at the functional site: one sample telescopes to ℓ(none) − ℓ(all)
    scores = ShapleyAttributionMetric(
        model, batches(x, y, 4), F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=0
    ).run(model.conv1, True)
    with torch.no_grad():
        everything = F.cross_entropy(model(x), y, reduction="none")
        rest = lambda h: model.fc(torch.flatten(F.adaptive_avg_pool2d(F.gelu(model.conv2(F.max_pool2d(h, 2))), 1), 1))
        nothing = F.cross_entropy(rest(torch.zeros_like(z)), y, reduction="none")
    np.testing.assert_allclose(scores.sum(1), (nothing - everything).numpy(), rtol=1e-9)
    # gelu is an activation: find_best from conv2 lands on it; Taylor there has conv2's 6 units
    assert TaylorAttributionMetric(model, batches(x, y, 4), F.cross_entropy, "cpu").run(model.conv2, True).shape == (6,)


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).to(DTYPE).eval()
    x, y = classification_data((3, 32, 32), n=3, classes=5)
    return model, x, y


def test_resnet18_bn_before_inplace_relu_equals_captum(resnet):
    """layer1[0].bn1 is followed by ReLU(inplace=True): the captured activation must survive it."""
    model, x, y = resnet
    block = model.layer1[0]
    taylor = TaylorAttributionMetric(model, batches(x, y, 2), F.cross_entropy, "cpu", reduction="none", signed=True)
    np.testing.assert_allclose(taylor.run(block.bn1), captum_gxa(model, block.bn1, x, y), rtol=1e-8, atol=1e-12)
    graph = get_graph(model, (x[:2],))
    assert graph.evaluation_point(block.conv1, find_best=True) is graph.site(block.relu, 0)
    assert graph.evaluation_point(block.bn2, find_best=True) is graph.site(block.bn2)  # stops at `out += identity`


def test_resnet18_apoz_before_inplace_add(resnet):
    """bn2's output is modified in place by `out += identity`: APoZ must see bn2's own output."""
    model, x, y = resnet
    block = model.layer1[0]
    captured = []
    handle = block.bn2.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    expected = (captured[0] > 0).double().mean(dim=(0, 2, 3)).numpy()
    with pytest.warns(UserWarning, match="not a ReLU-like"):
        scores = APoZAttributionMetric(model, batches(x, y, 2), F.cross_entropy, "cpu").run(block.bn2)
    np.testing.assert_array_equal(scores, expected)


def test_resnet18_reused_relu_second_call(resnet):
    """The block's one ReLU runs twice; its second call (after `out += identity`) feeds the next block.
    Taylor there = captum's gradient × input of the next block's conv1 (the same tensor, both paths)."""
    model, x, y = resnet
    taylor = TaylorAttributionMetric(model, batches(x, y, 3), F.cross_entropy, "cpu", reduction="none", signed=True)
    scores = taylor.run(model.layer1[0].relu, call_index=1)
    reference = captum_gxa(model, model.layer1[1].conv1, x, y, attribute_to_layer_input=True)
    np.testing.assert_allclose(scores, reference, rtol=1e-8, atol=1e-12)
    first_call = taylor.run(model.layer1[0].relu, call_index=0)
    assert first_call.shape == scores.shape == (3, 64) and not np.allclose(first_call, scores)


def test_token_linear_units_on_last_dim():
    """[N, L, D] activations: units are the last dim, positions are the tokens."""
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.proj = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, ids):
            return self.head(torch.relu(self.proj(self.emb(ids))).mean(1))

    model = Tokens().to(DTYPE).eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 11, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)
    data = [{"input_ids": ids[:3], "labels": y[:3]}, {"input_ids": ids[3:], "labels": y[3:]}]
    z = model.proj(model.emb(ids)).detach().requires_grad_(True)
    loss = F.cross_entropy(model.head(torch.relu(z).mean(1)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, z)
    expected = (-grad * z).sum(1).abs().detach().numpy()  # sum over tokens, per unit
    taylor = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu", reduction="none")
    np.testing.assert_allclose(taylor.run(model.proj), expected, rtol=1e-10)
    shapley = ShapleyAttributionMetric(model, data, F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=0)
    with torch.no_grad():
        nothing = F.cross_entropy(model.head(torch.zeros(6, 5, dtype=DTYPE)), y, reduction="none")
        everything = F.cross_entropy(model(ids), y, reduction="none")
    np.testing.assert_allclose(shapley.run(model.proj).sum(1), (nothing - everything).numpy(), rtol=1e-9)
    from captum.attr import LayerConductance, LayerIntegratedGradients

    gxa = CaptumAttributionMetric(
        model,
        data,
        F.cross_entropy,
        "cpu",
        method=captum_layer("LayerGradientXActivation"),
        reduction="none",
        absolute=True,
    )
    np.testing.assert_allclose(gxa.run(model.proj), expected, rtol=1e-10)
    layer_ig = CaptumAttributionMetric(
        model, data, F.cross_entropy, "cpu", method=LayerIntegratedGradients, reduction="none", n_steps=200
    ).run(model.proj)
    with torch.no_grad():  # layer IG's baseline: the layer output for token id 0 everywhere
        zero_tokens = F.cross_entropy(model(torch.zeros_like(ids)), y, reduction="none")
    np.testing.assert_allclose(layer_ig.sum(1), (zero_tokens - everything).numpy(), rtol=0.03, atol=1e-4)
    with pytest.raises(TypeError, match="floating-point"):
        CaptumAttributionMetric(model, data, F.cross_entropy, "cpu", method=LayerConductance).run(model.proj)


def test_model_fx_cannot_trace_uses_hooks_graph():
    """Data-dependent control flow: the graph falls back to forward hooks; scores are unchanged."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x):
            h = self.act(self.fc1(x))
            if h.sum() > -1:  # data-dependent: torch.fx cannot trace this
                h = h * 2
            return self.fc2(h)

    torch.manual_seed(0)
    model = Branchy().to(DTYPE).eval()
    x, y = classification_data((5,))
    assert get_graph(model, (x[:2],)).method == "hooks"
    taylor = TaylorAttributionMetric(model, batches(x, y, 5), F.cross_entropy, "cpu", reduction="none", signed=True)
    np.testing.assert_allclose(taylor.run(model.fc1, True), captum_gxa(model, model.act, x, y), rtol=1e-10)
    scores = ShapleyAttributionMetric(
        model, batches(x, y, 5), F.cross_entropy, "cpu", reduction="none", sv_samples=1, seed=0
    ).run(model.fc1, True)
    with torch.no_grad():
        nothing = F.cross_entropy(model.fc2(torch.zeros(len(x), 6, dtype=DTYPE)), y, reduction="none")
        everything = F.cross_entropy(model(x), y, reduction="none")
    np.testing.assert_allclose(scores.sum(1), (nothing - everything).numpy(), rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_honoured():
    cpu_model, cuda_model = convnet(), convnet().cuda()  # same seed, same weights
    x, y = classification_data((2, 6, 6))
    cpu_scores = TaylorAttributionMetric(cpu_model, batches(x, y, 4), F.cross_entropy, "cpu").run(cpu_model[0])
    scores = TaylorAttributionMetric(cuda_model, batches(x, y, 4), F.cross_entropy, torch.device("cuda")).run(
        cuda_model[0]
    )
    np.testing.assert_allclose(scores, cpu_scores, rtol=1e-8)
    cuda_rng = torch.cuda.get_rng_state()
    ShapleyAttributionMetric(cuda_model, batches(x, y, 4), F.cross_entropy, "cuda", sv_samples=1).run(cuda_model[0])
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


# --------------------------------------------------------------------------------------------
# The captum adapter
# --------------------------------------------------------------------------------------------
def test_captum_adapter_gradient_x_activation_is_signed_taylor():
    from captum.attr import LayerGradientXActivation

    model = convnet()
    x, y = classification_data((2, 6, 6))
    data = batches(x, y, 5)
    adapter = CaptumAttributionMetric(model, data, F.cross_entropy, "cpu", method=LayerGradientXActivation)
    taylor = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu", signed=True)
    for find_best in (False, True):
        np.testing.assert_allclose(adapter.run(model[0], find_best), taylor.run(model[0], find_best), rtol=1e-10)
    np.testing.assert_allclose(
        adapter.run(model[0], absolute=True),
        TaylorAttributionMetric(model, data, F.cross_entropy, "cpu").run(model[0]),
        rtol=1e-10,
    )


def test_captum_adapter_methods():
    from captum.attr import (
        InternalInfluence,
        LayerActivation,
        LayerConductance,
        LayerFeatureAblation,
        LayerIntegratedGradients,
    )

    model = convnet().eval()  # eval for the references below
    x, y = classification_data((2, 6, 6), n=6)
    data = batches(x, y, 3)
    with torch.no_grad():
        z = model[:3](x)
    activation = CaptumAttributionMetric(model, data, F.cross_entropy, "cpu", method=LayerActivation)
    np.testing.assert_allclose(activation.run(model[0], True), z.sum(dim=(2, 3)).mean(0).numpy(), rtol=1e-12)
    # Conductance: the adapter gives captum's own numbers for the layer, and completeness holds
    # (per example the unit scores sum to −ℓ(x) − (−ℓ(0)), up to the integration error).
    conductance = CaptumAttributionMetric(
        model,
        data,
        F.cross_entropy,
        "cpu",
        method=LayerConductance,
        reduction="none",
        n_steps=64,
        attribute_kwargs={"method": "riemann_trapezoid"},
    ).run(model[0])
    forward = lambda inputs, target: -F.cross_entropy(model(inputs), target, reduction="none")
    direct = LayerConductance(forward, model[0]).attribute(
        x, additional_forward_args=(y,), n_steps=64, method="riemann_trapezoid"
    )
    np.testing.assert_allclose(conductance, direct.detach().sum(dim=(2, 3)).numpy(), rtol=1e-9, atol=1e-13)
    with torch.no_grad():
        delta = (
            F.cross_entropy(model(torch.zeros_like(x)), y, reduction="none")
            - F.cross_entropy(model(x), y, reduction="none")
        ).numpy()
    np.testing.assert_allclose(conductance.sum(1), delta, rtol=0.03)
    layer_ig = CaptumAttributionMetric(
        model, data, F.cross_entropy, "cpu", method=LayerIntegratedGradients, reduction="none", n_steps=64
    ).run(model[0])
    # layer IG integrates between the layer activations of the input baseline (0) and of x
    np.testing.assert_allclose(layer_ig.sum(1), delta, rtol=0.03)
    everything = loss_with_units_zeroed(model[:1], model[1:], x, y, [])
    influence = CaptumAttributionMetric(model, data, F.cross_entropy, "cpu", method=InternalInfluence, n_steps=8)
    assert influence.run(model[0]).shape == (4,)
    # feature ablation of a whole unit (mask per channel) = ℓ(unit zeroed) − ℓ(all): "leave one out"
    mask = torch.arange(4).reshape(1, 4, 1, 1).expand(1, 4, 6, 6)
    ablation = CaptumAttributionMetric(
        model, data, F.cross_entropy, "cpu", method=LayerFeatureAblation, reduction="none", layer_mask=mask
    ).run(model[0])
    for unit in range(4):
        leave_out = loss_with_units_zeroed(model[:1], model[1:], x, y, [unit]) - everything
        np.testing.assert_allclose(ablation[:, unit] / 36, leave_out, rtol=1e-9, atol=1e-12)


def test_captum_adapter_refuses_model_hooking_methods():
    from captum.attr import LayerDeepLift, LayerLRP

    model = mlp()
    x, y = classification_data((5,))
    for method in (LayerDeepLift, LayerLRP):
        with pytest.raises(TypeError, match="not supported"):
            CaptumAttributionMetric(model, batches(x, y, 4), F.cross_entropy, method=method).run(model[0])
    assert all_hooks_removed(model)


def all_hooks_removed(model):
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_import_without_captum():
    code = (
        "import sys; import torchpruner, torchpruner.attributions; "
        "assert 'captum' not in sys.modules, 'captum imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
