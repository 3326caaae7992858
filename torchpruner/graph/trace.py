"""The one tracer of torchpruner: call sites of a model in data-flow order.

A :class:`ModelGraph` records every *call site* of a model for one example input: each call of a
leaf module, each functional op (``F.relu``, ``torch.cat``, ``operator.add``) and each tensor
method (``x.view``, ``x.mean``), with the producers of its tensor arguments, its users, the shape
of its output and the axis that holds the layer's *units* (neurons, channels, filters).

Two tracing methods, tried in this order:

``"fx"``
    ``torch.fx`` symbolic tracing with torch.nn modules as leaves, followed by one real forward pass
    (shape propagation). Sees functional ops and merges (add, cat). Fails on data-dependent control
    flow (``if x.sum() > 0``) and on some dynamic Python; then the fallback is used.
``"hooks"``
    Forward hooks on every leaf module during one real forward pass. Works on any model that runs,
    but only sees modules: functional ops (``F.relu``), merges and reshapes are invisible, so
    ``find_best=True`` only moves through modules that directly consume each other's output.

Tracing never changes the model: it runs under ``torch.no_grad()`` in eval mode (each module's
training flag restored afterwards) and restores the global RNG state, so BatchNorm statistics,
Dropout masks and the training run are untouched.

A module called twice (torchvision's ResNet reuses one ``nn.ReLU`` per block) has one call site per
call, distinguished by :attr:`CallSite.call_index`.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

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
# Op families
# --------------------------------------------------------------------------------------------

#: Modules whose output keeps the units of their input (element-wise activations).
ACTIVATION_MODULES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink,
    nn.Softshrink,
)
ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.prelu,
    F.rrelu, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.hardtanh_, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
    F.softsign, F.tanhshrink, F.logsigmoid, F.threshold,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
#: Activations for which "fraction of positive outputs" (APoZ) is meaningful.
RELU_LIKE_MODULES: Tuple[type, ...] = (nn.ReLU, nn.ReLU6)
RELU_LIKE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6}
RELU_LIKE_METHODS = {"relu", "relu_"}

DROPOUT_MODULES: Tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                     nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout}
BATCHNORM_MODULES: Tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
BATCHNORM_FUNCTIONS = {F.batch_norm}

#: Functions/methods that merge several tensors: an evaluation point never moves past them.
MERGE_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
                   operator.sub, torch.sub, torch.cat, torch.concat, torch.stack}
MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}

#: Module types whose units are on the last axis of their output ([N, ..., D]).
LAST_AXIS_MODULES: Tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding,
                                       nn.EmbeddingBag, nn.MultiheadAttention, nn.RMSNorm)
#: Module types whose units are on axis 1 ([N, C, ...]).
CHANNEL_AXIS_MODULES: Tuple[type, ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)


# --------------------------------------------------------------------------------------------
# Model and input helpers
# --------------------------------------------------------------------------------------------

def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module that owns the parameters: strips ``torch.compile``'s wrapper.

    Raises:
        TypeError: for ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (their replicas
            and gradient reducers hold the old parameter shapes; prune ``model.module`` and wrap
            again afterwards), and for anything that is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"{type(model).__name__} wrappers are not supported: prune the wrapped model "
            f"(`model.module`), then delete the old wrapper and wrap again (its reducer caches the "
            f"old parameter shapes)")
    seen = 0
    while hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
        model = model._orig_mod  # torch.compile's OptimizedModule shares the parameters
        seen += 1
        if seen > 8:
            break
    return model


def _model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    for tensor in list(model.parameters()) + list(model.buffers()):
        return torch.get_default_dtype(), tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def make_example_inputs(
    model: nn.Module,
    input_size: Optional[Sequence[int]] = None,
    example_inputs: Any = None,
    device: Optional[torch.device | str] = None,
    batch_size: int = 2,
) -> Tuple[tuple, dict]:
    """Normalise what a user gives to describe the model's input into ``(args, kwargs)``.

    Args:
        model: the model (its floating dtype and device are used for generated inputs).
        input_size: the input shape without the batch dimension, any layout. A random tensor of
            shape ``(batch_size, *input_size)`` is generated from a private generator (the global
            RNG is not touched).
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs
            (integer token ids are fine). Used as given, moved to ``device``.
        device: where inputs go; defaults to the device of the model's parameters.
        batch_size: batch size of generated inputs (2, so shapes are never ambiguous).

    Returns:
        ``(args, kwargs)`` ready for ``model(*args, **kwargs)``.
    """
    dtype, param_device = _model_dtype_device(model)
    device = torch.device(device) if device is not None else param_device
    if example_inputs is not None:
        if isinstance(example_inputs, Mapping):
            return (), {k: _to_device(v, device) for k, v in example_inputs.items()}
        if isinstance(example_inputs, (tuple, list)):
            return tuple(_to_device(v, device) for v in example_inputs), {}
        return (_to_device(example_inputs, device),), {}
    if input_size is None:
        raise ValueError("give either input_size (shape without the batch dim) or example_inputs")
    try:
        shape = tuple(int(s) for s in input_size)
    except TypeError as exc:
        raise TypeError(f"input_size must be a sequence of ints, got {input_size!r}") from exc
    if any(s <= 0 for s in shape):
        raise ValueError(f"input_size must be positive, got {shape}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size,) + shape, generator=generator, dtype=dtype).to(device)
    return (x,), {}


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block in eval mode and restore each module's training flag and the global RNG.

    RNG covered: torch (CPU and every CUDA device already initialised), numpy and ``random``.
    """
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


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
        module: the module for ``kind == "module"``, else None.
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
        if self.kind == "module":
            return self.module_name if self.call_index == 0 else f"{self.module_name} (call {self.call_index})"
        return self.name

    def is_op(self, functions: set, methods: set = frozenset(), modules: Tuple[type, ...] = ()) -> bool:
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
    if site.kind == "module":
        if isinstance(site.module, LAST_AXIS_MODULES):
            return ndim - 1
        if isinstance(site.module, CHANNEL_AXIS_MODULES):
            return 1
    if site.kind == "input":  # [N, C, ...] data; integer token ids carry no units
        return 1 if site.dtype is not None and site.dtype.is_floating_point else None
    if site.kind == "attr":  # bare parameters such as class tokens / position embeddings [1, L, D]
        return ndim - 1
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
    target = site.target
    args = list(node.args[1:]) if node.args else []
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
# The graph
# --------------------------------------------------------------------------------------------

