"""Slots: the positions of a tensor's unit axis, and the helpers that link them (floor 2, part of
the dependency analysis in :mod:`torchpruner.graph.dependency`)."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._ops import (
    leaf_version,
    SHAPE_QUERY_ATTRIBUTES,
    SHAPE_QUERY_FUNCTIONS,
    SHAPE_QUERY_METHODS,
    TUPLE_DIM_FUNCTIONS,
    TUPLE_DIM_OPS,
)

from .spaces import _CannotFollow, _LiteralSize, _Role, _ShapeAttribute, _Space
from .trace import CallSite, ModelGraph, _LeafTracer, _PLAIN_TYPES, _get_attr_path, _is_plain


def _slot_ids(shape: Sequence[int], axis: int, ids: np.ndarray) -> torch.Tensor:
    """A tensor of ``shape`` (with ``len(ids)`` on ``axis``) holding each position's slot id."""
    shape = list(shape)
    shape[axis] = len(ids)
    view = [1] * len(shape)
    view[axis] = len(ids)
    return torch.as_tensor(ids, dtype=torch.int64).reshape(view).expand(shape).contiguous()


def _unit_line(y: torch.Tensor) -> tuple[int, np.ndarray] | None:
    """The one axis along which slot ids vary (constant along every other axis) and the ids along
    it, or None when there is no such axis."""
    if y.dim() == 0:
        return None
    candidates = []
    for axis in range(y.dim()):
        index: list[int | slice] = [0] * y.dim()
        index[axis] = slice(None)
        line = y[tuple(index)]
        view = [1] * y.dim()
        view[axis] = y.shape[axis]
        if torch.equal(y, line.reshape(view).expand_as(y)):
            candidates.append((axis, line))
    varying = [(a, ids) for a, ids in candidates if ids.numel() > 1 and not bool((ids == ids[0]).all())]
    if len(varying) == 1:
        return varying[0][0], varying[0][1].numpy()
    if not varying and candidates and bool((y == y.flatten()[0]).all()):
        # a single unit: the last axis holding it
        for a, ids in reversed(candidates):
            if y.shape[a] >= 1:
                return a, ids.numpy()
    return None


def _name_target(node: fx.Node) -> str:
    """The target of a ``call_module``, ``call_method``, ``get_attr`` or ``placeholder`` node, which
    fx always writes as a name (only ``call_function`` targets are callables)."""
    target = node.target
    assert isinstance(target, str), f"{node.op} node '{node.name}' targets {target!r}, not a name"
    return target


