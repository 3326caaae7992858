"""The tracer: call sites, unit axes, evaluation points, interception, and leaving the model alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from torchpruner.graph import ModelGraph, get_graph, make_example_inputs, unwrap_model
from torchpruner.graph.trace import invalidate_graph

from oracles import assert_unchanged, snapshot


def _graph(model, input_size, **kw):
    return ModelGraph(model, *make_example_inputs(model, input_size), **kw)


class FunctionalNet(nn.Module):
    """Activations are functional calls: no module to hook after the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.silu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class ControlFlowNet(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the hooks fallback must."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if h.sum() > -1e9:  # always true, but fx cannot know
            h = h * 1.0
        return self.fc2(h)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = self.stem(x)
        return self.relu(self.bn(self.conv(s)) + s)


def test_sequential_evaluation_points_and_unit_axis():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.Tanh(),
        nn.Linear(5, 2),
    )
    graph = _graph(model, (1, 8, 8))
    assert graph.method == "fx"
    assert graph.evaluation_point(model[0]).module is model[0]
    best = graph.evaluation_point(model[0], find_best=True)
    assert best.module is model[3]  # past BN, ReLU and Dropout; stops before Flatten
    assert best.unit_axis == 1 and best.num_units == 4
    assert graph.evaluation_point(model[5], find_best=True).module is model[6]
    assert graph.site(model[7]).num_units == 2


def test_functional_activation_is_an_evaluation_point():
    model = FunctionalNet()
    graph = _graph(model, (3, 8, 8))
    best = graph.evaluation_point(model.conv, find_best=True)
    assert best.kind == "function" and best.target is F.silu
    assert best.num_units == 6


def test_stops_at_merge():
    model = Residual()
    graph = _graph(model, (3, 6, 6))
    assert graph.evaluation_point(model.conv, find_best=True).module is model.bn
    # the stem feeds both the conv and the add: two users, so it does not move
    assert graph.evaluation_point(model.stem, find_best=True).module is model.stem


def test_token_linear_units_on_last_axis():
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.LayerNorm(10), nn.Linear(10, 3))
    graph = ModelGraph(model, (torch.randn(2, 7, 6),))
    site = graph.evaluation_point(model[0], find_best=True)
    assert site.module is model[1]
    assert site.unit_axis == 2 and site.num_units == 10
    assert graph.site(model[2]).unit_axis == 2


def test_embedding_with_integer_inputs():
    model = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 4))
    args, kwargs = make_example_inputs(model, example_inputs=torch.randint(0, 20, (2, 5)))
    graph = ModelGraph(model, args, kwargs)
    assert graph.site(model[0]).unit_axis == 2
    assert graph.site(model[1]).num_units == 4


def test_hooks_fallback_for_untraceable_models():
    model = ControlFlowNet()
    graph = _graph(model, (5,))
    assert graph.method == "hooks" and graph.fx_error is not None
    best = graph.evaluation_point(model.fc1, find_best=True)
    assert best.module is model.act
    assert [s.module for s in graph.sites] == [model.fc1, model.act, model.fc2]


def test_resnet18_reused_relu_and_inplace_add():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    graph = _graph(model, (3, 32, 32))
    block = model.layer1[0]
    relu_sites = graph.sites_of(block.relu)
    assert len(relu_sites) == 2 and [s.call_index for s in relu_sites] == [0, 1]
    assert graph.evaluation_point(block.conv1, find_best=True) is relu_sites[0]
    assert graph.evaluation_point(block.conv2, find_best=True).module is block.bn2  # stops at the add

    # Intercepting the second call only: capture, and a clone protects it from in-place ops.
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    captured = {}

    def capture(z):
        captured["z"] = z
        return z.clone()

    with graph.intercept({relu_sites[1]: capture}) as forward:
        out = forward(x)
    expected = {}
    handle = block.register_forward_hook(lambda m, i, o: expected.setdefault("z", o.clone()))
    try:
        reference = model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(captured["z"], expected["z"])  # block output == 2nd relu call


