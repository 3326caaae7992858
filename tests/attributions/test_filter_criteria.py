"""Filter-pruning criteria against direct computations (float64).

* WeightNorm ``p=1`` (FilterNorm, the default) and ``p=2``: the L_p norm of the weights each unit
  owns, found from the gradient's support; for a group, per layer over every slice the prune
  removes, each layer divided by its mean; a bad ``p`` is refused naming it.
* FPGM: each filter's summed L2 distance to the layer's other filters, by a double loop; for a
  group, over the concatenation of every slice removed with the unit, each layer's slices divided
  by their mean L2 norm; no data.
* ThiNet: the greedy order in which the next layer's input channels are removed, each step taking
  the channel whose removal (with those already removed) least changes that layer's output, by a
  brute-force greedy that really zeroes the channels and re-runs the consumer; the sampled
  contributions of each channel add up to the consumer's output at the sampled entries; clear
  errors for layers without exactly one Conv/Linear consumer; the model is left as found.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unchanged, snapshot
from test_attributions_groups import build, model_groups, stream_group
from test_experiments import TINY_CNN
from torch import nn

from experiments import compare_criteria
from experiments.common import DEFAULT_CRITERIA
from torchpruner import FPGMAttributionMetric as TopLevelFPGM
from torchpruner import ThiNetAttributionMetric as TopLevelThiNet
from torchpruner.attributions import (
    FPGMAttributionMetric,
    ThiNetAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.methods.thinet import (
    channel_contributions,
    greedy_removal_order,
)

DTYPE = torch.float64


def owned(layer: nn.Module, input_shape) -> list[torch.Tensor]:
    """The weights each output unit owns, from the gradient's support (a direct reading of the
    layer, independent of any layout rule), flattened in the weight's own order."""
    x = torch.randn((2,) + tuple(input_shape), dtype=DTYPE)
    out = layer(x)
    slices = []
    for o in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, o].sum(), layer.weight, retain_graph=True)
        slices.append(layer.weight.detach()[g != 0])
    return slices


LAYERS = {
    "conv": (lambda: nn.Conv2d(3, 5, 3), (3, 5, 5)),
    "grouped_conv": (lambda: nn.Conv2d(4, 6, 2, groups=2), (4, 4, 4)),
    "conv_transpose": (lambda: nn.ConvTranspose2d(4, 6, 2, groups=2), (4, 3, 3)),
    "linear": (lambda: nn.Linear(7, 4), (7,)),
}


def layer_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    make, shape = LAYERS[name]
    torch.manual_seed(seed)
    return nn.Sequential(make().to(DTYPE)), shape


# --------------------------------------------------------------------------------------------
# WeightNorm p
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_weight_norm_p_is_the_lp_norm_of_the_owned_weights(name, p):
    model, shape = layer_model(name)
    expected = [float((w.abs() ** p).sum() ** (1 / p)) for w in owned(model[0], shape)]
    metric = WeightNormAttributionMetric(model, None, None, p=p)
    np.testing.assert_allclose(metric.run(model[0]), expected, rtol=1e-12)
    # the default is FilterNorm: p = 1 (the seed's behaviour)
    if p == 1:
        np.testing.assert_allclose(WeightNormAttributionMetric(model, None, None).run(model[0]), expected, rtol=1e-12)


