"""fx symbolic tracing with the example inputs at hand: shape checks and wrapped forwards.

Plain fx symbolic tracing stops at two things Hugging Face's vision models (ResNet, ConvNeXt) and
timm's VGG do although nothing in them depends on tensor values:

- a branch on a size, ``if pixel_values.shape[1] != self.num_channels: raise ...`` (fx cannot
  decide ``bool`` of a proxy);
- a forward wrapped by a decorator with ``(*args, **kwargs)`` (Hugging Face's
  ``can_return_tuple``): fx gives ``*args`` one proxy, which the wrapper then iterates.

When the tracer is given the example inputs, :class:`ExampleBinding` answers both:

- a branch whose condition is computed from sizes only (``x.shape``, ``x.size()``, ``x.dim()``,
  ``x.ndim``, arithmetic and comparisons of them, constants, and non-tensor example inputs) is
  decided by running the ops it depends on with the example inputs, and the graph records the
  answer as a guard, ``torch._assert(cond, ...)``: the graph raises on inputs where the branch
  would go the other way instead of computing something else. A guard on a size that a prune
  would change refuses those units in the dependency analysis (the branch would flip). A
  condition that reads tensor values (``if x.sum() > 0``) is left to fx, which raises as before;
- a wrapped forward gets one placeholder per example input, named as the inputs are (keyword
  inputs that are no tensors, such as ``use_cache=False``, are fixed to their values), and the
  graph returns its output's pytree leaves with generated code that rebuilds the structure (a
  ``ModelOutput``), as graphs captured with torch.export do.

The caller checks a graph traced this way against the model's own output on the example inputs
(:func:`check_against_model`) before using it, so an ``isinstance(x, torch.Tensor)`` or
``torch.jit.is_tracing()`` branch that took another path than the real forward cannot slip
through.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeInfo

from torchpruner.graph.capture import _OutputTree  # the same generated code as exported graphs

__all__ = ["ExampleBinding", "check_against_model", "GraphMismatch"]

#: attributes of a tensor that describe it without reading its values
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
#: tensor methods of the same kind
_SIZE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})
#: plain functions on sizes and constants (comparisons, arithmetic, indexing a shape, not/and/or)
_SIZE_ARITHMETIC = frozenset(
    {
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.truediv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.abs,
        operator.not_,
        operator.and_,
        operator.or_,
        operator.getitem,
        operator.contains,
        operator.is_,
        operator.is_not,
        len,
        min,
        max,
        abs,
        math.ceil,
        math.floor,
        math.sqrt,
        math.prod,
    }
)

GUARD_MESSAGE = "torchpruner: the traced graph holds for inputs where this shape is "


class ExampleProxy(fx.Proxy):
    """A proxy whose ``len`` is answered from the example when it is a shape (fx's raises)."""

    def __len__(self) -> int:
        example = getattr(self.tracer, "example", None)
        if isinstance(example, ExampleBinding) and isinstance(self.tracer, fx.Tracer):
            length = example.length(self.tracer, self)
            if length is not None:
                return length
        return super().__len__()


class GraphMismatch(RuntimeError):
    """A graph traced with decided shape checks does not compute the model's output."""


class _Untraceable(Exception):
    """The condition reads tensor values: plain fx behaviour (TraceError)."""


class ExampleBinding:
    """The example inputs of one trace and the values of the nodes computed from them.

    Args:
        args: positional example inputs.
        kwargs: keyword example inputs.
    """

    def __init__(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.values: dict[fx.Node, Any] = {}
        self.decided = 0  # branches decided (guards written)
        self.flat_output: pytree.TreeSpec | None = None
        self.input_names: list[str] = []
        #: True while the ops a condition depends on run on the example (the tracer's patched
        #: module calls and attribute reads then act as in a plain forward)
        self.evaluating = False

    # -- the root's placeholders ------------------------------------------------------------

    @staticmethod
    def wrapped(forward: Callable[..., Any]) -> bool:
        """``forward`` is a decorator's wrapper or takes ``*args``/``**kwargs``."""
        if hasattr(forward, "__wrapped__"):
            return True
        try:
            parameters = inspect.signature(forward).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)

    def root_arguments(
        self, tracer: fx.Tracer, root: nn.Module, forward: Callable[..., Any]
    ) -> tuple[Callable[..., Any], list[Any]]:
        """One placeholder per example input, named like the forward's own parameters (those of
        the function a decorator wraps), and a root function that calls the forward with them by
        name and returns its output's leaves (the structure is kept in :attr:`flat_output`)."""
        try:
            parameters = [
                p
                for p in list(inspect.signature(inspect.unwrap(forward)).parameters.values())[1:]
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            parameters = []
        if len(self.args) > len(parameters):
            raise TypeError(
                f"{type(root).__name__}.forward takes {len(parameters)} named positional inputs, "
                f"{len(self.args)} example inputs were given positionally"
            )
        # keyword inputs that are no tensors (use_cache=False) are fixed to their example values,
        # as in an exported graph: the forward's Python sees the value itself
        fixed = {k: v for k, v in self.kwargs.items() if not isinstance(v, torch.Tensor)}
        names = [p.name for p in parameters[: len(self.args)]] + [k for k in self.kwargs if k not in fixed]
        self.input_names = names
        values = list(self.args) + [v for k, v in self.kwargs.items() if k not in fixed]
        proxies = []
        for name, value in zip(names, values):
            proxy = tracer.create_proxy("placeholder", name, (), {})
            self.values[proxy.node] = value
            proxies.append(proxy)
        positional = len(self.args)

        def flat_forward(module: nn.Module, *inputs: Any) -> Any:
            named = dict(zip(names[positional:], inputs[positional:]))
            output = forward(module, *inputs[:positional], **named, **fixed)
            leaves, spec = pytree.tree_flatten(output)
            self.flat_output = spec
            return tuple(leaves)

        return flat_forward, [root, *proxies]

    def set_codegen(self, graph: fx.Graph) -> None:
        """Generated code that rebuilds the forward's output structure from the flat outputs."""
        if self.flat_output is None:
            return
        graph._codegen = _OutputTree(_PyTreeInfo(self.input_names, None, self.flat_output))  # type: ignore[arg-type]

    # -- branches ---------------------------------------------------------------------------

    def decide(self, tracer: fx.Tracer, proxy: fx.Proxy) -> bool | None:
        """The example's value of the condition ``proxy`` with a guard written into the graph, or
        None when the condition reads tensor values (or an input without an example)."""
        try:
            self._check_sizes_only(proxy.node)
            value = bool(self._value(tracer, proxy.node))
        except _Untraceable:
            return None
        condition = proxy.node if value else tracer.create_node("call_function", operator.not_, (proxy.node,), {})
        tracer.create_node("call_function", torch._assert, (condition, GUARD_MESSAGE + f"check is {value!r}"), {})
        self.decided += 1
        return value

    def unpack(self, tracer: fx.Tracer, proxy: fx.Proxy) -> list[Any] | None:
        """The items of a shape ``proxy`` iterated (``(*x.shape[:-1], -1, d)``), one proxy each,
        with its length guarded in the graph; None when it reads tensor values or is no sequence."""
        length = self.length(tracer, proxy)
        return None if length is None else [proxy[index] for index in range(length)]  # type: ignore[index]

    def length(self, tracer: fx.Tracer, proxy: fx.Proxy) -> int | None:
        """``len`` of a shape ``proxy`` (``list.extend`` asks it before iterating), guarded in the
        graph; None when it reads tensor values or is no sequence."""
        try:
            self._check_sizes_only(proxy.node)
            value = self._value(tracer, proxy.node)
        except _Untraceable:
            return None
        if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
            return None
        length = tracer.create_node("call_function", len, (proxy.node,), {})
        same = tracer.create_node("call_function", operator.eq, (length, len(value)), {})
        tracer.create_node("call_function", torch._assert, (same, GUARD_MESSAGE + f"of length {len(value)}"), {})
        self.decided += 1
        return len(value)

    def _check_sizes_only(self, node: fx.Node) -> None:
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "placeholder":
                if current not in self.values or isinstance(self.values[current], torch.Tensor):
                    raise _Untraceable  # a tensor input's values (or an input without example)
                continue
            if current.op == "call_function" and current.target is getattr:
                if current.args[1] in _SIZE_ATTRIBUTES:
                    continue  # the tensor's values are not read
                raise _Untraceable
            if current.op == "call_method" and current.target in _SIZE_METHODS:
                continue
            if current.op == "call_function" and current.target in _SIZE_ARITHMETIC:
                stack.extend(current.all_input_nodes)
                continue
            raise _Untraceable

    def _value(self, tracer: fx.Tracer, node: fx.Node) -> Any:
        """``node`` computed from the example inputs (the ops it depends on run once each)."""
        if node in self.values:
            return self.values[node]
        needed: set[fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in needed or current in self.values:
                continue
            if current.op == "placeholder":
                raise _Untraceable  # an input without an example
            needed.add(current)
            stack.extend(current.all_input_nodes)
        interpreter = fx.Interpreter(tracer.root, graph=tracer.graph)
        interpreter.env = self.values
        self.evaluating = True
        try:
            with torch.no_grad():
                for current in tracer.graph.nodes:
                    if current in needed:
                        self.values[current] = interpreter.run_node(current)
        finally:
            self.evaluating = False
        return self.values[node]


def check_against_model(
    model: nn.Module, graph_output: Any, args: Sequence[Any], kwargs: dict[str, Any], what: str
) -> None:
    """The graph's output on the example inputs is the model's own (the same leaves in the same
    order, tensors equal to float tolerance); else :class:`GraphMismatch` names the first difference."""
    with torch.no_grad():
        expected = model(*args, **kwargs)
    got_leaves = pytree.tree_leaves(graph_output)
    want_leaves = pytree.tree_leaves(expected)
    if len(got_leaves) != len(want_leaves):
        raise GraphMismatch(f"{what}: the graph returns {len(got_leaves)} values, the model {len(want_leaves)}")
    for index, (got, want) in enumerate(zip(got_leaves, want_leaves)):
        if isinstance(want, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                raise GraphMismatch(f"{what}: output {index} differs in type or shape from the model's")
            if want.is_floating_point() or want.is_complex():
                if not torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
                    raise GraphMismatch(f"{what}: output {index} differs from the model's")
            elif not torch.equal(got, want):
                raise GraphMismatch(f"{what}: output {index} differs from the model's")
        elif got != want:
            raise GraphMismatch(f"{what}: output {index} is {got!r}, the model's {want!r}")
