"""The slicing-rule registry: how each layer type loses units, keyed by module type.

A rule answers four questions about a module (the four verbs):

``out_units(module)``
    how many units the module produces (``out_features``, ``out_channels``...), or None.
``in_units(module)``
    how many units it reads (``in_features``, ``in_channels``...), or None when any count works
    (Dropout, activations).
``prune_out(module, selection)``
    the edits that remove the selected *output* units (the module is the pruned layer).
``prune_in(module, selection)``
    the edits that remove the selected *input* units (the module consumes the pruned layer).

Rules never modify anything: they return :class:`~torchpruner.rules.edits.TensorSlice` and
:class:`~torchpruner.rules.edits.AttributeChange` edits that the planner collects, validates and
only then applies. A rule whose module keeps its input units in its output (BatchNorm, LayerNorm,
PReLU, Dropout, activations, depthwise convolutions) sets ``passes_units_through = True``: after
``prune_in`` the same units disappear from its output, so the layers after it are pruned too.
Layout facts (a convolution's weight layout, its channel groups) live on the rule, nowhere else.

Register a rule for your own layer (subclasses of a registered type find the rule of the nearest
registered base class; one holding parameters or buffers that rule does not declare in
``tensors`` is refused, so that a per-unit tensor is never left unsliced):

>>> import torch, torch.nn as nn
>>> from torchpruner.rules import SlicingRule, register_slicing_rule, set_attribute, slice_tensor
>>> class Scale(nn.Module):                 # y = x * weight, per channel on dim 1
...     def __init__(self, channels):
...         super().__init__()
...         self.channels = channels
...         self.weight = nn.Parameter(torch.ones(channels))
...     def forward(self, x):
...         return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))
>>> @register_slicing_rule(Scale)
... class ScaleRule(SlicingRule[Scale]):   # its verbs take a Scale
...     passes_units_through = True         # channel c in -> channel c out
...     input_unit_axis = 1
...     tensors = frozenset({"weight"})     # the tensors of Scale this rule accounts for
...     def out_units(self, module): return module.channels
...     def in_units(self, module): return module.channels
...     def prune_in(self, module, selection):
...         return (slice_tensor(module, "weight", 0, selection.keep)
...                 + set_attribute(module, "channels", len(selection.keep)))
...     prune_out = prune_in
>>> from torchpruner import Pruner
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), Scale(4), nn.Conv2d(4, 2, 3))
>>> plan = Pruner(model, input_size=(1, 8, 8)).prune_model(model[0], [1, 2], cascading_modules=[model[1], model[2]])
>>> model[1].weight.shape, model[2].in_channels
(torch.Size([2]), 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

import torch
import torch.nn as nn

from typing_extensions import TypeVar

from torchpruner._ops import register_leaf_module

from .edits import Edit

__all__ = [
    "UnitSelection",
    "SlicingRule",
    "register_slicing_rule",
    "get_slicing_rule",
    "GroupedSliceError",
    "DROPOUT_POLICIES",
    "unaccounted_tensors",
    "unaccounted_tensors_message",
]

#: How a Dropout after a pruned layer changes its rate ``p`` when ``k`` of ``n`` units go.
DROPOUT_POLICIES: dict[str, Callable[[float, int, int], float]] = {
    # the 2020 TorchPruner rule: fewer units, proportionally less dropout
    "linear": lambda p, n, k: p * (1.0 - k / n),
    # Han et al. 2015 ("Learning both weights and connections"): D_r = D_o * sqrt(C_r / C_o)
    "sqrt": lambda p, n, k: p * math.sqrt((n - k) / n),
    "keep": lambda p, n, k: p,
}


@dataclass(frozen=True)
class UnitSelection:
    """The units a rule removes from one side (input or output) of a module.

    Attributes:
        remove: sorted, unique int64 indices of the units to remove (CPU tensor).
        keep: sorted int64 indices of the units that stay (the complement of ``remove``).
        num_units: the number of units on that side before pruning.
        axis: axis of the units in the module's input/output tensor (batch dim included), when
            known from the trace; None otherwise.
        ndim: number of dims of that tensor, when known.
        dropout_policy: name of the rule for Dropout rates (see :data:`DROPOUT_POLICIES`).
    """

    remove: torch.Tensor
    keep: torch.Tensor
    num_units: int
    axis: int | None = None
    ndim: int | None = None
    dropout_policy: str = "linear"

    @classmethod
    def from_remove(cls, remove: torch.Tensor, num_units: int, **kwargs: Any) -> UnitSelection:
        remove = torch.unique(torch.as_tensor(remove, dtype=torch.long).flatten(), sorted=True)
        mask = torch.ones(num_units, dtype=torch.bool)
        mask[remove] = False
        return cls(remove=remove, keep=mask.nonzero().flatten(), num_units=num_units, **kwargs)


#: The module type a rule slices (a rule for ``nn.Linear`` is a ``SlicingRule[nn.Linear]``); a bare
#: ``SlicingRule`` takes any module. Contravariant: a rule for every module serves a Linear too.
ModuleT = TypeVar("ModuleT", bound=nn.Module, default=nn.Module, contravariant=True)


class SlicingRule(Generic[ModuleT]):
    """Base class of slicing rules; see the module docstring for the four verbs.

    Parametrised by the module type it slices (``class LinearRule(SlicingRule[nn.Linear])``), so
    the verbs of a subclass take that type; a bare ``SlicingRule`` subclass takes any module.

    Class attributes:
        passes_units_through: True when input unit ``c`` is output unit ``c`` (after ``prune_in``
            the same units leave the output, so pruning continues downstream).
        input_unit_axis: where the module reads its units: ``1`` (channels, ``[N, C, ...]``),
            ``-1`` (last dim, ``[N, ..., D]``) or None (anywhere / checked by the rule).
        has_unit_state: True when the module holds per-unit tensors (then it must be listed
            in ``cascading_modules`` when pruned units flow into it).
        tensors: the names of the module's own parameters and buffers the rule accounts for
            (slices, or knowingly leaves alone). A module holding any other parameter or buffer
            (a subclass with a per-unit gate...) is refused by name instead of being pruned
            without it; register a rule for the subclass. None: the rule makes no claim (no
            check). Every built-in rule declares its tensors.
    """

    passes_units_through: bool = False
    input_unit_axis: int | None = None
    has_unit_state: bool = True
    tensors: frozenset[str] | None = None

    def out_units(self, module: ModuleT) -> int | None:
        return None

    def in_units(self, module: ModuleT) -> int | None:
        return None

    def prune_out(self, module: ModuleT, selection: UnitSelection) -> list[Edit]:
        raise TypeError(f"{type(module).__name__} cannot be pruned on its output units")

    def prune_in(self, module: ModuleT, selection: UnitSelection) -> list[Edit]:
        raise TypeError(f"{type(module).__name__} cannot consume pruned units")

    def removed_out_after_in(self, module: ModuleT, selection: UnitSelection) -> torch.Tensor | None:
        """Output units that disappear when ``selection`` is removed from the input.

        None for consumers (their output keeps its size). The default follows
        ``passes_units_through``; grouped convolutions override it.
        """
        return selection.remove if self.passes_units_through else None


#: One rule instance per registered module type. Each rule takes modules of the type it is
#: registered for, which the value type cannot say per key: hence ``SlicingRule[Any]`` here, and
#: :func:`get_slicing_rule` hands out the rule of ``type(module)`` as one that takes ``module``.
_RULES: dict[type, SlicingRule[Any]] = {}
R = TypeVar("R", bound=type[SlicingRule[Any]])


def register_slicing_rule(*module_types: type) -> Callable[[R], R]:
    """Class decorator: use this rule for ``module_types`` (and their subclasses).

    Args:
        module_types: ``nn.Module`` subclasses; a later registration replaces an earlier one.
    """
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_slicing_rule expects nn.Module subclasses, got {module_type!r}")

    def decorator(rule_class: R) -> R:
        if not (isinstance(rule_class, type) and issubclass(rule_class, SlicingRule)):
            raise TypeError(f"{rule_class!r} is not a SlicingRule subclass")
        instance = rule_class()
        for module_type in module_types:
            _RULES[module_type] = instance
            if not module_type.__module__.startswith(("torch.", "torchvision.")):
                register_leaf_module(module_type)  # the graph shows the layer, not the ops inside it
        return rule_class

    return decorator


#: Rules for classes of optional libraries, by ``"<module path>.<class name>"``: registered for the
#: class the first time a module of it (or of a subclass) is looked up, so the library is never
#: imported by torchpruner (Hugging Face's ``transformers.pytorch_utils.Conv1D``).
_RULES_BY_CLASS_PATH: dict[str, type[SlicingRule[Any]]] = {}


def register_slicing_rule_by_path(*class_paths: str) -> Callable[[R], R]:
    """Class decorator: use this rule for the classes named ``"package.module.ClassName"`` (and
    their subclasses) once one of them is seen; nothing is imported."""

    def decorator(rule_class: R) -> R:
        if not (isinstance(rule_class, type) and issubclass(rule_class, SlicingRule)):
            raise TypeError(f"{rule_class!r} is not a SlicingRule subclass")
        for path in class_paths:
            _RULES_BY_CLASS_PATH[path] = rule_class
        return rule_class

    return decorator


def get_slicing_rule(module: nn.Module) -> SlicingRule[nn.Module] | None:
    """The rule registered for ``type(module)`` or its nearest registered base class."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return rule
        by_path = _RULES_BY_CLASS_PATH.get(f"{klass.__module__}.{klass.__qualname__}")
        if by_path is not None:
            register_slicing_rule(klass)(by_path)
            return _RULES[klass]
    return None


