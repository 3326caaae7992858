"""The traced-graph cache follows the model it describes, and tracing leaves nothing behind.

- A cached graph is reused only while it describes the live model: a submodule, a parameter or a
  forward-relevant attribute replaced by a new object of the same shape gives a new trace, so
  scores are those of the new module and a Pruner (old or new) prunes it.
- The cache holds no strong reference that keeps a replaced module alive.
- The generated source of every fx graph module the library creates (one per trace, one per
  scoring run at a functional evaluation point) is released from ``linecache`` and torch.fx's
  loader, so periodic pruning inside a training run holds constant memory.
- When torch.fx fails, the message names the module whose code it could not trace.
- The tracer names each parameter and buffer a traced forward reads as torch.fx's own search
  does (the first name of a shared tensor, a buffer replaced while tracing by its new object).
"""

from __future__ import annotations

import copy
import gc
import linecache
import logging
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracles import (
    assert_prune_equals_zeroed_twin,
    assert_unchanged,
    masked_units,
    snapshot,
)
import torch.fx as fx
from torch.fx import graph_module as fx_graph_module
from torch.utils.data import DataLoader, TensorDataset

from torchpruner import APoZAttributionMetric, Pruner, TaylorAttributionMetric
from torchpruner.graph import get_graph
from torchpruner.graph.dependency import DependencyError
from torchpruner.graph.trace import _LeafTracer


class HeadNet(nn.Module):
    """fc -> F.relu (a functional evaluation point) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(x)))


class ScaledNet(HeadNet):
    """A bare parameter read in forward (an fx ``get_attr``) after the evaluation point."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(x)) * self.scale)


