"""Masked trajectory for coupled-group prunes (float64).

Training continued after a group prune with the live optimizer must equal training the unpruned
twin with the pruned units masked to zero at the groups' mask points (the tensors their consumers
read) from the same step on. The net couples units through a residual add, a concatenation, a
depthwise conv and a bare parameter, so the optimizer surgery of every kind of group member is
exercised: conv rows and columns, depthwise filters, BatchNorm, a gain vector read in forward.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner import Pruner, prune_groups
from torchpruner.graph import make_example_inputs
from torchpruner.schedule import select_units

from oracles import assert_state_matches, kept, masked_at_mask_points, train, twin_of


class CoupledNet(nn.Module):
    def __init__(self):
        super().__init__()
        # no bias before a training-mode BatchNorm: its gradient is zero up to rounding, which
        # Adam's normalised step turns into a full step of noise that differs between CPUs
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 6, 1)
        self.merge = nn.Conv2d(12, 8, 1)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        s = F.relu(self.bn(self.stem(x)))
        joined = torch.cat([F.relu(self.branch(s)), F.relu(self.pointwise(self.depthwise(s)))], 1)
        y = (self.merge(joined) + s) * self.gain.view(1, -1, 1, 1)  # residual: stem and merge coupled
        return self.fc(y.mean((2, 3)))


def kept_slices(model: CoupledNet) -> dict:
    """The slicer of every tensor of a pruned CoupledNet, from the kept ids it records."""
    stream = model.stem._torchpruner_kept_units["out"]
    branch = model.branch._torchpruner_kept_units["out"]
    pointwise = model.pointwise._torchpruner_kept_units["out"]
    merge_in = model.merge._torchpruner_kept_units["in"]
    assert merge_in == branch + [6 + unit for unit in pointwise]
    return {
        "stem.weight": kept(stream),
        "gain": kept(stream),
        "branch.weight": kept(branch, stream),
        "branch.bias": kept(branch),
        "depthwise.weight": kept(stream),
        "depthwise.bias": kept(stream),
        "pointwise.weight": kept(pointwise, stream),
        "pointwise.bias": kept(pointwise),
        "merge.weight": kept(stream, merge_in),
        "merge.bias": kept(stream),
        "fc.weight": kept(None, stream),
        **{f"bn.{t}": kept(stream) for t in ("weight", "bias", "running_mean", "running_var")},
    }


def _scores(group):
    """Deterministic, distinct scores so the twin can be told which units go."""
    return np.random.default_rng(group.num_units * 7 + group.index).permutation(group.num_units).astype(float)


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, amsgrad=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_group_prune_mid_training_equals_masked_twin(name):
    torch.manual_seed(0)
    model = CoupledNet().double()
    optimizer = OPTIMIZERS[name](model.parameters())
    data = [(torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(8)]
    train(model, optimizer, data[:3])
    twin, twin_optimizer = twin_of(model, optimizer, lambda m: OPTIMIZERS[name](m.parameters()))

    # Which units go (the twin masks them at its own graph's mask points: groups matched by index).
    pruner = Pruner(model, input_size=(3, 6, 6), optimizer=optimizer)
    groups = pruner.groups()
    assert len(groups) >= 3  # stream, branch, pointwise
    selection = select_units(groups, fraction=0.25, scores=_scores)
    assert len(selection) == len(groups)
    units_by_group = {group.index: units for group, units in selection.items()}

    plan = prune_groups(pruner, fraction=0.25, scores=_scores)
    assert "optimizer" in str(plan) or name.startswith("sgd")  # state slices are listed
    assert model.stem.out_channels == 6 and model.gain.shape == (6,)

    # at least: relu (stream), depthwise output, cat, the pooled stream
    with masked_at_mask_points(
        twin, make_example_inputs(twin, (3, 6, 6))[0], units_by_group, min_sites=4
    ) as masked_twin:
        model.train(), twin.train()
        train(model, optimizer, data[3:])
        train(masked_twin, twin_optimizer, data[3:])
        model.eval(), twin.eval()
        probe = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(model(probe), masked_twin(probe), rtol=1e-9, atol=1e-10)

    # Every tensor and its optimizer state, sliced where the kept ids say.
    assert_state_matches(
        model, twin, kept_slices(model), optimizer=optimizer, reference_optimizer=twin_optimizer, rtol=1e-9, atol=1e-12
    )
    for param in (model.stem.weight, model.merge.weight, model.gain):
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == param.shape, (key, value.shape, param.shape)
