"""The one data loop shared by every attribution metric.

A metric only says what it collects for one batch: a per-example, per-unit tensor of shape
``[N, C]`` (``score_batch``), or, for metrics that need no data, one score per unit
(``score_without_data``). Everything else lives here: turning batches into model inputs,
per-example losses, locating the evaluation point in the traced graph, intercepting it,
the progress bar, reducing over examples, and leaving the model exactly as it was found.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

Reduction = Union[str, Callable[[np.ndarray], np.ndarray]]
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

    args: tuple
    kwargs: dict = field(default_factory=dict)
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


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move every tensor inside ``obj`` (nested tuples, lists, dicts) to ``device``."""
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


# --------------------------------------------------------------------------------------------
# Per-example losses
# --------------------------------------------------------------------------------------------
def _criterion_name(criterion: Any) -> str:
    if isinstance(criterion, nn.Module):
        return f"{type(criterion).__name__}()"
    return getattr(criterion, "__qualname__", None) or getattr(criterion, "__name__", None) or repr(
        criterion
    )


def _accepts_reduction(fn: Callable) -> bool | None:
    """True/False when the signature says so, None when it cannot be inspected."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "reduction" or p.kind is p.VAR_KEYWORD for p in params)


def per_example_loss(
    criterion: Callable, output: Any, target: Any, batch_size: int | None = None
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
    name = _criterion_name(criterion)
    if isinstance(criterion, nn.Module) and isinstance(getattr(criterion, "reduction", None), str):
        previous = criterion.reduction
        criterion.reduction = "none"
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
                    f"criterion {name} does not accept reduction='none', so it cannot give "
                    "per-example losses"
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


# --------------------------------------------------------------------------------------------
# Leaving the model as found
# --------------------------------------------------------------------------------------------
def _loader_generators(data_generator: Any) -> list[torch.Generator]:
    """The private ``torch.Generator`` objects a DataLoader (or its samplers) draws from."""
    found: list[torch.Generator] = []
    sampler = getattr(data_generator, "sampler", None)
    batch_sampler = getattr(data_generator, "batch_sampler", None)
    for owner in (data_generator, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None) if owner is not None else None
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


@contextlib.contextmanager
def left_as_found(model: nn.Module, data_generator: Any = None) -> Iterator[None]:
    """Eval mode (every module's own training flag restored on exit) and the global torch,
    CUDA, numpy and python RNG states restored on exit, as well as the private generators of
    ``data_generator`` (``DataLoader(..., generator=g)``, ``RandomSampler(..., generator=g)``).

    Iterating a shuffled DataLoader draws from the global torch generator (or from its own), and
    scoring inside a training loop must not change the training run. BatchNorm statistics cannot
    move in eval mode.
    """
    from torchpruner.graph import preserved_state

    generators = [(g, g.get_state()) for g in _loader_generators(data_generator)]
    # inference_mode(False): gradient metrics must work even when called under inference_mode
    try:
        with preserved_state(model, eval_mode=True), torch.inference_mode(False):
            yield
    finally:
        for generator, state in generators:
            generator.set_state(state)


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------
def progress_enabled(progress: bool | None) -> bool:
    """``progress`` wins when given; otherwise a bar only on a terminal and unless
    ``TORCHPRUNER_PROGRESS=0``."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("TORCHPRUNER_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Reduction over examples
# --------------------------------------------------------------------------------------------
def check_reduction(reduction: Reduction) -> None:
    if callable(reduction) or reduction in ("mean", "sum", "none"):
        return
    raise ValueError(f"reduction must be 'mean', 'sum', 'none' or a callable, got {reduction!r}")


def reduce_scores(per_example: np.ndarray, reduction: Reduction) -> np.ndarray:
    """Reduce an ``[examples, units]`` array to one score per unit (or keep it for ``"none"``)."""
    check_reduction(reduction)
    if reduction == "none":
        return per_example
    if reduction == "mean":
        return per_example.mean(axis=0)
    if reduction == "sum":
        return per_example.sum(axis=0)
    scores = np.asarray(reduction(per_example))
    if scores.shape != per_example.shape[1:]:
        raise ValueError(
            f"the reduction callable returned shape {scores.shape}; expected "
            f"{per_example.shape[1:]} (one score per unit)"
        )
    return scores


class _ScoreAccumulator:
    """Streams ``[N, C]`` batch scores; keeps every row only when the reduction needs them."""

    def __init__(self, reduction: Reduction) -> None:
        check_reduction(reduction)
        self.reduction = reduction
        self.rows: list[np.ndarray] = []
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, scores: torch.Tensor) -> None:
        array = scores.detach().to("cpu", torch.float64).numpy()
        self.count += array.shape[0]
        if self.reduction in ("mean", "sum"):
            batch_sum = array.sum(axis=0)
            self.total = batch_sum if self.total is None else self.total + batch_sum
        else:
            self.rows.append(array)

    def result(self) -> np.ndarray:
        if self.reduction == "mean":
            return self.total / self.count
        if self.reduction == "sum":
            return self.total
        return reduce_scores(np.concatenate(self.rows, axis=0), self.reduction)


