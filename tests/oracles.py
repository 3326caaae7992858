"""The correctness oracles of the test suite (ARCHITECTURE.md "Correctness oracles"), in one place.

- **Unchanged**: ``snapshot(model, optimizer)`` before a refused prune (or a dry run, or a trace),
  ``assert_unchanged(before, model, optimizer)`` after it: bit for bit, every parameter and buffer,
  every gradient (None stays None), each Parameter object, module attributes (widths, Dropout p,
  training mode, kept-unit bookkeeping), hooks, the optimizer's state and param groups.
- **Zeroed twin**: ``assert_prune_equals_zeroed_twin(model, prune, mask, inputs)``: pruning equals
  the unpruned twin with the pruned units masked (``masked_units``: a persistent hook on one
  module; ``masked_at_mask_points``: the dependency analysis' mask points of a coupled group),
  float64, eval mode, and the pruned model keeps its Parameter objects.
- **Masked trajectory**: ``twin_of`` (a deep copy with a copy of the optimizer state), ``train``
  (the same steps for both), ``assert_state_matches(model, twin, slices, optimizers)``: each
  tensor of the pruned model and each per-element optimizer state tensor equals its slice of the
  twin's.
- **Rebuilt smaller model** (LayerNorm / attention over the pruned dim, where masking is not
  equivalent): ``rebuilt(small, full, slices)`` loads a smaller model from the kept slices.

A *slicer* maps a tensor of the unpruned model to the part the pruned model keeps; ``slices`` maps
state-dict keys to slicers, every other key is kept whole. ``kept(rows, cols)`` builds one.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.graph import get_graph
from torchpruner.graph.dependency import get_dependency_graph, zeroing_functions

Slicer = Callable[[torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Slicers
# --------------------------------------------------------------------------------------------


def kept(*per_axis: Sequence[int] | torch.Tensor | None) -> Slicer:
    """The slicer keeping ``per_axis[a]`` along axis ``a`` (None: all of it), axis by axis:
    ``kept(rows)(t) == t[rows]``, ``kept(None, cols)(t) == t[:, cols]``."""

    def slicer(tensor: torch.Tensor) -> torch.Tensor:
        for axis, index in enumerate(per_axis):
            if index is not None:
                tensor = tensor.index_select(axis, torch.as_tensor(index, dtype=torch.long, device=tensor.device))
        return tensor

    return slicer


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# --------------------------------------------------------------------------------------------
# Unchanged: bit-for-bit snapshots
# --------------------------------------------------------------------------------------------

_PLAIN = (bool, int, float, str, type(None))


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


@dataclass
class Snapshot:
    tensors: dict[str, torch.Tensor]
    parameters: dict[str, nn.Parameter]
    grads: dict[str, torch.Tensor | None]
    state_keys: list[str]
    attributes: dict[str, dict[str, Any]]
    hooks: dict[str, dict[str, list[Any]]]
    repr: str
    optimizer: dict[str, Any] | None
    optimizer_params: list[list[int]] | None
    optimizer_state_params: list[int] | None


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
    """Everything a refused prune, a dry run or a trace must leave exactly as it was."""
    named = list(
        itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    )
    parameters = dict(model.named_parameters(remove_duplicate=False))
    return Snapshot(
        tensors={name: tensor.detach().clone() for name, tensor in named},
        parameters=parameters,
        grads={name: None if p.grad is None else p.grad.detach().clone() for name, p in parameters.items()},
        state_keys=list(model.state_dict().keys()),
        # plain attributes: widths, groups, Dropout p, training mode, the kept-unit bookkeeping
        attributes={
            name: {k: copy.deepcopy(v) for k, v in vars(m).items() if _is_plain(v)}
            for name, m in model.named_modules(remove_duplicate=False)
        },
        hooks={
            name: {k: list(v.keys()) for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict)}
            for name, m in model.named_modules(remove_duplicate=False)
        },
        repr=repr(model),
        optimizer=None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        optimizer_params=None if optimizer is None else [[id(p) for p in g["params"]] for g in optimizer.param_groups],
        optimizer_state_params=None if optimizer is None else [id(p) for p in optimizer.state],
    )


def assert_unchanged(before: Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """``model`` (and ``optimizer``) are bit for bit what ``before`` recorded."""
    after = snapshot(model, optimizer)
    assert after.repr == before.repr
    assert after.state_keys == before.state_keys
    assert after.tensors.keys() == before.tensors.keys()
    for name, old in before.tensors.items():
        new = after.tensors[name]
        assert new.shape == old.shape and new.dtype == old.dtype and torch.equal(new, old), name
    for name, param in before.parameters.items():
        assert after.parameters[name] is param, f"{name} is a new Parameter object"
        old, new = before.grads[name], after.grads[name]
        assert (old is None) == (new is None), f"{name}.grad"
        if old is not None:
            assert new.shape == old.shape and torch.equal(new, old), f"{name}.grad"
    assert after.attributes == before.attributes
    assert after.hooks == before.hooks
    if before.optimizer is not None:
        assert optimizer is not None
        assert_same_structure(after.optimizer, before.optimizer)
        assert after.optimizer_params == before.optimizer_params
        assert after.optimizer_state_params == before.optimizer_state_params


def assert_reduction_refused(model: nn.Module, x: torch.Tensor, source: nn.Module) -> None:
    """The group of ``source``'s output units is refused at a ``mean`` over the unit axis, listed by
    ``refused_groups()`` and not by ``groups()``, and asking changes nothing."""
    import warnings

    from torchpruner.pruner import Pruner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, example_inputs=(x,))
    before = snapshot(model)
    assert not [g for g in pruner.groups() if source in g.source_modules]
    (refused,) = [g for g in pruner.refused_groups() if source in g.source_modules]
    assert "reduces over the unit axis" in refused.refusal and "mean" in refused.refusal
    assert_unchanged(before, model)


def assert_same_structure(x: Any, y: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors equal bit for bit (tensors: shape, dtype and values)."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            assert_same_structure(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same_structure(u, v, f"{where}/{i}")
    else:
        assert x == y, where


# --------------------------------------------------------------------------------------------
# Zeroed twin
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def masked_units(
    module: nn.Module, indices: Sequence[int], axis: int = 1, *, value: float = 0.0, on: str = "output"
) -> Iterator[None]:
    """Set units ``indices`` (along ``axis``) of ``module``'s output (``on="input"``: of its one
    input) to ``value`` on every forward inside the block: a persistent mask."""
    if on not in ("output", "input"):
        raise ValueError(f"on={on!r}: 'output' or 'input'")
    index = torch.as_tensor(list(indices), dtype=torch.long)

    def mask(tensor: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(tensor.shape[axis], dtype=tensor.dtype, device=tensor.device)
        keep[index] = 0
        shape = [1] * tensor.dim()
        shape[axis] = -1
        keep = keep.view(shape)
        return tensor * keep + (1 - keep) * value

    if on == "output":
        handle = module.register_forward_hook(lambda _m, _inputs, output: mask(output))
    else:
        handle = module.register_forward_pre_hook(lambda _m, inputs: (mask(*inputs),))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def masked_at_mask_points(
    twin: nn.Module,
    example_args: tuple,
    units: tuple[nn.Module, Sequence[int]] | Mapping[int, Sequence[int]],
    *,
    min_sites: int = 1,
) -> Iterator[Callable[..., Any]]:
    """Yield ``twin``'s forward with units zeroed where their groups' consumers read them.

    ``units``: ``(module of twin, output indices)``, or ``{group index: units}`` for the groups of
    a Pruner on a model of the same architecture (group indices are stable across copies).
    At least ``min_sites`` call sites must be masked.
    """
    graph = get_graph(twin, example_args)
    dependencies = get_dependency_graph(graph)
    if isinstance(units, tuple):
        selection = dependencies.select(*units)
    else:
        groups = {group.index: group for group in dependencies.all_groups}
        selection = {groups[index]: list(group_units) for index, group_units in units.items()}
    fns = zeroing_functions(selection)
    assert len(fns) >= min_sites, f"{len(fns)} call sites to mask, expected at least {min_sites}"
    with graph.intercept(fns) as forward:
        yield forward


def counterpart(twin: nn.Module, model: nn.Module, module: nn.Module) -> nn.Module:
    """``twin``'s submodule that holds the place of ``model``'s ``module``."""
    names = {id(m): name for name, m in model.named_modules()}
    return twin.get_submodule(names[id(module)])


def assert_prune_equals_zeroed_twin(
    model: nn.Module,
    prune: Callable[[], Any],
    mask: Callable[[nn.Module], ContextManager[Callable[..., Any] | None]],
    inputs: torch.Tensor | tuple,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> Any:
    """Zeroed-twin oracle: ``prune()`` (which prunes ``model`` in place) gives the outputs of the
    unpruned twin run inside ``mask(twin)`` (its yielded forward, or the twin itself), in float64
    and eval mode; every Parameter object of ``model`` survives. Returns what ``prune()`` returned."""
    assert not any(m.training for m in model.modules()), "the zeroed twin holds in eval mode"
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    twin = copy.deepcopy(model)
    with mask(twin) as forward, torch.no_grad():
        expected = (forward or twin)(*args)
    parameters = dict(model.named_parameters())
    result = prune()
    for name, param in model.named_parameters():
        assert param is parameters[name], f"{name} is a new Parameter object"
    with torch.no_grad():
        got = model(*args)
    assert got.dtype == torch.float64, "run the zeroed twin in float64"
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    return result


# --------------------------------------------------------------------------------------------
# Masked trajectory
# --------------------------------------------------------------------------------------------


def twin_of(
    model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of ``model`` with its own optimizer holding a copy of ``optimizer``'s state."""
    twin = copy.deepcopy(model)
    twin_optimizer = make_optimizer(twin)
    # load_state_dict keeps the tensors it is given: copy them, or unsliced buffers would be shared
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin, twin_optimizer


