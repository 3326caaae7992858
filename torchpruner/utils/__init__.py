"""Cost of a model: parameters, FLOPs (``torch.utils.flop_counter``) and measured latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from torchpruner._state import make_example_inputs, preserved_state, unwrap_model
from torchpruner.graph.evaluation import find_best_module_for_attributions

__all__ = ["count_parameters", "count_flops", "measure_latency", "find_best_module_for_attributions"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared Parameter counted once)."""
    params = unwrap_model(model).parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


@overload
def count_flops(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    batch_size: int = 1,
    by_module: Literal[False] = False,
) -> int: ...


@overload
def count_flops(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    batch_size: int = 1,
    *,
    by_module: Literal[True],
) -> dict[str, int]: ...


@overload
def count_flops(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    batch_size: int = 1,
    by_module: bool = False,
) -> int | dict[str, int]: ...


def count_flops(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    batch_size: int = 1,
    by_module: bool = False,
) -> int | dict[str, int]:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Counts matrix multiplications and convolutions (a multiply-add is 2 FLOPs), as PyTorch does.
    Runs in eval mode under ``no_grad`` and leaves mode and RNG as they were.

    Args:
        model: the model.
        input_size: input shape without the batch dim (or give ``example_inputs``).
        example_inputs: a tensor, tuple or dict, used as given.
        batch_size: batch size of the generated input when ``input_size`` is used.
        by_module: return ``{module name: flops}`` (the root's total under ``"Global"``).
    """
    model = unwrap_model(model)
    args, kwargs = make_example_inputs(model, input_size, example_inputs, batch_size=batch_size)
    counter = FlopCounterMode(display=False)
    with preserved_state(model), torch.no_grad(), counter:
        model(*args, **kwargs)
    if by_module:
        return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops())


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, float]:
    """Wall-clock latency of a forward pass in eval mode under ``no_grad``.

    Args:
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards).

    Returns:
        ``{"median_s", "min_s", "mean_s"}`` over ``repeats`` timed runs after ``warmup`` runs.
    """
    model = unwrap_model(model)
    args, kwargs = make_example_inputs(model, input_size, example_inputs, batch_size=batch_size)
    old_threads = torch.get_num_threads()
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with preserved_state(model), torch.no_grad():
            device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
            for i in range(warmup + repeats):
                if device is not None and device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(*args, **kwargs)
                if device is not None and device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old_threads)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times)}