class ActNet(HeadNet):
    """The activation is a plain attribute; the flag is a plain bool read in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.act = F.relu
        self.double_it = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.fc(x))
        if self.double_it:
            z = z * 2
        return self.head(z)


def _data(in_features: int = 4, classes: int = 3, n: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, in_features, dtype=torch.float64, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _taylor(model: nn.Module, module: nn.Module, data: DataLoader, **kwargs) -> np.ndarray:
    return TaylorAttributionMetric(model, data, F.cross_entropy, "cpu").run(module, **kwargs)


def _fresh_scores(model: nn.Module, name: str, data: DataLoader, **kwargs) -> np.ndarray:
    fresh = copy.deepcopy(model)  # a deep copy starts with an empty cache
    return _taylor(fresh, fresh.get_submodule(name), data, **kwargs)


# --------------------------------------------------------------------------------------------
# A replaced submodule, parameter or attribute gives a new trace
# --------------------------------------------------------------------------------------------


def test_replaced_submodule_scores_at_a_functional_point_are_those_of_the_new_module():
    torch.manual_seed(0)
    model, data = HeadNet().double(), _data()
    attr = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    before = attr.run(model.fc, find_best_evaluation_module=True)
    model.head = nn.Linear(6, 3).double()
    after = attr.run(model.fc, find_best_evaluation_module=True)
    expected = _fresh_scores(model, "fc", data, find_best_evaluation_module=True)
    np.testing.assert_allclose(after, expected, rtol=1e-12, atol=0)
    assert not np.allclose(before, after)  # the new head does change the scores


def test_replaced_submodule_can_itself_be_scored():
    torch.manual_seed(0)
    model, data = HeadNet().double(), _data()
    _taylor(model, model.fc, data)
    model.head = nn.Linear(6, 3).double()
    np.testing.assert_allclose(_taylor(model, model.head, data), _fresh_scores(model, "head", data), rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["existing", "new"])
def test_replaced_submodule_is_pruned_by_an_existing_or_a_new_pruner(which):
    torch.manual_seed(0)
    model = HeadNet().double().eval()
    pruner = Pruner(model, input_size=(4,))
    pruner.groups()  # trace and analyse before the replacement
    model.head = nn.Linear(6, 3).double().eval()
    if which == "new":
        pruner = Pruner(model, input_size=(4,))
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc, [1, 4]), lambda twin: masked_units(twin.fc, [1, 4]), x
    )
    assert model.head.in_features == 4 and model.head.weight.shape == (3, 4)


def test_groups_from_before_a_replacement_are_refused_as_stale():
    model = HeadNet().double()
    pruner = Pruner(model, input_size=(4,))
    group = pruner.groups()[0]
    model.head = nn.Linear(6, 3).double()
    before = snapshot(model)
    with pytest.raises(ValueError, match="stale.*pruner.groups"):
        pruner.prune_group(group, [0])
    assert_unchanged(before, model)
    fresh = pruner.groups()[0]
    pruner.prune_group(fresh, [0])
    assert model.head.in_features == 5


def test_replacing_the_consumer_with_another_shape_is_followed_too():
    torch.manual_seed(0)
    model = HeadNet().double().eval()
    pruner = Pruner(model, input_size=(4,))
    pruner.groups()
    model.head = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc, [0]), lambda twin: masked_units(twin.fc, [0]), x
    )


def test_replaced_parameter_read_in_forward_gives_fresh_scores():
    torch.manual_seed(0)
    model, data = ScaledNet().double(), _data()
    attr = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    attr.run(model.fc, find_best_evaluation_module=True)
    model.scale = nn.Parameter(torch.linspace(0.1, 3.0, 6, dtype=torch.float64))
    after = attr.run(model.fc, find_best_evaluation_module=True)
    np.testing.assert_allclose(
        after, _fresh_scores(model, "fc", data, find_best_evaluation_module=True), rtol=1e-12, atol=0
    )


def test_replaced_layer_parameter_gives_a_new_graph():
    model = HeadNet().double()
    args = (torch.randn(2, 4, dtype=torch.float64),)
    graph = get_graph(model, args)
    assert get_graph(model, args) is graph  # unchanged model: the cached graph
    model.fc.weight = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    assert get_graph(model, args) is not graph


def test_swapped_activation_attribute_gives_fresh_scores():
    torch.manual_seed(0)
    model, data = ActNet().double(), _data()
    attr = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    attr.run(model.fc, find_best_evaluation_module=True)
    model.act = torch.tanh
    after = attr.run(model.fc, find_best_evaluation_module=True)
    np.testing.assert_allclose(
        after, _fresh_scores(model, "fc", data, find_best_evaluation_module=True), rtol=1e-12, atol=0
    )


def test_flipped_flag_read_in_forward_gives_fresh_scores():
    torch.manual_seed(0)
    model, data = ActNet().double(), _data()
    attr = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    attr.run(model.fc, find_best_evaluation_module=True)
    model.double_it = True
    after = attr.run(model.fc, find_best_evaluation_module=True)
    np.testing.assert_allclose(
        after, _fresh_scores(model, "fc", data, find_best_evaluation_module=True), rtol=1e-12, atol=0
    )


def test_scoring_and_training_mode_do_not_retrace():
    model, data = HeadNet().double(), _data()
    args = (torch.randn(2, 4, dtype=torch.float64),)
    graph = get_graph(model, args)
    _taylor(model, model.fc, data, find_best_evaluation_module=True)
    model.train()
    assert get_graph(model, args) is graph
    model.eval()
    assert get_graph(model, args) is graph


def test_the_cache_does_not_keep_a_replaced_module_alive():
    model = HeadNet().double()
    args = (torch.randn(2, 4, dtype=torch.float64),)
    get_graph(model, args)
    old = weakref.ref(model.head)
    model.head = nn.Linear(6, 3).double()
    get_graph(model, args)
    gc.collect()
    assert old() is None


# --------------------------------------------------------------------------------------------
# Generated source is released
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = Block(8, 64)
        self.block2 = Block(8, 16)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _source_cache_sizes() -> tuple[int, int]:
    return len(linecache.cache), len(fx_graph_module._loader.eval_cache)


def test_fifty_prune_and_score_cycles_hold_the_source_caches_constant():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 4, (4,))
    data = DataLoader(TensorDataset(x, y), batch_size=4)
    pruner = Pruner(model, input_size=(3, 8, 8))
    taylor = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    apoz = APoZAttributionMetric(model, data, F.cross_entropy, "cpu")
    sizes = []
    for cycle in range(50):
        scores = taylor.run(model.block1.conv1, find_best_evaluation_module=True)  # at F.relu
        pruner.prune_model(model.block1.conv1, [int(np.argmin(scores))])
        apoz.run(model.block2.conv1, find_best_evaluation_module=True)
        sizes.append(_source_cache_sizes())
    assert model.block1.conv1.out_channels == 14
    lines_growth = sizes[-1][0] - sizes[4][0]
    loader_growth = sizes[-1][1] - sizes[4][1]
    assert lines_growth <= 3 and loader_growth <= 3, sizes


def test_a_collected_model_leaves_no_generated_source_behind():
    model = HeadNet()
    graph = get_graph(model, (torch.randn(2, 4),))
    key = type(graph.traced).forward.__code__.co_filename
    assert key in fx_graph_module._loader.eval_cache  # the live graph keeps its source for tracebacks
    del model, graph
    gc.collect()
    assert key not in fx_graph_module._loader.eval_cache and key not in linecache.cache


def test_a_replaced_trace_releases_its_source():
    model = HeadNet()
    args = (torch.randn(2, 4),)
    old = get_graph(model, args)
    key = type(old.traced).forward.__code__.co_filename
    model.head = nn.Linear(6, 3)
    get_graph(model, args)
    assert key not in fx_graph_module._loader.eval_cache and key not in linecache.cache
    assert old.traced(*args).shape == (2, 3)  # the old graph module still runs


# --------------------------------------------------------------------------------------------
# The fx failure names the module that failed
# --------------------------------------------------------------------------------------------


class GatedConv(nn.Conv2d):
    """A Conv subclass outside torch.nn, traced through, with data-dependent control flow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if y.sum() > 0 else -y


