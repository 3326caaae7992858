"""The data of the dependency analysis: a tensor's unit axis (its slots), the roles modules
play on it, a group's :class:`Member`, connected components, and the refusal types (part of
:mod:`torchpruner.graph.dependency`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch.fx as fx
import torch.nn as nn


from .trace import CallSite


class DependencyError(ValueError):
    """A prune that the traced graph cannot support (names the op and the call site)."""


def _is_torchvision(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("torchvision") and type(module).__name__ == name


class RefusedGroupsWarning(UserWarning):
    """Some groups of the model hold a layer's units but cannot be pruned (an op the analysis
    cannot follow): they are left out of ``groups()``; ``pruner.refused_groups()`` lists them."""


class _CannotFollow(Exception):
    """Raised inside the analysis when an op cannot be followed."""


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Space:
    """The slots of one tensor: positions ``start .. start + size - 1`` along ``axis``."""

    node: fx.Node
    site: Optional[CallSite]
    start: int
    size: int
    axis: int
    shape: Tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def slots(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass(eq=False)
class _Role:
    """A module (or a bare parameter) whose tensors are sliced when units of ``space`` go."""

    space: _Space
    direction: str  # "out", "in" or "param"
    module: nn.Module
    module_name: str
    parameter: Optional[str] = None  # for "param": the tensor's attribute name on ``module``
    axis: Optional[int] = None  # for "param": the sliced axis
    per_call: bool = False  # a parameter-free module (Dropout): each call site is its own op


@dataclass(eq=False)
class _ShapeAttribute:
    """A module attribute holding the size of ``space``'s unit axis (the ``normalized_shape`` that a
    functional ``F.layer_norm`` reads): updated when units of ``space`` go."""

    space: _Space
    module: nn.Module
    module_name: str
    attribute: str
    index: int | None  # position in the tuple; None for a plain int


@dataclass(eq=False)
class _LiteralSize:
    """A size that an exported graph holds as a literal (torch.export keeps only the number of a size
    the code read from a tensor: ``repeat_kv``'s ``expand(B, 2, 2, L, D)``): entry ``axis`` of the
    target shape of ``node``, which holds the unit count of ``space``. It is followed as if it were
    computed, and the groups whose units reach it are checked by capturing the model again with
    units removed (the literal must become the kept count) or refused."""

    node: fx.Node
    axis: Optional[int]  # None: the size argument of ``split`` (each piece's length)
    literal: int
    space: Optional[_Space] = None
    #: for ``split(64)``: the calling module and its int attributes equal to the literal, one of
    #: which the code reads it from (``self.split_size``); the check finds which, the prune updates it
    owner: Optional[nn.Module] = None
    owner_name: str = ""
    attributes: Tuple[str, ...] = ()


@dataclass
class Member:
    """One module (or bare parameter) of a coupled group, as printed by ``str(group)``.

    Attributes:
        module_name: qualified name (for a bare parameter: its owner's name).
        module: the module.
        direction: ``"out"`` (its output units go: a source of the group), ``"in"`` (its input
            units / channel-wise parameters go) or ``"param"`` (a bare parameter is sliced).
        parameter: for ``"param"``: the parameter's attribute name.
        num_units: units on the sliced side before pruning.
        units_per_group_unit: how many of those a single group unit removes (``H*W`` after a
            flatten, ``groups`` for a grouped convolution's input...).
    """

    module_name: str
    module: nn.Module
    direction: str
    parameter: Optional[str]
    num_units: int
    units_per_group_unit: int

    def __str__(self) -> str:
        what = f"{self.module_name}.{self.parameter}" if self.parameter else self.module_name
        per = f", {self.units_per_group_unit} per unit" if self.units_per_group_unit != 1 else ""
        return f"{self.direction:<5} {what} ({type(self.module).__name__}, {self.num_units} units{per})"


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph on ``n`` nodes with edges ``a[i]-b[i]``.

    Vectorised union: every edge hooks the larger representative onto the smaller, then pointer
    jumping flattens the trees; repeated until no edge joins two representatives. Labels are
    0..k-1, numbered by each component's smallest node.
    """
    labels = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return labels
    while True:
        low = np.minimum(labels[a], labels[b])
        hooked = labels.copy()
        np.minimum.at(hooked, labels[a], low)
        np.minimum.at(hooked, labels[b], low)
        while True:  # pointer jumping: every node points at its representative
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, labels):
            break
        labels = hooked
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def pd_unique(values: np.ndarray) -> np.ndarray:
    """Unique values in order of first appearance."""
    values = np.asarray(values)
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


def _flatten_nodes(value: Any) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Node) else None)
    return found
