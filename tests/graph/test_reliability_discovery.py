"""Discovery follows what the model really does, or refuses before anything changes.

- A parameter-free module called at several call sites (a shared ``nn.Dropout``, ``nn.ReLU``,
  ``nn.Identity``, ``nn.Flatten``) is one op per call site: it does not couple the layers it
  follows. A shared Dropout's ``p`` changes only when every call site loses the same fraction of
  its units; otherwise it stays and the plan says so.
- Attribute reads that are tensors (``.values`` / ``.indices`` of max/topk/sort, ``.mT``, ``.T``,
  ``.real``, ``.data``) are followed like the ops they are; any other one is refused.
- ``F.layer_norm(x, self.normalized_shape, self.weight, self.bias)`` (ConvNeXt's LayerNorm): the
  attribute the call reads is updated with the weights; a literal shape in the code is refused.
- A contraction with a bare parameter (``x @ W``, ``F.linear``, ``einsum``, ``F.conv2d``) is refused
  on both paths, whatever its sizes.

Every accepted prune is checked against an independent oracle (the zeroed twin, or a smaller model
built by hand where masking is not pruning); every refusal leaves the model bit for bit unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import (
    assert_prune_equals_zeroed_twin,
    assert_unchanged,
    kept,
    masked_units,
    rebuilt,
    snapshot,
)
from torch import nn

from torchpruner import Pruner

# --------------------------------------------------------------------------------------------
# 1. Parameter-free modules called at several call sites
# --------------------------------------------------------------------------------------------

SHARED_KINDS = {
    "dropout": lambda: nn.Dropout(0.5),
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "flatten": nn.Flatten,
    "tanh": nn.Tanh,
}


class SharedAfterTwoLayers(nn.Module):
    """``shared`` after fc1 and again after fc2: the two call sites carry different units."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)
        self.shared = SHARED_KINDS[kind]()

    def forward(self, x):
        return self.fc3(self.shared(self.fc2(self.shared(self.fc1(x)))))


@pytest.mark.parametrize("kind", sorted(SHARED_KINDS))
@pytest.mark.parametrize("path", ["discovered", "explicit"])
def test_shared_parameter_free_module_does_not_couple_its_call_sites(kind, path):
    torch.manual_seed(0)
    model = SharedAfterTwoLayers(kind).double().eval()
    pruner = Pruner(model, input_size=(6,))
    x = torch.randn(5, 6, dtype=torch.float64)
    cascade = None if path == "discovered" else [model.fc2]
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.fc1, [0, 1], cascade), lambda twin: masked_units(twin.fc1, [0, 1]), x
    )
    assert (model.fc1.out_features, model.fc2.in_features) == (6, 6)
    assert model.fc2.out_features == 8 and model.fc3.in_features == 8, "fc2 keeps all its outputs"


def test_shared_dropout_keeps_p_when_its_call_sites_lose_different_fractions():
    model = SharedAfterTwoLayers("dropout")
    plan = Pruner(model, input_size=(6,)).prune_model(model.fc1, [0, 1])
    assert model.shared.p == 0.5
    assert "'shared' keeps p=0.5" in str(plan) and "2/8" in str(plan) and "0/8" in str(plan)


def test_shared_dropout_p_follows_when_every_call_site_loses_the_same_fraction():
    model = SharedAfterTwoLayers("dropout")
    pruner = Pruner(model, input_size=(6,))
    first, second = pruner.groups()[:2]
    assert model.fc1 in first.source_modules and model.fc2 in second.source_modules
    plan = pruner.plan_groups({first: [0, 1], second: [3, 4]})
    plan.apply(model)
    assert model.shared.p == pytest.approx(0.5 * (1 - 2 / 8))
    assert sum(1 for e in plan.edits if getattr(e, "attribute", None) == "p") == 1
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features, model.fc3.in_features) == (
        6,
        6,
        6,
        6,
    )
    model(torch.randn(2, 6))


class DropoutTwiceOnOneTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(self.drop(h) + self.drop(h))


def test_dropout_called_twice_on_the_same_units_is_rescaled_once():
    model = DropoutTwiceOnOneTensor()
    plan = Pruner(model, input_size=(6,)).prune_model(model.fc1, [0, 1])
    assert model.drop.p == pytest.approx(0.4 * (1 - 2 / 8))
    assert sum(1 for e in plan.edits if getattr(e, "attribute", None) == "p") == 1
    assert model.fc2.in_features == 6


# --------------------------------------------------------------------------------------------
# 8. Attribute reads: .values / .indices, .mT, .T, .real, .data
# --------------------------------------------------------------------------------------------


