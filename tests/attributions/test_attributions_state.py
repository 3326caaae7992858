"""Scoring leaves the model as it found it; options, batches and errors behave as documented.

Each guarantee is asserted separately, for every metric that runs a data pass.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from torchpruner.attributions import (
    APoZAttributionMetric,
    CaptumAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.base import default_batch_fn, per_example_loss

DTYPE = torch.float64


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).to(DTYPE)


def make_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def loader(n=10, batch_size=4, shuffle=True):
    return DataLoader(TensorDataset(*make_data(n)), batch_size=batch_size, shuffle=shuffle)


def captum_gxa():
    from captum.attr import LayerGradientXActivation

    return LayerGradientXActivation


METRICS = {
    "random": lambda m, d, c, **kw: RandomAttributionMetric(m, d, c, "cpu", seed=0, **kw),
    "weight_norm": lambda m, d, c, **kw: WeightNormAttributionMetric(m, d, c, "cpu", **kw),
    "apoz": lambda m, d, c, **kw: APoZAttributionMetric(m, d, c, "cpu", **kw),
    "sensitivity": lambda m, d, c, **kw: SensitivityAttributionMetric(m, d, c, "cpu", **kw),
    "taylor": lambda m, d, c, **kw: TaylorAttributionMetric(m, d, c, "cpu", **kw),
    "shapley": lambda m, d, c, **kw: ShapleyAttributionMetric(m, d, c, "cpu", sv_samples=1, seed=0, **kw),
    "captum": lambda m, d, c, **kw: CaptumAttributionMetric(m, d, c, "cpu", method=captum_gxa(), **kw),
}
DATA_METRICS = ["apoz", "sensitivity", "taylor", "shapley", "captum"]


def all_hooks(model):
    found = []
    for name, module in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            if getattr(module, attr, None):
                found.append((name, attr))
    return found


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("find_best", [False, True])
def test_training_flag_restored_per_module(name, find_best):
    model = make_model()
    model.train()
    model[1].eval()  # a mixed state: the root and BN disagree
    model[3].eval()
    before = [m.training for m in model.modules()]
    seen_modes = []
    criterion = lambda out, y, reduction="mean": (
        seen_modes.append(model[1].training or model[3].training),
        F.cross_entropy(out, y, reduction=reduction),
    )[1]
    METRICS[name](model, loader(), criterion).run(model[0], find_best)
    assert [m.training for m in model.modules()] == before
    assert not any(seen_modes)  # every forward ran in eval mode


class Boom(RuntimeError):
    pass


def failing_criterion(after_calls):
    calls = {"n": 0}

    def criterion(output, target, reduction="mean"):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Boom("criterion failed")
        return F.cross_entropy(output, target, reduction=reduction)

    return criterion


def failing_data(after_batches):
    x, y = make_data(12)
    for i in range(0, 12, 4):
        if i // 4 >= after_batches:
            raise Boom("data loader failed")
        yield x[i : i + 4], y[i : i + 4]


@pytest.mark.parametrize("name", DATA_METRICS)
@pytest.mark.parametrize("failure", ["criterion", "data"])
def test_no_hooks_left_and_state_restored_on_error(name, failure):
    if name == "apoz" and failure == "criterion":
        pytest.skip("APoZ never calls the criterion")
    model = make_model()
    model.train()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    if failure == "criterion":
        metric = METRICS[name](model, loader(), failing_criterion(2))
    else:
        metric = METRICS[name](model, failing_data(2), F.cross_entropy)
    with pytest.raises(Boom):
        metric.run(model[0], True)
    assert all_hooks(model) == []
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_loss_module_reduction_restored_even_on_error():
    model = make_model()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    x, y = make_data()
    scores = TaylorAttributionMetric(model, [(x, y)], criterion, "cpu", reduction="none").run(model[0])
    assert criterion.reduction == "sum"
    functional = TaylorAttributionMetric(model, [(x, y)], F.cross_entropy, "cpu", reduction="none").run(model[0])
    np.testing.assert_array_equal(scores, functional)
    with pytest.raises(RuntimeError):
        TaylorAttributionMetric(model, [(x, y.float())], criterion, "cpu").run(model[0])  # bad target dtype
    assert criterion.reduction == "sum"


@pytest.mark.parametrize("name", list(METRICS))
def test_batchnorm_statistics_unchanged(name):
    model = make_model()
    model.train()
    bn = model[1]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    METRICS[name](model, loader(), F.cross_entropy).run(model[0], True)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", list(METRICS))
def test_grads_untouched(name):
    model = make_model()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 == 0 else None
    before = [None if p.grad is None else p.grad.clone() for p in params]
    METRICS[name](model, loader(), F.cross_entropy).run(model[0], True)
    for p, old in zip(params, before):
        if old is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, old)


@pytest.mark.parametrize("name", list(METRICS))
def test_global_rng_state_restored(name):
    """A shuffled DataLoader and train-mode Dropout would both draw from the global RNG."""
    model = make_model()
    model.train()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    METRICS[name](model, loader(shuffle=True), F.cross_entropy).run(model[0], True)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


@pytest.mark.parametrize("name", DATA_METRICS)
def test_scores_independent_of_batch_size(name):
    model = make_model()
    scores = [
        METRICS[name](model, loader(10, bs, shuffle=False), F.cross_entropy).run(model[0], True) for bs in (1, 3, 10)
    ]
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", DATA_METRICS)
def test_reductions(name):
    model = make_model()
    run = lambda reduction: METRICS[name](
        model, loader(10, 4, shuffle=False), F.cross_entropy, reduction=reduction
    ).run(model[0], True)
    per_example = run("none")
    assert per_example.shape == (10, 4)
    np.testing.assert_allclose(run("mean"), per_example.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(run("sum"), per_example.sum(0), rtol=1e-12, atol=1e-15)
    mean_plus_2std = lambda s: s.mean(0) + 2 * s.std(0)
    np.testing.assert_allclose(run(mean_plus_2std), mean_plus_2std(per_example), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="one score per unit"):
        run(lambda s: s)
    with pytest.raises(ValueError, match="reduction"):
        run("max")


@pytest.mark.parametrize("name", DATA_METRICS)
def test_max_batches(name):
    model = make_model()
    x, y = make_data(12)
    consumed = []

    def generator():
        for i in range(0, 12, 4):
            consumed.append(i)
            yield x[i : i + 4], y[i : i + 4]

    capped = METRICS[name](model, generator(), F.cross_entropy, max_batches=2, reduction="none").run(model[0], True)
    assert consumed == [0, 4]
    first_two = METRICS[name](model, [(x[:8], y[:8])], F.cross_entropy, reduction="none").run(model[0], True)
    np.testing.assert_allclose(capped, first_two, rtol=1e-10, atol=1e-13)


def test_data_free_metrics_shapes_and_seeds():
    model = make_model()
    data = loader()
    first = RandomAttributionMetric(model, data, F.cross_entropy, "cpu", seed=3).run(model[0])
    assert first.shape == (4,) and ((first >= 0) & (first < 1)).all()
    np.testing.assert_array_equal(first, RandomAttributionMetric(model, data, F.cross_entropy, seed=3).run(model[0]))
    assert not np.array_equal(first, RandomAttributionMetric(model, data, F.cross_entropy, seed=4).run(model[0]))
    unseeded = RandomAttributionMetric(model, data, F.cross_entropy)
    assert not np.array_equal(unseeded.run(model[0]), unseeded.run(model[0]))
    assert RandomAttributionMetric(model, data, F.cross_entropy, seed=0).run(model[5]).shape == (3,)
    none = RandomAttributionMetric(model, data, F.cross_entropy, reduction="none", seed=3).run(model[0])
    np.testing.assert_array_equal(none, first[None])
    assert WeightNormAttributionMetric(model, data, F.cross_entropy, reduction="none").run(model[0]).shape == (1, 4)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def test_batch_layouts():
    model = make_model()
    x, y = make_data(6)
    reference = TaylorAttributionMetric(model, [(x, y)], F.cross_entropy, "cpu").run(model[0])
    indices = torch.arange(6)
    layouts = {
        "longer tuple": [(x, y, indices)],
        "list": [[x, y]],
        "dict": [{"input": x, "target": y, "index": indices}],
        "dict labels": [{"images": x, "labels": y}],
    }
    for layout, data in layouts.items():
        np.testing.assert_array_equal(
            TaylorAttributionMetric(model, data, F.cross_entropy).run(model[0]), reference, err_msg=layout
        )
    custom = [{"pixels": x, "class": y}]
    scores = TaylorAttributionMetric(model, custom, F.cross_entropy, batch_fn=lambda b: (b["pixels"], b["class"])).run(
        model[0]
    )
    np.testing.assert_array_equal(scores, reference)
    with pytest.raises(ValueError, match="batch_fn"):
        TaylorAttributionMetric(model, custom, F.cross_entropy).run(model[0])
    with pytest.raises(ValueError, match="batch_fn"):
        default_batch_fn(x)


@pytest.mark.filterwarnings("ignore::torchpruner.attributions.CoupledGroupWarning")  # a and b feed one sum
def test_several_and_keyword_inputs_via_batch_fn():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, left, right):
            return self.head(torch.relu(self.a(left) + self.b(right)))

    torch.manual_seed(0)
    model = TwoInputs().to(DTYPE)
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(5, 3, generator=g, dtype=DTYPE), torch.randn(5, 2, generator=g, dtype=DTYPE)
    y = torch.randint(0, 2, (5,), generator=g)
    positional = TaylorAttributionMetric(
        model, [(left, right, y)], F.cross_entropy, batch_fn=lambda b: ((b[0], b[1]), b[2]), reduction="none"
    ).run(model.a)
    keyword = TaylorAttributionMetric(
        model,
        [(left, right, y)],
        F.cross_entropy,
        batch_fn=lambda b: ({"left": b[0], "right": b[1]}, b[2]),
        reduction="none",
    ).run(model.a)
    np.testing.assert_array_equal(positional, keyword)
    z = model.a(left).detach().requires_grad_(True)
    loss = F.cross_entropy(model.head(torch.relu(z + model.b(right))), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    np.testing.assert_allclose(positional, (-g * z).abs().detach().numpy(), rtol=1e-10)


@pytest.mark.parametrize("name", DATA_METRICS)
def test_called_under_no_grad_or_inference_mode(name):
    model = make_model()
    reference = METRICS[name](model, loader(shuffle=False), F.cross_entropy).run(model[0], True)
    with torch.no_grad():
        np.testing.assert_allclose(
            METRICS[name](model, loader(shuffle=False), F.cross_entropy).run(model[0], True), reference, rtol=1e-12
        )
    with torch.inference_mode():
        x, y = make_data()  # inference tensors
        data = [(x[:5], y[:5]), (x[5:], y[5:])]
        np.testing.assert_allclose(
            METRICS[name](model, data, F.cross_entropy).run(model[0], True), reference, rtol=1e-12
        )
        assert torch.is_inference_mode_enabled()


def test_device_honoured_and_autocast_accumulates_in_float32():
    model = make_model().float()
    x, y = make_data(8)
    data = [(x.float(), y)]
    reference = TaylorAttributionMetric(model, data, F.cross_entropy, torch.device("cpu")).run(model[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu").run(model[0])
    assert mixed.dtype == np.float64 and np.isfinite(mixed).all()
    np.testing.assert_allclose(mixed, reference, rtol=0.1, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def test_clear_errors():
    model = make_model()
    data = loader()
    taylor = TaylorAttributionMetric(model, data, F.cross_entropy, "cpu")
    with pytest.raises(ValueError, match="not part of the model"):
        taylor.run(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="container"):
        nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)).to(DTYPE)
        TaylorAttributionMetric(
            nested, [(torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 1, 0]))], F.cross_entropy
        ).run(nested[0])

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    unused = Unused().to(DTYPE)
    with pytest.raises(ValueError, match="never called"):
        TaylorAttributionMetric(
            unused, [(torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 1, 0]))], F.cross_entropy
        ).run(unused.unused)
    with pytest.raises(ValueError, match="no batches"):
        TaylorAttributionMetric(model, [], F.cross_entropy).run(model[0])
    with pytest.raises(ValueError, match="no batches"):
        TaylorAttributionMetric(model, DataLoader(TensorDataset(*make_data(0)), batch_size=2), F.cross_entropy).run(
            model[0]
        )
    with pytest.raises(ValueError, match="scalar"):
        TaylorAttributionMetric(model, data, lambda out, y, reduction="mean": F.cross_entropy(out, y)).run(model[0])

    def no_reduction(out, y):
        return F.cross_entropy(out, y)

    with pytest.raises(TypeError, match="no_reduction.*per-example"):
        TaylorAttributionMetric(model, data, no_reduction).run(model[0])
    with pytest.raises(TypeError, match="unknown option"):
        TaylorAttributionMetric(model, data, F.cross_entropy, sv_samples=3)
    with pytest.raises(TypeError, match="unknown option"):
        taylor.run(model[0], signd=True)
    with pytest.raises(ValueError, match="sv_samples"):
        ShapleyAttributionMetric(model, data, F.cross_entropy, sv_samples=0).run(model[0])
    with pytest.raises(ValueError, match="max_batches"):
        TaylorAttributionMetric(model, data, F.cross_entropy, max_batches=0)
    with pytest.raises(TypeError, match="DataParallel"):
        TaylorAttributionMetric(nn.DataParallel(model), data, F.cross_entropy).run(model[0])


def test_per_example_loss_reduces_extra_dims():
    out = torch.randn(4, 3, 5, dtype=DTYPE)  # [N, classes, tokens]
    target = torch.randint(0, 3, (4, 5))
    np.testing.assert_allclose(
        per_example_loss(F.cross_entropy, out, target, 4).numpy(),
        F.cross_entropy(out, target, reduction="none").mean(1).numpy(),
    )
    with pytest.raises(ValueError, match="shape"):
        per_example_loss(lambda o, t, reduction: o.sum(0), out, target, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_example_cross_entropy_fast_path_equals_the_criterion(dtype):
    """Plain cross-entropy outside autograd is computed as logsumexp minus the target's logit:
    the criterion's values, for the function and the module; anything else goes to the criterion."""
    g = torch.Generator().manual_seed(0)
    out = (torch.randn(300, 7, generator=g) * 30).to(dtype)  # large logits: the shift must be stable
    target = torch.randint(0, 7, (300,), generator=g)
    expected = F.cross_entropy(out, target, reduction="none")
    for criterion in (F.cross_entropy, nn.CrossEntropyLoss()):
        got = per_example_loss(criterion, out, target, 300)
        assert got.dtype == dtype
        # to the rounding of logits of magnitude ~100
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # ignored targets, class weights, label smoothing, gradients: the criterion's own result
    ignored = target.clone()
    ignored[:5] = -100
    assert torch.equal(
        per_example_loss(F.cross_entropy, out, ignored, 300), F.cross_entropy(out, ignored, reduction="none")
    )
    assert float(per_example_loss(F.cross_entropy, out, ignored, 300)[:5].abs().max()) == 0.0
    weight = torch.rand(7, generator=g, dtype=dtype)
    for module in (nn.CrossEntropyLoss(weight=weight), nn.CrossEntropyLoss(label_smoothing=0.1)):
        module.reduction = "none"
        expected_module = module(out, target)
        module.reduction = "mean"
        assert torch.equal(per_example_loss(module, out, target, 300), expected_module)
        assert module.reduction == "mean"
    leaf = out.clone().requires_grad_()
    per_example_loss(F.cross_entropy, leaf, target, 300).sum().backward()
    assert leaf.grad is not None
    with pytest.raises(IndexError):  # an invalid class index is the criterion's error, as before
        per_example_loss(F.cross_entropy, out, torch.full((300,), 7), 300)


