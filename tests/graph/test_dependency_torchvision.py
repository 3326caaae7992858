"""Coupled groups on real architectures, and the group helpers (fraction, ratios, global ranking,
iterative schedule). torchvision models are built with ``weights=None`` (no download)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.graph.dependency import get_dependency_graph
from torchpruner.schedule import IterativePruning, prune_groups, select_units, weight_norm_scores
from torchpruner.pruner import Pruner

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_at_mask_points, snapshot

torchvision = pytest.importorskip("torchvision")
torch.set_num_threads(1)

FAST_SUBSET = {
    # name: (constructor kwargs, image size)
    "resnet18": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "densenet121": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "vit_b_16": ({"image_size": 32}, 32),
}


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FAST_SUBSET))
def test_torchvision_prune_30_percent_of_every_group(name):
    kwargs, size = FAST_SUBSET[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([1, 3])
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = num_params(model)
    pruner = Pruner(model, input_size=(3, size, size), optimizer=optimizer)
    groups = pruner.groups()
    assert groups, f"{name}: no prunable group"
    widths = {id(g): g.num_units for g in groups}
    plan = prune_groups(pruner, fraction=0.3)
    assert plan.removed_parameters > 0
    model.train()
    optimizer.zero_grad()
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, y).backward()
    optimizer.step()
    assert num_params(model) < before
    # every group lost 30% (rounded down) and the classifier still has 10 outputs
    assert len(pruner.groups()) == len(groups)
    assert sum(g.num_units for g in pruner.groups()) <= sum(int(np.ceil(w * 0.7)) for w in widths.values())


def test_shufflenet_channel_shuffle_is_followed_and_pruning_through_it_is_the_zeroed_twin():
    """torchvision's channel_shuffle computes its sizes from the tensor: the same position of every
    shuffle group goes together, and the prune equals the twin zeroed at the consumers."""
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    pruner = Pruner(model, example_inputs=x)
    assert not pruner.refused_groups()
    (group,) = get_dependency_graph(pruner.graph()).groups_of(model.stage2[0].branch2[5])
    assert group.prunable()
    plan = pruner.plan_groups({group: [1]}, "one unit through the shuffle")
    assert_prune_equals_zeroed_twin(
        model, lambda: plan.apply(model, None), lambda twin: masked_at_mask_points(twin, (x,), {group.index: [1]}), x
    )
    assert model.stage2[0].branch2[5].out_channels == 16


def test_vit_stream_prunes_with_hidden_dim_updated():
    """torchvision's ViT reshapes the patch embedding with ``self.hidden_dim``: the stream is
    pruned (the same dims in every head of its MultiheadAttention layers) and hidden_dim follows."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32)
    pruner = Pruner(model, input_size=(3, 32, 32))
    groups = pruner.groups()
    assert len(groups) == 13 and sum(g.num_units == 3072 for g in groups) == 12
    dep = get_dependency_graph(pruner.graph())
    stream = dep.group_of(model.encoder.layers[0].mlp[3])
    assert stream.prunable() and stream.num_units == 64  # dim d of every one of the 12 heads
    assert any(m.parameter == "class_token" for m in stream.members)
    assert any(m.parameter == "pos_embedding" for m in stream.members)
    pruner.plan_groups({stream: [0]}, "one stream unit").apply(model, None)
    assert model.hidden_dim == 756 and model.encoder.layers[0].self_attention.embed_dim == 756
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


# --------------------------------------------------------------------------------------------
# groups() and the helpers on a small residual net
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.conv2(F.relu(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def test_groups_listing_and_print():
    model = Net()
    pruner = Pruner(model, input_size=(3, 8, 8))
    groups = pruner.groups()
    assert [g.num_units for g in groups] == [8, 12]
    text = str(groups[0])
    for name in ("stem", "bn", "conv1", "conv2", "fc"):
        assert name in text
    assert [g.num_units for g in pruner.groups(include_outputs=True)] == [8, 12, 4]
    assert [g.num_units for g in pruner.groups(ignored_layers=[model.conv1])] == [8]
    plan = pruner.prune_group(groups[0], [0, 1])
    assert "stem" in str(plan) and "conv2.weight" in str(plan)
    assert model.stem.out_channels == model.conv2.out_channels == model.fc.in_features == 6


def test_prune_groups_fraction_ratios_min_units():
    model = Net()
    pruner = Pruner(model, input_size=(3, 8, 8))
    prune_groups(pruner, fraction=0.5, ratios={model.conv1: 0.25})
    assert model.stem.out_channels == 4 and model.conv1.out_channels == 9
    prune_groups(pruner, fraction=0.9, min_units=3)
    assert model.stem.out_channels == 3 and model.conv1.out_channels == 3


def test_weight_norm_scores_pick_the_weakest_units():
    model = Net()
    with torch.no_grad():
        model.conv1.weight[[2, 7]] *= 1e-3
        model.conv2.weight[:, [2, 7]] *= 1e-3
    pruner = Pruner(model, input_size=(3, 8, 8))
    groups = pruner.groups()
    scores = weight_norm_scores(groups[1])
    assert set(np.argsort(scores)[:2]) == {2, 7}
    selection = select_units(groups, fraction=0.2)
    assert selection[groups[1]] == [2, 7]


def test_a_grouped_consumer_loses_the_lowest_scored_units_of_each_conv_group():
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 6, 3, groups=3))
    pruner = Pruner(model, input_size=(3, 8, 8))
    (group,) = [g for g in pruner.groups() if model[0] in g.source_modules]
    assert group.count_cells().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    values = np.array([5.0, 1.0, 3.0, 0.5, 9.0, 8.0, 0.1, 0.2, 4.0, 4.0, 4.0, 0.0])

    selection = select_units([group], fraction=0.5, scores=lambda g: values)
    # two units from each conv group: its two lowest scores (the earlier unit on a tie)
    assert selection[group] == [1, 3, 6, 7, 8, 11]
    selection = select_units([group], fraction=0.25, scores=lambda g: values)
    assert selection[group] == [3, 6, 11]  # three units: one from each conv group


def test_global_ranking_with_per_group_normalisation():
    model = Net()
    pruner = Pruner(model, input_size=(3, 8, 8))
    groups = pruner.groups()

    # custom scores: group 0 all equal; group 1 with four clearly weak units
    def scores(group):
        if group.num_units == 8:
            return np.full(8, 100.0)
        values = np.ones(12)
        values[[0, 1, 2, 3]] = 0.01
        return values

    selection = select_units(groups, fraction=0.2, scores=scores, global_ranking=True)
    assert list(selection) == [groups[1]] and selection[groups[1]] == [0, 1, 2, 3]


def test_iterative_schedule_in_training_loop_with_live_optimizer():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = Pruner(model, input_size=(3, 8, 8), optimizer=optimizer)
    schedule = IterativePruning(pruner, target=0.5, steps=2, every=3)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    widths = []
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        schedule.step()
        widths.append((model.stem.out_channels, model.conv1.out_channels))
    assert widths[1] == (8, 12) and widths[2] == (6, 9) and widths[5] == (4, 6) and widths[7] == (4, 6)
    assert len(schedule.plans) == 2
    assert optimizer.state[model.stem.weight]["exp_avg"].shape == model.stem.weight.shape


def test_ratios_and_global_ranking_are_refused_together():
    import torch.nn as nn
    from torchpruner import Pruner

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    pruner = Pruner(model, input_size=(4,))
    before = snapshot(model)
    with pytest.raises(ValueError, match="global_ranking"):
        prune_groups(pruner, fraction=0.3, ratios={model[0]: 0.5}, global_ranking=True)
    assert_unchanged(before, model)