# --------------------------------------------------------------------------------------------
# The shared machine: run the model with the evaluation point intercepted
# --------------------------------------------------------------------------------------------
class SiteRunner:
    """Runs the model on a batch with one call site intercepted.

    One interception stays installed for a whole ``run``; what it does on each forward is set
    by :meth:`activation`, :meth:`activation_and_gradient` and :meth:`losses`. The function
    applied at the site always returns a new tensor, so in-place operations downstream
    (``ReLU(inplace=True)``, ``out += identity``) never touch the captured activation.
    """

    def __init__(self, forward: Callable, site: Any, criterion: Callable) -> None:
        self.forward = forward
        self.site = site
        self.label: str = site.label
        self.unit_axis: int = site.unit_axis
        self.num_units: int = site.num_units
        self.criterion = criterion
        self._transform: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.clone()

    # The function installed at the call site (delegates to the current transform).
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self._transform(z)

    def _check_units(self, z: torch.Tensor) -> None:
        if z.dim() <= self.unit_axis or z.shape[self.unit_axis] != self.num_units:
            raise ValueError(
                f"the activation at {self.site.name} has shape {tuple(z.shape)}, expected "
                f"{self.num_units} units on axis {self.unit_axis} (as traced)"
            )

    def _run(self, batch: Batch, transform: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        self._transform = transform
        try:
            return self.forward(*batch.args, **batch.kwargs)
        finally:
            self._transform = lambda z: z.clone()

    def activation(self, batch: Batch) -> torch.Tensor:
        """The activation ``z`` at the evaluation point (no gradient)."""
        captured: list[torch.Tensor] = []

        def capture(z: torch.Tensor) -> torch.Tensor:
            self._check_units(z)
            captured.append(z.detach())
            return z.clone()

        with torch.no_grad():
            self._run(batch, capture)
        if not captured:
            raise RuntimeError(f"the evaluation point {self.site.name} was not reached")
        return captured[0]

    def activation_and_gradient(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, ∂ℓₙ/∂z)`` for every example n, from one forward and one backward.

        Per-example gradients come from the gradient of Σₙ ℓₙ: in eval mode each example's
        output depends on its own input only (BatchNorm uses running statistics, Dropout is off),
        so ∂(Σₘ ℓₘ)/∂z[n] = ∂ℓₙ/∂z[n]. Only ``z`` is differentiated (``torch.autograd.grad``), so
        the parameters' ``.grad`` are never touched; ``z`` is detached from the upstream graph,
        which also spares the backward through earlier layers.
        """
        captured: list[torch.Tensor] = []

        def capture(z: torch.Tensor) -> torch.Tensor:
            self._check_units(z)
            leaf = z.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf.clone()  # a non-leaf copy: downstream in-place ops are allowed

        with torch.enable_grad():
            output = self._run(batch, capture)
            if not captured:
                raise RuntimeError(f"the evaluation point {self.site.name} was not reached")
            losses = per_example_loss(self.criterion, output, batch.target, batch.size)
            (grad,) = torch.autograd.grad(wide(losses).sum(), captured[0], allow_unused=True)
        z = captured[0].detach()
        if grad is None:  # the loss does not depend on this activation
            grad = torch.zeros_like(z)
        return z, grad

    def losses(self, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example losses ``[N]`` (float64) with the units where ``keep`` is False zeroed
        at the evaluation point (``keep=None``: nothing zeroed)."""

        def apply(z: torch.Tensor) -> torch.Tensor:
            self._check_units(z)
            if keep is None:
                return z.clone()
            mask = keep.to(z.device).reshape(unit_mask_shape(z.dim(), self.unit_axis, self.num_units))
            return z.masked_fill(~mask, 0)

        with torch.no_grad():
            output = self._run(batch, apply)
            return per_example_loss(self.criterion, output, batch.target, batch.size).to(torch.float64)


# --------------------------------------------------------------------------------------------
# The metric base class
# --------------------------------------------------------------------------------------------
def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name or type(model).__name__
    return None


class AttributionMetric:
    """Base class of every attribution metric: one score per unit, higher = keep.

    Args:
        model: the model to score (left exactly as found: mode, hooks, ``.grad``, BatchNorm
            statistics and the global RNG state are restored).
        data_generator: an iterable of batches (a ``DataLoader``); see :func:`default_batch_fn`
            for the accepted batch layouts.
        criterion: ``criterion(output, target, reduction="none")`` as in
            ``torch.nn.functional``, or a loss module instance (``nn.CrossEntropyLoss()``).
        device: where batches are moved (the model is not moved). ``None``: the device of the
            model's first parameter.
        reduction: how per-example scores become one score per unit: ``"mean"`` (default),
            ``"sum"``, ``"none"`` (an ``[examples, units]`` array) or a callable taking that
            array and returning one value per unit (e.g. ``lambda s: s.mean(0) + 2 * s.std(0)``).
        max_batches: stop after this many batches (``None``: the whole generator).
        batch_fn: ``batch_fn(batch) -> (inputs, target)``; ``inputs`` a tensor, a tuple of
            positional inputs or a dict of keyword inputs.
        progress: show a tqdm bar over batches. ``None``: only on a terminal and unless the
            environment variable ``TORCHPRUNER_PROGRESS=0``.
        **method_options: options of the metric (``signed=`` for Taylor, ``sv_samples=`` and
            ``seed=`` for Shapley); ``run(..., **kwargs)`` overrides them per call.
    """

    #: Short name used in progress bars and messages.
    name: ClassVar[str] = "Attribution"
    #: Options this metric understands, with their defaults.
    default_options: ClassVar[dict[str, Any]] = {}
    #: Metrics that compute scores without a pass over the data set this to False.
    needs_data: ClassVar[bool] = True
    #: Metrics that need neither the data nor the traced evaluation point (WeightNorm).
    needs_trace: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable,
        criterion: Callable,
        device: torch.device | str | None = None,
        reduction: Reduction = "mean",
        max_batches: int | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool | None = None,
        **method_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_reduction(reduction)
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        self.model = model
        self.data_generator = data_generator
        self.criterion = criterion
        self.device = torch.device(device) if device is not None else None
        self.reduction = reduction
        self.max_batches = max_batches
        self.batch_fn = batch_fn
        self.progress = progress
        self.method_options = self._check_options(method_options)

    # ---------------------------------------------------------------- options
    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            valid = ", ".join(sorted(self.default_options)) or "none"
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {unknown}; valid options: {valid}"
            )
        return dict(options)

    def options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults, then constructor options, then ``run`` keyword arguments."""
        return {**self.default_options, **self.method_options, **self._check_options(overrides)}

    # ---------------------------------------------------------------- public API
    def run(
        self,
        module: nn.Module | Any,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        **kwargs: Any,
    ) -> np.ndarray:
        """Score the units of ``module``.

        Args:
            module: a module of the model (its output is the evaluation point), a
                ``CallSite`` of the model's traced graph, or a coupled group from
                ``pruner.groups()``: one score per group unit, for removing the unit from every
                layer of the group at once (see :mod:`torchpruner.attributions.groups`).
                A module whose units are shared with other layers (a residual stream) is scored
                locally, with a :class:`~torchpruner.attributions.groups.CoupledGroupWarning`.
            find_best_evaluation_module: evaluate after the BatchNorm / activation / Dropout
                that follow ``module`` in the data flow (stops at a merge such as add or cat).
                Ignored for a group: it is always scored where zeroing equals pruning.
            call_index: which call of a module that runs several times per forward (not for groups).
            **kwargs: metric options overriding the constructor's (``signed``, ``sv_samples``,
                ``seed``, ...).

        Returns:
            ``np.ndarray`` of shape ``[units]`` (``[examples, units]`` for ``reduction="none"``).
        """
        options = self.options(kwargs)
        model = self._unwrapped_model()
        from .groups import is_group

        if is_group(module):
            return self._run_group(model, module, options)
        site_module = getattr(module, "module", None) if _is_call_site(module) else module
        if not _is_call_site(module):
            if not isinstance(module, nn.Module):
                raise TypeError(f"module must be an nn.Module or a CallSite, got {type(module).__name__}")
            if _module_name(model, module) is None:
                raise ValueError(
                    f"{type(module).__name__} module is not part of the model "
                    f"{type(model).__name__} (scoring needs a submodule of the model)"
                )

        with left_as_found(model, self.data_generator):
            if not self.needs_trace:
                return self._finish(self.score_without_data(model, site_module, None, options))
            batches = self._batches(model)
            first = next(batches, None)
            if first is None:
                raise ValueError(
                    f"the data generator yielded no batches; {type(self).__name__} needs at least "
                    "one batch (to trace the model)"
                )
            site, graph = self._evaluation_point(
                model, module, first, find_best_evaluation_module, call_index
            )
            if not self.needs_data:
                return self._finish(self.score_without_data(model, site_module, site, options))
            return self._data_pass(model, graph, site, itertools.chain([first], batches), options)

    # ---------------------------------------------------------------- for subclasses
    def score_batch(self, runner: SiteRunner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """Per-example, per-unit scores ``[N, C]`` for one batch (metrics with a data pass)."""
        raise NotImplementedError

    def score_without_data(
        self, model: nn.Module, module: nn.Module | None, site: Any, options: dict[str, Any]
    ) -> torch.Tensor:
        """One score per unit ``[C]`` for metrics without a data pass. ``site`` is the traced
        evaluation point (``None`` when ``needs_trace`` is False)."""
        raise NotImplementedError

    #: False for metrics that cannot score a coupled group (``run(group)`` raises TypeError).
    supports_groups: ClassVar[bool] = True

    def score_group_batch(self, runner: Any, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """Per-example, per-group-unit scores ``[N, U]`` for one batch; ``runner`` is a
        :class:`~torchpruner.attributions.groups.GroupRunner`."""
        raise NotImplementedError(f"{type(self).__name__} does not score coupled groups")

    def score_group_without_data(self, model: nn.Module, group: Any, options: dict[str, Any]) -> torch.Tensor:
        """One score per group unit ``[U]`` for metrics without a data pass."""
        raise NotImplementedError(f"{type(self).__name__} does not score coupled groups")

    def prepare_group(self, runner: Any, options: dict[str, Any]) -> None:
        """Called once per ``run(group)`` before the first batch."""

    def describe(self, module_name: str, options: dict[str, Any]) -> str:
        """Progress-bar description."""
        return f"{self.name} {module_name}"

    def prepare(self, site: Any, options: dict[str, Any]) -> None:
        """Called once per run before the first batch (e.g. draw permutations)."""

    def intercept_function(self, runner: SiteRunner) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function installed at the call site for the whole run."""
        return runner

    # ---------------------------------------------------------------- internals
    def _unwrapped_model(self) -> nn.Module:
        from torchpruner.graph import unwrap_model

        return unwrap_model(self.model)

    def _device(self, model: nn.Module) -> torch.device | None:
        if self.device is not None:
            return self.device
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        return first.device if first is not None else None

    def _batches(self, model: nn.Module) -> Iterator[Batch]:
        """The data generator's batches (at most ``max_batches``) as :class:`Batch` on the device."""
        iterator = iter(self.data_generator)
        if self.max_batches is not None:
            iterator = itertools.islice(iterator, self.max_batches)
        device = self._device(model)
        return (make_batch(raw, self.batch_fn, device) for raw in iterator)

    def _total_batches(self) -> int | None:
        try:
            total = len(self.data_generator)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if self.max_batches is not None:
            total = self.max_batches if total is None else min(total, self.max_batches)
        return total

    def _evaluation_point(
        self, model: nn.Module, module: Any, batch: Batch, find_best: bool, call_index: int
    ) -> tuple[Any, Any]:
        from torchpruner.graph import get_graph

        graph = get_graph(model, batch.args, batch.kwargs or None)
        if _is_call_site(module):
            site = module
            if site not in graph.sites:
                raise ValueError(f"call site {getattr(site, 'name', site)} is not in the traced graph of the model")
        else:
            try:
                site = graph.evaluation_point(module, find_best=find_best, call_index=call_index)
            except ValueError as error:
                if any(True for _ in module.children()):
                    raise ValueError(
                        f"module '{graph.module_name(module)}' ({type(module).__name__}) is a "
                        "container: it has no units of its own; score one of its layers"
                    ) from error
                raise
        if site.unit_axis is None or not site.num_units:
            label = graph.module_name(module) if isinstance(module, nn.Module) else site.name
            raise ValueError(
                f"the evaluation point {site.name} of {label} has no units (output shape "
                f"{tuple(site.shape) if site.shape is not None else None}); score a layer whose "
                "output is a tensor with a unit axis (Linear, Conv, BatchNorm, activation)"
            )
        logger.debug("%s: evaluation point %s (unit axis %d, %d units)", self.name, site.name, site.unit_axis, site.num_units)
        if isinstance(module, nn.Module):
            from .groups import warn_if_coupled

            warn_if_coupled(graph, module, call_index, stacklevel=4)
        return site, graph

    def _data_pass(
        self, model: nn.Module, graph: Any, site: Any, batches: Iterable[Batch], options: dict[str, Any]
    ) -> np.ndarray:
        self.prepare(site, options)
        runner = SiteRunner(None, site, self.criterion)
        return self._scoring_loop(
            graph, {site: self.intercept_function(runner)}, runner,
            lambda batch: self.score_batch(runner, batch, options),
            site.num_units, self.describe(site.label, options), batches,
        )

    def _run_group(self, model: nn.Module, group: Any, options: dict[str, Any]) -> np.ndarray:
        """``run(group)``: one score per group unit (see :mod:`torchpruner.attributions.groups`)."""
        from torchpruner.graph import get_graph

        from .groups import GroupRunner, check_group, group_label, mask_points

        if not self.supports_groups:
            raise TypeError(
                f"{type(self).__name__} cannot score a coupled group: it attributes a single layer, "
                "while a group unit lives in several tensors; use TaylorAttributionMetric "
                "(gradient x activation summed over the group), or score one layer with run(module)"
            )
        check_group(model, group)
        label = group_label(group)
        with left_as_found(model, self.data_generator):
            if not self.needs_data:
                return self._finish(self.score_group_without_data(model, group, options))
            batches = self._batches(model)
            first = next(batches, None)
            if first is None:
                raise ValueError(f"the data generator yielded no batches; {type(self).__name__} needs data")
            graph = get_graph(model, first.args, first.kwargs or None)
            runner = GroupRunner(mask_points(graph, group), group.num_units, self.criterion, label)
            logger.debug("%s: %s zeroed at %s", self.name, label, [p.site.name for p in runner.points])
            self.prepare_group(runner, options)
            return self._scoring_loop(
                graph, runner.functions(), runner, lambda batch: self.score_group_batch(runner, batch, options),
                group.num_units, self.describe(label, options), itertools.chain([first], batches),
            )

    def _scoring_loop(
        self, graph: Any, functions: dict, runner: Any, score: Callable[[Batch], torch.Tensor],
        num_units: int, description: str, batches: Iterable[Batch],
    ) -> np.ndarray:
        """The one data loop: intercept ``functions`` for the whole run, score every batch
        (``[N, units]``), reduce over examples."""
        from tqdm.auto import tqdm

        accumulator = _ScoreAccumulator(self.reduction)
        bar = tqdm(
            total=self._total_batches(),
            desc=description,
            unit="batch",
            disable=not progress_enabled(self.progress),
            leave=False,
        )
        self._bar = bar
        try:
            with graph.intercept(functions) as forward:
                runner.forward = forward
                for batch in batches:
                    scores = score(batch)
                    if scores.shape != (batch.size, num_units):
                        raise RuntimeError(
                            f"{type(self).__name__} scored a batch with shape {tuple(scores.shape)}, "
                            f"expected {(batch.size, num_units)}"
                        )
                    accumulator.add(scores)
                    bar.update(1)
        finally:
            bar.close()
            self._bar = None
        if accumulator.count == 0:
            raise ValueError(f"the data generator yielded no examples; {type(self).__name__} needs data")
        return accumulator.result()

    def _finish(self, scores: torch.Tensor) -> np.ndarray:
        """Data-free metrics: treat the scores as a single example so ``reduction`` applies."""
        array = scores.detach().to("cpu", torch.float64).numpy().reshape(1, -1)
        return reduce_scores(array, self.reduction)

    def _set_progress(self, text: str) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.set_description_str(text)


def _is_call_site(obj: Any) -> bool:
    try:
        from torchpruner.graph import CallSite
    except ImportError:  # pragma: no cover - the graph package is part of torchpruner
        return False
    return isinstance(obj, CallSite)