def train(
    forward: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    *,
    scheduler: Any = None,
    loss: Callable[..., torch.Tensor] = F.cross_entropy,
) -> None:
    """One optimizer step per ``(x, y)`` batch (and one scheduler step, if given)."""
    for x, y in batches:
        optimizer.zero_grad()
        loss(forward(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_state_matches(
    model: nn.Module,
    reference: nn.Module,
    slices: Mapping[str, Slicer] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    reference_optimizer: torch.optim.Optimizer | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Every state-dict tensor of ``model`` equals ``slices[key]`` of ``reference``'s (whole when
    the key has no slicer); with optimizers, so do the per-element state tensors of each
    parameter, the scalar state and the param-group options. Exact unless told otherwise."""
    slices = dict(slices or {})
    state, reference_state = model.state_dict(), reference.state_dict()
    assert state.keys() == reference_state.keys()
    assert set(slices) <= set(state), f"slicers for unknown keys {sorted(set(slices) - set(state))}"
    for key, value in state.items():
        expected = slices.get(key, _whole)(reference_state[key])
        assert value.shape == expected.shape, key
        torch.testing.assert_close(value, expected, rtol=rtol, atol=atol, msg=key)
    if optimizer is None:
        return
    assert reference_optimizer is not None
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        got, want = optimizer.state[param], reference_optimizer.state[reference_params[name]]
        assert got.keys() == want.keys(), name
        for key, value in got.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                expected = slices.get(name, _whole)(want[key])
                assert value.shape == expected.shape, f"{name}/{key}"
                torch.testing.assert_close(value, expected, rtol=rtol, atol=atol, msg=f"{name}/{key}")
            elif isinstance(value, torch.Tensor) and value.dtype == want[key].dtype:
                torch.testing.assert_close(value, want[key], rtol=rtol, atol=atol, msg=f"{name}/{key}")
            elif isinstance(value, torch.Tensor):  # load_state_dict cast the twin's (NAdam's float32 mu_product)
                torch.testing.assert_close(value, want[key].to(value.dtype), msg=f"{name}/{key}")
            else:
                assert value == want[key], f"{name}/{key}"
    assert len(optimizer.param_groups) == len(reference_optimizer.param_groups)
    for group, reference_group in zip(optimizer.param_groups, reference_optimizer.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {
            k: v for k, v in reference_group.items() if k != "params"
        }


# --------------------------------------------------------------------------------------------
# Rebuilt smaller model
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def rebuilt(small: nn.Module, full: nn.Module, slices: Mapping[str, Slicer]) -> nn.Module:
    """``small`` (built smaller by hand) holding ``full``'s kept slices: every state-dict entry of
    ``full`` through its slicer (whole without one), strictly; in ``full``'s dtype, eval mode."""
    slices = dict(slices)
    state = full.state_dict()
    assert set(slices) <= set(state), f"slicers for unknown keys {sorted(set(slices) - set(state))}"
    small = small.to(next(full.parameters()).dtype)
    small.load_state_dict({key: slices.get(key, _whole)(value) for key, value in state.items()}, strict=True)
    return small.eval()
