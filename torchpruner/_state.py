"""Model-state helpers: unwrapping, example inputs, and running a block without side effects.

Every floor above uses these: the tracer probes the model with :func:`make_example_inputs`
under :func:`preserved_state`, the attributions run their data loop under it, the Pruner and
the checkpoints unwrap ``torch.compile`` wrappers with :func:`unwrap_model`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["unwrap_model", "make_example_inputs", "input_shape", "to_device", "preserved_state"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module that owns the parameters: strips ``torch.compile``'s wrapper.

    Raises:
        TypeError: for ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (their replicas
            and gradient reducers hold the old parameter shapes; prune ``model.module`` and wrap
            again afterwards), and for anything that is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"{type(model).__name__} wrappers are not supported: prune the wrapped model "
            f"(`model.module`), then delete the old wrapper and wrap again (its reducer caches the "
            f"old parameter shapes)")
    seen = 0
    while hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        model = model._orig_mod  # torch.compile's OptimizedModule shares the parameters
        seen += 1
        if seen > 8:
            break
    return model


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return torch.get_default_dtype(), tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def make_example_inputs(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    example_inputs: Any = None,
    device: torch.device | str | None = None,
    batch_size: int = 2,
) -> tuple[tuple, dict]:
    """Normalise what a user gives to describe the model's input into ``(args, kwargs)``.

    Args:
        model: the model (its floating dtype and device are used for generated inputs).
        input_size: the input shape without the batch dimension, any layout. A random tensor of
            shape ``(batch_size, *input_size)`` is generated from a private generator (the global
            RNG is not touched).
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs
            (integer token ids are fine). Used as given, moved to ``device``.
        device: where inputs go; defaults to the device of the model's parameters.
        batch_size: batch size of generated inputs (2, so shapes are never ambiguous).

    Returns:
        ``(args, kwargs)`` ready for ``model(*args, **kwargs)``.
    """
    dtype, param_device = _model_dtype_device(model)
    device = torch.device(device) if device is not None else param_device
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            return (), {k: to_device(v, device) for k, v in example_inputs.items()}
        if isinstance(example_inputs, (tuple, list)):
            return tuple(to_device(v, device) for v in example_inputs), {}
        return (to_device(example_inputs, device),), {}
    if input_size is None:
        raise ValueError("give either input_size (shape without the batch dim) or example_inputs")
    shape = input_shape(input_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size,) + shape, generator=generator, dtype=dtype).to(device)
    return (x,), {}


def input_shape(input_size: Any) -> tuple[int, ...]:
    """``input_size`` checked and returned as a tuple of positive ints (a float such as ``3.9`` is
    refused rather than truncated to 3).

    Raises:
        TypeError: not a sequence, or an entry that is not an integer (floats, bools, strings).
        ValueError: an entry that is zero or negative.
    """
    if isinstance(input_size, (str, bytes, Mapping)) or not isinstance(input_size, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"input_size must be a sequence of ints (the input shape without the batch dim), "
                        f"got {input_size!r} ({type(input_size).__name__})")
    entries = input_size.tolist() if isinstance(input_size, (np.ndarray, torch.Tensor)) else list(input_size)
    if not isinstance(entries, list):
        entries = [entries]
    for entry in entries:
        if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (int, np.integer)):
            raise TypeError(f"input_size must hold integers, got {entry!r} ({type(entry).__name__}) in "
                            f"{tuple(entries)!r}")
    shape = tuple(int(entry) for entry in entries)
    if any(entry <= 0 for entry in shape):
        raise ValueError(f"input_size must be positive, got {shape}")
    return shape


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor inside ``obj`` (nested tuples, lists, dicts) to ``device`` (None: stay)."""
    if isinstance(obj, torch.Tensor):
        # tensors made under torch.inference_mode cannot enter autograd: use a normal copy
        obj = obj.clone() if obj.is_inference() else obj
        return obj if device is None else obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block in eval mode and restore each module's training flag and the global RNG.

    RNG covered: torch (CPU and every CUDA device already initialised), numpy and ``random``.
    """
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