def _gated_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), GatedConv(4, 5, 3), nn.Flatten(), nn.Linear(80, 2))


def test_fx_failure_names_the_module_that_failed(caplog):
    model = _gated_model()
    with caplog.at_level(logging.INFO, logger="torchpruner.graph.trace"):
        graph = get_graph(model, (torch.randn(2, 3, 8, 8),))
    assert graph.method == "hooks"
    assert "'2' (GatedConv)" in graph.fx_failure
    assert "control flow" in graph.fx_failure
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "'2' (GatedConv)" in messages and "control flow" in messages


def test_dependency_error_names_the_module_that_failed():
    model = _gated_model()
    pruner = Pruner(model, input_size=(3, 8, 8))
    with pytest.raises(DependencyError, match=r"'2' \(GatedConv\).*control flow"):
        pruner.prune_model(model[0], [0])


def test_fx_failure_in_the_model_forward_itself_names_the_model():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    graph = get_graph(Gated(), (torch.randn(2, 4),))
    assert graph.method == "hooks"
    assert "forward of the model Gated" in graph.fx_failure


def test_an_fx_trace_that_does_not_run_falls_back_silently_with_the_model_error(capfd):
    class TensorCheck(nn.Module):
        """Traced, ``x`` is a Proxy: the graph adds a dimension that the eager forward never does."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, torch.Tensor):
                x = x.unsqueeze(0)
            return self.conv(x)

    graph = get_graph(TensorCheck(), (torch.randn(2, 3, 8, 8),))
    assert graph.capture == "export"  # fx's graph does not run: torch.export takes over
    assert isinstance(graph.fx_error, RuntimeError) and "conv2d" in str(graph.fx_error)
    assert "meta=" not in graph.fx_failure
    captured = capfd.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err


class _SearchingTracer(_LeafTracer):
    """The same tracer with torch.fx's own name search for parameters and buffers."""

    getattr = fx.Tracer.getattr
    create_arg = fx.Tracer.create_arg


class _Norm(nn.BatchNorm2d):
    """A BatchNorm subclass traced into: reads its parameters and its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return x * self.weight.view(1, -1, 1, 1)


class _SharedNet(nn.Module):
    """A parameter and a buffer held under two names each, and a buffer replaced while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.first = _Norm(4)
        self.second = _Norm(4)
        self.second.weight = self.first.weight  # the first name is "first.weight"
        self.second.register_buffer("running_mean", self.first.running_mean)
        self.register_buffer("scale", torch.ones(4, 1, 1))
        self.scale_old: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.second(self.first(x)) * self.scale
        self.scale_old = self.scale
        self.scale = torch.full((4, 1, 1), 2.0)  # a new buffer object under the old name
        # the old object, no longer a buffer, is a constant as fx makes it
        return x * self.scale * self.scale_old + self.second.weight.sum()


def test_the_tracer_names_parameters_and_buffers_as_fx_searches_them():
    graphs = []
    for tracer in (_LeafTracer(), _SearchingTracer()):
        model = _SharedNet()
        graphs.append(tracer.trace(model))
    ours, searched = ([(n.name, n.op, n.target, repr(n.args)) for n in graph.nodes] for graph in graphs)
    assert ours == searched
    targets = [target for _, op, target, _ in ours if op == "get_attr"]
    assert "first.weight" in targets and "second.weight" not in targets
    assert "first.running_mean" in targets and "second.running_var" in targets
    assert targets.count("scale") == 2  # the replaced buffer is found under its name again
    assert "_tensor_constant0" in targets


# --------------------------------------------------------------------------------------------
# The cyclic garbage collector is paused while a graph is built, planned and applied
# --------------------------------------------------------------------------------------------


_COLLECTOR_SEEN: list[bool] = []  # not a model attribute: that would make the model look changed


class RecordsCollector(nn.Module):
    """Records whether the cyclic collector is enabled each time its forward runs (fx runs it to trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _COLLECTOR_SEEN.append(gc.isenabled())
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_while_tracing_and_left_as_found(enabled):
    from torchpruner import Pruner
    from torchpruner.schedule import prune_groups

    model = RecordsCollector()
    _COLLECTOR_SEEN.clear()
    previous = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        pruner = Pruner(model, input_size=(4,))
        pruner.graph()
        assert _COLLECTOR_SEEN and not any(_COLLECTOR_SEEN)  # paused during the trace
        assert gc.isenabled() is enabled
        prune_groups(pruner, fraction=0.5)
        assert gc.isenabled() is enabled and model.a.out_features == 3
    finally:
        gc.enable() if previous else gc.disable()


def test_the_collector_is_enabled_again_when_a_trace_fails():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("forward fails")

    assert gc.isenabled()
    with pytest.raises(Exception, match="forward fails"):
        get_graph(Fails(), (torch.randn(2, 4),))
    assert gc.isenabled()