def test_weight_norm_p2_of_a_group_by_hand():
    """Each layer's per-unit L2 norm over the slice the prune removes, divided by its mean."""
    model, input_size = build("residual", seed=6)
    group = stream_group(model, input_size)
    l2 = lambda w, dims: w.detach().pow(2).sum(dims).sqrt()
    per_layer = [l2(model.stem.weight, (1, 2, 3)), model.bn.weight.detach().abs(), l2(model.fc.weight, 0)]
    for block in model.blocks:
        per_layer += [
            l2(block.conv1.weight, (0, 2, 3)),
            l2(block.conv2.weight, (1, 2, 3)),
            block.bn2.weight.detach().abs(),
        ]
    expected = sum(v / v.mean() for v in per_layer)
    np.testing.assert_allclose(
        WeightNormAttributionMetric(model, None, None, p=2).run(group), expected.numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(
        WeightNormAttributionMetric(model, None, None).run(group, p=2), expected.numpy(), rtol=1e-12
    )


@pytest.mark.parametrize(
    "p, error",
    [
        (0, ValueError),
        (0.5, ValueError),
        (-1, ValueError),
        (math.nan, ValueError),
        ("2", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_weight_norm_refuses_a_bad_p(p, error):
    model, _ = layer_model("linear")
    with pytest.raises(error, match=r"\bp\b"):
        WeightNormAttributionMetric(model, None, None, p=p)
    metric = WeightNormAttributionMetric(model, None, None)
    with pytest.raises(error, match=r"\bp\b"):
        metric.run(model[0], p=p)


def test_weight_norm_p_infinity_is_the_largest_weight():
    model, shape = layer_model("conv")
    expected = [float(w.abs().max()) for w in owned(model[0], shape)]
    np.testing.assert_allclose(WeightNormAttributionMetric(model, None, None, p=math.inf).run(model[0]), expected)


# --------------------------------------------------------------------------------------------
# FPGM
# --------------------------------------------------------------------------------------------
def summed_distances(vectors: list[np.ndarray]) -> np.ndarray:
    return np.array([sum(float(np.sqrt(((a - b) ** 2).sum())) for b in vectors) for a in vectors])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fpgm_is_the_summed_distance_to_the_other_filters(name):
    model, shape = layer_model(name, seed=3)
    filters = [w.numpy() for w in owned(model[0], shape)]
    scores = FPGMAttributionMetric(model, None, None).run(model[0])  # no data needed
    np.testing.assert_allclose(scores, summed_distances(filters), rtol=1e-12)
    assert TopLevelFPGM is FPGMAttributionMetric


def test_fpgm_prunes_the_filter_nearest_the_geometric_median_first():
    """Filters on a line at 0, 1, 2 and 10: the one at 2 is nearest the others (lowest), the
    outlier at 10 the farthest; a duplicated filter is redundant with its twin."""
    layer = nn.Linear(3, 5, bias=False).to(DTYPE)
    direction = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([t * direction for t in (0.0, 1.0, 2.0, 10.0, 2.0)]))
    scores = FPGMAttributionMetric(nn.Sequential(layer), None, None).run(layer)
    assert scores[2] == scores[4] == scores.min()
    assert scores.argmax() == 3


def test_fpgm_of_a_group_concatenates_every_slice_normalised_per_layer():
    model, input_size = build("residual", seed=4)
    group = stream_group(model, input_size)
    rows = lambda w: w.detach().reshape(w.shape[0], -1)  # output unit c: W[c]
    columns = lambda w: w.detach().transpose(0, 1).reshape(w.shape[1], -1)  # input unit c: W[:, c]
    per_layer = [rows(model.stem.weight), model.bn.weight.detach().reshape(-1, 1), columns(model.fc.weight)]
    for block in model.blocks:
        per_layer += [columns(block.conv1.weight), rows(block.conv2.weight), block.bn2.weight.detach().reshape(-1, 1)]
    normalised = [s / s.norm(dim=1).mean() for s in per_layer]
    joined = torch.cat(normalised, dim=1).numpy()
    scores = FPGMAttributionMetric(model, None, None).run(group)
    np.testing.assert_allclose(scores, summed_distances(list(joined)), rtol=1e-12)


def test_fpgm_of_a_group_with_flattened_consumer():
    """A channel flattened into a Linear owns its H*W input columns, concatenated."""
    model, input_size = build("separable", seed=8)
    (last,) = [g for g in model_groups(model, input_size) if g.sources[0].module is model[6]]
    filters = model[6].weight.detach().reshape(5, -1)
    columns = model[9].weight.detach().reshape(3, 5, 16).transpose(0, 1).reshape(5, -1)
    joined = torch.cat([filters / filters.norm(dim=1).mean(), columns / columns.norm(dim=1).mean()], 1).numpy()
    np.testing.assert_allclose(
        FPGMAttributionMetric(model, None, None).run(last), summed_distances(list(joined)), rtol=1e-12
    )


def test_fpgm_refuses_a_layer_without_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no weight"):
        FPGMAttributionMetric(model, None, None).run(model[1])


# --------------------------------------------------------------------------------------------
# ThiNet
# --------------------------------------------------------------------------------------------
class ConvChain(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> ReLU -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2, padding=1, dilation=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def chain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvChain().to(DTYPE)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.train()  # scoring must switch to eval mode and back


def image_batches(seed: int = 0, n: int = 3, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 2, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def consumer_inputs(model: nn.Module, consumer: nn.Module, loader) -> list[torch.Tensor]:
    captured = []
    handle = consumer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    try:
        model.eval()
        with torch.no_grad():
            for x, _ in loader:
                model(x)
    finally:
        handle.remove()
    return captured


def brute_force_greedy(consumer: nn.Module, inputs: list[torch.Tensor], channels: int, owner=lambda j: j) -> list[int]:
    """Remove, one at a time, the channel whose removal (with those already removed) changes the
    consumer's output least (squared error over every output entry): zero the input features
    ``owner`` maps to the removed channels and re-run the consumer."""
    with torch.no_grad():
        full = [consumer(x) for x in inputs]
        removed: list[int] = []
        for _ in range(channels):
            best, best_error = None, None
            for c in range(channels):
                if c in removed:
                    continue
                errors = 0.0
                for x, y in zip(inputs, full):
                    z = x.clone()
                    gone = [j for j in range(x.shape[1]) if owner(j) in removed + [c]]
                    z[:, gone] = 0
                    errors += float(((consumer(z) - y) ** 2).sum())
                if best_error is None or errors < best_error - 1e-12:
                    best, best_error = c, errors
            removed.append(best)
    return removed


def scores_of(order: list[int]) -> np.ndarray:
    scores = np.empty(len(order))
    scores[order] = (np.arange(len(order)) + 1) / len(order)
    return scores


def test_thinet_equals_brute_force_greedy_into_a_conv():
    model, loader = chain_model(1), image_batches(1)
    before = snapshot(model)
    rng = torch.get_rng_state()
    scores = ThiNetAttributionMetric(model, loader, None, samples_per_batch=None).run(model.conv1)
    assert_unchanged(before, model)
    assert torch.equal(torch.get_rng_state(), rng)
    order = brute_force_greedy(model.conv2, consumer_inputs(model, model.conv2, loader), 5)
    np.testing.assert_allclose(scores, scores_of(order))
    assert TopLevelThiNet is ThiNetAttributionMetric


def test_thinet_equals_brute_force_greedy_into_a_flattened_linear():
    """conv2's channel c reaches fc as its 3x3 flattened columns."""
    model, loader = chain_model(2), image_batches(2)
    scores = ThiNetAttributionMetric(model, loader, None, samples_per_batch=None).run(model.conv2)
    order = brute_force_greedy(model.fc, consumer_inputs(model, model.fc, loader), 4, owner=lambda j: j // 9)
    np.testing.assert_allclose(scores, scores_of(order))


def test_thinet_of_a_group_is_the_layer_score_and_reductions_see_one_row():
    model, loader = chain_model(3), image_batches(3)
    (group,) = [g for g in model_groups(model, (2, 6, 6)) if g.sources[0].module is model.conv1]
    metric = ThiNetAttributionMetric(model, loader, None, samples_per_batch=7, seed=5)
    np.testing.assert_allclose(metric.run(group), metric.run(model.conv1))
    none = ThiNetAttributionMetric(model, loader, None, reduction="none", samples_per_batch=7, seed=5)
    np.testing.assert_allclose(none.run(model.conv1), metric.run(model.conv1)[None])


def test_thinet_mlp_into_a_linear():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    g = torch.Generator().manual_seed(4)
    loader = [(torch.randn(8, 5, generator=g, dtype=DTYPE), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    scores = ThiNetAttributionMetric(model, loader, None, samples_per_batch=None).run(model[0])
    order = brute_force_greedy(model[2], consumer_inputs(model, model[2], loader), 6)
    np.testing.assert_allclose(scores, scores_of(order))


def test_thinet_sampling_is_seeded():
    model, loader = chain_model(5), image_batches(5)
    run = lambda **kw: ThiNetAttributionMetric(model, loader, None, samples_per_batch=6, **kw).run(model.conv1)
    np.testing.assert_array_equal(run(seed=1), run(seed=1))
    assert sorted(run(seed=2).tolist()) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert any(not np.array_equal(run(seed=1), run(seed=s)) for s in range(2, 12))


@pytest.mark.parametrize("consumer", ["conv", "conv1d_circular", "conv_same_reflect", "linear"])
def test_sampled_contributions_add_up_to_the_consumer_output(consumer):
    torch.manual_seed(6)
    if consumer.startswith("conv"):
        layer = {
            "conv": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
            "conv1d_circular": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
            "conv_same_reflect": lambda: nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect"),
        }[consumer]().to(DTYPE)
        x = torch.randn((2, 3, 7) if consumer == "conv1d_circular" else (2, 3, 7, 7), dtype=DTYPE)
        y = (layer(x) - layer.bias.view(1, -1, *[1] * (x.dim() - 2))).detach().flatten()
    else:
        layer = nn.Linear(6, 4).to(DTYPE)
        x = torch.randn(2, 5, 6, dtype=DTYPE)  # tokens: features on the last dim
        y = (layer(x) - layer.bias).detach().movedim(-1, 1).flatten()
    generator = torch.Generator().manual_seed(0)
    contributions, index = channel_contributions(layer, x, 9, generator)
    assert contributions.shape == (9, 3 if consumer.startswith("conv") else 6) and contributions.dtype == DTYPE
    torch.testing.assert_close(contributions.sum(1), y[index], rtol=1e-12, atol=1e-12)
    everything, index = channel_contributions(layer, x, None, generator)
    assert len(index) == y.numel()
    torch.testing.assert_close(everything.sum(1), y[index], rtol=1e-12, atol=1e-12)


def test_greedy_removal_order_brute_force():
    g = torch.Generator().manual_seed(7)
    contributions = torch.randn(30, 5, generator=g, dtype=DTYPE)
    order = greedy_removal_order(contributions)
    removed: list[int] = []
    for _ in range(5):
        rest = [c for c in range(5) if c not in removed]
        removed.append(min(rest, key=lambda c: float(contributions[:, removed + [c]].sum(1).pow(2).sum())))
    assert order == removed
    assert sorted(order) == list(range(5))


def test_thinet_refuses_layers_without_one_conv_or_linear_consumer():
    model, input_size = build("residual", seed=0)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, *input_size, generator=g, dtype=DTYPE), torch.zeros(2, dtype=torch.long))]
    metric = ThiNetAttributionMetric(model, loader, None)
    before = snapshot(model)
    with pytest.raises(ValueError, match="exactly one"):
        metric.run(model.stem)  # the residual stream feeds conv1 of each block and fc
    with pytest.raises(ValueError, match="exactly one"):
        metric.run(stream_group(model, input_size))
    with pytest.raises(ValueError, match="model output|no .*consumer"):
        metric.run(model.fc)
    assert_unchanged(before, model)
    with pytest.raises(TypeError, match="samples_per_batch"):
        ThiNetAttributionMetric(model, loader, None, samples_per_batch=2.5)
    with pytest.raises(ValueError, match="samples_per_batch"):
        ThiNetAttributionMetric(model, loader, None, samples_per_batch=0)


def test_thinet_refuses_a_grouped_consumer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    ).to(DTYPE)
    loader = [(torch.randn(2, 2, 6, 6, dtype=DTYPE), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="groups"):
        ThiNetAttributionMetric(model, loader, None).run(model[0])


def test_thinet_needs_data():
    model = chain_model(0)
    with pytest.raises(ValueError, match="no batches"):
        ThiNetAttributionMetric(model, [], None).run(model.conv1)


# --------------------------------------------------------------------------------------------
# The criteria-comparison study
# --------------------------------------------------------------------------------------------
def test_fpgm_and_thinet_are_rows_of_the_criteria_comparison(tmp_path):
    assert {"fpgm", "thinet"} <= set(DEFAULT_CRITERIA)
    payload = compare_criteria.main(
        ["--results", str(tmp_path), *TINY_CNN, "--criteria", "fpgm,thinet", "--verify-points", "1"]
    )
    assert {row["criterion"] for row in payload["summary"]} == {"fpgm", "thinet"}
    assert payload["verification"]["max_abs_loss_diff"] < 1e-4
