"""Prune a ``DistributedDataParallel`` model in the middle of its run, on every rank alike.

Each rank holds a replica of the model, its own optimizer state (identical on every rank, since
DDP all-reduces the gradients) and a DDP wrapper whose reducer holds every parameter's gradient
accumulator, which caches the parameter's shape. Pruning mid-run therefore means: decide once,
prune the same units on every rank with optimizer surgery, and replace the wrapper. Two lines in
the training loop (the Pruner is built once, on ``ddp.module``, with the live optimizer)::

    pruner = Pruner(ddp.module, input_size=(1, 8, 8), optimizer=optimizer)
    attr = TaylorAttributionMetric(ddp, loader, F.cross_entropy)     # each rank scores its shard
    ...
    selection = select_units(pruner.groups(), 0.3, scores=attr.run)  # the same scores on every rank
    ddp = prune_ddp(ddp, pruner, selection)                          # a new wrapper; same optimizer

:func:`prune_ddp` (and :func:`plan_ddp`, its dry run) guarantee:

* **one decision**: rank 0's selection is broadcast (``broadcast=True``, the default), so the
  other ranks may pass ``None``; every rank plans it on its own replica, and the plans'
  fingerprints (every edit, the indices kept and the optimizer slices) are compared. Ranks whose
  plans differ (their models differ, or with ``broadcast=False`` their selections) all raise the
  same :class:`DistributedPruningError` and nothing is pruned anywhere;
* **no hang**: each step is one collective that carries either a result or the rank's error, so
  a rank that fails makes every rank raise instead of leaving the others waiting; with the gloo
  backend a ``monitored_barrier`` first reports ranks that do not arrive within ``timeout``
  (other backends: the process group's own ``timeout``);
* **all or nothing**: the plans are applied only when every rank has validated its plan; if
  applying still fails on some rank (out of memory, an interrupt) every rank puts its model and
  optimizer back and raises, with a wrapper of the unchanged model in ``error.ddp``;
* **a new wrapper**: the old one is retired (its reducer, which holds the gradient accumulators
  of the old shapes, is released, and calling it raises an error saying what to use instead) and
  the model is wrapped again with the same DDP arguments (:func:`ddp_arguments`), or with
  ``wrap(module)``. The optimizer and any LR scheduler are the same objects as before.

FSDP is refused: each rank holds only a shard of every parameter, so no rank can slice whole
units (the error says what to do instead).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from torchpruner._state import fsdp_modules, fsdp_refusal
from torchpruner.graph.dependency import Group, get_dependency_graph
from torchpruner.pruner import Plan, Pruner
from torchpruner.rules import AttributeChange, TensorSlice

logger = logging.getLogger(__name__)
_Result = TypeVar("_Result")

__all__ = ["DistributedPruningError", "ddp_arguments", "plan_ddp", "prune_ddp"]

Selection = Mapping[Group, Sequence[int]]


class DistributedPruningError(RuntimeError):
    """A distributed prune was refused or failed; every rank raises this same error.

    Attributes:
        ddp: after a failed apply (nothing pruned), a new wrapper of the unchanged model to keep
            training with; None otherwise (the old wrapper is still valid then).
    """

    def __init__(self, message: str, ddp: DistributedDataParallel | None = None) -> None:
        super().__init__(message)
        self.ddp = ddp


# -- collectives that carry an error instead of leaving the other ranks waiting ---------------


class _Ranks:
    """The ranks of one process group, taking the steps of a distributed prune together."""

    def __init__(self, group: dist.ProcessGroup, timeout: datetime.timedelta | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout

    def all_arrive(self) -> None:
        """With gloo, a ``monitored_barrier``: a rank that does not arrive within the timeout is
        named in the error (rank 0 names it; the others time out too)."""
        if dist.get_backend(self.group) != "gloo":
            return
        try:
            dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise DistributedPruningError(
                f"not every rank reached the distributed prune within the timeout ({error}); every rank must "
                f"call prune_ddp / plan_ddp at the same point of the run; nothing was pruned"
            ) from error

    def run(
        self, step: Callable[[], _Result], what: str, share: Callable[[_Result], Any] = lambda result: None
    ) -> tuple[_Result, list[Any]]:
        """Run ``step`` on this rank: its result, and ``share(result)`` of every rank in rank order
        (one collective). An exception on any rank becomes the same
        :class:`DistributedPruningError` on every rank."""
        try:
            result = step()
            item: tuple[str, Any] = ("ok", share(result))
            error: Exception | None = None
        except Exception as caught:  # sent to the other ranks, which wait for this rank's result
            item, error = ("error", f"{type(caught).__name__}: {caught}"), caught
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, item, group=self.group)
        failed = [(rank, message) for rank, (status, message) in enumerate(outcomes) if status == "error"]
        if failed:
            details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
            raise DistributedPruningError(
                f"{what} failed on rank(s) {[r for r, _ in failed]} of {self.world_size} "
                f"({details}); nothing was pruned on any rank"
            ) from error
        return result, [shared for _, shared in outcomes]

    def from_rank0(self, step: Callable[[], Any], what: str) -> Any:
        """``step()`` computed on rank 0 only and given to every rank (errors shared as above)."""
        return self.run(lambda: step() if self.rank == 0 else None, what, share=lambda result: result)[1][0]


def _as_timedelta(timeout: Any) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, a timedelta or None, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _process_group(process_group: Any) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "a distributed prune needs an initialized torch.distributed job (torch.distributed.init_process_group)"
        )
    group = dist.group.WORLD if process_group is None else process_group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    return group


# -- one decision ------------------------------------------------------------------------------


def _selection_items(selection: Any, pruner: Pruner) -> list[tuple[int, list[int]]]:
    """``{group: units}`` as ``[(group index, sorted units)]``, checked against the pruner's model."""
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection must be a dict {{group: units}} of groups from pruner.groups() (as from "
            f"torchpruner.schedule.select_units), got {type(selection).__name__}"
        )
    known = {id(group) for group in get_dependency_graph(pruner.graph()).all_groups}
    items = []
    for group, units in selection.items():
        if not isinstance(group, Group):
            raise TypeError(f"selection keys must be groups from pruner.groups(), got {type(group).__name__}")
        if id(group) not in known:
            raise ValueError(
                f"group {group.index} of the selection is not a group of the pruner's model as it is "
                f"now (groups from before a prune are stale): take them from pruner.groups()"
            )
        items.append((group.index, sorted(int(u) for u in units)))
    return sorted(items)


