"""``run_all`` of the captum adapter: one captum call per batch where captum takes a list of layers.

Oracles:
* with LayerGradientXActivation and LayerActivation (captum attributes a list of layers, each
  as alone), ``run_all`` equals ``run(target)`` on each layer and call site (float64), and captum
  is called once per batch for all of them (once per target and batch layer by layer);
* a method that cannot (LayerConductance; LayerIntegratedGradients, which interpolates the listed
  layers together) is called per target and gives ``run``'s scores; a group is refused as by ``run``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from test_attributions_groups import batches, build, data, model_groups
from test_attributions_run_all import residual_targets

from torchpruner.attributions import CaptumAttributionMetric
from torchpruner.attributions.captum_adapter import lists_layers

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def layer_targets(model, x):
    """Layers before and after a BatchNorm, a block's conv, the classifier and a functional ReLU."""
    return residual_targets(model, x)[:7]  # the groups follow


def counted(monkeypatch, method) -> list:
    """Calls of ``method.attribute``."""
    calls: list = []
    original = method.attribute
    monkeypatch.setattr(method, "attribute", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


def assert_equal_to_run(attr, targets, got, **options) -> None:
    assert len(got) == len(targets)
    for (key, scores), target in zip(got.items(), targets):
        want = attr.run(target, **options)
        assert scores.shape == want.shape, key
        np.testing.assert_allclose(scores, want, rtol=1e-10, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("find_best", [False, True])
@pytest.mark.parametrize(
    "method, options",
    [
        ("LayerGradientXActivation", {}),
        ("LayerGradientXActivation", {"absolute": True, "reduction": "none"}),
        ("LayerGradientXActivation", {"init_kwargs": {"multiply_by_inputs": False}}),
        ("LayerActivation", {"reduction": "sum"}),
    ],
)
def test_run_all_of_a_layer_list_method_equals_run_and_calls_captum_once_per_batch(
    monkeypatch, method, options, find_best
):
    method = getattr(captum_attr, method)
    assert lists_layers(method)
    model, input_size = build("residual", seed=3)
    x, y = data(input_size, n=10)
    loader = batches(x, y, 4)  # 3 batches
    targets = layer_targets(model, x)
    attr = CaptumAttributionMetric(model, loader, F.cross_entropy, method=method, **options)
    calls = counted(monkeypatch, method)
    got = attr.run_all(targets, find_best_evaluation_module=find_best)
    assert len(calls) == len(loader)  # one call per batch for all the targets
    calls.clear()
    assert_equal_to_run(attr, targets, got, find_best_evaluation_module=find_best)
    assert len(calls) == len(targets) * len(loader)  # what scoring layer by layer costs


@pytest.mark.parametrize(
    "method, options",
    [("LayerConductance", {"n_steps": 4}), ("LayerIntegratedGradients", {"n_steps": 4})],
)
def test_a_method_without_the_list_form_is_called_per_target_and_gives_runs_scores(monkeypatch, method, options):
    method = getattr(captum_attr, method)
    assert not lists_layers(method)
    model, input_size = build("residual", seed=4)
    x, y = data(input_size, n=6)
    loader = batches(x, y, 3)
    targets = layer_targets(model, x)[:3]
    attr = CaptumAttributionMetric(model, loader, F.cross_entropy, method=method, **options)
    calls = counted(monkeypatch, method)
    got = attr.run_all(targets)
    assert len(calls) == len(targets) * len(loader)
    assert_equal_to_run(attr, targets, got)


def test_a_group_is_refused_by_run_all_as_by_run():
    model, input_size = build("residual", seed=5)
    x, y = data(input_size, n=4)
    group = model_groups(model, input_size)[0]
    for method in (captum_attr.LayerGradientXActivation, captum_attr.LayerConductance):
        attr = CaptumAttributionMetric(model, batches(x, y), F.cross_entropy, method=method)
        with pytest.raises(TypeError, match="cannot score a coupled group"):
            attr.run_all([model.stem, group])


def test_the_list_form_is_found_by_a_feature_check():
    class LayerGradientXActivation:  # the name of a list method, but not captum's
        def __init__(self, forward_func, layer):
            pass

        def attribute(self, inputs):
            pass

    assert not lists_layers(LayerGradientXActivation)
    assert lists_layers(captum_attr.LayerActivation) and not lists_layers(captum_attr.LayerFeatureAblation)
