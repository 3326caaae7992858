"""Masked trajectory for coupled-group prunes (float64).

Training continued after a group prune with the live optimizer must equal training the unpruned
twin with the pruned units masked to zero at the groups' mask points (the tensors their consumers
read) from the same step on. The net couples units through a residual add, a concatenation, a
depthwise conv and a bare parameter, so the optimizer surgery of every kind of group member is
exercised: conv rows and columns, depthwise filters, BatchNorm, a gain vector read in forward.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner import Pruner, prune_groups
from torchpruner.graph import get_graph, make_example_inputs
from torchpruner.graph.dependency import get_dependency_graph, zeroing_functions
from torchpruner.schedule import select_units


class CoupledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
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

    def train_step(forward, opt, x, y):
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    for x, y in data[:3]:
        train_step(model, optimizer, x, y)

    twin = copy.deepcopy(model)
    twin_optimizer = OPTIMIZERS[name](twin.parameters())
    # load_state_dict keeps the tensors it is given: copy them, or unsliced buffers would be shared
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    # Which units go, and where the twin masks them (its own graph: call sites matched by name).
    pruner = Pruner(model, input_size=(3, 6, 6), optimizer=optimizer)
    groups = pruner.groups()
    assert len(groups) >= 3  # stream, branch, pointwise
    selection = select_units(groups, fraction=0.25, scores=_scores)
    assert len(selection) == len(groups)
    twin_graph = get_graph(twin, *make_example_inputs(twin, (3, 6, 6)))
    twin_groups = {group.index: group for group in get_dependency_graph(twin_graph).all_groups}
    fns = zeroing_functions({twin_groups[group.index]: units for group, units in selection.items()})
    assert len(fns) >= 4  # relu (stream), depthwise output, cat, the pooled stream

    plan = prune_groups(pruner, fraction=0.25, scores=_scores)
    assert "optimizer" in str(plan) or name.startswith("sgd")  # state slices are listed
    assert model.stem.out_channels == 6 and model.gain.shape == (6,)

    with twin_graph.intercept(fns) as masked_twin:
        for x, y in data[3:]:
            model.train(), twin.train()
            train_step(model, optimizer, x, y)
            train_step(masked_twin, twin_optimizer, x, y)
        model.eval(), twin.eval()
        probe = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(model(probe), masked_twin(probe), rtol=1e-9, atol=1e-10)

    # Parameter by parameter where the kept ids say which slice to compare.
    kept_stream = model.stem._torchpruner_kept_units["out"]
    torch.testing.assert_close(model.stem.weight, twin.stem.weight[kept_stream], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.gain, twin.gain[kept_stream], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, twin.bn.running_var[kept_stream], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.depthwise.weight, twin.depthwise.weight[kept_stream], rtol=1e-9, atol=1e-12)
    kept_in = model.merge._torchpruner_kept_units["in"]
    torch.testing.assert_close(model.merge.weight, twin.merge.weight[kept_stream][:, kept_in], rtol=1e-9, atol=1e-12)
    for param in (model.stem.weight, model.merge.weight, model.gain):
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.shape == param.shape, (key, value.shape, param.shape)