def _selection_of(items: list[tuple[int, list[int]]], pruner: Pruner) -> dict[Group, list[int]]:
    groups = {group.index: group for group in get_dependency_graph(pruner.graph()).all_groups}
    missing = [index for index, _ in items if index not in groups]
    if missing:
        raise ValueError(f"this rank's model has no group(s) {missing} (its model differs from rank 0's)")
    return {groups[index]: units for index, units in items}


def fingerprint(plan: Plan) -> str:
    """A digest of everything a plan changes: each edit's text, the indices it keeps, the new
    attribute values and the optimizer-state slices. Equal plans on two replicas give equal digests."""
    digest = hashlib.sha256(str(plan).encode())
    for edit in plan.edits:
        if isinstance(edit, TensorSlice):
            per_group = None if edit.group_keep is None else [keep.tolist() for keep in edit.group_keep]
            digest.update(repr((edit.qualified_name, edit.axis, edit.keep.tolist(), per_group)).encode())
        elif isinstance(edit, AttributeChange):
            digest.update(repr((edit.module_name, edit.attribute, edit.new)).encode())
    return digest.hexdigest()


def _first_difference(text: str, reference: str) -> str:
    for line, expected in zip(text.splitlines(), reference.splitlines()):
        if line != expected:
            return f"'{line.strip()}' where rank 0 has '{expected.strip()}'"
    return "the same description with different indices kept" if text == reference else "a different number of edits"


