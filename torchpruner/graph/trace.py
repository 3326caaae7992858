"""The one tracer of torchpruner: call sites of a model in data-flow order.

A :class:`ModelGraph` records every *call site* of a model for one example input: each call of a
leaf module, each functional op (``F.relu``, ``torch.cat``, ``operator.add``) and each tensor
method (``x.view``, ``x.mean``), with the producers of its tensor arguments, its users, the shape
of its output and the axis that holds the layer's *units* (neurons, channels, filters).

Three tracing methods, tried in this order:

``"fx"``
    ``torch.fx`` symbolic tracing with torch.nn modules as leaves, followed by one real forward pass
    (shape propagation). Sees functional ops and merges (add, cat). Fails on data-dependent control
    flow (``if x.sum() > 0``) and on some dynamic Python; then the fallback is used, and
    :attr:`ModelGraph.fx_failure` names the module whose code fx could not trace.
``"export"``
    When fx symbolic tracing fails: ``torch.export`` in non-strict mode (it runs the forward as
    Python, so Hugging Face models, value-dependent control flow and iteration work), translated
    into the same kind of fx graph by :mod:`torchpruner.graph.capture` (leaf modules as
    ``call_module``, parameters by their state-dict names, torch-level ops). The graph keeps
    ``method == "fx"`` (the analysis reads it like any fx graph); :attr:`ModelGraph.capture` says
    ``"export"``. Costs seconds rather than a fraction of one; dimensions other than the batch
    keep the example's sizes.
``"hooks"``
    Forward hooks on every leaf module during one real forward pass. Works on any model that runs,
    but only sees modules: functional ops (``F.relu``), merges and reshapes are invisible, so
    ``find_best=True`` only moves through modules that directly consume each other's output.

Tracing never changes the model: it runs under ``torch.no_grad()`` in eval mode (each module's
training flag restored afterwards) and restores the global RNG state, so BatchNorm statistics,
Dropout masks and the training run are untouched.

A module called twice (torchvision's ResNet reuses one ``nn.ReLU`` per block) has one call site per
call, distinguished by :attr:`CallSite.call_index`.

:func:`get_graph` caches one graph on the model and reuses it only while it describes the live
model: the same module, parameter and buffer objects, shapes, plain attributes and functions
(``model.head = nn.Linear(6, 3)`` gives a new trace). torch.fx keeps the generated source of each
graph module in ``linecache``; the tracer releases it when a cached graph is replaced or collected
and when a scoring run's probed module is done, so periodic pruning holds constant memory.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import math
import weakref
from dataclasses import dataclass, field
from collections.abc import Container, Iterable
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.fx.graph_module as fx_graph_module
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    BATCHNORM_FUNCTIONS,
    BATCHNORM_MODULES,
    CHANNEL_AXIS_MODULES,
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    FUNCTIONAL_LAYERS,
    LAST_AXIS_MODULES,
    MERGE_FUNCTIONS,
    MERGE_METHODS,
    RELU_LIKE_FUNCTIONS,
    RELU_LIKE_METHODS,
    RELU_LIKE_MODULES,
    leaf_version,
    user_leaf_types,
)
from torchpruner._state import collector_paused, make_example_inputs, preserved_state, unwrap_model
from torchpruner.rules import get_slicing_rule
from torchpruner.graph.capture import capture as export_capture
from torchpruner.graph.concrete import ExampleBinding, ExampleProxy, check_against_model

logger = logging.getLogger(__name__)

__all__ = [
    "CallSite",
    "ModelGraph",
    "get_graph",
    "make_example_inputs",
    "unwrap_model",
    "preserved_state",
]


# --------------------------------------------------------------------------------------------
# Call sites
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CallSite:
    """One call of a module, function or tensor method in the traced forward pass.

    Attributes:
        index: position in data-flow (execution) order.
        name: fx node name (``layer1_0_relu_1``) or ``"<module name>#<call_index>"`` in hooks mode.
        kind: ``"module"``, ``"function"``, ``"method"``, ``"input"`` (a model input) or
            ``"attr"`` (a bare parameter/buffer read, e.g. a class token).
        target: the module, the function, the method name, the input name or the attribute path.
        module: the module for ``kind == "module"``; for a functional call that stands for a layer
            (``F.linear`` on a module's own weight, inside its forward: a subclass fx traces into),
            that layer; else None.
        module_name: qualified name of ``module`` in the model.
        call_index: for modules, which call of this module within one forward (0-based).
        inputs: producers of this site's tensor arguments, in argument order.
        users: sites that consume this site's output.
        shape: output shape for the example input (batch dim included), None if not a tensor.
        unit_axis: non-negative axis of the units in the output, None when it has none.
        node: the fx node (fx mode only).
    """

    index: int
    name: str
    kind: str
    target: Any
    module: Optional[nn.Module] = None
    module_name: Optional[str] = None
    call_index: int = 0
    inputs: List["CallSite"] = field(default_factory=list)
    users: List["CallSite"] = field(default_factory=list)
    shape: Optional[torch.Size] = None
    dtype: Optional[torch.dtype] = None
    unit_axis: Optional[int] = None
    node: Optional[fx.Node] = None

    @property
    def num_units(self) -> Optional[int]:
        if self.shape is None or self.unit_axis is None:
            return None
        return int(self.shape[self.unit_axis])

    @property
    def label(self) -> str:
        """Human-readable name: the module name (with call index when reused) or the op."""
        if self.kind == "module" and self.module_name is not None:
            return self.module_name if self.call_index == 0 else f"{self.module_name} (call {self.call_index})"
        return self.name

    def is_op(
        self, functions: Container[object], methods: Container[object] = frozenset(), modules: Tuple[type, ...] = ()
    ) -> bool:
        if self.kind == "function":
            return self.target in functions
        if self.kind == "method":
            return self.target in methods
        if self.kind == "module":
            return isinstance(self.module, modules)
        return False

    @property
    def is_activation(self) -> bool:
        return self.is_op(ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES)

    @property
    def is_relu_like(self) -> bool:
        if self.kind == "module" and isinstance(_final_child(self.module), RELU_LIKE_MODULES):
            return True  # a BatchNormAct2d traced as one call ends with its ReLU
        return self.is_op(RELU_LIKE_FUNCTIONS, RELU_LIKE_METHODS, RELU_LIKE_MODULES)

    @property
    def is_dropout(self) -> bool:
        return self.is_op(DROPOUT_FUNCTIONS, set(), DROPOUT_MODULES)

    @property
    def is_batchnorm(self) -> bool:
        return self.is_op(BATCHNORM_FUNCTIONS, set(), BATCHNORM_MODULES)

    @property
    def is_merge(self) -> bool:
        # parameters read by a functional op (F.batch_norm's running stats) do not make a merge
        data_inputs = {id(s) for s in self.inputs if s.kind != "attr"}
        return len(data_inputs) > 1 or (self.is_op(MERGE_FUNCTIONS, MERGE_METHODS) and len(self.inputs) > 1)

    def __repr__(self) -> str:
        shape = tuple(self.shape) if self.shape is not None else None
        return f"CallSite({self.index}, {self.label!r}, kind={self.kind}, shape={shape}, unit_axis={self.unit_axis})"


def _unit_axis_for(site: CallSite) -> Optional[int]:
    """Axis of the units in ``site``'s output (see module docstring)."""
    if site.shape is None:
        return None
    ndim = len(site.shape)
    if ndim < 2:
        return None
    if site.module is not None:
        if isinstance(site.module, LAST_AXIS_MODULES):
            return ndim - 1
        if isinstance(site.module, CHANNEL_AXIS_MODULES):
            return 1
    if site.kind == "input":  # [N, C, ...] data; integer token ids carry no units
        return 1 if site.dtype is not None and site.dtype.is_floating_point else None
    if site.kind == "attr":  # bare parameters such as class tokens / position embeddings [1, L, D]
        # integer buffers (Hugging Face's position_ids) are indices, not units
        return ndim - 1 if site.dtype is None or site.dtype.is_floating_point else None
    producer = site.inputs[0] if site.inputs else None
    if producer is not None and producer.unit_axis is not None and producer.shape is not None:
        axis = producer.unit_axis
        if site.kind in ("function", "method") and site.node is not None:
            mapped = _map_axis_through_permute(site, axis, len(producer.shape))
            if mapped is not None:
                return mapped
        if len(producer.shape) == ndim:
            return axis
    return 1


def _map_axis_through_permute(site: CallSite, axis: int, in_ndim: int) -> Optional[int]:
    """Follow the unit axis through ``permute``/``transpose``/``movedim`` (e.g. ViT's [N,D,L]->[N,L,D])."""
    node = site.node
    assert node is not None  # only called for sites of an fx graph
    target = site.target
    args: list[Any] = list(node.args[1:]) if node.args else []  # read as ints below; TypeError: not followed
    try:
        if target in ("permute",) or target is torch.permute:
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = [int(d) % in_ndim for d in dims]
            return dims.index(axis)
        if target in ("transpose", "swapaxes") or target in (torch.transpose, torch.swapaxes):
            d0, d1 = (int(args[0]) % in_ndim, int(args[1]) % in_ndim)
            return d1 if axis == d0 else d0 if axis == d1 else axis
    except (TypeError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Generated source: every fx graph module registers its forward's source with linecache
# --------------------------------------------------------------------------------------------


def _forget_source(key: str) -> None:
    """Drop the generated source registered under ``key`` (linecache and torch.fx's loader)."""
    linecache.cache.pop(key, None)
    eval_cache = getattr(getattr(fx_graph_module, "_loader", None), "eval_cache", None)
    if isinstance(eval_cache, dict):
        eval_cache.pop(key, None)


def _source_release(module: fx.GraphModule) -> Callable[[], None]:
    """A callable that releases ``module``'s generated source; it also runs when ``module`` is
    collected. Safe to call more than once; the graph module keeps working (only tracebacks
    through it lose their source lines).

    torch.fx names each generated forward ``<eval_with_key>.N`` and keeps its source in
    ``linecache`` and in its loader for the life of the process, so without this every retrace
    and every probed module would leave a few KB behind.
    """
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    key = getattr(code, "co_filename", None)
    if not isinstance(key, str) or not key.startswith("<eval_with_key>"):
        return lambda: None  # not a per-instance key (content-addressed or unknown): nothing grows
    finalizer = weakref.finalize(module, _forget_source, key)
    finalizer.atexit = False
    return finalizer


# --------------------------------------------------------------------------------------------
# fx tracing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _sdpa_taking_proxies() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` recorded as one call while tracing, whatever its
    arguments: in older torch releases (2.6 among them) its argument parser refused a traced flag
    (``is_causal=is_causal`` passed on from a forward argument, as in timm's attention), so fx
    could not trace the model. The recorded node is the one newer torch records."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def recorded(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return original(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", original, args, kwargs)

    functional.scaled_dot_product_attention = recorded
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


class _TensorNames:
    """The qualified name of each parameter and buffer of ``root``, as ``named_parameters()`` and
    ``named_buffers()`` give it (the first name of a shared tensor), found in a map built once.

    A name is given only while it still holds that very tensor (a module may replace a buffer
    while being traced; the map holds each tensor, so an id is not reused meanwhile); else None,
    and the caller searches as fx does.
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        self._parameters: Dict[int, Tuple[str, torch.Tensor]] = {}
        self._buffers: Dict[int, Tuple[str, torch.Tensor]] = {}
        for name, parameter in root.named_parameters():
            self._parameters.setdefault(id(parameter), (name, parameter))
        for name, buffer in root.named_buffers():
            self._buffers.setdefault(id(buffer), (name, buffer))

    def parameter(self, tensor: torch.Tensor) -> str | None:
        return self._held(self._parameters.get(id(tensor)), tensor, "_parameters")

    def buffer(self, tensor: torch.Tensor) -> str | None:
        return self._held(self._buffers.get(id(tensor)), tensor, "_buffers")

    def _held(self, entry: Tuple[str, torch.Tensor] | None, tensor: torch.Tensor, kind: str) -> str | None:
        if entry is None or entry[1] is not tensor:
            return None
        name = entry[0]
        path, _, attribute = name.rpartition(".")
        module: nn.Module | None = self._root
        for atom in path.split(".") if path else ():
            module = module._modules.get(atom) if module is not None else None
        if module is None or getattr(module, kind).get(attribute) is not tensor:
            return None
        return name


#: Layers of other libraries (by class path: nothing is imported) that compute exactly the op of
#: their torch.nn base class on their own parameters: timm's "same"-padded convolution and pools
#: (the padding is computed from the spatial size, which never carries units) and its BatchNorm
#: followed by an activation. Traced as one call of that layer (with its rule) instead of through
#: their code, which fx cannot trace for the same-padded ones (``math.ceil`` of a size) and which
#: cost more than the rest of a trace for the BatchNorm (timm's efficient and mobile nets). A
#: BatchNormAct2d qualifies only while its ``drop`` is an ``nn.Identity`` (a Dropout would need
#: its rate fixed) and its ``act`` an ``nn.Identity`` or a torch.nn activation without parameters.
_BASE_LAYER_OF = {
    "timm.layers.conv2d_same.Conv2dSame": nn.Conv2d,
    "timm.layers.pool2d_same.MaxPool2dSame": nn.MaxPool2d,
    "timm.layers.pool2d_same.AvgPool2dSame": nn.AvgPool2d,
    "timm.layers.norm_act.BatchNormAct2d": nn.BatchNorm2d,
}


def _class_path(m: nn.Module) -> str:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}"


def _computes_its_base_layer(m: nn.Module) -> bool:
    """True for a layer of :data:`_BASE_LAYER_OF` (its exact class) in a form that computes its
    base class's op: no children beyond a BatchNormAct2d's element-wise ``drop`` and ``act``."""
    base = _BASE_LAYER_OF.get(_class_path(m))
    if base is None or not isinstance(m, base):
        return False
    children = dict(m.named_children())
    if base is nn.BatchNorm2d:
        drop, act = children.pop("drop", None), children.pop("act", None)
        if type(drop) is not nn.Identity:
            return False
        if act is None or (
            type(act) is not nn.Identity
            and (
                type(act) not in ACTIVATION_MODULES
                or any(True for _ in act.parameters())
                or any(True for _ in act.buffers())
            )
        ):
            return False
    return not children


def _final_child(module: nn.Module | None) -> nn.Module | None:
    """The child whose output is the output of a layer traced as its base layer (a BatchNormAct2d
    ends with ``self.act``), so that scoring that child scores the layer's call; else None."""
    if module is None or not _computes_its_base_layer(module) or not isinstance(module, nn.BatchNorm2d):
        return None
    act = getattr(module, "act", None)
    return act if isinstance(act, nn.Module) else None


def base_layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input that the base-layer op of a layer traced as its base layer
    (:data:`_BASE_LAYER_OF`) sees, for code that recomputes the layer from its attributes: timm's
    ``Conv2dSame`` pads its input "same" in its forward (TensorFlow's rule: the output has
    ``ceil(size / stride)`` positions; the padding is split with the smaller half first), then
    convolves with ``padding=0``. Any other module: ``x`` itself."""
    if _class_path(module) != "timm.layers.conv2d_same.Conv2dSame" or not _computes_its_base_layer(module):
        return x
    assert isinstance(module, nn.Conv2d)
    pads: list[int] = []
    for axis in (1, 0):  # F.pad lists the last dim first
        size, kernel = x.shape[-2 + axis], module.kernel_size[axis]
        stride, dilation = module.stride[axis], module.dilation[axis]
        total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _placeholder_examples(
    placeholders: list[fx.Node], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[fx.Node, Any]:
    """The example value of each placeholder of a traced forward: the positional inputs in order,
    then the keyword inputs by name, then the forward's defaults (one without any is left out)."""
    found: dict[fx.Node, Any] = {}
    for position, node in enumerate(placeholders):
        name = str(node.target).lstrip("*")
        if position < len(args):
            found[node] = args[position]
        elif name in kwargs:
            found[node] = kwargs[name]
        elif node.args:
            found[node] = node.args[0]
    return found


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every torch.nn module, childless torchvision ops modules and
    registered user types (:func:`register_leaf_module`) as leaves.

    Remembers the innermost module whose code raised (:attr:`failure`), so that an fx error
    names the module that could not be traced rather than the model around it.
    """

    def __init__(self, example: ExampleBinding | None = None) -> None:
        super().__init__()
        self.failure: tuple[BaseException, str, type] | None = None
        self._tensor_names: _TensorNames | None = None
        #: the example inputs, when given: shape checks are decided on them and a wrapped
        #: forward gets one placeholder per input (:mod:`torchpruner.graph.concrete`)
        self.example = example

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        example = self.example
        if example is None or not is_module or concrete_args is not None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        if example.wrapped(root_fn):
            return example.root_arguments(self, self.root, root_fn)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        example.values.update(_placeholder_examples(placeholders, example.args, example.kwargs))
        return fn, args

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ExampleProxy(node, self) if self.example is not None else super().proxy(node)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        if self.example is not None:
            items = self.example.unpack(self, obj)
            if items is not None:
                return iter(items)
        return super().iter(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.example is not None:
            value = self.example.decide(self, obj)
            if value is not None:
                return value
        return super().to_bool(obj)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.example is not None and self.example.evaluating:
            return forward(*args, **kwargs)  # deciding a shape check: the real module on real tensors
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failure is None or self.failure[0] is not exc:  # innermost module of this error
                try:
                    name = self.path_of_module(m)
                except NameError:
                    name = type(m).__name__
                self.failure = (exc, name, type(m))
            raise

    def trace(
        self,
        root: nn.Module | Callable[..., Any],
        concrete_args: dict[str, Any] | None = None,
    ) -> fx.Graph:
        self._tensor_names = None
        try:
            with _sdpa_taking_proxies():
                graph = super().trace(root, concrete_args)
            if self.example is not None:
                self.example.set_codegen(graph)
            return graph
        finally:
            self._tensor_names = None

    def _names(self) -> _TensorNames:
        if self._tensor_names is None:
            self._tensor_names = _TensorNames(self.root)
        return self._tensor_names

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        # fx finds the name of a parameter a traced forward reads by scanning named_parameters()
        # at every read: quadratic in the parameter count (seconds on timm's BatchNormAct2d
        # models). The same name from a map built once; anything else is left to fx.
        if self.example is not None and self.example.evaluating:
            return attr_val
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            name = self._names().parameter(attr_val)
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=None)
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        # fx emits a buffer or parameter met as a plain tensor argument (BatchNorm's running
        # statistics) as a get_attr of its name, found by scanning named_buffers() or
        # named_parameters() each time: the same name from the map built once
        if isinstance(a, torch.Tensor):
            names = self._names()
            name = names.parameter(a) if isinstance(a, nn.Parameter) else names.buffer(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = user_leaf_types()
        if leaves and isinstance(m, leaves):
            return True
        if _computes_its_base_layer(m):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        module_path = type(m).__module__
        if module_path.startswith("torchvision.ops"):
            # torchvision.ops blocks built from nn modules (SqueezeExcitation) are traced through,
            # so their inner layers get call sites; leaf ops (StochasticDepth, Permute) stay leaves
            return not any(True for _ in m.children())
        return module_path.startswith(("torch.nn", "torch.ao.nn"))


def layer_of_call(node: fx.Node, root: nn.Module) -> str | None:
    """The qualified name in ``root`` (the model) of the layer a functional call stands for, or None.

    ``F.linear(x, self.weight, self.bias)`` made inside the forward of an ``nn.Linear`` subclass
    that fx traces into is that layer's call: every tensor it reads besides the input is the
    parameter or buffer of that very module that the argument names (see
    :data:`torchpruner._ops.FUNCTIONAL_LAYERS`), and every setting it reads (``groups``...) has the
    module's value. Whether a setting is read from the attribute or written as a literal in the
    code is checked by the dependency analysis, which prunes it.
    """
    spec = FUNCTIONAL_LAYERS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    module_types, tensors, settings = spec

    def argument(position: int, keyword: str) -> Any:
        if keyword in node.kwargs:
            return node.kwargs[keyword]
        return node.args[position] if len(node.args) > position else None

    owner_path = None
    for position, keyword, attribute in tensors:
        value = argument(position, keyword)
        if value is None:
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr" or not isinstance(value.target, str):
            return None
        path, _, name = value.target.rpartition(".")
        if name != attribute or (owner_path is not None and path != owner_path):
            return None
        owner_path = path
    if owner_path is None:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    calling = list(stack.values())[-1][0] if stack else ""
    if calling != owner_path:
        return None  # another module's forward reads the layer's weight (tied weights): not its call
    try:
        owner = root.get_submodule(owner_path)
    except AttributeError:
        return None
    if not isinstance(owner, module_types):
        return None
    for position, keyword, attribute in settings:
        value = argument(position, keyword)
        if value is None and keyword == "groups":
            value = 1
        current = getattr(owner, attribute, None)
        if isinstance(current, (tuple, list, torch.Size)) and isinstance(value, (tuple, list, torch.Size)):
            if tuple(current) != tuple(value):
                return None
        elif current != value:
            return None
    return owner_path


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and records each node's output shape and dtype.

    Not ``torch.fx.passes.shape_prop.ShapeProp``, although it records the same facts
    (``node.meta["tensor_meta"]``), because of what it does when the example run fails, which
    is how a trace that fx built but that does not run (a forward that branches on
    ``isinstance(x, torch.Tensor)``) falls back to forward hooks: ShapeProp prints the traceback
    to stderr (``traceback.print_exc``; the library never prints) and re-raises a RuntimeError
    whose message is the node and its whole ``meta`` dict, which ``ModelGraph.fx_failure`` would
    then show instead of the model's own error. It also raises on tensors without sizes
    (nested tensors), which only need ``None`` here.
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.meta: Dict[fx.Node, Tuple[Optional[torch.Size], Optional[torch.dtype]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.meta[n] = (result.shape, result.dtype)
        else:
            self.meta[n] = (None, None)
        return result


class _Probe(nn.Module):
    """Identity module inserted after an fx node; applies an interception function when set."""

    def __init__(self) -> None:
        super().__init__()
        self.fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def forward(self, x: Any) -> Any:
        return x if self.fn is None else self.fn(x)


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


class ModelGraph:
    """Call sites of ``model`` for one example input. See the module docstring.

    Args:
        model: the model (``torch.compile`` wrappers are unwrapped).
        args: positional example inputs (batch dim included).
        kwargs: keyword example inputs.
        method: ``"auto"`` (fx symbolic tracing, then torch.export, then hooks), ``"fx"`` (symbolic
            tracing only), ``"export"`` (torch.export only) or ``"hooks"``.

    Attributes:
        method: ``"fx"`` when the call sites come from an fx graph (:attr:`traced`), ``"hooks"``.
        capture: what made the graph: ``"symbolic_trace"``, ``"export"`` or ``"hooks"``.
        export_error: why torch.export failed, when it was tried and failed (else None).
    """

    def __init__(
        self,
        model: nn.Module,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
        method: str = "auto",
    ) -> None:
        if method not in ("auto", "fx", "export", "hooks"):
            raise ValueError(f"method must be 'auto', 'fx', 'export' or 'hooks', got {method!r}")
        self.model = unwrap_model(model)
        for module in self.model.modules():
            # a rule registered by class path (Hugging Face's Conv1D) makes its class a leaf: resolve
            # it before tracing, so the first trace is the same as every later one
            get_slicing_rule(module)
        self._state = _ModelState(self.model)
        kwargs = dict(kwargs or {})
        self._names: Dict[int, str] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)
        self.traced: Optional[fx.GraphModule] = None
        self.fx_error: Optional[BaseException] = None
        self._fx_failed_in: tuple[str, type] | None = None
        self._release_traced: Callable[[], None] = lambda: None
        self.sites: List[CallSite] = []
        self.export_error: Optional[BaseException] = None
        #: the example inputs the dependency analysis captures the model again with, to check
        #: literal sizes (graphs of torch.export and of fx on a wrapped forward); else None
        self.export_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.method, self.capture = "hooks", "hooks"
        if method in ("auto", "fx"):
            try:
                self._build_fx(args, kwargs)
                self.method, self.capture = "fx", "symbolic_trace"
            except Exception as exc:  # fx cannot trace data-dependent control flow and more
                self.fx_error = exc
                self.export_inputs = None  # set only for a graph that was kept
                if method == "fx":
                    if hasattr(exc, "add_note"):  # Python 3.11+: the traceback names the failing module
                        exc.add_note(f"torch.fx could not trace {self.fx_failure}")
                    raise
                logger.info("torch.fx could not trace %s; capturing with torch.export", self.fx_failure)
                self.sites = []
        if method in ("auto", "export") and self.method == "hooks":
            try:
                self._build_fx(args, kwargs, exported=True)
                self.method, self.capture = "fx", "export"
                # the dependency analysis captures again with units removed to check literal sizes
                self.export_inputs = (tuple(args), dict(kwargs))
            except Exception as exc:  # noqa: BLE001  (torch.export raises many kinds of errors)
                self.export_error = exc
                if method == "export":
                    raise
                logger.info(
                    "torch.export could not capture %s (%s: %s); using forward hooks",
                    type(self.model).__name__,
                    type(exc).__name__,
                    exc,
                )
                self.sites = []
        if self.method == "hooks":
            self._build_hooks(args, kwargs)
        for site in self.sites:
            site.unit_axis = _unit_axis_for(site)
        self._by_module: Dict[int, List[CallSite]] = {}
        for site in self.sites:
            if site.module is not None:
                self._by_module.setdefault(id(site.module), []).append(site)
        for site in self.sites:  # a BatchNormAct2d traced as one call: its output is its act's
            act = _final_child(site.module) if site.kind == "module" else None
            if act is not None and id(act) not in self._by_module:
                self._by_module[id(act)] = self._by_module[id(site.module)]

    # -- building -------------------------------------------------------------------------

    @property
    def fx_failure(self) -> str | None:
        """Why torch.fx could not trace the model: the module whose code failed and the fx error
        (None when fx traced it)."""
        if self.fx_error is not None and self.export_error is not None:
            return (
                f"{self._symbolic_failure()}; torch.export failed too "
                f"({type(self.export_error).__name__}: {str(self.export_error)[:300]})"
            )
        return self._symbolic_failure()

    def _symbolic_failure(self) -> str | None:
        model_name = type(self.model).__name__
        if self.fx_error is None:
            return None if self.method == "fx" else f"the model {model_name} (traced with forward hooks only)"
        error = f"{type(self.fx_error).__name__}: {self.fx_error}"
        if self._fx_failed_in is None:
            return f"the forward of the model {model_name} ({error})"
        name, module_type = self._fx_failed_in
        return (
            f"module '{name}' ({module_type.__name__}) of the model {model_name} ({error}); "
            f"torchpruner.graph.register_leaf_module({module_type.__name__}) traces it as one layer"
        )

    def _build_fx(self, args: tuple[Any, ...], kwargs: dict[str, Any], exported: bool = False) -> None:
        tracer = _LeafTracer(None if exported else ExampleBinding(args, kwargs))
        traced: fx.GraphModule | None = None
        release: Callable[[], None] = lambda: None
        try:
            with preserved_state(self.model):
                if exported:
                    traced = export_capture(self.model, args, kwargs)
                    graph = traced.graph
                else:
                    graph = tracer.trace(self.model)
                    traced = fx.GraphModule(tracer.root, graph, type(self.model).__name__)
                release = _source_release(traced)
                placeholders = [n for n in graph.nodes if n.op == "placeholder"]
                examples = _placeholder_examples(placeholders, args, kwargs)
                flat_args = list(args)
                for node in placeholders[len(args) :]:
                    if node not in examples:
                        raise ValueError(f"no example value for the model input {node.target.lstrip('*')!r}")
                    flat_args.append(examples[node])
                recorder = _ShapeRecorder(traced)
                with torch.no_grad():
                    output = recorder.run(*flat_args)
                example = tracer.example
                if example is not None and example.flat_output is not None:
                    # a wrapped forward (Hugging Face's): the graph must compute what the model
                    # computes (a branch on isinstance(x, Tensor) or is_tracing() must not have
                    # taken another path than the real forward)
                    check_against_model(self.model, output, args, kwargs, "the fx graph")
                    # sizes a wrapped (Hugging Face) forward passes as ints from module attributes
                    # are checked by tracing again with units removed, as for an exported graph
                    self.export_inputs = (tuple(args), dict(kwargs))
        except Exception as exc:
            release()
            if tracer.failure is not None and _in_chain(tracer.failure[0], exc):
                self._fx_failed_in = tracer.failure[1:]
            raise
        self.traced = traced
        self._release_traced = release
        self._fx_input_order = [n.target for n in placeholders]
        by_node: Dict[fx.Node, CallSite] = {}
        calls: Dict[int, int] = {}
        for node in graph.nodes:
            if node.op == "output":
                continue
            kind = {
                "placeholder": "input",
                "get_attr": "attr",
                "call_module": "module",
                "call_function": "function",
                "call_method": "method",
            }[node.op]
            module = module_name = None
            call_index = 0
            layer_path = (
                node.target if kind == "module" else layer_of_call(node, self.model) if kind == "function" else None
            )
            if layer_path is not None:
                # a traced-through layer is not a submodule of the graph module: take the model's
                module = traced.get_submodule(layer_path) if kind == "module" else self.model.get_submodule(layer_path)
                module_name = self._names.get(id(module), layer_path)
                call_index = calls.get(id(module), 0)
                calls[id(module)] = call_index + 1
            shape, dtype = recorder.meta.get(node, (None, None))
            site = CallSite(
                index=len(self.sites),
                name=node.name,
                kind=kind,
                target=module if kind == "module" else node.target,
                module=module,
                module_name=module_name,
                call_index=call_index,
                shape=shape,
                dtype=dtype,
                node=node,
            )
            producers: List[CallSite] = []
            for arg in node.all_input_nodes:
                if arg in by_node and by_node[arg].shape is not None:
                    producers.append(by_node[arg])
            site.inputs = producers
            for producer in producers:
                producer.users.append(site)
            by_node[node] = site
            self.sites.append(site)
        self._site_by_node = by_node

    def trace_again(self) -> fx.Graph:
        """The fx graph of the model as it is now, traced with the same example inputs (the
        dependency analysis compares it op by op with :attr:`traced`'s; an exported graph is
        captured again with :func:`torchpruner.graph.recapture.capture_again`)."""
        if self.export_inputs is None or self.capture != "symbolic_trace":
            raise RuntimeError("this graph was not traced by fx with example inputs to trace again with")
        args, kwargs = self.export_inputs
        tracer = _LeafTracer(ExampleBinding(args, kwargs))
        with preserved_state(self.model), torch.no_grad():
            return tracer.trace(self.model)

    def _build_hooks(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        producer_of: Dict[int, CallSite] = {}
        keep_alive: List[torch.Tensor] = []
        calls: Dict[int, int] = {}

        def tensors(value: Any) -> List[torch.Tensor]:
            if isinstance(value, torch.Tensor):
                return [value]
            if isinstance(value, (tuple, list)):
                return [t for v in value for t in tensors(v)]
            if isinstance(value, Mapping):
                return [t for v in value.values() for t in tensors(v)]
            return []

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            call_index = calls.get(id(module), 0)
            calls[id(module)] = call_index + 1
            name = self._names.get(id(module), type(module).__name__)
            out = output if isinstance(output, torch.Tensor) else None
            site = CallSite(
                index=len(self.sites),
                name=f"{name}#{call_index}",
                kind="module",
                target=module,
                module=module,
                module_name=name,
                call_index=call_index,
                shape=out.shape if out is not None else None,
                dtype=out.dtype if out is not None else None,
            )
            for tensor in tensors(inputs):
                producer = producer_of.get(id(tensor))
                if producer is not None and producer not in site.inputs:
                    site.inputs.append(producer)
                    producer.users.append(site)
            for tensor in tensors(output):
                producer_of[id(tensor)] = site
                keep_alive.append(tensor)
            self.sites.append(site)

        handles = [
            m.register_forward_hook(hook)
            for m in self.model.modules()
            if not any(True for _ in m.children()) and m is not self.model
        ]
        if not any(True for _ in self.model.children()):
            handles.append(self.model.register_forward_hook(hook))
        try:
            with preserved_state(self.model), torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    # -- queries --------------------------------------------------------------------------

    def module_name(self, module: nn.Module) -> str:
        """Qualified name of ``module`` in the model (ValueError if it is not a submodule)."""
        try:
            return self._names[id(module)]
        except KeyError:
            raise ValueError(
                f"{type(module).__name__} module {module!r:.80} is not a submodule of "
                f"the model {type(self.model).__name__}"
            ) from None

    def sites_of(self, module: nn.Module) -> List[CallSite]:
        """All call sites of ``module``, in execution order."""
        name = self.module_name(module)
        sites = self._by_module.get(id(module), [])
        if not sites:
            raise ValueError(
                f"module '{name}' ({type(module).__name__}) is never called in the "
                f"forward pass of {type(self.model).__name__}, so it has no units to score or prune"
            )
        return sites

    def has_sites(self, module: nn.Module) -> bool:
        """True when ``module`` has call sites of its own (fx traces through some modules)."""
        return bool(self._by_module.get(id(module)))

    def site(self, module: nn.Module, call_index: int = 0) -> CallSite:
        """The ``call_index``-th call site of ``module``."""
        sites = self.sites_of(module)
        if not 0 <= call_index < len(sites):
            raise ValueError(
                f"module '{sites[0].module_name}' is called {len(sites)} time(s); "
                f"call_index {call_index} does not exist"
            )
        return sites[call_index]

    def evaluation_point(self, module: nn.Module, find_best: bool = False, call_index: int = 0) -> CallSite:
        """Where a module's units are observed (and zeroed) for scoring.

        With ``find_best=True`` the point moves forward in the data flow past the following
        BatchNorm, activations and Dropout (modules or functional), as long as each is the single
        consumer of the previous point; it stops at a merge (add, cat, ...) or any other op.
        """
        site = self.site(module, call_index)
        if find_best:
            site = self.follow_elementwise(site)
        return site

    def follow_elementwise(self, site: CallSite) -> CallSite:
        """Move ``site`` past single-consumer BatchNorm / activation / Dropout call sites."""
        while True:
            tensor_users = [u for u in site.users if u.shape is not None]  # ignore x.size(0) reads
            if len(tensor_users) != 1:
                break
            user = tensor_users[0]
            if user.is_merge or not (user.is_batchnorm or user.is_activation or user.is_dropout):
                break
            if user.shape is None or site.shape is None or user.shape != site.shape:
                break
            site = user
        return site

    # -- interception ---------------------------------------------------------------------

    @contextlib.contextmanager
    def intercept(self, fns: Mapping[CallSite, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[Callable[..., Any]]:
        """Apply ``fn`` to the output of each call site on every forward inside the block.

        Yields the callable to run instead of the model. Module sites are intercepted with
        forward hooks on the original model; if any site is a functional op (fx mode only), the
        traced graph is run with identity probes inserted after the sites. All hooks are removed
        when the block exits, also on error.
        """
        fns = dict(fns)
        for site in fns:
            if site not in self.sites:
                raise ValueError(f"call site {site!r} does not belong to this graph")
            if site.shape is None:
                raise ValueError(f"call site {site.label!r} does not output a single tensor")
        if self.hooks_modules(fns):
            with self._intercept_with_hooks(fns) as forward:
                yield forward
        else:
            if self.traced is None:
                raise ValueError("functional call sites can only be intercepted in fx mode")
            probed = self._probed_module(fns)
            release = _source_release(probed)
            try:
                yield probed
            finally:
                release()  # one probed module per scoring run: leave no generated source behind

    @staticmethod
    def hooks_modules(sites: Iterable[CallSite]) -> bool:
        """True when :meth:`intercept` of ``sites`` puts forward hooks on the model's own modules
        (every site is a module call); otherwise it runs a probed copy of the traced graph and
        leaves the modules alone."""
        return all(site.kind == "module" for site in sites)

    @contextlib.contextmanager
    def _intercept_with_hooks(
        self, fns: Dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]
    ) -> Iterator[Callable[..., Any]]:
        counters: Dict[int, int] = {}
        by_module: Dict[int, Dict[int, Callable[[torch.Tensor], torch.Tensor]]] = {}
        for site, fn in fns.items():
            by_module.setdefault(id(site.module), {})[site.call_index] = fn
        modules = {id(site.module): site.module for site in fns if site.module is not None}

        def reset(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            counters.clear()

        def make_hook(module_id: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
            def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
                call = counters.get(module_id, 0)
                counters[module_id] = call + 1
                fn = by_module[module_id].get(call)
                return fn(output) if fn is not None else None

            return hook

        handles = [self.model.register_forward_pre_hook(reset)]
        try:
            for module_id, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(module_id)))
            yield self.model
        finally:
            for handle in handles:
                handle.remove()

    def _probed_module(self, fns: Dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]) -> fx.GraphModule:
        assert self.traced is not None
        old_graph = self.traced.graph
        new_graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        root: Dict[str, Any] = {}
        fn_by_node = {site.node: fn for site, fn in fns.items()}
        for node in old_graph.nodes:
            new_node = new_graph.node_copy(node, lambda n: env[n])
            env[node] = new_node
            if node.op in ("call_module", "get_attr"):
                root[node.target] = _get_attr_path(self.traced, node.target)
            if node in fn_by_node:
                probe_name = f"_torchpruner_probe_{len([k for k in root if k.startswith('_torchpruner_probe_')])}"
                probe = _Probe()
                probe.fn = fn_by_node[node]
                root[probe_name] = probe
                env[node] = new_graph.call_module(probe_name, (new_node,))
        new_graph._codegen = old_graph._codegen  # the model's output structure (a captured ModelOutput)
        return fx.GraphModule(root, new_graph, "ProbedModel")

    def is_current(self) -> bool:
        """True while the model holds the same modules, parameters, buffers, shapes and plain
        attributes as when it was traced (the graph, and groups computed on it, still describe it)."""
        return self._state.same_as(_ModelState(self.model))

    def release_source(self) -> None:
        """Release the generated source of the traced graph module from ``linecache`` (done when
        the cache replaces this graph, or when it is collected). The graph keeps working."""
        self._release_traced()

    def __repr__(self) -> str:
        return f"ModelGraph({type(self.model).__name__}, method={self.method}, {len(self.sites)} call sites)"


def _in_chain(cause: BaseException, error: BaseException) -> bool:
    """True when ``cause`` is ``error`` or one of the exceptions it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if current is cause:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _get_attr_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Cache: one graph per model and input signature, rebuilt when the model changes
# --------------------------------------------------------------------------------------------

_SLOT = "_torchpruner_graph_cache"

#: Types of plain module attributes that a traced forward may bake in (``if self.flag``, ``x * self.scale``).
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


class _ModelState:
    """What a graph of a model depends on, compared without keeping replaced objects alive.

    The graph holds the model's module objects and bakes in what the forward reads, so a new
    submodule, parameter or tensor attribute of the same shape (``model.head = nn.Linear(6, 3)``),
    a swapped function (``self.act = torch.tanh``) or a flipped flag (``self.use_skip = False``)
    makes it stale, as does a new shape. Training mode is left out (tracing runs in eval mode).

    ``key`` names every module, function attribute, parameter, buffer and tensor attribute by
    ``id``; ``refs`` holds weak references to the modules and functions. A key that compares equal
    while every reference is alive names the very same objects (two live objects never share an
    id). Tensors take no weak reference (a tensor with one cannot be swapped in place, which
    pruning does); their ids are safe anyway: every tensor the graph bakes in (an fx ``get_attr``)
    is held by the traced module, so it is not freed and its id not reused while the graph lives,
    and a layer's own parameters are read live when the graph runs.
    """

    __slots__ = ("key", "refs")

    def __init__(self, model: nn.Module) -> None:
        refs: list[Callable[[], Any]] = []

        def identity(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return ("id", id(obj))
            try:
                refs.append(weakref.ref(obj))
            except TypeError:  # builtins (torch.relu) take no weak references; they live for good
                return ("object", obj)
            return ("id", id(obj))

        modules = []
        for name, module in model.named_modules(remove_duplicate=False):
            attributes: list[tuple[Any, ...]] = []
            for attr, value in module.__dict__.items():
                if attr.startswith("_") or attr == "training":
                    continue
                if isinstance(value, torch.Tensor):
                    attributes.append((attr, identity(value), tuple(value.shape), value.dtype))
                elif _is_plain(value):
                    attributes.append((attr, tuple(value) if isinstance(value, list) else value))
                elif callable(value) and not isinstance(value, nn.Module):
                    attributes.append((attr, identity(value)))
            modules.append((name, type(module), identity(module), tuple(attributes)))
        tensors = tuple(
            (name, identity(t), tuple(t.shape), t.dtype)
            for name, t in list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False))
        )
        self.key = (tensors, tuple(modules), leaf_version())
        self.refs = tuple(refs)

    def same_as(self, now: _ModelState) -> bool:
        """True when ``now`` (taken later) describes the very same objects and attributes."""
        return self.key == now.key and all(ref() is not None for ref in self.refs)


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN_TYPES):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 64 and all(isinstance(v, _PLAIN_TYPES) for v in value)