def _reads(form: str, h: torch.Tensor) -> torch.Tensor:
    """``h`` is [N, 8, 4, 4] (units on axis 1); the result is [N, 8] or [N, L, 8] (units last)."""
    flat = h.flatten(2)
    if form == "max.values":
        return flat.max(-1).values
    if form == "max[0]":
        return flat.max(-1)[0]
    if form == "torch.max.values":
        return torch.max(flat, dim=2).values
    if form == "max.indices":
        return flat.max(-1).indices.to(h.dtype)
    if form == "max[1]":
        return flat.max(-1)[1].to(h.dtype)
    if form == "min.values.keepdim":
        return flat.min(-1, keepdim=True).values.squeeze(-1)
    if form == "topk.values":
        return torch.topk(flat, 2, dim=-1).values.sum(-1)
    if form == "topk.indices":
        return torch.topk(flat, 2).indices.sum(-1).to(h.dtype)
    if form == "sort.values":
        return flat.sort(dim=-1, descending=True).values[..., 0]
    if form == "kthvalue.values":
        return flat.kthvalue(3, dim=-1).values
    if form == "median.values":
        return flat.median(dim=-1).values
    if form == "cummax.values":
        return h.cummax(dim=2).values.mean((2, 3))
    if form == "mT":
        return flat.mT
    if form == "mH":
        return flat.mH
    if form == "T.T":
        return h.mean((2, 3)).T.T
    if form == "real":
        return h.real.mean((2, 3))
    if form == "data":
        return h.data.mean((2, 3))
    # refused
    if form == "max over the units":
        return flat.max(1).values.mean(-1, keepdim=True).expand(-1, 8)
    if form == "frexp.mantissa":
        return torch.frexp(h).mantissa.mean((2, 3))
    if form == "._base":
        return h.mean((2, 3))[:, :]._base
    raise AssertionError(form)


FOLLOWED_READS = [
    "max.values",
    "max[0]",
    "torch.max.values",
    "max.indices",
    "max[1]",
    "min.values.keepdim",
    "topk.values",
    "topk.indices",
    "sort.values",
    "kthvalue.values",
    "median.values",
    "cummax.values",
    "mT",
    "mH",
    "T.T",
    "real",
    "data",
]
REFUSED_READS = ["max over the units", "frexp.mantissa", "._base"]


class ConvThenRead(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.form = form

    def forward(self, x):
        out = self.fc(_reads(self.form, self.conv(x)))
        return out.mean(1) if self.form in ("mT", "mH") else out


@pytest.mark.parametrize("form", FOLLOWED_READS)
def test_tensor_attribute_reads_are_followed(form):
    """The consumer after the read loses the pruned units: pruning equals the unpruned twin whose
    consumer ignores them (its inputs zeroed), and the pruned model runs."""
    torch.manual_seed(0)
    model = ConvThenRead(form).double().eval()
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert pruner.graph().method == "fx"
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    axis = -1
    assert_prune_equals_zeroed_twin(
        model,
        lambda: pruner.prune_model(model.conv, [1, 5]),
        lambda twin: masked_units(twin.fc, [1, 5], axis=axis, on="input"),
        x,
    )
    assert model.conv.out_channels == 6 and model.fc.in_features == 6


@pytest.mark.parametrize("form", REFUSED_READS)
def test_unknown_or_unit_mixing_reads_are_refused(form):
    model = ConvThenRead(form)
    pruner = Pruner(model, input_size=(3, 4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot prune 'conv'"):
        pruner.prune_model(model.conv, [1, 5])
    assert_unchanged(before, model)


def test_shape_attribute_reads_stay_shape_queries():
    """``x.shape`` / ``x.ndim`` carry no units: the prune goes through them."""

    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 16, 3)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.reshape(h.shape[0], -1) * (h.ndim - 3))

    torch.manual_seed(0)
    model = Reshaped().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pruner = Pruner(model, input_size=(3, 4, 4))
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.conv, [0, 7]), lambda twin: masked_units(twin.conv, [0, 7]), x
    )
    assert model.fc.in_features == 6 * 16


# --------------------------------------------------------------------------------------------
# 9. A functional LayerNorm reading its normalized_shape from the module
# --------------------------------------------------------------------------------------------


class ConvNeXtLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm: channels_last through F.layer_norm, channels_first by hand."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class LiteralLayerNorm(ConvNeXtLayerNorm):
    def forward(self, x):
        return F.layer_norm(x, (8,), self.weight, self.bias, self.eps)


class LiteralOnlyLayerNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return F.layer_norm(x, [8], self.weight)