#: User module types traced as one call site (see :func:`register_leaf_module`).
_USER_LEAF_TYPES: List[type] = []


def register_leaf_module(*module_types: type) -> None:
    """Trace modules of these types as single call sites instead of tracing through them.

    ``torchpruner.pruner.register_slicing_rule`` calls this for your layer types, so the graph shows
    your layer (with its rule) rather than the ops inside it. Cached graphs are rebuilt.
    """
    global _LEAF_VERSION
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_leaf_module expects nn.Module subclasses, got {module_type!r}")
        if module_type not in _USER_LEAF_TYPES:
            _USER_LEAF_TYPES.append(module_type)
            _LEAF_VERSION += 1


_LEAF_VERSION = 0


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every torch.nn module, childless torchvision ops modules and
    registered user types (:func:`register_leaf_module`) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _USER_LEAF_TYPES and isinstance(m, tuple(_USER_LEAF_TYPES)):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        module_path = type(m).__module__
        if module_path.startswith("torchvision.ops"):
            # torchvision.ops blocks built from nn modules (SqueezeExcitation) are traced through,
            # so their inner layers get call sites; leaf ops (StochasticDepth, Permute) stay leaves
            return not any(True for _ in m.children())
        return module_path.startswith(("torch.nn", "torch.ao.nn"))


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and records each node's output shape and dtype."""

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


