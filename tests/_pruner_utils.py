"""Helpers for the pruner tests: persistent unit masks and bit-for-bit state snapshots."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, Sequence

import torch
import torch.nn as nn


@contextlib.contextmanager
def masked_units(module: nn.Module, indices: Sequence[int], axis: int = 1) -> Iterator[None]:
    """Zero units ``indices`` (along ``axis``) of ``module``'s output on every forward in the block."""
    index = torch.as_tensor(list(indices), dtype=torch.long)

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(output.shape[axis], dtype=output.dtype, device=output.device)
        mask[index] = 0
        shape = [1] * output.dim()
        shape[axis] = -1
        return output * mask.view(shape)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Dict[str, Any]:
    """Everything a refused prune must leave alone: tensors (with grads), repr, optimizer state."""
    state = {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()},
        "repr": repr(model),
        "attrs": {n: copy.copy(getattr(m, "_torchpruner_kept_units", None)) for n, m in model.named_modules()},
    }
    if optimizer is not None:
        state["optim"] = copy.deepcopy(optimizer.state_dict())
    return state


def assert_same_snapshot(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert a["repr"] == b["repr"]
    assert a["attrs"] == b["attrs"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        x, y = a["tensors"][key], b["tensors"][key]
        assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y), key
    for key in a["grads"]:
        x, y = a["grads"][key], b["grads"][key]
        assert (x is None) == (y is None), key
        if x is not None:
            assert torch.equal(x, y), key
    if "optim" in a:
        assert_same_structure(a["optim"], b["optim"])


def assert_same_structure(x: Any, y: Any) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            assert_same_structure(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert_same_structure(u, v)
    else:
        assert x == y