class InputShapedLayerNorm(ConvNeXtLayerNorm):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class NoAffineLayerNorm(nn.Module):
    """No weight: the owner is only known from the call's module stack."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shape = (width,)

    def forward(self, x):
        return F.layer_norm(x, self.shape)


class LayerNorm2d(nn.LayerNorm):
    """An nn.LayerNorm subclass that fx traces through (timm's LayerNorm2d)."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtStem(nn.Module):
    def __init__(self, width: int = 8, norm: type = ConvNeXtLayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = norm(width)
        self.pw = nn.Linear(width, 4)

    def forward(self, x):
        h = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.pw(h).mean((1, 2))


class ChannelsFirstStem(ConvNeXtStem):
    def __init__(self, width: int = 8, norm: type = ConvNeXtLayerNorm) -> None:
        super().__init__(width, norm)
        if isinstance(self.norm, ConvNeXtLayerNorm):
            self.norm.data_format = "channels_first"
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        return self.head(self.norm(self.conv(x))).mean((2, 3))


KEEP = [0, 2, 3, 4, 6, 7]


@pytest.mark.parametrize("norm", [ConvNeXtLayerNorm, InputShapedLayerNorm, NoAffineLayerNorm])
def test_functional_layer_norm_against_rebuilt_model(norm):
    torch.manual_seed(0)
    model = ConvNeXtStem(8, norm).double().eval()
    for p in model.norm.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    slices = {"conv.weight": kept(KEEP), "conv.bias": kept(KEEP), "pw.weight": kept(None, KEEP)}
    if norm is not NoAffineLayerNorm:
        slices.update({"norm.weight": kept(KEEP), "norm.bias": kept(KEEP)})
    expected = rebuilt(ConvNeXtStem(6, norm), model, slices)(x)
    plan = Pruner(model, input_size=(3, 5, 5)).prune_model(model.conv, [1, 5])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    attribute = "shape" if norm is NoAffineLayerNorm else "normalized_shape"
    if norm is InputShapedLayerNorm:  # the call does not read the attribute: it adapts by itself
        assert not any(getattr(e, "attribute", None) == attribute for e in plan.edits)
    else:
        assert getattr(model.norm, attribute) == (6,)
        assert f"norm.{attribute}" in str(plan)


class SpatialLayerNorm(nn.Module):
    """``F.layer_norm(y, y.shape[2:])`` normalises each channel over its positions: channels stay
    independent, so pruning them equals masking them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(F.layer_norm(y, y.shape[2:])).mean((2, 3))


def test_layer_norm_over_other_dims_than_the_units_is_followed():
    torch.manual_seed(0)
    model = SpatialLayerNorm().double().eval()
    pruner = Pruner(model, input_size=(3, 6, 6))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model, lambda: pruner.prune_model(model.a, [1]), lambda twin: masked_units(twin.a, [1]), x
    )
    assert model.b.in_channels == 3


@pytest.mark.parametrize("affine", [True, False])
def test_traced_through_layer_norm_subclass_against_rebuilt_model(affine):
    """timm's LayerNorm2d: an nn.LayerNorm subclass whose forward fx traces through."""
    torch.manual_seed(0)

    def norm(width: int) -> nn.Module:
        return LayerNorm2d(width, elementwise_affine=affine, bias=affine)

    model = ChannelsFirstStem(8, norm).double().eval()
    for p in model.norm.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    slices = {
        "conv.weight": kept(KEEP),
        "conv.bias": kept(KEEP),
        "head.weight": kept(None, KEEP),
        "pw.weight": kept(None, KEEP),
    }
    if affine:
        slices.update({"norm.weight": kept(KEEP), "norm.bias": kept(KEEP)})
    expected = rebuilt(ChannelsFirstStem(6, norm), model, slices)(x)
    Pruner(model, input_size=(3, 5, 5)).prune_model(model.conv, [1, 5])
    assert tuple(model.norm.normalized_shape) == (6,)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "model_fn, match",
    [
        (lambda: ConvNeXtStem(8, LiteralLayerNorm), r"layer_norm.*normalized_shape \(8,\) as a constant"),
        (lambda: ConvNeXtStem(8, LiteralOnlyLayerNorm), r"layer_norm.*normalized_shape \(8,\) as a constant"),
        (lambda: ChannelsFirstStem(8), "reduces over the unit axis"),
    ],
)
def test_layer_norm_that_cannot_follow_is_refused(model_fn, match):
    model = model_fn()
    pruner = Pruner(model, input_size=(3, 5, 5))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pruner.prune_model(model.conv, [1, 5])
    assert_unchanged(before, model)


# --------------------------------------------------------------------------------------------
# 10. Contractions with a bare parameter whose sizes coincide
# --------------------------------------------------------------------------------------------


class BareContraction(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)
        self.W = nn.Parameter(torch.randn(8, 8))
        self.C = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.form = form

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.form == "matmul":
            h = h @ self.W
        elif self.form == "linear":
            h = F.linear(h, self.W)
        elif self.form == "einsum":
            h = torch.einsum("ni,ij->nj", h, self.W)
        else:
            h = F.conv2d(h[:, :, None, None], self.C).flatten(1)
        return self.fc2(h)


@pytest.mark.parametrize("form", ["matmul", "linear", "einsum", "conv2d"])
@pytest.mark.parametrize("path", ["discovered", "explicit"])
def test_contraction_with_a_bare_parameter_is_refused(form, path):
    model = BareContraction(form)
    pruner = Pruner(model, input_size=(8,))
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"cannot prune 'fc1'.*{form}"):
        pruner.prune_model(model.fc1, [0, 1], None if path == "discovered" else [model.fc2])
    assert_unchanged(before, model)
    model(torch.randn(2, 8))
