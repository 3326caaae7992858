"""The one runner: the model run on a batch with its mask points intercepted.

A *mask point* is one tensor of the forward pass (a call site's output) where units are observed,
differentiated or zeroed, with the map from its positions to the scored units. Scoring a layer
(``run(module)``) is a runner with one point, the evaluation point, whose positions are the
units themselves. Scoring a coupled group (``run(group)``) is a runner with the group's points
(:mod:`torchpruner.attributions.groups`), in two roles:

* **read points**, the tensors the group's consumers read: observed by APoZ and zeroed by
  Shapley coalitions (zeroing them is pruning);
* **entry points**, the tensors that enter the shared stream: differentiated by Taylor and
  Sensitivity (the first-order term of scaling each unit once per source).

For a layer, and for a plain chain, both roles are the same point.

One interception per point stays installed for a whole ``run``; what it does on each forward is
set by :meth:`Runner.activations`, :meth:`Runner.activations_and_gradients`,
:meth:`Runner.losses` or :meth:`Runner.transformed`. Every interception returns a new tensor, so
in-place operations downstream (``ReLU(inplace=True)``, ``out += identity``) never touch a
captured activation.

Several runners can share one pass (:class:`SharedPass`, used by ``run_all``): every point of
every runner is intercepted at once, and one forward (one forward and one backward for
gradients) per batch serves all of them. The derivative at a point is the total derivative of the
loss there whatever else is intercepted (the other points add a zero or copy), so each runner
sees exactly what it would see alone. Runners that run the model their own way (masked
evaluations) take turns instead (:class:`TakingTurns`): each runner's points are intercepted
during its own turn only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchpruner.graph import CallSite, ModelGraph
from torchpruner.graph.dependency import Group

from .data import Batch, per_example_loss, unit_mask_shape, units_view, wide

Transform = Callable[["MaskPoint", torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class MaskPoint:
    """One tensor where scored units live: ``site``'s output, the units' positions on ``axis``.

    Attributes:
        site: the call site in the graph the model is run with.
        axis: the axis of the positions in the site's output.
        size: the length of that axis.
        positions: the positions that belong to scored units (long tensor).
        units: ``units[k]`` is the scored unit of ``positions[k]``.
    """

    site: CallSite
    axis: int
    size: int
    positions: torch.Tensor
    units: torch.Tensor

    @classmethod
    def of_site(cls, site: CallSite) -> MaskPoint:
        """A layer's evaluation point: position c is unit c."""
        num_units, axis = site.num_units, site.unit_axis
        if num_units is None or axis is None:
            raise ValueError(f"the call site {site.label} has no unit axis: it cannot be an evaluation point")
        identity = torch.arange(num_units, dtype=torch.long)
        return cls(site=site, axis=axis, size=num_units, positions=identity, units=identity)

    @property
    def is_identity(self) -> bool:
        return len(self.positions) == self.size and bool(
            (self.positions == torch.arange(self.size)).all() and (self.units == self.positions).all()
        )

    def keep_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool ``[size]``: False where the unit is not in the coalition ``keep`` (bool ``[units]``)."""
        mask = torch.ones(self.size, dtype=torch.bool)
        mask[self.positions] = keep.cpu()[self.units]
        return mask

    def check(self, z: Any) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() <= self.axis or z.shape[self.axis] != self.size:
            raise ValueError(
                f"the activation at {self.site.label} has shape {tuple(getattr(z, 'shape', ()))}, "
                f"expected {self.size} units on axis {self.axis} (as traced)"
            )


def _copy(point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
    return z.clone()


def _additive_zero(site: CallSite, z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A zero shaped like ``z`` whose derivative is taken (of the batch's size for a bare
    parameter ``[1, ...]``, so that its derivative is per example). One scalar expanded: nothing
    is allocated or filled, and the derivative with respect to it still has the full shape."""
    shape: tuple[int, ...] = tuple(z.shape)
    if site.kind == "attr" and z.dim() >= 2 and shape[0] == 1:
        shape = (batch_size,) + tuple(shape[1:])
    return torch.zeros((), dtype=z.dtype, device=z.device, requires_grad=True).expand(shape)