class ModelGraph:
    """Call sites of ``model`` for one example input. See the module docstring.

    Args:
        model: the model (``torch.compile`` wrappers are unwrapped).
        args: positional example inputs (batch dim included).
        kwargs: keyword example inputs.
        method: ``"auto"`` (fx, falling back to hooks), ``"fx"`` or ``"hooks"``.
    """

    def __init__(self, model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None,
                 method: str = "auto") -> None:
        if method not in ("auto", "fx", "hooks"):
            raise ValueError(f"method must be 'auto', 'fx' or 'hooks', got {method!r}")
        self.model = unwrap_model(model)
        kwargs = dict(kwargs or {})
        self._names: Dict[int, str] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)
        self.traced: Optional[fx.GraphModule] = None
        self.fx_error: Optional[BaseException] = None
        self.sites: List[CallSite] = []
        if method in ("auto", "fx"):
            try:
                self._build_fx(args, kwargs)
                self.method = "fx"
            except Exception as exc:  # fx cannot trace data-dependent control flow and more
                if method == "fx":
                    raise
                self.fx_error = exc
                logger.info("torch.fx could not trace %s (%s: %s); using forward hooks",
                            type(self.model).__name__, type(exc).__name__, exc)
                self.sites = []
                self._build_hooks(args, kwargs)
                self.method = "hooks"
        else:
            self._build_hooks(args, kwargs)
            self.method = "hooks"
        for site in self.sites:
            site.unit_axis = _unit_axis_for(site)
        self._by_module: Dict[int, List[CallSite]] = {}
        for site in self.sites:
            if site.kind == "module":
                self._by_module.setdefault(id(site.module), []).append(site)

    # -- building -------------------------------------------------------------------------

    def _build_fx(self, args: tuple, kwargs: dict) -> None:
        tracer = _LeafTracer()
        with preserved_state(self.model):
            graph = tracer.trace(self.model)
            traced = fx.GraphModule(tracer.root, graph, type(self.model).__name__)
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            flat_args = list(args)
            for node in placeholders[len(args):]:
                name = node.target.lstrip("*")
                if name in kwargs:
                    flat_args.append(kwargs[name])
                elif node.args:
                    flat_args.append(node.args[0])
                else:
                    raise ValueError(f"no example value for the model input {name!r}")
            recorder = _ShapeRecorder(traced)
            with torch.no_grad():
                recorder.run(*flat_args)
        self.traced = traced
        self._fx_input_order = [n.target for n in placeholders]
        by_node: Dict[fx.Node, CallSite] = {}
        calls: Dict[int, int] = {}
        for node in graph.nodes:
            if node.op == "output":
                continue
            kind = {"placeholder": "input", "get_attr": "attr", "call_module": "module",
                    "call_function": "function", "call_method": "method"}[node.op]
            module = module_name = None
            call_index = 0
            if kind == "module":
                module = traced.get_submodule(node.target)
                module_name = self._names.get(id(module), node.target)
                call_index = calls.get(id(module), 0)
                calls[id(module)] = call_index + 1
            shape, dtype = recorder.meta.get(node, (None, None))
            site = CallSite(index=len(self.sites), name=node.name, kind=kind, target=module if kind == "module" else node.target,
                            module=module, module_name=module_name, call_index=call_index,
                            shape=shape, dtype=dtype, node=node)
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

    def _build_hooks(self, args: tuple, kwargs: dict) -> None:
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

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            call_index = calls.get(id(module), 0)
            calls[id(module)] = call_index + 1
            name = self._names.get(id(module), type(module).__name__)
            out = output if isinstance(output, torch.Tensor) else None
            site = CallSite(index=len(self.sites), name=f"{name}#{call_index}", kind="module",
                            target=module, module=module, module_name=name, call_index=call_index,
                            shape=out.shape if out is not None else None,
                            dtype=out.dtype if out is not None else None)
            for tensor in tensors(inputs):
                producer = producer_of.get(id(tensor))
                if producer is not None and producer not in site.inputs:
                    site.inputs.append(producer)
                    producer.users.append(site)
            for tensor in tensors(output):
                producer_of[id(tensor)] = site
                keep_alive.append(tensor)
            self.sites.append(site)

        handles = [m.register_forward_hook(hook) for m in self.model.modules()
                   if not any(True for _ in m.children()) and m is not self.model]
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
            raise ValueError(f"{type(module).__name__} module {module!r:.80} is not a submodule of "
                             f"the model {type(self.model).__name__}") from None

    def sites_of(self, module: nn.Module) -> List[CallSite]:
        """All call sites of ``module``, in execution order."""
        name = self.module_name(module)
        sites = self._by_module.get(id(module), [])
        if not sites:
            raise ValueError(f"module '{name}' ({type(module).__name__}) is never called in the "
                             f"forward pass of {type(self.model).__name__}, so it has no units to score or prune")
        return sites

    def site(self, module: nn.Module, call_index: int = 0) -> CallSite:
        """The ``call_index``-th call site of ``module``."""
        sites = self.sites_of(module)
        if not 0 <= call_index < len(sites):
            raise ValueError(f"module '{sites[0].module_name}' is called {len(sites)} time(s); "
                             f"call_index {call_index} does not exist")
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
        if all(site.kind == "module" for site in fns):
            with self._intercept_with_hooks(fns) as forward:
                yield forward
        else:
            if self.traced is None:
                raise ValueError("functional call sites can only be intercepted in fx mode")
            yield self._probed_module(fns)

    @contextlib.contextmanager
    def _intercept_with_hooks(self, fns: Dict[CallSite, Callable]) -> Iterator[Callable[..., Any]]:
        counters: Dict[int, int] = {}
        by_module: Dict[int, Dict[int, Callable]] = {}
        for site, fn in fns.items():
            by_module.setdefault(id(site.module), {})[site.call_index] = fn
        modules = {id(site.module): site.module for site in fns}

        def reset(_module: nn.Module, _args: tuple) -> None:
            counters.clear()

        def make_hook(module_id: int) -> Callable:
            def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
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

    def _probed_module(self, fns: Dict[CallSite, Callable]) -> fx.GraphModule:
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
        return fx.GraphModule(root, new_graph, "ProbedModel")

    def __repr__(self) -> str:
        return f"ModelGraph({type(self.model).__name__}, method={self.method}, {len(self.sites)} call sites)"