def _agree(ranks: _Ranks, everyone: list[tuple[str, str]]) -> None:
    """Every rank's plan ``(fingerprint, text)`` must be rank 0's: the same error on every rank otherwise."""
    reference = everyone[0]
    differ = [rank for rank, theirs in enumerate(everyone) if theirs[0] != reference[0]]
    if differ:
        first = differ[0]
        raise DistributedPruningError(
            f"the ranks planned different prunes: rank(s) {differ} of {ranks.world_size} differ from rank 0 (rank "
            f"{first}: {_first_difference(everyone[first][1], reference[1])}). The replicas or the selections "
            f"differ; decide on rank 0 (broadcast=True) and keep the replicas identical (DDP does, unless a rank "
            f"changed its model outside it); nothing was pruned on any rank"
        )


def plan_ddp(
    pruner: Pruner,
    selection: Selection | Plan | None,
    *,
    process_group: Any = None,
    broadcast: bool = True,
    timeout: float | datetime.timedelta | None = None,
    description: str | None = None,
) -> Plan:
    """The plan that every rank will apply, checked to be the same on every rank; changes nothing.

    Call it on every rank at the same point of the run (it is a collective).

    Args:
        pruner: the rank's Pruner, built on ``ddp.module`` with the rank's optimizer.
        selection: ``{group: units}`` (groups of ``pruner.groups()``, as from
            ``torchpruner.schedule.select_units``), or a :class:`Plan` the rank built itself
            (``pruner.plan(module, indices)``; only checked, never broadcast).
        process_group: the ranks taking part (default: the whole job).
        broadcast: use rank 0's selection on every rank (the others' are ignored and may be None).
            ``False``: each rank's own, which must agree.
        timeout: seconds (or a timedelta) to wait for the other ranks to arrive, with gloo; other
            backends and None: the process group's timeout.
        description: the plan's first line.

    Raises:
        DistributedPruningError: on every rank, when some rank failed to plan or the plans differ.
    """
    if not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be a torchpruner Pruner built on ddp.module, got {type(pruner).__name__}")
    if fsdp_modules(pruner.model):
        raise TypeError(fsdp_refusal(pruner.model))
    if not isinstance(broadcast, bool):
        raise TypeError(f"broadcast must be a bool, got {broadcast!r}")
    ranks = _Ranks(_process_group(process_group), _as_timedelta(timeout))
    ranks.all_arrive()
    own_plan = isinstance(selection, Plan)
    if own_plan and broadcast:
        raise ValueError(
            "a Plan built on each rank cannot be broadcast: pass broadcast=False to check that every "
            "rank built the same plan, or pass the selection {group: units} to use rank 0's"
        )

    def local_plan() -> Plan:
        if own_plan:
            return selection  # type: ignore[return-value]
        items = decided if broadcast else _selection_items(selection, pruner)
        return pruner.plan_groups(_selection_of(items, pruner), description or "distributed prune")

    decided: list[tuple[int, list[int]]] = []
    if broadcast and not own_plan:
        decided = ranks.from_rank0(lambda: _selection_items(selection, pruner), "deciding the distributed prune")
    plan, everyone = ranks.run(
        local_plan, "planning the distributed prune", share=lambda plan: (fingerprint(plan), str(plan))
    )
    _agree(ranks, everyone)
    return plan


# -- all or nothing ----------------------------------------------------------------------------