class Runner:
    """Runs the model on a batch with every mask point intercepted.

    Args:
        read_points: where units are observed and zeroed (see the module docstring).
        entry_points: where units are differentiated; the same objects as ``read_points`` where
            a tensor plays both roles.
        num_units: the number of scored units.
        criterion: the loss, as given to the metric.
        label: what is scored, for messages and the progress bar.
        group: the coupled group scored, None for a layer.

    Attributes:
        forward: runs the intercepted model (set by the data loop for the whole run).
        graph: the traced graph the points belong to (set by the data loop; metrics that evaluate
            parts of the model, such as fast Shapley, read it).
        description: the progress bar's text at the start (a metric's ``prepare`` may change it).
    """

    def __init__(
        self,
        read_points: list[MaskPoint],
        entry_points: list[MaskPoint],
        num_units: int,
        criterion: Callable[..., Any],
        label: str,
        group: Group | None = None,
    ) -> None:
        self.read_points = read_points
        self.entry_points = entry_points
        self.points = list({id(p): p for p in read_points + entry_points}.values())
        self.num_units = num_units
        self.criterion = criterion
        self.label = label
        self.group = group
        self.forward: Callable[..., Any] | None = None
        self.graph: ModelGraph | None = None
        self.description = label
        self._transform: Transform = _copy
        self._set_progress: Callable[[str], None] = lambda text: None
        #: the pass this runner shares with others (``run_all``), else None
        self.shared: SharedPass | None = None

    @property
    def unit_axis(self) -> int:
        """The unit axis of a layer's evaluation point (a runner with one point)."""
        (point,) = self.points
        return point.axis

    def functions(self) -> dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]:
        """``{site: fn}`` for ``graph.intercept``; each fn delegates to the current transform."""
        return {point.site: functools.partial(self._apply, point) for point in self.points}

    def set_progress(self, text: str) -> None:
        """Show ``text`` on the progress bar (a no-op without one)."""
        self._set_progress(text)

    def _apply(self, point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
        point.check(z)
        return self._transform(point, z)

    @contextlib.contextmanager
    def transformed(self, transform: Transform) -> Iterator[None]:
        """Apply ``transform(point, z)`` at every point on every forward inside the block (it must
        return a new tensor); e.g. to route a point through a module that captum hooks."""
        self._transform = transform
        try:
            yield
        finally:
            self._transform = _copy

    def _run(self, batch: Batch, transform: Transform) -> Any:
        if self.shared is not None:
            raise RuntimeError(
                f"{self.label} shares its forward pass with other runners: only "
                "activations() and activations_and_gradients() are available"
            )
        if self.forward is None:
            raise RuntimeError(f"{self.label} is run outside the data loop")
        with self.transformed(transform):
            return self.forward(*batch.args, **batch.kwargs)

    def _reached(self, points: list[MaskPoint], captured: dict[int, Any]) -> list[Any]:
        missing = [point.site.label for point in points if id(point) not in captured]
        if missing:
            raise RuntimeError(f"the points {missing} of {self.label} were not reached")
        return [captured[id(point)] for point in points]

    def activations(self, batch: Batch) -> list[tuple[MaskPoint, torch.Tensor]]:
        """``[(point, z)]``: the tensor at every read point (no gradient)."""
        if self.shared is not None:
            return self.shared.activations(self, batch)
        wanted = {id(p) for p in self.read_points}
        captured: dict[int, torch.Tensor] = {}

        def capture(point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
            if id(point) in wanted:
                captured[id(point)] = z.detach()
            return z.clone()

        with torch.no_grad():
            self._run(batch, capture)
        return list(zip(self.read_points, self._reached(self.read_points, captured)))

    def activations_and_gradients(self, batch: Batch) -> list[tuple[MaskPoint, torch.Tensor, torch.Tensor]]:
        """``[(point, z, g)]`` per entry point: the tensor and the total derivative ``∂ℓₙ/∂z`` of
        each example's loss (through every later point too), from one forward and one backward.

        An additive zero ``e`` is inserted at every entry point (``z + e``), so ``∂ℓ/∂e`` is the
        total derivative there; only the ``e`` are differentiated, so the parameters' ``.grad``
        are never touched. In eval mode each example's output depends on its own input only
        (BatchNorm uses running statistics, Dropout is off), so the gradient of ``Σₙ ℓₙ`` gives
        every example's own derivative. A bare parameter (a position embedding ``[1, L, D]``) gets
        a zero of the batch's size, so that its derivative is per example too.
        """
        if self.shared is not None:
            return self.shared.activations_and_gradients(self, batch)
        wanted = {id(p) for p in self.entry_points}
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def perturb(point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
            if id(point) not in wanted:
                return z.clone()
            zero = _additive_zero(point.site, z, batch.size)
            captured[id(point)] = (z.detach(), zero)
            return z + zero  # a new tensor: downstream in-place ops are allowed

        with torch.enable_grad():
            output = self._run(batch, perturb)
            pairs = self._reached(self.entry_points, captured)
            losses = per_example_loss(self.criterion, output, batch.target, batch.size)
            grads = torch.autograd.grad(wide(losses).sum(), [zero for _, zero in pairs], allow_unused=True)
        return [
            (point, z.expand_as(zero), torch.zeros_like(zero) if g is None else g)
            for point, (z, zero), g in zip(self.entry_points, pairs, grads)
        ]

    def losses(self, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example losses ``[N]`` (float64) with the units where ``keep`` (bool ``[units]``)
        is False zeroed at every read point (``keep=None``: nothing zeroed)."""
        masks = None if keep is None else {id(p): p.keep_mask(keep) for p in self.read_points}

        def apply(point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
            if masks is None or id(point) not in masks:
                return z.clone()
            mask = masks[id(point)].to(z.device).reshape(unit_mask_shape(z.dim(), point.axis, point.size))
            return z.masked_fill(~mask, 0)

        with torch.no_grad():
            output = self._run(batch, apply)
            return per_example_loss(self.criterion, output, batch.target, batch.size).to(torch.float64)

    def sum_per_unit(self, pairs: Iterable[tuple[MaskPoint, torch.Tensor]]) -> torch.Tensor:
        """``[N, units]``: for each unit, the sum of the tensors (each shaped like its point's
        tensor) over every position of the unit at every given point.

        A layer's single point is summed as ``[N, C, positions]`` in float32 or wider; several
        points, or positions shared with other groups, are accumulated in float64.
        """
        pairs = list(pairs)
        if len(pairs) == 1 and pairs[0][0].is_identity:
            point, t = pairs[0]
            return units_view(wide(t), point.axis).sum(dim=2)
        total: torch.Tensor | None = None
        for point, t in pairs:
            per_position = units_view(t, point.axis).to(torch.float64).sum(dim=2)  # [N, size]
            if total is None:
                total = torch.zeros(
                    per_position.shape[0], self.num_units, dtype=torch.float64, device=per_position.device
                )
            positions, units = point.positions.to(per_position.device), point.units.to(per_position.device)
            total.index_add_(1, units, per_position.index_select(1, positions))
        if total is None:
            raise RuntimeError(f"{self.label} has no points to sum over")
        return total


class SharedPass:
    """One pass per batch for several runners of one graph (``run_all``).

    Every point of every runner is intercepted at once (a tensor that several runners read is
    intercepted once). The first ``activations`` (``activations_and_gradients``) a runner asks
    for on a batch runs one forward (one forward and one backward) that captures the tensors (and
    total derivatives) of every runner's read (entry) points; the other runners are served from
    it. Each runner gets its own points, exactly as it would alone.

    Args:
        runners: the runners; each one's ``shared`` is set to this pass.
        criterion: the loss, as given to the metric.

    Attributes:
        forward: runs the intercepted model (set by the data loop for the whole run).
    """

    def __init__(self, runners: list[Runner], criterion: Callable[..., Any]) -> None:
        self.runners = runners
        self.criterion = criterion
        self.forward: Callable[..., Any] | None = None
        self._sites: dict[str, CallSite] = {}
        self._points: dict[str, list[MaskPoint]] = {}
        self._read: set[str] = set()
        self._entry: set[str] = set()
        for runner in runners:
            for point in runner.points:
                self._sites.setdefault(point.site.name, point.site)
                self._points.setdefault(point.site.name, []).append(point)
            self._read.update(point.site.name for point in runner.read_points)
            self._entry.update(point.site.name for point in runner.entry_points)
            runner.shared = self
        self._batch: Batch | None = None
        self._captured: dict[str, torch.Tensor] | None = None
        self._derivatives: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, z: z.clone()

    def functions(self) -> dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]:
        """``{site: fn}`` for ``graph.intercept``: each site once, whichever runners hold it."""
        return {site: functools.partial(self._apply, name) for name, site in self._sites.items()}

    def _apply(self, name: str, z: torch.Tensor) -> torch.Tensor:
        for point in self._points[name]:
            point.check(z)
        return self._transform(name, z)

    def _run(self, batch: Batch, transform: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
        return self._forward(transform, batch.args, batch.kwargs)

    def _forward(
        self, transform: Callable[[str, torch.Tensor], torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.forward is None:
            raise RuntimeError("the shared pass is run outside the data loop")
        self._transform = transform
        try:
            return self.forward(*args, **kwargs)
        finally:
            self._transform = lambda name, z: z.clone()

    def run_with(self, transform: Callable[[CallSite, torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """One forward of the intercepted model on ``args``/``kwargs`` (not necessarily a batch of
        the data: captum expands it) with ``transform(site, z)`` at every site of every runner (it
        must return a new tensor)."""
        return self._forward(lambda name, z: transform(self._sites[name], z), args, kwargs)

    def points_at(self, site: CallSite) -> list[MaskPoint]:
        """The points of every runner at ``site`` (in the order of the runners)."""
        return list(self._points[site.name])

    def _on(self, batch: Batch) -> None:
        if self._batch is not batch:  # a new batch: forget the last one's tensors
            self._batch, self._captured, self._derivatives = batch, None, None

    def _reached(self, runner: Runner, points: list[MaskPoint], captured: dict[str, Any]) -> list[Any]:
        missing = [point.site.label for point in points if point.site.name not in captured]
        if missing:
            raise RuntimeError(f"the points {missing} of {runner.label} were not reached")
        return [captured[point.site.name] for point in points]

    def activations(self, runner: Runner, batch: Batch) -> list[tuple[MaskPoint, torch.Tensor]]:
        """What ``runner.activations(batch)`` returns alone."""
        self._on(batch)
        if self._captured is None:
            captured: dict[str, torch.Tensor] = {}

            def capture(name: str, z: torch.Tensor) -> torch.Tensor:
                if name in self._read:
                    captured[name] = z.detach()
                return z.clone()

            with torch.no_grad():
                self._run(batch, capture)
            self._captured = captured
        return list(zip(runner.read_points, self._reached(runner, runner.read_points, self._captured)))

    def activations_and_gradients(
        self, runner: Runner, batch: Batch
    ) -> list[tuple[MaskPoint, torch.Tensor, torch.Tensor]]:
        """What ``runner.activations_and_gradients(batch)`` returns alone."""
        self._on(batch)
        if self._derivatives is None:
            captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def perturb(name: str, z: torch.Tensor) -> torch.Tensor:
                if name not in self._entry:
                    return z.clone()
                zero = _additive_zero(self._sites[name], z, batch.size)
                captured[name] = (z.detach(), zero)
                return z + zero

            with torch.enable_grad():
                output = self._run(batch, perturb)
                names = list(captured)
                losses = per_example_loss(self.criterion, output, batch.target, batch.size)
                grads = torch.autograd.grad(
                    wide(losses).sum(), [captured[name][1] for name in names], allow_unused=True
                )
            self._derivatives = {
                name: (z.expand_as(zero), zero, torch.zeros_like(zero) if g is None else g)
                for name, (z, zero), g in zip(names, (captured[name] for name in names), grads)
            }
        found = self._reached(runner, runner.entry_points, self._derivatives)
        return [(point, z, g) for point, (z, _, g) in zip(runner.entry_points, found)]


class TakingTurns:
    """Several runners of one graph that each run the model their own way (``run_all`` for the
    masked-evaluation metrics: Shapley, leave-one-out), in turn on the same batches, each seeing
    exactly the model it sees alone.

    A runner whose points are all module calls is intercepted with forward hooks on the model's
    modules; those are installed for its turn only (:meth:`turn`), so that no other runner's hooks
    run inside its forwards, nor inside the parts of the traced graph a metric evaluates itself
    (fast Shapley's suffix, which calls the same modules). A runner with a point after a function
    call runs a probed copy of the traced graph, which hooks nothing: it is built once for the
    whole run (:meth:`whole_run`).
    """

    def __init__(self, graph: ModelGraph, runners: list[Runner]) -> None:
        self.graph = graph
        self.runners = runners

    def _hooked(self, runner: Runner) -> bool:
        return self.graph.hooks_modules(point.site for point in runner.points)

    @contextlib.contextmanager
    def whole_run(self) -> Iterator[None]:
        """The probed models of the runners that need one, for the whole block."""
        try:
            with contextlib.ExitStack() as stack:
                for runner in self.runners:
                    if not self._hooked(runner):
                        runner.forward = stack.enter_context(self.graph.intercept(runner.functions()))
                yield
        finally:
            for runner in self.runners:
                runner.forward = None

    @contextlib.contextmanager
    def turn(self, runner: Runner) -> Iterator[None]:
        """``runner``'s turn: its hooks (if it is intercepted with hooks) installed in the block."""
        if not self._hooked(runner):
            yield
            return
        with self.graph.intercept(runner.functions()) as forward:
            runner.forward = forward
            try:
                yield
            finally:
                runner.forward = None
