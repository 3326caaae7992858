"""Capturing a model again with units removed, to check the literal sizes of an exported graph
(part of the dependency analysis in :mod:`torchpruner.graph.dependency`).

Model
-----
torch.export runs the model's Python and keeps only the numbers of the sizes it computed:
Hugging Face's ``repeat_kv`` reads ``batch, heads, length, head_dim = hidden.shape`` and calls
``hidden[:, :, None].expand(batch, heads, n_rep, length, head_dim)``, which the exported graph holds
as ``expand(x, B, 2, 2, 16, 64)``. Whether such a ``2`` follows the key/value heads or is written in
the code cannot be read from the graph. It is found out the way the model would meet it: the
model's tensors are replaced by tensors of the shapes the prune would give them (uninitialised:
the capture runs on fake tensors, so only shapes matter) and the module attributes the rules
change are set, the model is captured again, and the two graphs are compared op by op. The
literal follows the units when the second graph has the same ops and holds the kept count where
the first held the full one. Everything is put back in a ``finally`` block (parameters keep their
identity), whatever the capture raises.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from torchpruner.rules import AttributeChange, Edit, TensorSlice, UnitSelection, get_slicing_rule

from .capture import _input_names, export_model, from_exported
from .spaces import _Role

__all__ = ["trial_edits", "temporarily_pruned", "capture_again", "same_ops"]


def trial_edits(removals: Sequence[tuple[_Role, np.ndarray]]) -> list[Edit] | None:
    """The tensor slices and attribute changes of removing ``removals`` (``[(role, positions)]``),
    from each member's slicing rule; None when a member has no rule."""
    edits: list[Edit] = []
    for role, positions in removals:
        if role.per_call:
            continue  # a Dropout's rate: no shape changes with it
        remove = torch.as_tensor(positions, dtype=torch.long)
        selection = UnitSelection.from_remove(remove, role.space.size, axis=role.space.axis, ndim=role.space.ndim)
        if role.direction == "param":
            assert role.parameter is not None and role.axis is not None  # every "param" role names its tensor
            tensor = getattr(role.module, role.parameter)
            edits.append(
                TensorSlice(
                    role.module,
                    role.parameter,
                    role.axis,
                    selection.keep,
                    tuple(tensor.shape),
                    role.parameter in role.module._parameters,
                )
            )
            continue
        rule = get_slicing_rule(role.module)
        if rule is None:
            return None
        edits += (
            rule.prune_out(role.module, selection) if role.direction == "out" else rule.prune_in(role.module, selection)
        )
    return edits


@contextlib.contextmanager
def temporarily_pruned(edits: Sequence[Edit]) -> Iterator[None]:
    """The model with ``edits`` applied (new tensors in place of the sliced ones, attributes set),
    put back as it was on exit, also when the body raises."""
    undo: list[tuple[nn.Module, str, str, Any]] = []  # (module, kind, name, old value)
    try:
        for edit in edits:
            module = edit.module
            if module is None:
                continue
            if isinstance(edit, TensorSlice):
                kind = "_parameters" if edit.tensor_name in module._parameters else "_buffers"
                table = getattr(module, kind)
                old = table[edit.tensor_name]
                undo.append((module, kind, edit.tensor_name, old))
                # only the shape matters to a capture (it runs on fake tensors): no copy of the data
                shape = list(old.shape)
                shape[edit.axis] = len(edit.keep)
                sliced = torch.empty(shape, dtype=old.dtype, device=old.device)
                table[edit.tensor_name] = (
                    nn.Parameter(sliced, requires_grad=old.requires_grad) if kind == "_parameters" else sliced
                )
            elif isinstance(edit, AttributeChange):
                undo.append((module, "attribute", edit.attribute, getattr(module, edit.attribute)))
                setattr(module, edit.attribute, edit.new)
        yield
    finally:
        for module, kind, name, old in reversed(undo):
            if kind == "attribute":
                setattr(module, name, old)
            else:
                getattr(module, kind)[name] = old


def capture_again(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Graph:
    """The graph :func:`~torchpruner.graph.capture.capture` gives for ``model`` as it is now
    (without the check against the model's outputs: the caller compares the graphs)."""
    with _quiet_fake_tensors():
        program = export_model(model, args, kwargs)
    return from_exported(model, program, _input_names(model, args, kwargs), list(args) + list(kwargs.values())).graph


@contextlib.contextmanager
def _quiet_fake_tensors() -> Iterator[None]:
    """torch logs the error of every op that fails on fake tensors before it raises; a capture
    that is expected to fail when a literal does not follow the units logs nothing."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def same_ops(first: fx.Graph, second: fx.Graph) -> dict[fx.Node, fx.Node] | None:
    """``{node of first: node of second}`` when both graphs run the same ops in the same order
    (arguments may differ), else None."""
    a, b = list(first.nodes), list(second.nodes)
    if len(a) != len(b):
        return None
    for x, y in zip(a, b):
        if x.op != y.op or x.target != y.target or len(x.args) != len(y.args):
            return None
    return dict(zip(a, b))