class _RestorePoint:
    """What applying ``plan`` replaces (the old objects, not copies), to put back on this rank
    when another rank failed to apply its plan."""

    def __init__(self, plan: Plan, optimizer: torch.optim.Optimizer | None) -> None:
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]] = []
        self.attributes: list[tuple[nn.Module | None, str, Any, bool]] = []
        self.states: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for edit in plan.edits:
            if isinstance(edit, TensorSlice):
                tensor = getattr(edit.module, edit.tensor_name)
                self.tensors.append(
                    (tensor, tensor.data, tensor.grad if edit.is_parameter else None, edit.is_parameter)
                )
                if optimizer is not None and edit.is_parameter and tensor in optimizer.state:
                    state = optimizer.state[tensor]
                    self.states.append((state, dict(state)))
            else:
                module = edit.module
                existed = edit.attribute in vars(module) or hasattr(
                    getattr(type(module), edit.attribute, None), "__set__"
                )
                self.attributes.append((module, edit.attribute, getattr(module, edit.attribute, None), existed))

    def restore(self) -> None:
        for tensor, data, grad, is_parameter in reversed(self.tensors):
            tensor.data = data
            if is_parameter:
                tensor.grad = grad
        for module, attribute, old, existed in reversed(self.attributes):
            if module is None:
                continue
            if existed:
                setattr(module, attribute, old)
            else:
                module.__dict__.pop(attribute, None)
        for state, old in self.states:
            state.clear()
            state.update(old)


def _apply_everywhere(ranks: _Ranks, plan: Plan, pruner: Pruner) -> bool:
    """Apply ``plan`` on every rank or on none; True when it landed everywhere."""
    restore_point = _RestorePoint(plan, pruner.optimizer)
    applied = False

    def apply() -> None:
        nonlocal applied
        plan.apply(pruner.model, pruner.optimizer)
        applied = True

    try:
        ranks.run(apply, "applying the distributed prune")
    except DistributedPruningError:
        if applied:  # this rank's plan landed, another's did not: put this rank back
            restore_point.restore()
        raise
    return True


# -- the wrapper -------------------------------------------------------------------------------

#: DDP constructor arguments read back from a wrapper, with the attribute that holds each
_DDP_ATTRIBUTES = {
    "device_ids": "device_ids",
    "output_device": "output_device",
    "dim": "dim",
    "process_group": "process_group",
    "find_unused_parameters": "find_unused_parameters",
    "gradient_as_bucket_view": "gradient_as_bucket_view",
    "static_graph": "static_graph",
    "skip_all_reduce_unused_params": "skip_all_reduce_unused_params",
    "forward_sync_buffers": "forward_sync_buffers",
}


def ddp_arguments(ddp: DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments that wrap a module the way ``ddp`` wraps its own.

    Read back from the wrapper: ``device_ids``, ``output_device``, ``dim``, ``process_group``,
    ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``, the bucket size,
    buffer syncing (``broadcast_buffers`` / ``forward_sync_buffers``) and
    ``skip_all_reduce_unused_params``, as far as the installed torch has them.

    Raises:
        ValueError: for what cannot be carried over to a new wrapper: communication hooks (their
            state may hold per-bucket buffers of the old shapes), DDP's mixed precision (it
            installs hooks on the module) and delayed all-reduce parameters; pass ``wrap=`` to
            :func:`prune_ddp` to build the new wrapper yourself.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"expected a DistributedDataParallel wrapper, got {type(ddp).__name__}")
    refused = [
        what
        for what, present in (
            ("a communication hook (register_comm_hook)", bool(getattr(ddp, "_comm_hooks", None))),
            ("mixed_precision", getattr(ddp, "mixed_precision", None) is not None),
            ("delay_all_reduce_named_params", bool(getattr(ddp, "_delay_all_reduce_params", None))),
        )
        if present
    ]
    if refused:
        raise ValueError(
            f"the DistributedDataParallel wrapper uses {', '.join(refused)}, which cannot be carried "
            f"over to a wrapper of the pruned model automatically; pass wrap=lambda module: "
            f"DistributedDataParallel(module, ...) (registering the hook again with a fresh state)"
        )
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    arguments = {
        name: getattr(ddp, attribute)
        for name, attribute in _DDP_ATTRIBUTES.items()
        if name in accepted and hasattr(ddp, attribute)
    }
    if "forward_sync_buffers" not in arguments and "broadcast_buffers" in accepted:
        arguments["broadcast_buffers"] = ddp.broadcast_buffers
    if "bucket_cap_mb" in accepted and hasattr(ddp, "bucket_bytes_cap"):
        arguments["bucket_cap_mb"] = ddp.bucket_bytes_cap / (1024 * 1024)
    return arguments


