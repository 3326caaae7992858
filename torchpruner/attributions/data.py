"""Batches, per-example losses and tensor helpers: what every runner and metric reads.

The bottom of the attributions floor: it imports only the ground floor (``torchpruner._state``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from torchpruner._state import to_device

logger = logging.getLogger(__name__)

BatchFn = Callable[[Any], tuple[Any, Any]]

#: Keys tried, in order, by the default ``batch_fn`` when a batch is a mapping.
INPUT_KEYS: tuple[str, ...] = ("input", "inputs", "x", "image", "images", "data", "input_ids")
TARGET_KEYS: tuple[str, ...] = ("target", "targets", "y", "label", "labels")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One batch, already on the scoring device.

    Attributes:
        args: positional model inputs.
        kwargs: keyword model inputs (from a dict returned by ``batch_fn``).
        target: whatever the criterion takes as its second argument.
        size: number of examples (dim 0 of the first tensor input).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    size: int = 0


def default_batch_fn(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, target)``.

    Accepted layouts:
      * ``(x, y)`` or ``[x, y]``: ``x`` is the model input, ``y`` the target;
      * ``(x, y, *rest)``: the extra items (sample indices, weights, ...) are ignored;
      * a mapping: the input is the first key found among :data:`INPUT_KEYS`, the target the
        first found among :data:`TARGET_KEYS`.

    For anything else (several model inputs, keyword inputs, a target in a nested structure)
    pass ``batch_fn=`` to the metric: it must return ``(inputs, target)`` where ``inputs`` is a
    tensor, a tuple of positional inputs, or a dict of keyword inputs.
    """
    if isinstance(batch, Mapping):
        input_key = next((k for k in INPUT_KEYS if k in batch), None)
        target_key = next((k for k in TARGET_KEYS if k in batch), None)
        if input_key is None or target_key is None:
            raise ValueError(
                f"cannot find the input and target in a batch with keys {sorted(batch)}: "
                f"expected one of {INPUT_KEYS} and one of {TARGET_KEYS}; "
                "pass batch_fn=lambda b: (inputs, target) to the metric"
            )
        return batch[input_key], batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, target); "
        "expected (x, y), (x, y, *rest) or a dict, or pass batch_fn=lambda b: (inputs, target)"
    )


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def make_batch(raw: Any, batch_fn: BatchFn | None, device: torch.device | None) -> Batch:
    """Turn one item of the data generator into a :class:`Batch` on ``device``."""
    inputs, target = (batch_fn or default_batch_fn)(raw)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    args, kwargs, target = to_device(args, device), to_device(kwargs, device), to_device(target, device)
    first = first_tensor((args, kwargs))
    if first is None or first.dim() == 0:
        raise ValueError("a batch has no tensor input with a batch dimension")
    return Batch(args=args, kwargs=kwargs, target=target, size=int(first.shape[0]))


def _has_shared_iterator(data_generator: Any) -> TypeGuard[DataLoader[Any]]:
    """A DataLoader with persistent workers whose one shared iterator exists (a loop may be
    iterating it: ``iter(loader)`` would reset it)."""
    return (
        isinstance(data_generator, DataLoader)
        and data_generator.persistent_workers
        and data_generator.num_workers > 0
        and getattr(data_generator, "_iterator", None) is not None
    )