def _get_attr_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# Cache: one graph per model and input signature, rebuilt when the structure changes
# --------------------------------------------------------------------------------------------

_SLOT = "_torchpruner_graph_cache"


class _GraphSlot:
    """Holds a model's cached graph on the model itself.

    A graph refers to its model, so a global cache keyed by the model would keep every model
    alive. Kept on the model, the two form an ordinary reference cycle that the garbage collector
    frees with the model. ``deepcopy`` and pickling give an empty slot (a copy traces anew).
    """

    __slots__ = ("key", "graph")

    def __init__(self) -> None:
        self.key: Any = None
        self.graph: Optional[ModelGraph] = None

    def __deepcopy__(self, memo: dict) -> "_GraphSlot":
        return _GraphSlot()

    def __reduce__(self) -> Tuple[type, tuple]:
        return (_GraphSlot, ())


def _structure_key(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in
                    list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)))
    modules = tuple((name, type(m)) for name, m in model.named_modules())

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape[1:]), value.dtype, value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        if isinstance(value, Mapping):
            return tuple(sorted((k, describe(v)) for k, v in value.items()))
        return repr(value)

    return tensors, modules, describe(args), describe(kwargs), _LEAF_VERSION


def get_graph(model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None) -> ModelGraph:
    """The cached :class:`ModelGraph` of ``model`` for inputs like ``args``/``kwargs``.

    The cache lives on the model object; an entry is reused while the parameter/buffer shapes,
    the module structure and the input shapes (batch size ignored) are the same, so the attribution
    metrics and the Pruner share one trace and a prune triggers a new one.
    """
    model = unwrap_model(model)
    kwargs = dict(kwargs or {})
    key = _structure_key(model, args, kwargs)
    slot = model.__dict__.get(_SLOT)
    if isinstance(slot, _GraphSlot) and slot.graph is not None and slot.key == key and slot.graph.model is model:
        return slot.graph
    graph = ModelGraph(model, args, kwargs)
    slot = _GraphSlot()
    slot.key, slot.graph = key, graph
    model.__dict__[_SLOT] = slot  # a shallow copy of the model shares it: the `is model` check above
    return graph


def invalidate_graph(model: nn.Module) -> None:
    """Forget the cached graph of ``model`` (done automatically when shapes change)."""
    unwrap_model(model).__dict__.pop(_SLOT, None)