def has_own_slicing_rule(module: nn.Module) -> bool:
    """True when a rule is registered for ``type(module)`` itself (not only for a base class whose
    forward the subclass may have replaced, as Hugging Face's channels-first LayerNorm does)."""
    get_slicing_rule(module)  # registers a rule named by class path
    return type(module) in _RULES


def unaccounted_tensors(rule: SlicingRule[Any], module: nn.Module) -> list[str]:
    """The module's own parameters and buffers that ``rule`` does not account for (see
    :attr:`SlicingRule.tensors`); empty when the rule makes no claim."""
    if rule.tensors is None:
        return []
    own = [
        name for name, tensor in list(module._parameters.items()) + list(module._buffers.items()) if tensor is not None
    ]
    return [name for name in own if name not in rule.tensors]


def unaccounted_tensors_message(rule: SlicingRule[Any], module: nn.Module, name: str) -> str | None:
    """The refusal for a module holding tensors its rule does not account for (None: it holds none)."""
    unknown = unaccounted_tensors(rule, module)
    if not unknown:
        return None
    kind = type(module).__name__
    owner = next((k.__name__ for k in type(module).__mro__ if _RULES.get(k) is rule), type(rule).__name__)
    listed = ", ".join(f"'{t}' ({'parameter' if t in module._parameters else 'buffer'})" for t in unknown)
    return (
        f"'{name}' ({kind}) holds {listed}, which the slicing rule of {owner} does not account for: "
        f"pruning it with that rule would leave {', '.join(unknown)} as it is; register a slicing rule "
        f"for {kind} (register_slicing_rule({kind}); e.g. a subclass of {type(rule).__name__} that also "
        f"slices them, with tensors = {type(rule).__name__}.tensors | {set(unknown)!r})"
    )


class GroupedSliceError(ValueError):
    """Pruning that would break the group structure of a grouped convolution."""