def _describe_inputs(value: Any) -> Any:
    """Shapes (batch size ignored), dtypes and devices of example inputs; reprs of the rest."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape[1:]), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return tuple(_describe_inputs(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _describe_inputs(v)) for k, v in value.items()))
    return repr(value)


class _GraphSlot:
    """Holds a model's cached graph on the model itself, with the inputs it was traced for.

    A graph refers to its model, so a global cache keyed by the model would keep every model
    alive. Kept on the model, the two form an ordinary reference cycle that the garbage collector
    frees with the model. ``deepcopy`` and pickling give an empty slot (a copy traces anew).
    """

    __slots__ = ("inputs", "graph")

    def __init__(self) -> None:
        self.inputs: Any = None
        self.graph: Optional[ModelGraph] = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "_GraphSlot":
        return _GraphSlot()

    def __reduce__(self) -> Tuple[type, tuple[()]]:
        return (_GraphSlot, ())


def get_graph(model: nn.Module, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None) -> ModelGraph:
    """The cached :class:`ModelGraph` of ``model`` for inputs like ``args``/``kwargs``.

    The cache lives on the model object; an entry is reused while the model holds the same module,
    parameter and buffer objects with the same shapes, the same plain attributes and functions
    (see :class:`_ModelState`), and the inputs have the same shapes (batch size ignored), so the
    attribution metrics and the Pruner share one trace, and a prune or a replaced layer triggers a
    new one. A replaced graph releases its generated source.
    """
    model = unwrap_model(model)
    kwargs = dict(kwargs or {})
    inputs = (_describe_inputs(args), _describe_inputs(kwargs))
    slot = model.__dict__.get(_SLOT)
    if isinstance(slot, _GraphSlot) and slot.graph is not None and slot.graph.model is model:
        if slot.inputs == inputs and slot.graph.is_current():
            return slot.graph
        slot.graph.release_source()
    with collector_paused():
        graph = ModelGraph(model, args, kwargs)
    slot = _GraphSlot()
    slot.inputs, slot.graph = inputs, graph
    model.__dict__[_SLOT] = slot  # a shallow copy of the model shares it: the `is model` check above
    return graph


def invalidate_graph(model: nn.Module) -> None:
    """Forget the cached graph of ``model`` (done automatically when the model changes)."""
    slot = unwrap_model(model).__dict__.pop(_SLOT, None)
    if isinstance(slot, _GraphSlot) and slot.graph is not None:
        slot.graph.release_source()