@contextlib.contextmanager
def scoring_iterator(data_generator: Iterable[Any]) -> Iterator[Iterator[Any]]:
    """An iterator over ``data_generator`` that leaves a training loop's own iteration alone.

    A ``DataLoader`` with ``persistent_workers=True`` keeps one shared iterator and resets it on
    every ``iter(loader)``: scoring with the loader that the training loop is iterating would
    restart or exhaust the loop's epoch. Once such a loader has its shared iterator, scoring
    iterates a private one instead, with workers of its own that are shut down when the block
    exits. (Starting workers takes time: a separate scoring loader is the faster pattern.)
    Every other iterable is iterated with ``iter()``.
    """
    if not _has_shared_iterator(data_generator):
        yield iter(data_generator)
        return
    logger.debug("the DataLoader's persistent iterator may be in use: scoring iterates a private one")
    private = data_generator._get_iterator()
    try:
        yield private
    finally:
        shutdown = getattr(private, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# --------------------------------------------------------------------------------------------
# Per-example losses
# --------------------------------------------------------------------------------------------
def _criterion_name(criterion: Any) -> str:
    if isinstance(criterion, nn.Module):
        return f"{type(criterion).__name__}()"
    return getattr(criterion, "__qualname__", None) or getattr(criterion, "__name__", None) or repr(criterion)


def _accepts_reduction(fn: Callable[..., Any]) -> bool | None:
    """True/False when the signature says so, None when it cannot be inspected."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "reduction" or p.kind is p.VAR_KEYWORD for p in params)


def _plain_cross_entropy(criterion: Any, output: Any, target: Any) -> torch.Tensor | None:
    """Per-example cross-entropy as ``logsumexp(output) - output[target]`` when ``criterion`` is
    plain cross-entropy (``F.cross_entropy`` or an ``nn.CrossEntropyLoss()`` with no class
    weights, label smoothing or ignored targets in the batch) on logits ``[N, C]`` and class
    indices ``[N]`` outside autograd; None otherwise. The same values as the criterion (to float
    rounding), several times faster on the CPU for the tall stacked batches of coalition
    evaluations (``log_softmax`` over a short last dim is slow there)."""
    if criterion is F.cross_entropy:
        pass
    elif type(criterion) is nn.CrossEntropyLoss:
        if criterion.weight is not None or criterion.label_smoothing != 0.0 or criterion.ignore_index >= 0:
            return None
    else:
        return None
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if output.dim() != 2 or target.dim() != 1 or target.dtype != torch.long or len(target) != len(output):
        return None
    if output.dtype not in (torch.float32, torch.float64) or output.requires_grad or len(target) == 0:
        return None
    if bool(target.min() < 0) or bool(target.max() >= output.shape[1]):  # ignored or invalid: the criterion decides
        return None
    return torch.logsumexp(output, 1) - output.gather(1, target[:, None]).squeeze(1)


def per_example_loss(
    criterion: Callable[..., Any], output: Any, target: Any, batch_size: int | None = None
) -> torch.Tensor:
    """Loss of every example of a batch, shape ``[N]``.

    ``criterion`` is called as ``criterion(output, target, reduction="none")`` (the
    ``torch.nn.functional`` convention). A loss module with a ``reduction`` attribute
    (``nn.CrossEntropyLoss()``) is switched to ``"none"`` for the call and restored afterwards,
    even when it raises. Non-batch dims of the result (tokens, pixels) are averaged.

    Args:
        criterion: the loss function or loss module.
        output: the model output for the batch.
        target: the target for the batch.
        batch_size: the expected number of examples; checked when given.

    Raises:
        TypeError: the criterion does not accept ``reduction``.
        ValueError: the criterion returned a scalar or a tensor whose first dim is not the batch.
    """
    fast = _plain_cross_entropy(criterion, output, target)
    if fast is not None:
        return fast
    name = _criterion_name(criterion)
    if isinstance(criterion, nn.Module) and isinstance(getattr(criterion, "reduction", None), str):
        previous = criterion.reduction
        criterion.reduction = "none"  # type: ignore[assignment]  # __setattr__ is typed for tensors/modules
        try:
            loss = criterion(output, target)
        finally:
            criterion.reduction = previous
    else:
        accepts = _accepts_reduction(criterion.forward if isinstance(criterion, nn.Module) else criterion)
        if accepts is False:
            raise TypeError(
                f"criterion {name} does not accept a `reduction` argument, so it cannot give "
                "per-example losses; use a torch.nn.functional loss, a loss module such as "
                "nn.CrossEntropyLoss(), or a function criterion(output, target, reduction='none')"
            )
        try:
            loss = criterion(output, target, reduction="none")
        except TypeError as error:
            if accepts is None and "reduction" in str(error):
                raise TypeError(
                    f"criterion {name} does not accept reduction='none', so it cannot give per-example losses"
                ) from error
            raise
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"criterion {name} returned {type(loss).__name__}, not a tensor")
    if loss.dim() == 0:
        if batch_size == 1:
            return loss.reshape(1)
        raise ValueError(
            f"criterion {name} returned a scalar for a batch of {batch_size} examples with "
            "reduction='none': it cannot give per-example losses"
        )
    if batch_size is not None and loss.shape[0] != batch_size:
        raise ValueError(
            f"criterion {name} returned losses of shape {tuple(loss.shape)} for a batch of "
            f"{batch_size} examples: expected the batch on dim 0"
        )
    if loss.dim() > 1:
        loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    return loss


# --------------------------------------------------------------------------------------------
# Small tensor helpers
# --------------------------------------------------------------------------------------------
def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider (half/bfloat16 results of autocast are upcast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def units_view(t: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """View an activation-shaped tensor as ``[N, C, positions]`` (positions may be 1)."""
    if unit_axis == 0:
        raise ValueError("the unit axis cannot be the batch axis (dim 0)")
    t = t.movedim(unit_axis, 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def sum_positions(t: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """Sum an activation-shaped tensor over every axis but batch and units: ``[N, C]``."""
    return units_view(wide(t), unit_axis).sum(dim=2)


def unit_mask_shape(ndim: int, unit_axis: int, num_units: int) -> list[int]:
    shape = [1] * ndim
    shape[unit_axis] = num_units
    return shape
