"""Optimizer surgery: training after a prune equals training a masked twin (float64).

Masked trajectory: train a few steps, prune with the live optimizer, train more. A twin (same
weights, same optimizer state) trains with the pruned units zeroed after their activation from the
same step on. Every remaining parameter (and every per-element optimizer state tensor) equals the
corresponding slice of the twin's: the masked units contribute nothing to the kept units' gradients,
and per-element optimizers update each element from its own history only. (The twin's pruned-unit
weights still decay and drift; they are not compared.)
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from torchpruner.pruner import Pruner, register_per_element_optimizer

from oracles import assert_state_matches, assert_unchanged, kept, masked_units, snapshot, train, twin_of

DTYPE = torch.float64

OPTIMIZERS = {
    "SGD": (torch.optim.SGD, dict(lr=0.05)),
    "SGD-nesterov-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "Adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "AdamW": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "AdamW-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "Adamax": (torch.optim.Adamax, dict(lr=1e-2)),
    "NAdam": (torch.optim.NAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "RAdam": (torch.optim.RAdam, dict(lr=1e-2)),
    "RMSprop-centered-momentum": (torch.optim.RMSprop, dict(lr=1e-3, centered=True, momentum=0.9)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.05, initial_accumulator_value=0.1)),
    "Adadelta": (torch.optim.Adadelta, dict(lr=1.0)),
    "ASGD": (torch.optim.ASGD, dict(lr=1e-2, t0=2)),
    "Rprop": (torch.optim.Rprop, dict(lr=1e-2)),
}

PRUNED = [1, 4, 6]
KEEP = [i for i in range(8) if i not in PRUNED]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # no bias before BatchNorm: its gradient would be zero up to rounding noise, which Rprop's sign
    # and centered RMSprop's ratio amplify
    return nn.Sequential(
        nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(DTYPE)


# how each parameter / buffer of the pruned model maps onto the twin's
SLICES = {
    "0.weight": kept(KEEP),
    "1.weight": kept(KEEP),
    "1.bias": kept(KEEP),
    "1.running_mean": kept(KEEP),
    "1.running_var": kept(KEEP),
    "3.weight": kept(None, KEEP),
}


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def assert_matches_twin(model, twin, optimizer, twin_optimizer):
    assert_state_matches(
        model, twin, SLICES, optimizer=optimizer, reference_optimizer=twin_optimizer, rtol=1e-9, atol=1e-12
    )


def trained_with_twin(name, steps=3, n_batches=7):
    """A model trained ``steps`` steps with ``OPTIMIZERS[name]``, its optimizer, an identical twin
    with a deep copy of the optimizer state, and the batches (the rest continue training)."""
    cls, kwargs = OPTIMIZERS[name]
    model = make_model()
    optimizer = cls(model.parameters(), **kwargs)
    data = batches(n_batches)
    train(model, optimizer, data[:steps])
    twin, twin_optimizer = twin_of(model, optimizer, lambda m: cls(m.parameters(), **kwargs))
    return model, optimizer, twin, twin_optimizer, data


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_trajectory(name):
    cls, kwargs = OPTIMIZERS[name]
    model, optimizer, twin, twin_optimizer, data = trained_with_twin(name)
    params_before = list(model.parameters())
    plan = Pruner(model, input_size=(5,), optimizer=optimizer).prune_model(model[0], PRUNED, [model[3], model[1]])
    assert "optim" in str(plan)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    # state_dict round trip after surgery: a fresh optimizer loaded from it continues identically
    reloaded_model, reloaded = twin_of(model, optimizer, lambda m: cls(m.parameters(), **kwargs))
    train(model, optimizer, data[3:])
    train(reloaded_model, reloaded, data[3:])
    with masked_units(twin[2], PRUNED):
        train(twin, twin_optimizer, data[3:])
    assert_matches_twin(model, twin, optimizer, twin_optimizer)
    for a, b in zip(model.parameters(), reloaded_model.parameters()):
        # load_state_dict casts float state to the parameter dtype (NAdam's float32 mu_product)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["SGD-nesterov-wd", "Adam-amsgrad", "RMSprop-centered-momentum", "Rprop"])
def test_prune_between_backward_and_step(name):
    model, optimizer, twin, twin_optimizer, data = trained_with_twin(name)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        x, y = data[3]
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
    Pruner(model, input_size=(5,), optimizer=optimizer).prune_model(model[0], PRUNED, [model[1], model[3]])
    assert model[0].weight.grad.shape == (5, 5)
    optimizer.step()
    twin_optimizer.step()
    train(model, optimizer, data[4:])
    with masked_units(twin[2], PRUNED):  # the twin is masked from the next forward on
        train(twin, twin_optimizer, data[4:])
    assert_matches_twin(model, twin, optimizer, twin_optimizer)


@pytest.mark.parametrize("name", ["SGD-nesterov-wd", "AdamW", "Adagrad"])
def test_two_param_groups_and_scheduler(name):
    cls, kwargs = OPTIMIZERS[name]

    def build(m):
        groups = [
            {"params": list(m[0].parameters()) + list(m[1].parameters()), "lr": kwargs["lr"] * 0.5},
            {"params": list(m[3].parameters()) + list(m[5].parameters()), "weight_decay": 0.05},
        ]
        return cls(groups, **kwargs)

    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model = make_model()
    optimizer = build(model)
    scheduler = schedule(optimizer)
    data = batches(8)
    train(model, optimizer, data[:3], scheduler=scheduler)
    twin, twin_optimizer = twin_of(model, optimizer, build)
    twin_scheduler = schedule(twin_optimizer)
    twin_scheduler.load_state_dict(scheduler.state_dict())
    Pruner(model, input_size=(5,), optimizer=optimizer).prune_model(model[0], PRUNED, [model[3], model[1]])
    train(model, optimizer, data[3:], scheduler=scheduler)
    with masked_units(twin[2], PRUNED):
        train(twin, twin_optimizer, data[3:], scheduler=twin_scheduler)
    assert optimizer.param_groups[0]["lr"] == twin_optimizer.param_groups[0]["lr"] < kwargs["lr"] * 0.5
    assert_matches_twin(model, twin, optimizer, twin_optimizer)


@pytest.mark.parametrize("name", ["LBFGS", "SparseAdam", "Adafactor", "Muon"])
def test_refused_optimizers_by_name(name):
    cls = getattr(torch.optim, name, None)
    if cls is None:
        pytest.skip(f"torch {torch.__version__} has no torch.optim.{name}")
    model = make_model()
    params = [model[3].weight] if name == "Muon" else model.parameters()
    optimizer = cls(params, lr=0.1) if cls is not torch.optim.SparseAdam else cls(list(model.parameters()), lr=0.1)
    with pytest.raises(TypeError, match=cls.__name__):
        Pruner(model, input_size=(5,), optimizer=optimizer)


class MySGD(torch.optim.SGD):
    pass


def test_unknown_optimizer_refused_then_registered():
    model = make_model()
    optimizer = MySGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, batches(1))
    with pytest.raises(TypeError, match="MySGD.*register_per_element_optimizer"):
        Pruner(model, input_size=(5,), optimizer=optimizer)
    register_per_element_optimizer(MySGD)
    Pruner(model, input_size=(5,), optimizer=optimizer).prune_model(model[0], [0], [model[1], model[3]])
    assert optimizer.state[model[0].weight]["momentum_buffer"].shape == (7, 5)


def test_refused_optimizer_on_plan_apply_changes_nothing():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, batches(1))
    plan = Pruner(model, input_size=(5,)).plan(model[0], [0], [model[1], model[3]])
    lbfgs = torch.optim.LBFGS(model.parameters())
    before = snapshot(model, lbfgs)
    with pytest.raises(TypeError, match="LBFGS"):
        plan.apply(model, lbfgs)
    assert_unchanged(before, model, lbfgs)