def test_options_constructor_then_run_override():
    model = make_model()
    data = loader(shuffle=False)
    signed = TaylorAttributionMetric(model, data, F.cross_entropy, signed=True)
    unsigned = TaylorAttributionMetric(model, data, F.cross_entropy)
    np.testing.assert_array_equal(signed.run(model[0], signed=False), unsigned.run(model[0]))
    assert not np.array_equal(signed.run(model[0]), unsigned.run(model[0]))
    assert signed.method_options == {"signed": True}  # run options do not stick


def test_progress_bar_names_module_and_permutations(monkeypatch):
    model = make_model()
    stream = io.StringIO()
    from tqdm import tqdm as real_tqdm
    import tqdm.auto

    descriptions, disabled = [], []

    class Recording(real_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = stream
            super().__init__(*args, **kwargs)
            descriptions.append(kwargs["desc"])
            disabled.append(kwargs["disable"])

        def set_description_str(self, desc=None, refresh=True):
            descriptions.append(desc)
            super().set_description_str(desc, refresh)

    original = tqdm.auto.tqdm
    tqdm.auto.tqdm = Recording
    try:
        # the reference algorithm runs one ordering after the other (the fast one stacks them)
        ShapleyAttributionMetric(
            model, loader(6, 3), F.cross_entropy, progress=True, sv_samples=2, algorithm="reference"
        ).run(model[0])
        TaylorAttributionMetric(model, loader(6, 3), F.cross_entropy, progress=False).run(model[0])
        monkeypatch.setenv("TORCHPRUNER_PROGRESS", "0")
        TaylorAttributionMetric(model, loader(6, 3), F.cross_entropy).run(model[0])
    finally:
        tqdm.auto.tqdm = original
    assert disabled == [False, True, True]
    assert descriptions[0] == "Shapley 0: 0/2 permutations"
    assert "Shapley 0: 1/2 permutations" in descriptions
    assert descriptions[:-2][-1] == "Shapley 0: 2/2 permutations"
    assert descriptions[-2:] == ["Taylor 0", "Taylor 0"]
    assert "2/2" in stream.getvalue()  # two batches counted


@settings(max_examples=10)
@given(
    channels=st.integers(1, 5),
    size=st.integers(1, 4),
    batch=st.integers(1, 5),
    call=st.sampled_from(["taylor", "apoz", "sensitivity"]),
)
def test_score_length_is_unit_count(channels, size, batch, call):
    torch.manual_seed(channels)
    model = nn.Sequential(nn.Conv1d(2, channels, 1), nn.ReLU(), nn.Flatten(), nn.Linear(channels * size, 2)).to(DTYPE)
    x = torch.randn(batch, 2, size, dtype=DTYPE)
    y = torch.randint(0, 2, (batch,))
    scores = METRICS[call](model, [(x, y)], F.cross_entropy, reduction="none").run(model[0], True)
    assert scores.shape == (batch, channels)


def test_apoz_does_not_warn_after_relu_then_identity():
    import warnings

    import torch
    import torch.nn as nn

    from torchpruner import APoZAttributionMetric

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Identity(), nn.Flatten(), nn.Linear(4 * 36, 2))
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,)))]
    attr = APoZAttributionMetric(model, data, torch.nn.functional.cross_entropy, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = attr.run(model[2])
    assert scores.shape == (4,) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.warns(UserWarning, match="ReLU"):
        attr.run(model[0])  # before the ReLU: still warned