def _retired(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "this DistributedDataParallel wrapper was replaced when its model was pruned: use the "
        "wrapper that prune_ddp returned (ddp = prune_ddp(ddp, pruner, selection))"
    )


def retire(ddp: DistributedDataParallel) -> None:
    """Release what ``ddp`` holds of its model's parameters (the reducer and its gradient
    accumulators, gradient hooks) and make calling it an error. Its module is not touched."""
    for handle in getattr(ddp, "_accum_grad_hooks", []):
        handle.remove()
    for attribute in ("reducer", "logger", "_module_parameters", "_accum_grad_hooks"):
        ddp.__dict__.pop(attribute, None)
    ddp._modules.pop("module", None)
    ddp.forward = _retired  # type: ignore[method-assign]


def prune_ddp(
    ddp: DistributedDataParallel,
    pruner: Pruner,
    selection: Selection | Plan | None,
    *,
    broadcast: bool = True,
    timeout: float | datetime.timedelta | None = None,
    wrap: Callable[[nn.Module], DistributedDataParallel] | None = None,
    description: str | None = None,
) -> DistributedDataParallel:
    """Prune ``ddp.module`` on every rank alike and return a new wrapper of it.

    Call it on every rank at the same point of the run, outside any forward/backward (e.g. after
    ``optimizer.step()``); gradients that exist are sliced with their parameters. The old
    wrapper is retired (see :func:`retire`): keep only the returned one (``ddp = prune_ddp(ddp,
    ...)``). The optimizer, its param groups and any LR scheduler stay the same objects.

    Args:
        ddp: the wrapper.
        pruner: the rank's Pruner, built on ``ddp.module`` with the optimizer that trains it.
        selection, broadcast, timeout, description: as in :func:`plan_ddp`.
        wrap: builds the new wrapper from the pruned module (default:
            ``DistributedDataParallel(module, **ddp_arguments(ddp))``).

    Returns:
        the new ``DistributedDataParallel`` wrapper (the old one when nothing is pruned).

    Raises:
        DistributedPruningError: on every rank, with nothing pruned anywhere, when a rank failed or
            the ranks' plans differ (see the module docstring).
        TypeError / ValueError: for a wrapper or pruner that does not fit (before any collective).
    """
    if fsdp_modules(ddp) if isinstance(ddp, nn.Module) else False:
        raise TypeError(fsdp_refusal(ddp))
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(
            f"ddp must be a DistributedDataParallel wrapper, got {type(ddp).__name__}; for a model "
            f"that is not wrapped use Pruner / prune_groups directly"
        )
    if not isinstance(pruner, Pruner) or pruner.model is not ddp.module:
        raise ValueError("pruner must be built on the wrapped module: Pruner(ddp.module, ..., optimizer=optimizer)")
    if wrap is not None and not callable(wrap):
        raise TypeError(f"wrap must be a function module -> wrapper, got {type(wrap).__name__}")
    arguments = ddp_arguments(ddp) if wrap is None else {}
    rewrap: Callable[[nn.Module], DistributedDataParallel] = wrap or functools.partial(
        DistributedDataParallel, **arguments
    )
    plan = plan_ddp(
        pruner,
        selection,
        process_group=ddp.process_group,
        broadcast=broadcast,
        timeout=timeout,
        description=description,
    )
    if plan.is_empty:
        return ddp
    ranks = _Ranks(ddp.process_group, _as_timedelta(timeout))
    module = ddp.module
    try:
        _apply_everywhere(ranks, plan, pruner)
    except DistributedPruningError as error:
        # the parameters got new gradient accumulators, which the old reducer does not watch
        retire(ddp)
        error.ddp = rewrap(module)
        raise
    retire(ddp)
    new = rewrap(module)
    logger.info("pruned on %d rank(s): %s", ranks.world_size, plan.description)
    return new
