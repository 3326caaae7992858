"""Defects found in review, each pinned by a test that failed before its fix.

Every test names the promise (ARCHITECTURE.md, "Guarantees") it checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.attributions import TaylorAttributionMetric
from torchpruner.pruner import Pruner

from oracles import assert_prune_equals_zeroed_twin, assert_unchanged, masked_units, snapshot


# --------------------------------------------------------------------------------------------
# 1. Scoring inside a training loop must not change the training run (ARCHITECTURE.md "Guarantees":
#    scoring restores the global RNG state). PyTorch's reproducibility recipe
#    gives the DataLoader its own seeded generator; scoring with that loader advanced it, so the
#    next training epoch saw a different shuffle.
# --------------------------------------------------------------------------------------------


def test_scoring_leaves_a_seeded_dataloader_generator_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    generator = torch.Generator().manual_seed(123)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=generator)
    expected_order = [y.tolist() for _, y in loader]  # what the next epoch should see
    generator.manual_seed(123)

    TaylorAttributionMetric(model, loader, F.cross_entropy, "cpu", max_batches=2).run(model[0])

    assert [y.tolist() for _, y in loader] == expected_order


def test_scoring_leaves_a_seeded_sampler_generator_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    generator = torch.Generator().manual_seed(7)
    sampler = torch.utils.data.RandomSampler(data, generator=generator)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    state = generator.get_state().clone()

    TaylorAttributionMetric(model, loader, F.cross_entropy, "cpu").run(model[0])

    assert torch.equal(generator.get_state(), state)


# --------------------------------------------------------------------------------------------
# 2. "Pruning keeps each nn.Parameter object ... so optimizers, schedulers and hooks that hold
#    references keep working" (ARCHITECTURE.md). Tensor hooks on a parameter (gradient masks, clipping,
#    optimizer-in-backward via register_post_accumulate_grad_hook) silently stopped firing after a
#    prune.
# --------------------------------------------------------------------------------------------


def test_parameter_tensor_hooks_survive_a_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    calls = {"grad": 0, "post": 0}

    def zero_grad_hook(grad):  # e.g. freezing a weight through its gradient
        calls["grad"] += 1
        return grad * 0

    def post_hook(_param):
        calls["post"] += 1

    model[0].weight.register_hook(zero_grad_hook)
    handle = model[0].bias.register_post_accumulate_grad_hook(post_hook)

    Pruner(model, (6,)).prune_model(model[0], [0, 5], cascading_modules=[model[2]])
    F.cross_entropy(model(x), y).backward()

    assert calls == {"grad": 1, "post": 1}
    assert torch.count_nonzero(model[0].weight.grad) == 0
    handle.remove()  # handles taken before the prune still work
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert calls == {"grad": 2, "post": 1}


# --------------------------------------------------------------------------------------------
# 3. "A refused prune leaves model and optimizer exactly as they were" / bad input raises
#    "before anything is modified" (ARCHITECTURE.md). A model torch.fx cannot trace (data-dependent
#    control flow, shape asserts) falls back to the forward-hook trace, which cannot see merges
#    (x + f(x), torch.cat): the plan was accepted and the model left broken.
# --------------------------------------------------------------------------------------------


class _UntraceableResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        if h.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            h = h + self.body(h)
        return self.head(h)


def test_hooks_trace_refuses_a_prune_into_an_invisible_merge():
    torch.manual_seed(0)
    model = _UntraceableResidual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    optimizer.step()
    pruner = Pruner(model, (3, 8, 8), "cpu", optimizer)
    assert pruner.graph().method == "hooks"
    before = snapshot(model, optimizer)

    with pytest.raises(ValueError, match="'body'"):
        pruner.prune_model(model.body, [0], cascading_modules=[model.head])

    assert_unchanged(before, model, optimizer)
    model(x)  # still runs


def test_hooks_trace_still_prunes_a_plain_chain():
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3)
            self.c2 = nn.Conv2d(4, 2, 3)
            self.fc = nn.Linear(2 * 4 * 4, 3)

        def forward(self, x):
            if float(x.abs().sum()) < 0:  # a branch on values: neither torch.fx nor torch.export captures it
                x = -x
            h = torch.relu(self.c1(x))
            return self.fc(self.c2(h).flatten(1))

    torch.manual_seed(0)
    model = Chain().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pruner = Pruner(model, (3, 8, 8))
    assert pruner.graph().method == "hooks"
    pruner.prune_model(model.c2, [1], cascading_modules=[model.fc])
    assert model(x).shape == (2, 3)


# --------------------------------------------------------------------------------------------
# 4. Zeroed-twin oracle / "bad input ... raises before anything is modified" (ARCHITECTURE.md) for the
#    explicit cascading_modules path: the data flow was followed by shapes alone, so an op that
#    keeps the shape but reorders the units (x.flip(1), x.roll(1, 1), x[:, perm]) was taken for an
#    element-wise op (the pruned model silently computed something else), and a reduction over
#    the unit axis whose output happened to have a matching shape prefix (x.sum(1) with H == C)
#    was accepted and left the model broken. cascading_modules=None (dependency analysis) was right.
# --------------------------------------------------------------------------------------------


class _AcrossUnits(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.next = nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(2 * 8 * 8, 2)
        self.fc_sum = nn.Linear(8 * 8, 2)
        self.op = op
        self.register_buffer("perm", torch.arange(7, -1, -1))

    def forward(self, x):
        h = self.conv(x)
        if self.op == "flip":
            h = h.flip(1)
        elif self.op == "roll":
            h = torch.roll(h, 1, dims=1)
        elif self.op == "index":
            h = h[:, self.perm]
        elif self.op == "softmax":
            h = F.softmax(h, dim=1)
        elif self.op == "sum":  # [N, 8, 8, 8] -> [N, 8, 8]: shape prefix matches
            return self.fc_sum(h.sum(1).flatten(1))
        return self.fc(self.next(h).flatten(1))


@pytest.mark.parametrize("op", ["roll", "index", "softmax", "sum"])
@pytest.mark.parametrize("cascade", ["explicit", "discovered"])
def test_ops_across_units_are_refused_on_both_paths(op, cascade):
    torch.manual_seed(0)
    model = _AcrossUnits(op).double()
    pruner = Pruner(model, (3, 8, 8))
    assert pruner.graph().method == "fx"
    listed = ([model.fc_sum] if op == "sum" else [model.next]) if cascade == "explicit" else None
    before = snapshot(model)
    with pytest.raises(ValueError, match="'conv'"):
        pruner.prune_model(model.conv, [0], cascading_modules=listed)
    assert_unchanged(before, model)


def test_a_channel_flip_is_a_permutation_both_paths_follow():
    """``h.flip(1)`` reorders the units consistently before and after pruning: the one analysis
    maps unit c to column 7 - c of the next layer, for a listed cascade as for discovery."""
    torch.manual_seed(0)
    model = _AcrossUnits("flip").double()
    twin = copy.deepcopy(model)
    plans = [
        Pruner(m, (3, 8, 8)).plan(m.conv, [0, 5], cascading_modules=c) for m, c in ((model, [model.next]), (twin, None))
    ]
    assert [str(e.keep.tolist()) for e in plans[0].edits if hasattr(e, "keep")] == [
        str(e.keep.tolist()) for e in plans[1].edits if hasattr(e, "keep")
    ]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        mask = torch.ones(1, 8, 1, 1, dtype=torch.float64)
        mask[:, [0, 5]] = 0
        handle = twin.conv.register_forward_hook(lambda m, i, o: o * mask)
        expected = twin(x)
        handle.remove()
        plans[0].apply(model)
        assert model.next.in_channels == 6
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


class _AlongOtherDims(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x)[:, :, 1:-1].flip(-1).softmax(dim=2)
        return self.fc(h.mean((2, 3)))


def test_explicit_cascade_still_follows_ops_along_other_dims():
    torch.manual_seed(0)
    model = _AlongOtherDims().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, (3, 8, 8)).prune_model(model.conv, [0, 5], cascading_modules=[model.fc]),
        # softmax(0) != 0: mask where the units reach the consumer
        lambda twin: masked_units(twin.fc, [0, 5], on="input"),
        x,
        rtol=1e-12,
        atol=1e-12,
    )