def test_intercept_masks_a_functional_site_and_removes_probes():
    model = FunctionalNet().double().eval()
    graph = _graph(model, (3, 8, 8))
    site = graph.evaluation_point(model.conv, find_best=True)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float64).view(1, 6, 1, 1)
    with graph.intercept({site: lambda z: z * mask}) as forward:
        masked = forward(x)
    y = F.silu(model.bn(model.conv(x))) * mask
    torch.testing.assert_close(masked, model.fc(y.mean((2, 3))))
    assert not torch.allclose(model(x), masked)


def test_intercept_removes_hooks_on_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    graph = _graph(model, (3,))

    def boom(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with graph.intercept({graph.site(model[1]): boom}) as forward:
            forward(torch.randn(2, 3))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_tracing_leaves_model_untouched():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.ReLU())
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    before = snapshot(model)  # modes, BatchNorm statistics, hooks (none)
    rng = torch.get_rng_state()
    for method in ("fx", "hooks"):
        _graph(model, (1, 6, 6), method=method)
        assert [m.training for m in model.modules()] == [True, True, False, True, True]
        assert_unchanged(before, model)
        assert torch.equal(torch.get_rng_state(), rng)
        for module in model.modules():
            assert not module._forward_hooks


def test_errors_name_the_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    graph = _graph(model, (3,))
    with pytest.raises(ValueError, match="not a submodule"):
        graph.sites_of(nn.Linear(3, 4))
    unused = ControlFlowNet()
    unused.extra = nn.Linear(4, 4)  # registered, never called
    with pytest.raises(ValueError, match="'extra'.*never called"):
        _graph(unused, (5,)).sites_of(unused.extra)
    with pytest.raises(ValueError, match="call_index 3"):
        graph.site(model[0], call_index=3)


def test_unwrap_and_refuse_wrappers():
    model = nn.Linear(3, 2)
    assert unwrap_model(torch.compile(model)) is model
    with pytest.raises(TypeError, match="DataParallel"):
        unwrap_model(nn.DataParallel(model))


def test_cache_is_shared_and_rebuilt_after_a_shape_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    args, kwargs = make_example_inputs(model, (3,))
    graph = get_graph(model, args, kwargs)
    assert get_graph(model, (torch.randn(9, 3),)) is graph  # batch size does not matter
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data[:2]
        model[0].bias.data = model[0].bias.data[:2]
        model[2].weight.data = model[2].weight.data[:, :2]
    rebuilt = get_graph(model, args, kwargs)
    assert rebuilt is not graph and rebuilt.site(model[0]).num_units == 2
    invalidate_graph(model)
    assert get_graph(model, args, kwargs) is not rebuilt


@settings(max_examples=15)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    act=st.sampled_from([nn.ReLU, nn.Sigmoid, nn.GELU]),
    bn=st.booleans(),
)
def test_random_mlps_every_linear_has_its_width(widths, act, bn):
    layers, prev = [], 3
    for width in widths:
        layers += [nn.Linear(prev, width)] + ([nn.BatchNorm1d(width)] if bn else []) + [act()]
        prev = width
    model = nn.Sequential(*layers)
    graph = _graph(model, (3,))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for linear, width in zip(linears, widths):
        assert graph.site(linear).num_units == width
        best = graph.evaluation_point(linear, find_best=True)
        assert isinstance(best.module, act) and best.num_units == width


def test_cached_graph_does_not_keep_the_model_alive():
    import copy
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    graph = get_graph(model, *make_example_inputs(model, (3,)))
    clone = copy.deepcopy(model)  # a copy does not inherit the cached graph
    assert get_graph(clone, *make_example_inputs(clone, (3,))) is not graph
    ref = weakref.ref(model)
    del model, graph, clone
    gc.collect()
    assert ref() is None