def _probe_removals(size: int) -> List[np.ndarray]:
    probes = [np.array([0, size // 2]) if size >= 3 else np.array([0])]
    if size >= 4:
        probes.append(np.array([size - 1]))
    return [np.unique(p) for p in probes]


def _shape_values(value: Any) -> list[Any]:
    """The non-tensor leaves of a (nested) argument, for comparing computed shapes."""
    found: list[Any] = []
    fx.node.map_aggregate(value, lambda v: found.append(None if isinstance(v, torch.Tensor) else v))
    return found


def _same_shape_value(value: Any, literal: Any) -> bool:
    """``value`` (a module attribute) is the shape constant ``literal`` that fx wrote into the graph."""
    if isinstance(literal, bool) or isinstance(value, bool):
        return False
    if isinstance(literal, int):
        return type(value) is int and value == literal
    if isinstance(literal, (tuple, list, torch.Size)) and isinstance(value, (tuple, list, torch.Size)):
        return tuple(value) == tuple(literal)
    return False


def _layer_norm_reads(owner: nn.Module, attribute: str, literal: Any) -> bool:
    """Every ``F.layer_norm`` call in ``owner``'s forward whose normalized_shape is ``literal`` reads
    it from ``owner.<attribute>``: traced again with the attribute set to another value (restored
    afterwards), none of them still shows ``literal``."""
    return _reads_attribute(owner, attribute, F.layer_norm, 1, "normalized_shape", literal)


def _is_kept_part(value: Any, full: torch.Tensor, axis: int, kept: Any) -> bool:
    """``value`` is ``full`` with only the positions ``kept`` along ``axis`` (what an op run on
    fewer units must give when it follows them)."""
    expected = full.index_select(axis, torch.as_tensor(kept))
    return isinstance(value, torch.Tensor) and value.shape == expected.shape and torch.equal(value, expected)


#: the traces of :func:`_traced_with` shared within one analysis (None outside one)
_SHARED_TRACES: contextvars.ContextVar[dict[Any, fx.Graph | None] | None] = contextvars.ContextVar(
    "_SHARED_TRACES", default=None
)


@contextlib.contextmanager
def shared_traces() -> Iterator[None]:
    """Within the block, :func:`_traced_with` traces each module structure once: the layers of
    a model are mostly copies of a few (every LayerNorm2d of a ConvNeXt, every block's attention),
    and each trace costs milliseconds. The block is one analysis of one model, so nothing that
    a trace depends on changes in between."""
    token = _SHARED_TRACES.set({})
    try:
        yield
    finally:
        _SHARED_TRACES.reset(token)


def _structure_key(owner: nn.Module) -> tuple[Any, ...] | None:
    """Everything ``owner``'s forward traced alone can depend on, comparable across modules: per
    submodule its name, class, which earlier submodule it is (a shared one), its plain attributes
    (training flag included) and functions, its parameters' names, shapes and dtypes, its
    buffers' too and their values (fx passes buffers to the forward as tensors, not proxies).
    None when a submodule holds anything else (a tensor attribute, a hook, an object), whose
    effect on the trace is unknown: then it is traced on its own."""
    seen: dict[int, int] = {}
    parts: list[Any] = [leaf_version()]
    for name, module in owner.named_modules(remove_duplicate=False):
        first = seen.setdefault(id(module), len(seen))
        attributes: list[Any] = []
        for attr, value in vars(module).items():
            if attr == "_modules":
                attributes.append((attr, tuple(value)))
            elif attr == "_parameters":  # read as proxies while tracing: their values do not matter
                tensors = tuple(
                    (key, None) if t is None else (key, type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad)
                    for key, t in value.items()
                )
                attributes.append((attr, tensors))
            elif attr == "_buffers":  # read as tensors (a value can decide a branch): their bits too
                buffers: list[tuple[Any, ...]] = []
                for key, t in value.items():
                    if t is None:
                        buffers.append((key, None))
                        continue
                    try:
                        if t.layout != torch.strided or t.is_meta or t.is_quantized:
                            return None
                        bits = t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()
                    except (RuntimeError, ValueError, TypeError):  # a lazy buffer, a dtype without bytes
                        return None
                    buffers.append((key, type(t), tuple(t.shape), t.dtype, t.device, bits))
                attributes.append((attr, tuple(buffers)))
            elif attr == "_non_persistent_buffers_set":
                attributes.append((attr, tuple(sorted(value))))
            elif "hook" in attr and isinstance(value, dict):
                if value:
                    return None
            elif isinstance(value, _PLAIN_TYPES) or (_is_plain(value) and isinstance(value, tuple)):
                attributes.append((attr, type(value), value))
            elif _is_plain(value):  # a list
                attributes.append((attr, type(value), tuple(value)))
            elif callable(value) and not isinstance(value, (nn.Module, torch.Tensor)) and hasattr(value, "__code__"):
                attributes.append((attr, value))  # a function: itself (held by the module)
            else:
                return None
        parts.append((name, type(module), first, tuple(attributes)))
    return tuple(parts)


def _traced_with(owner: nn.Module, attribute: str, value: Any, defaults: bool = False) -> fx.Graph | None:
    """``owner``'s forward traced alone with ``owner.<attribute>`` set to ``value`` (restored
    afterwards), or None when it cannot be traced alone (then where a value comes from stays
    unknown). ``defaults``: the arguments that default to None are None (as in a call that does not
    pass them: Swin's ``attn(x)`` without a mask), not traced values. Within
    :func:`shared_traces`, a module of the same structure as one already traced with the same
    change reuses that trace (the callers read only its structure)."""
    concrete = None
    if defaults:
        parameters = inspect.signature(owner.forward).parameters.values()
        concrete = {p.name: None for p in parameters if p.default is None}
        if not concrete:
            return None
    shared = _SHARED_TRACES.get()
    key = None
    if shared is not None and type(value) in (int, tuple, list, torch.Size):
        structure = _structure_key(owner)
        if structure is not None:
            key = (structure, attribute, type(value), tuple(value) if not isinstance(value, int) else value, defaults)
            if key in shared:
                return shared[key]
    attributes_before = set(vars(owner))
    old = getattr(owner, attribute)
    graph: fx.Graph | None
    try:
        setattr(owner, attribute, value)
        graph = _LeafTracer().trace(owner, concrete_args=concrete)
    except Exception:  # noqa: BLE001 - its forward cannot be traced alone: the origin stays unknown
        graph = None
    finally:
        setattr(owner, attribute, old)
    if shared is not None and key is not None and set(vars(owner)) == attributes_before:
        shared[key] = graph  # (a trace that stored constants on the module is not shared)
    return graph


def _reads_attribute(
    owner: nn.Module,
    attribute: str,
    function: Callable[..., Any] | str,
    position: int,
    keyword: str,
    literal: Any = None,
    sentinel: Any = None,
    expected: Any = None,
) -> bool:
    """The calls of ``function`` (a tensor method: its name) in ``owner``'s forward take argument ``keyword`` from
    ``owner.<attribute>``: traced again with the attribute set to ``sentinel`` (by default another
    value; restored afterwards), one of them shows ``expected`` (by default the sentinel: a value
    the code computes from the attribute, such as ``self.width // 2``, where given) and none
    still shows ``literal`` (by default the attribute's value)."""
    old = getattr(owner, attribute)
    literal = old if literal is None else literal
    if sentinel is None and isinstance(old, int):
        sentinel = old + 7919
    elif sentinel is None:
        values = [int(v) + 7919 for v in old]
        sentinel = torch.Size(values) if isinstance(old, torch.Size) else type(old)(values)
    expected = sentinel if expected is None else expected
    graph = _traced_with(owner, attribute, sentinel)
    if graph is None:
        return False
    op = "call_method" if isinstance(function, str) else "call_function"
    values = [
        n.kwargs.get(keyword, n.args[position] if len(n.args) > position else None)
        for n in graph.nodes
        if n.op == op and (n.target == function if op == "call_method" else n.target is function)
    ]
    return any(_same_shape_value(expected, value) for value in values) and not any(
        _same_shape_value(value, literal) for value in values
    )


def _int_attributes(owner: nn.Module, value: int) -> list[str]:
    """The public int attributes of ``owner`` equal to ``value`` (where a literal size may come from)."""
    return [
        attr for attr, held in vars(owner).items() if not attr.startswith("_") and type(held) is int and held == value
    ]


def _slices_at_attribute(owner: nn.Module, attribute: str, end: str) -> bool:
    """``owner``'s forward slices a tensor (``x[:, :self.a]``) with ``end`` (``"start"`` or
    ``"stop"``) of a slice read from ``owner.<attribute>``: traced again with the attribute changed
    (restored afterwards), some ``getitem`` shows the new value there."""
    old = getattr(owner, attribute)
    sentinel = old + 7919
    graph = _traced_with(owner, attribute, sentinel)
    if graph is None:
        return False
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) < 2:
            continue
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(item, slice) and getattr(item, end) == sentinel for item in index):
            return True
    return False


class _InputsRecorded(Exception):
    """Stops the model's forward once the module of interest has its inputs."""


def _swap_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], position: int, keyword: str, sentinel: Any, real: Any
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, value)``: the call's argument ``keyword`` (or at ``position``) put back to
    ``real`` where it is ``sentinel``, and the value the call was given."""
    if keyword in kwargs:
        value = kwargs[keyword]
        if _same_shape_value(value, sentinel):
            kwargs = {**kwargs, keyword: real}
        return args, kwargs, value
    if len(args) > position:
        value = args[position]
        if _same_shape_value(value, sentinel):
            args = args[:position] + (real,) + args[position + 1 :]
        return args, kwargs, value
    return args, kwargs, None


def _reads_attribute_running(
    owner: nn.Module,
    attribute: str,
    function: Callable[..., Any],
    position: int,
    keyword: str,
    run_model: Callable[[], Any],
) -> bool:
    """:func:`_reads_attribute` for a forward that fx cannot trace alone (shape arithmetic in
    Python: timm's ``Conv2dSame`` computes its padding with ``math.ceil``): ``owner``'s inputs are
    recorded while ``run_model()`` runs the example inputs, then its forward runs again on them
    with ``owner.<attribute>`` set to another value, every call of ``function`` intercepted (a
    ``TorchFunctionMode``) to read the argument and put the real value back before the call. True
    when the calls see the new value and never the old one; everything is restored."""
    recorded: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recorded.append((args, kwargs))
        raise _InputsRecorded

    handle = owner.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            run_model()
    except _InputsRecorded:
        pass
    except Exception:  # noqa: BLE001 - the model does not run its example inputs: origin unknown
        return False
    finally:
        handle.remove()
    if not recorded:
        return False
    old = getattr(owner, attribute)
    if not isinstance(old, int):
        return False
    sentinel = old + 7919
    seen: list[Any] = []

    class Intercept(torch.overrides.TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            kwargs = kwargs or {}
            if func is function:
                args, kwargs, value = _swap_argument(tuple(args), dict(kwargs), position, keyword, sentinel, old)
                seen.append(value)
            return func(*args, **kwargs)

    args, kwargs = recorded[0]
    try:
        setattr(owner, attribute, sentinel)
        with torch.no_grad(), Intercept():
            owner(*args, **kwargs)
    except Exception:  # noqa: BLE001 - its code uses the attribute elsewhere: the origin stays unknown
        return False
    finally:
        setattr(owner, attribute, old)
    return any(_same_shape_value(sentinel, v) for v in seen) and not any(_same_shape_value(v, old) for v in seen)


class SlotFlow:
    """Slot bookkeeping of the analysis: every tensor that carries units gets slots (one per
    position on its unit axis); ops link slots, refusals block them. The op and layer visitors
    (:class:`~torchpruner.graph.flow_ops.TensorOpFlow`, :class:`~torchpruner.graph.flow_layers.LayerFlow`)
    build on these helpers; :class:`~torchpruner.graph.dependency.DependencyGraph` owns the state
    they fill."""

    # the state, set by DependencyGraph.__init__
    graph: ModelGraph
    model: nn.Module
    _site_by_node: Dict[fx.Node, CallSite]
    _spaces: Dict[fx.Node, _Space]
    _space_list: List[_Space]
    _num_slots: int
    _edges: List[Tuple[np.ndarray, np.ndarray]]
    _blocked: Dict[int, Tuple[str, bool, Optional[fx.Node]]]  # id(space) -> (reason, hard, op)
    _visiting: Optional[fx.Node]
    _warned: bool
    _guessed: set[int]  # spaces whose unit axis is a guess (after an op that could not be followed)
    _roles: List[_Role]
    _pending_attr_blocks: Dict[fx.Node, str]
    _first_role_space: Dict[Tuple[int, str], _Space]
    _shape_attributes: list[_ShapeAttribute]
    _literal_sizes: list[_LiteralSize]  # literals of an exported graph, checked by capturing again
    _statistics: list[tuple[_Space, str]]  # hand-written RMSNorms, GRNs over the units: (input, owner)
    _count_constraints: List[Tuple[_Space, int]]  # (space, conv groups): equal counts per block
    _equal_pieces: list[_Space]  # tensors split into equal pieces (positions linked across pieces)
    _count_sources: list[tuple[_Space, fx.Node, str, fx.Node]]  # ops reading another tensor's unit count
    _bounded_prefixes: Dict[Tuple[int, str], Dict[int, _Space]]  # x[:, :self.a] pieces by attribute, source
    _modules: Dict[str, nn.Module]
    _traced_modules: Dict[str, nn.Module]

    # -- slots ------------------------------------------------------------------------------

    def _shape(self, node: Any) -> Optional[Tuple[int, ...]]:
        site = self._site_by_node.get(node) if isinstance(node, fx.Node) else None
        return tuple(site.shape) if site is not None and site.shape is not None else None

    def _tensor_shape(self, node: fx.Node) -> Tuple[int, ...]:
        """The shape of ``node``'s output, which the op being followed needs to be one tensor."""
        shape = self._shape(node)
        if shape is None:
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}: it does not return one tensor")
        return shape

    def _dtype(self, node: fx.Node) -> Optional[torch.dtype]:
        site = self._site_by_node.get(node)
        return site.dtype if site is not None else None

    def _alloc(self, node: fx.Node, axis: int, shape: Optional[Tuple[int, ...]] = None) -> _Space:
        shape = shape if shape is not None else self._shape(node)
        assert shape is not None
        axis = axis % len(shape)
        space = _Space(
            node=node,
            site=self._site_by_node.get(node),
            start=self._num_slots,
            size=int(shape[axis]),
            axis=axis,
            shape=tuple(shape),
        )
        self._num_slots += space.size
        self._spaces[node] = space
        self._space_list.append(space)
        if node in self._pending_attr_blocks:
            self._block(space, self._pending_attr_blocks.pop(node))
        return space

    def _link(self, a: _Space, a_pos: np.ndarray, b: _Space, b_pos: np.ndarray) -> None:
        if id(a) in self._guessed:
            self._guessed.add(id(b))  # its unit axis follows a guess
        self._edges.append((a.start + np.asarray(a_pos, dtype=np.int64), b.start + np.asarray(b_pos, dtype=np.int64)))

    def _link_same(self, a: _Space, b: _Space) -> None:
        if a.size != b.size:
            raise _CannotFollow(f"internal: linking {a.size} with {b.size} units")
        self._link(a, np.arange(a.size), b, np.arange(b.size))

    def _block(self, space: _Space, reason: str, hard: bool = True) -> None:
        old = self._blocked.get(id(space))
        if old is None or (hard and not old[1]):
            self._blocked[id(space)] = (reason, hard, self._visiting or space.node)

    def _label(self, node: fx.Node) -> str:
        site = self._site_by_node.get(node)
        if site is not None and site.kind == "module":
            return f"'{site.label}' ({type(site.module).__name__})"
        target = node.target
        op = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
        if site is not None and site.module is not None:  # a functional call standing for its layer
            call = f", call {site.call_index}" if site.call_index else ""
            return f"'{site.module_name}' ({type(site.module).__name__}, {op}{call})"
        return f"{op} at call site '{node.name}'"

    def _block_node(self, node: fx.Node, reason: str) -> None:
        """Block every slotted input of ``node`` (and its output): the op cannot be followed."""
        for arg in self._slotted_inputs(node, attrs=True):
            if arg in self._spaces:
                self._block(self._spaces[arg], reason)
            elif arg.op == "get_attr":
                self._pending_attr_blocks.setdefault(arg, reason)
        shape = self._shape(node)
        if shape is not None and len(shape) >= 1 and node not in self._spaces:
            # the blocked output still needs a sensible unit axis, so it does not poison its users
            site = self._site_by_node.get(node)
            axis = site.unit_axis if site is not None and site.unit_axis is not None else len(shape) - 1
            if (
                node.op == "call_function"
                and node.target is operator.getitem
                and isinstance(node.args[0], fx.Node)
                and node.args[0].op == "call_module"
            ):
                source = self._slotted_inputs(node)
                module = self._traced_modules.get(_name_target(node.args[0]))
                if isinstance(module, nn.MultiheadAttention) or not source:
                    axis = len(shape) - 1
            for arg in self._slotted_inputs(node):
                space = self._spaces.get(arg)
                if space is not None and space.ndim == len(shape) and space.node.op != "placeholder":
                    axis = space.axis
                    break
            blocked = self._alloc(node, axis)
            self._guessed.add(id(blocked))
            self._block(blocked, reason)
        elif node in self._spaces:
            self._block(self._spaces[node], reason)

    def _slotted_inputs(self, node: fx.Node, attrs: bool = False) -> List[fx.Node]:
        """Input nodes with slots (through tuple producers such as split); attrs: bare params too."""
        found: List[fx.Node] = []
        for arg in node.all_input_nodes:
            if arg in self._spaces or (attrs and arg.op == "get_attr" and self._attr_units(arg)):
                found.append(arg)
            elif (
                self._shape(arg) is None
                and arg.op in ("call_function", "call_method", "call_module")
                and not self._is_shape_query(arg)
            ):  # x.size(0), x.ndim: no units
                for inner in arg.all_input_nodes:
                    if inner in self._spaces or (attrs and inner.op == "get_attr" and self._attr_units(inner)):
                        found.append(inner)
        return list(dict.fromkeys(found))

    def _attr_units(self, node: fx.Node) -> bool:
        """A bare parameter/buffer carries units unless it holds integers (position ids are indices)."""
        dtype = self._dtype(node)
        return dtype is None or dtype.is_floating_point or dtype.is_complex

    def _space_of(self, node: Any, axis: Optional[int] = None) -> Optional[_Space]:
        """The slots of ``node``; bare parameters get slots on first use (along ``axis``)."""
        if not isinstance(node, fx.Node):
            return None
        space = self._spaces.get(node)
        if space is not None:
            return space
        if node.op == "get_attr":
            shape = self._shape(node)
            if shape is None or len(shape) == 0 or not self._attr_units(node):
                return None  # integer buffers (position ids) hold indices, not units
            return self._alloc(node, len(shape) - 1 if axis is None else axis)
        return None

    def _input_space(self, node: fx.Node) -> Tuple[fx.Node, _Space]:
        data = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
        if len(data) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(data)} tensors with units; expected one")
        return data[0], self._spaces[data[0]]

    def _dim_arg(self, node: fx.Node, position: int, name: str = "dim", default: Any = None) -> Any:
        if name in node.kwargs:
            return node.kwargs[name]
        if len(node.args) > position:
            return node.args[position]
        return default

    def _evaluate(
        self, node: fx.Node, env: Dict[fx.Node, torch.Tensor], module: Optional[nn.Module] = None, depth: int = 0
    ) -> Any:
        """Run ``node`` with ``env`` substituted; the shape arithmetic feeding it is re-run too
        (``x.size(0)``, ``h // p``), other tensors are stand-ins of their recorded shape."""
        if node in env:
            return env[node]
        if depth > 40:
            raise _CannotFollow("argument chain too deep")
        shape = self._shape(node)
        if depth > 0 and node.op == "get_attr" and not self._attr_units(node):
            constant = self._constant(node)  # an index buffer (Swin's relative_position_index): its values
            if constant is not None:
                return constant
        if depth > 0 and shape is not None:
            return self._stand_in(node, shape)

        def value(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                return self._evaluate(arg, env, None, depth + 1)
            if isinstance(arg, (list, tuple)):
                return type(arg)(value(a) for a in arg)
            if isinstance(arg, slice):
                return slice(value(arg.start), value(arg.stop), value(arg.step))
            if isinstance(arg, dict):
                return {k: value(v) for k, v in arg.items()}
            return arg

        args = value(node.args)
        kwargs = value(dict(node.kwargs))
        target = node.target
        if node.op == "call_function" and callable(target):
            return target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], _name_target(node))(*args[1:], **kwargs)
        if node.op == "placeholder" and node.args and shape is None:
            return node.args[0]  # a forward argument left at its default (attn_mask=None)
        if node.op == "call_module" and depth == 0:
            mod = module if module is not None else self._traced_modules[_name_target(node)]
            return mod(*args, **kwargs)
        raise _CannotFollow(f"cannot evaluate {node.op} '{node.name}' in a shape computation")

    def _constant(self, node: fx.Node) -> torch.Tensor | None:
        """The value of an integer tensor the graph reads with ``get_attr`` (not a stand-in)."""
        traced = self.graph.traced
        if traced is None:
            return None
        try:
            value = _get_attr_path(traced, str(node.target))
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None

    def _evaluate_value(self, value: Any, env: dict[fx.Node, torch.Tensor]) -> Any:
        """A (nested) argument with its nodes evaluated as in :meth:`_evaluate`."""
        return fx.node.map_aggregate(value, lambda v: self._evaluate(v, env, None, 1) if isinstance(v, fx.Node) else v)

    def _pin(self, space: _Space, positions: np.ndarray, reason: str) -> None:
        """Refuse the groups of the given slots of ``space`` (not its other slots): a blocked
        stand-in tensor is linked to them."""
        pin = _Space(
            node=space.node, site=None, start=self._num_slots, size=len(positions), axis=0, shape=(len(positions),)
        )
        self._num_slots += pin.size
        self._space_list.append(pin)
        self._link(space, positions, pin, np.arange(pin.size))
        self._block(pin, reason)

    def _calling_module(self, node: fx.Node) -> str | None:
        """Qualified name of the module whose forward made the call ``node`` (None: unknown)."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, value = list(stack.items())[-1]
            path = value[0] if isinstance(value, (tuple, list)) and isinstance(value[0], str) else key
            if path in self._modules:
                return path
        for arg in node.all_input_nodes:  # its weight: "<owner>.weight"
            if arg.op == "get_attr" and _name_target(arg).rpartition(".")[0] in self._modules:
                return _name_target(arg).rpartition(".")[0]
        return "" if not stack else None

    def _calling_owner(self, node: fx.Node) -> tuple[nn.Module, str] | None:
        """The module whose forward made the call ``node`` and its name (``""``: the model itself);
        None when unknown."""
        name = self._calling_module(node)
        owner = self._modules.get(name) if name is not None else None
        return None if owner is None or name is None else (owner, name)

    def _stand_in(self, node: fx.Node, shape: Sequence[int]) -> torch.Tensor:
        """A meta tensor of ``shape`` and ``node``'s dtype: a tensor whose values a shape computation never reads."""
        return torch.empty(tuple(shape), device="meta", dtype=self._dtype(node) or torch.float32)

    def _is_shape_query(self, node: fx.Node) -> bool:
        """``node`` reads a size or a property of a tensor, not its values (``x.size(0)``, ``x.shape``)."""
        if node.op == "call_function" and node.target is getattr:
            return self._shape(node) is None and node.args[1] in SHAPE_QUERY_ATTRIBUTES
        return (node.op == "call_function" and node.target in SHAPE_QUERY_FUNCTIONS) or (
            node.op == "call_method" and node.target in SHAPE_QUERY_METHODS
        )

    # -- attribute reads and (values, indices) pairs ----------------------------------------

    def _tuple_op(self, node: Any) -> str | None:
        """The name of ``node``'s op when it returns a (values, indices)-like pair, else None."""
        if not isinstance(node, fx.Node) or self._shape(node) is not None:
            return None
        if node.op == "call_function":
            return TUPLE_DIM_FUNCTIONS.get(node.target) if callable(node.target) else None
        if node.op == "call_method" and node.target in TUPLE_DIM_OPS:
            return node.target
        return None
