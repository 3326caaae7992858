"""Zeroed-twin oracle over random architectures (hypothesis, float64, eval mode).

For random Conv/Linear stacks (widths, depths, BatchNorm off / affine / not affine / without
running stats, activations including f(0) != 0, Dropout) and random valid indices, pruning a layer
with its cascading modules (given in a random order) gives the same outputs as the unpruned model
with those units zeroed after their activation by a persistent mask hook.
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from torchpruner.pruner import Pruner

from oracles import assert_prune_equals_zeroed_twin, counterpart, masked_units

ACTIVATIONS = {
    "relu": lambda w: nn.ReLU(),
    "sigmoid": lambda w: nn.Sigmoid(),
    "softplus": lambda w: nn.Softplus(),
    "tanh": lambda w: nn.Tanh(),
    "gelu": lambda w: nn.GELU(),
    "elu": lambda w: nn.ELU(),
    "silu": lambda w: nn.SiLU(),
    "prelu": lambda w: nn.PReLU(w, init=0.3),
}
NORMS = [None, "affine", "not-affine", "no-running-stats"]


@st.composite
def blocks(draw, max_blocks: int):
    n = draw(st.integers(1, max_blocks))
    return [
        (
            draw(st.integers(2, 6)),
            draw(st.sampled_from(NORMS)),
            draw(st.sampled_from(sorted(ACTIVATIONS))),
            draw(st.booleans()),
        )
        for _ in range(n)
    ]


@st.composite
def architectures(draw):
    conv_blocks = draw(st.one_of(st.just([]), blocks(2)))
    linear_blocks = draw(blocks(2)) if not conv_blocks else draw(st.one_of(st.just([]), blocks(1)))
    all_blocks = [("conv", b) for b in conv_blocks] + [("linear", b) for b in linear_blocks]
    target = draw(st.integers(0, len(all_blocks) - 1))
    width = all_blocks[target][1][0]
    indices = draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width - 1, unique=True))
    return all_blocks, target, indices, draw(st.integers(0, 10_000))


def build(all_blocks, seed):
    """Returns (model, per block: (layer, [cascading extras], mask module), final layer, input shape)."""
    torch.manual_seed(seed)
    layers, info = [], []
    channels, spatial = 2, 6
    features = None
    input_shape = (2, 6, 6) if all_blocks[0][0] == "conv" else (5,)
    if all_blocks[0][0] == "linear":
        features = 5
    for i, (kind, (width, norm, act, dropout)) in enumerate(all_blocks):
        if kind == "conv":
            layer = nn.Conv2d(channels, width, 3, padding=1)
            channels = width
        else:
            if features is None:  # first linear after the convs
                layers.append(nn.Flatten())
                features = channels * spatial * spatial
            layer = nn.Linear(features, width)
            features = width
        block = [layer]
        extras = []
        if norm is not None:
            bn_cls = nn.BatchNorm2d if kind == "conv" else nn.BatchNorm1d
            bn = bn_cls(width, affine=norm != "not-affine", track_running_stats=norm != "no-running-stats")
            if bn.running_mean is not None:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
            if bn.affine:
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
            block.append(bn)
            extras.append(bn)
        activation = ACTIVATIONS[act](width)
        block.append(activation)
        if isinstance(activation, nn.PReLU):
            extras.append(activation)
        mask_module = activation
        if dropout:
            drop = (nn.Dropout2d if kind == "conv" else nn.Dropout)(0.3)
            block.append(drop)
            extras.append(drop)
        if kind == "conv" and i == 0 and spatial == 6:
            block.append(nn.MaxPool2d(2))
            spatial = 3
        layers += block
        info.append((layer, extras, mask_module))
    if features is None:
        layers.append(nn.Flatten())
        features = channels * spatial * spatial
    final = nn.Linear(features, 3)
    layers.append(final)
    return nn.Sequential(*layers).double().eval(), info, final, input_shape


@settings(max_examples=120)
@given(architectures())
def test_pruned_equals_zeroed_twin(arch):
    all_blocks, target, indices, seed = arch
    model, info, final, input_shape = build(all_blocks, seed)
    layer, extras, mask_module = info[target]
    next_layer = info[target + 1][0] if target + 1 < len(info) else final
    cascade = extras + [next_layer]
    random.Random(seed).shuffle(cascade)
    x = torch.randn((3,) + input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, input_size=input_shape).prune_model(layer, indices, cascade),
        lambda twin: masked_units(counterpart(twin, model, mask_module), indices),
        x,
    )
    kept = [
        i
        for i in range(len(indices) + (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels))
        if i not in indices
    ]
    assert layer._torchpruner_kept_units["out"] == kept
