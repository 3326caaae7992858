"""Model-state helpers: unwrapping, example inputs, and running a block without side effects.

Every floor above uses these: the tracer probes the model with :func:`make_example_inputs`
under :func:`preserved_state`, the attributions run their data loop under it, the Pruner and
the checkpoints unwrap ``torch.compile`` wrappers with :func:`unwrap_model`.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parameter import is_lazy

__all__ = [
    "unwrap_model",
    "make_example_inputs",
    "input_shape",
    "to_device",
    "preserved_state",
    "fsdp_modules",
    "fsdp_refusal",
    "collector_paused",
]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block, then leave it as found.

    Tracing a model and analysing its graph allocate tens of thousands of objects (fx nodes,
    proxies, index arrays) that live until the block ends, so every young-generation collection
    meanwhile walks them again for nothing (about a tenth of the time of a trace and prune of
    timm's mobile nets), and a full collection, when one falls due (after other work left much
    garbage), walked everything the process holds inside the trace (0.2 s on a 0.3 s prune).
    Reference counting still frees acyclic garbage, and the collector runs as usual after the
    block. A collector the caller had disabled stays disabled; nested blocks do not re-enable it
    early.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fsdp_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` sharded by FSDP (``FullyShardedDataParallel`` wrappers or
    ``fully_shard``). FSDP is looked up only when torch has already imported it: a model cannot
    be sharded otherwise, and ``import torchpruner`` stays cheap. Before torch 2.6, ``fully_shard``
    and its ``FSDPModule`` live in ``torch.distributed._composable.fsdp``."""
    homes = [sys.modules.get(name) for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")]
    classes = tuple(
        c
        for home in homes
        for c in (getattr(home, "FullyShardedDataParallel", None), getattr(home, "FSDPModule", None))
        if isinstance(c, type)
    )
    if not classes:
        return []
    return [name or type(model).__name__ for name, module in model.named_modules() if isinstance(module, classes)]


def fsdp_refusal(model: nn.Module) -> str:
    """Why an FSDP-sharded model is refused, and what to do instead."""
    names = ", ".join(f"'{n}'" for n in fsdp_modules(model)[:5])
    return (
        f"{type(model).__name__} is sharded with FSDP ({names}): each rank holds only a shard of every "
        "parameter, so no rank can score or slice whole units. Prune before sharding (build the model, "
        "prune it, then shard it), or gather a full state dict, prune an unsharded copy of the model "
        "(save_pruned / load_pruned carry the sizes), and shard it again with a new optimizer; or train "
        "with DistributedDataParallel and use torchpruner.distributed.prune_ddp"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module that owns the parameters: strips ``torch.compile``'s wrapper.

    Raises:
        TypeError: for ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (their replicas
            and gradient reducers hold the old parameter shapes; prune ``model.module`` and wrap
            again afterwards), and for anything that is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "DistributedDataParallel wrappers cannot be pruned directly (the reducer caches the old "
            "parameter shapes): build the Pruner on `ddp.module` and prune with "
            "`ddp = torchpruner.distributed.prune_ddp(ddp, pruner, selection)`, which prunes every rank "
            "alike and returns a new wrapper"
        )
    if isinstance(model, nn.DataParallel):
        raise TypeError(
            "DataParallel wrappers are not supported: prune the wrapped model (`model.module`), then "
            "delete the old wrapper and wrap again (its replicas hold the old parameter shapes)"
        )
    if fsdp_modules(model):
        raise TypeError(fsdp_refusal(model))
    seen = 0
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
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
) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
    if isinstance(input_size, (str, bytes, Mapping)) or not isinstance(
        input_size, (Sequence, np.ndarray, torch.Tensor)
    ):
        raise TypeError(
            f"input_size must be a sequence of ints (the input shape without the batch dim), "
            f"got {input_size!r} ({type(input_size).__name__})"
        )
    entries = input_size.tolist() if isinstance(input_size, (np.ndarray, torch.Tensor)) else list(input_size)
    if not isinstance(entries, list):
        entries = [entries]
    for entry in entries:
        if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (int, np.integer)):
            raise TypeError(
                f"input_size must hold integers, got {entry!r} ({type(entry).__name__}) in {tuple(entries)!r}"
            )
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


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shape, dtype and every bit equal (``-0.0`` differs from ``0.0``, a NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    as_int = _SAME_SIZE_INTS.get(a.element_size()) if a.is_floating_point() else None
    if as_int is not None:
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


class _BufferSnapshot:
    """Every buffer of a model (registered ones, persistent or not), to put back bit for bit.

    Restoring keeps each buffer's tensor object (a traced graph or a user may hold it): a buffer
    the block replaced is put back, one it added is removed, and the values (and shape: QAT
    observers resize theirs on first use) of one it changed in place are copied back. A buffer
    whose bits did not change is not written (its version counter stays), so a graph the user's
    forward saved it in can still be differentiated. Lazy buffers that the block materialised
    stay materialised; buffers on the meta device hold no values to restore.
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[
            tuple[nn.Module, dict[str, tuple[torch.Tensor | None, torch.Tensor | None, tuple[Any, ...]]]]
        ] = []
        for module in model.modules():
            entries: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, tuple[Any, ...]]] = {}
            for name, buffer in module._buffers.items():
                if buffer is None or is_lazy(buffer) or buffer.is_meta:
                    entries[name] = (buffer, None, ())
                else:
                    entries[name] = (buffer, buffer.detach().clone(), self._fingerprint(buffer))
            self.saved.append((module, entries))

    @staticmethod
    def _fingerprint(buffer: torch.Tensor) -> tuple[Any, ...]:
        # no version counter: fused observer kernels write their buffers without bumping it
        return buffer.data_ptr(), tuple(buffer.shape), buffer.dtype, buffer.device

    def restore(self) -> None:
        for module, entries in self.saved:
            for name in [name for name in module._buffers if name not in entries]:
                del module._buffers[name]
                module._non_persistent_buffers_set.discard(name)
            for name, (original, copy, fingerprint) in entries.items():
                if name not in module._buffers or module._buffers[name] is not original:
                    module._buffers[name] = original
                if (
                    original is None
                    or copy is None
                    or (self._fingerprint(original) == fingerprint and _same_bits(original, copy))
                ):
                    continue
                with torch.no_grad():
                    if original.dtype == copy.dtype and original.device == copy.device:
                        try:
                            if original.shape != copy.shape:
                                original.resize_(copy.shape)
                            original.copy_(copy)
                            continue
                        except RuntimeError:  # storage that cannot be resized: swap the data
                            pass
                    original.data = copy


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put every module back in its own mode by calling ``train(mode)`` top-down.

    ``modes`` lists ``(module, training)`` in ``model.modules()`` order (parents first). A module
    whose flag differs is switched with its own ``train(mode)``, so overrides with side effects
    (a block that fuses its branches in eval mode and unfuses them in training) run again; that
    call also switches its children, which are checked after it. Flags still wrong after that (a
    ``train`` override that sets a parent's flag) are set directly.
    """
    for module, mode in modes:
        if module.training != mode:
            module.train(mode)
    for module, mode in modes:
        module.training = mode


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block in eval mode and leave the model's mode, buffers and the global RNG as found.

    Mode: the model is switched with ``model.eval()`` (only when some module is training) and
    put back with each module's own ``train(mode)``, parents first, so that modules whose
    ``train()``/``eval()`` have side effects (re-parametrised blocks that fuse in eval mode) end
    in the state the user had them in, mixed states included.
    Buffers: every buffer is restored bit for bit, shape included (observers of
    quantization-aware training update theirs even in eval mode), keeping each tensor object.
    RNG covered: torch (CPU and every CUDA device already initialised), numpy and ``random``.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = _BufferSnapshot(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        if eval_mode and any(mode for _, mode in modes):
            model.eval()
        yield
    finally:
        _restore_modes(modes)
        buffers.restore()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
