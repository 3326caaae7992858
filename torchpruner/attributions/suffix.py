"""Evaluating only the part of a model after its mask points, for many coalitions at once.

Masked-evaluation metrics (Shapley, leave-one-out) ask for the loss of the model with some units
zeroed at the read points, for many sets of units ("coalitions"). Everything before the first
read point is the same for every coalition, so :class:`Suffix` runs it once per batch (the
*prefix*) and evaluates only the nodes of the traced graph that depend on a read point (the
*suffix*) per coalition, with ``K`` coalitions stacked along the batch dimension: row
``k · n + i`` is example ``i`` under coalition ``k``.

When the model has one read point and the values there reach the output only through one linear
layer (``nn.Linear``, ``nn.Conv1d/2d/3d`` with ``groups=1``), possibly after per-channel ops that
keep a zeroed unit zero (ReLU-like activations, Dropout, pooling, flatten/view), the layer's
pre-activation is *additive* in the units: ``y(S) = y(∅) + Σ_{c∈S} W·z_c``. :class:`Incremental`
computes every unit's contribution once per batch, so that a coalition costs only the ops after
that layer (see :meth:`Suffix.incremental`).

Only models torch.fx traced are handled (the nodes of the graph are evaluated directly, so no
``forward_partial`` is needed). Whatever the model does with the batch size is recomputed on the
stacked batch: a prefix value that is not a tensor (``x.size(0)``, a split's tuple) is computed
again from stacked inputs. Anything this cannot follow raises :class:`SuffixUnavailable`; the
metrics then fall back to whole-model evaluation, and they cross-check the suffix against it on
the first batch.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchpruner._ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    SHAPE_QUERY_ATTRIBUTES,
    SHAPE_QUERY_FUNCTIONS,
    SHAPE_QUERY_METHODS,
)
from torchpruner.graph import CallSite, ModelGraph

from .data import Batch, per_example_loss
from .runner import MaskPoint

#: Default memory budget: the largest stacked activation holds at most this many elements.
#: (8 MiB of float32: large enough that per-call overhead is small, small enough to stay near the
#: CPU caches; 2**20 to 2**22 were equally fast on the digits CNN, 2**23 slower, 2**18 much slower.)
DEFAULT_MAX_BATCH_ELEMENTS = 2**21

_POOL_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHAIN_MODULES: tuple[type, ...] = (
    tuple(ACTIVATION_MODULES) + tuple(DROPOUT_MODULES) + _POOL_MODULES + (nn.Flatten, nn.Identity)
)
_CHAIN_FUNCTIONS = (
    set(ACTIVATION_FUNCTIONS)
    | set(DROPOUT_FUNCTIONS)
    | {
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        torch.flatten,
        torch.reshape,
    }
)
_CHAIN_METHODS = set(ACTIVATION_METHODS) | {"view", "reshape", "flatten", "contiguous", "clone"}
_LINEAR_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LinearConsumer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class SuffixUnavailable(Exception):
    """The suffix of this model cannot be evaluated on its own (the reason is the message)."""


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_QUERY_METHODS
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in SHAPE_QUERY_ATTRIBUTES
        return node.target in SHAPE_QUERY_FUNCTIONS
    return False


def _target_name(node: fx.Node) -> str:
    """The target of a ``get_attr``, ``call_method`` or ``call_module`` node (a name in fx)."""
    if not isinstance(node.target, str):
        raise SuffixUnavailable(f"the node {node.name} ({node.op}) has a target that is not a name")
    return node.target


def _closure(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``starts`` by ``step`` (the starts themselves only if reached)."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        for node in step(stack.pop()):
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return seen


def _descendants(starts: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(starts, lambda node: node.users)


def _ancestors(ends: Iterable[fx.Node]) -> set[fx.Node]:
    return _closure(ends, lambda node: node.all_input_nodes)


def repeat_rows(value: Any, rows: slice, repeats: int, batch_size: int) -> Any:
    """``value[rows]`` stacked ``repeats`` times along dim 0 (coalition-major); tensors without the
    batch on dim 0, and non-tensors, as they are. Tuples, lists and dicts are followed."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch_size:
            return value
        part = value[rows]
        return part.repeat(repeats, *([1] * (part.dim() - 1))) if repeats > 1 else part.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(repeat_rows(v, rows, repeats, batch_size) for v in value)
    if isinstance(value, dict):
        return {k: repeat_rows(v, rows, repeats, batch_size) for k, v in value.items()}
    return value


class _Program:
    """The nodes computed per coalition, in graph order, and the prefix values they read."""

    def __init__(self, suffix: Suffix, given: list[fx.Node], output: fx.Node | None) -> None:
        order = suffix.order
        computed = _descendants(given) - set(given)
        if output is not None:
            computed &= _ancestors([output]) | {output}
        # non-tensor prefix values (sizes, tuples) are computed again from stacked inputs
        frontier_pending = [n for node in computed for n in node.all_input_nodes if n not in computed]
        while frontier_pending:
            node = frontier_pending.pop()
            if node in computed or node in given or node.op in ("placeholder", "get_attr"):
                continue
            site = suffix.site_of.get(node)
            if site is None or site.shape is None:
                computed.add(node)
                frontier_pending.extend(node.all_input_nodes)
        self.given = given
        self.nodes = sorted(computed, key=order.__getitem__)
        self.frontier = sorted(
            {n for node in self.nodes for n in node.all_input_nodes if n not in computed and n not in given},
            key=order.__getitem__,
        )
        self.output = output
        self._plan_rewrites(suffix)
        self.elements_per_example = max(
            [1]
            + [
                math.prod(site.shape[1:])
                for node in self.nodes + given
                if (site := suffix.site_of.get(node)) is not None and site.shape is not None and len(site.shape)
            ]
        )

    def _plan_rewrites(self, suffix: Suffix) -> None:
        """Rewrites of the per-coalition program that give the same values with less work: a
        ReLU whose only reader is a max-pool runs after it, on the pooled tensor
        (``maxpool(relu(x)) == relu(maxpool(x))``: ReLU is non-decreasing); a ReLU whose input is
        the fresh output of a linear, convolution or BatchNorm layer read by nothing else runs in
        place; a linear layer reading a flatten reads a channels-last input as laid out. Masked
        nodes, the program's output, its given nodes and modules with forward hooks (which must
        see what the model computes) are left alone; with global module hooks, nothing is
        rewritten."""
        masked = set(suffix.masked_at)
        inside = set(self.nodes)
        keep_out = masked | set(self.given) | ({self.output} if self.output is not None else set())
        #: max-pool node -> the ReLU it now runs before
        self.pool_first: dict[fx.Node, fx.Node] = {}
        #: ReLU nodes whose input is overwritten
        self.in_place: set[fx.Node] = set()
        #: ReLU nodes that overwrite the given value they read (its only reader) when the caller
        #: says the given values are scratch (``evaluate(..., scratch=True)``)
        self.in_place_given: set[fx.Node] = set()
        #: linear node -> the flatten it reads (a channels-last input is read without a copy)
        self.flat_linear: dict[fx.Node, fx.Node] = {}
        self.deferred: set[fx.Node] = set()
        #: ``view`` nodes run as ``reshape`` (the same values; a channels-last state cannot be
        #: viewed as the model's contiguous tensor is): only where nothing else reads the input,
        #: so that no in-place write can go through the view to another reader
        self.views_as_reshape: set[fx.Node] = {
            node
            for node in self.nodes
            if node not in keep_out
            and node.op == "call_method"
            and node.target == "view"
            and node.args
            and isinstance(node.args[0], fx.Node)
            and [u for u in node.args[0].users if not _is_shape_query(u)] == [node]
            and not node.kwargs
            and not any(isinstance(a, torch.dtype) for a in node.args[1:])
        }
        if _global_hooks():  # a hook may read any module's input or output as the model computes it
            return
        keep_out |= {n for n in self.nodes if _hooked(suffix, n)}
        for node in self.nodes:
            if node in keep_out or not _is_plain_relu(suffix, node):
                continue
            (source,) = node.all_input_nodes
            users = list(node.users)
            if len(users) == 1 and users[0] in inside and users[0] not in keep_out and _is_max_pool(suffix, users[0]):
                if users[0].args and users[0].args[0] is node:
                    self.pool_first[users[0]] = node
                    continue
            if source in self.given and [u for u in source.users if not _is_shape_query(u)] == [node]:
                self.in_place_given.add(node)
                continue
            if (
                source in inside
                and source not in keep_out
                and list(source.users) == [node]
                and source.op == "call_module"
                and isinstance(suffix.traced.get_submodule(str(source.target)), _FRESH_OUTPUT_MODULES)
            ):
                self.in_place.add(node)
        for node in self.nodes:
            if node in keep_out or not _is_flatten_from_1(suffix, node):
                continue
            users = list(node.users)
            if len(users) != 1 or users[0] not in inside or users[0] in keep_out:
                continue
            (linear,) = users
            if (
                linear.op == "call_module"
                and type(suffix.traced.get_submodule(str(linear.target))) is nn.Linear
                and linear.args == (node,)
                and not linear.kwargs
            ):
                self.flat_linear[linear] = node
        self.deferred = set(self.pool_first.values()) | set(self.flat_linear.values())


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(
        module._global_forward_hooks or module._global_forward_pre_hooks or module._global_forward_hooks_always_called
    )


def _hooked(suffix: Suffix, node: fx.Node) -> bool:
    """``node`` calls a module with forward hooks (which would see rewritten values)."""
    if node.op != "call_module":
        return False
    module = suffix.traced.get_submodule(str(node.target))
    return bool(module._forward_hooks or module._forward_pre_hooks)


_FRESH_OUTPUT_MODULES: tuple[type, ...] = _LINEAR_CONSUMERS + (nn.modules.batchnorm._BatchNorm,)


def _is_plain_relu(suffix: Suffix, node: fx.Node) -> bool:
    """``node`` is a ReLU of one tensor (module, function or method), nothing else."""
    if len(node.all_input_nodes) != 1 or not node.args or node.args[0] is not node.all_input_nodes[0]:
        return False
    if node.op == "call_module":
        return type(suffix.traced.get_submodule(str(node.target))) is nn.ReLU and len(node.args) == 1
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1 and not node.kwargs


def _is_flatten_from_1(suffix: Suffix, node: fx.Node) -> bool:
    """``node`` flattens every dim after the batch dim of one tensor."""
    if len(node.all_input_nodes) != 1 or not node.args or node.args[0] is not node.all_input_nodes[0]:
        return False
    if node.op == "call_module":
        module = suffix.traced.get_submodule(str(node.target))
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1 and len(node.args) == 1
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return tuple(node.args[1:]) == (1,) and not node.kwargs
    return False


def _pools_faster_channels_last(x: Any) -> TypeGuard[torch.Tensor]:
    """``x`` is a contiguous 4-d CPU tensor with enough channels that a max-pool of it runs faster
    on a channels-last copy (PyTorch's CPU max-pool is several times slower in NCHW layout; with
    a few channels, as on an image, the copy costs more than it saves)."""
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[1] >= 8
        and x.shape[2] * x.shape[3] > 1
        and x.is_contiguous()
        and x.is_floating_point()
    )


class _ChannelsLastWeights:
    """A linear layer's weight with its input features in channels-last order, cached while the
    weight is unchanged: ``flatten(x) @ W.T == x.permute(0, 2, 3, 1).reshape(n, -1) @ W_cl.T``."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}

    def get(self, module: nn.Linear, shape: torch.Size) -> torch.Tensor:
        weight = module.weight
        key = (weight.data_ptr(), weight._version, tuple(shape), weight.dtype, weight.device)
        hit = self._cache.get(id(module))
        if hit is not None and hit[0] == key:
            return hit[1]
        c, h, w = shape
        permuted = weight.detach().reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
        self._cache[id(module)] = (key, permuted)
        return permuted


def _is_max_pool(suffix: Suffix, node: fx.Node) -> bool:
    """``node`` is a max-pool that returns the pooled tensor only (no indices)."""
    if node.op == "call_module":
        module = suffix.traced.get_submodule(str(node.target))
        return isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)) and (
            not module.return_indices
        )
    if node.op == "call_function" and node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
        return len(node.args) <= 6 and not node.kwargs.get("return_indices", False)
    return False


class Suffix:
    """Evaluates the model after ``read_points`` for stacked coalitions. See the module docstring.

    Args:
        graph: the model's traced graph (fx mode).
        read_points: where units are zeroed (a layer's evaluation point, or a group's read points).
        criterion: the loss, as given to the metric.
        max_batch_elements: the memory budget: the largest activation of one stacked evaluation
            holds at most this many elements (at least one coalition is always evaluated).
    """

    def __init__(
        self,
        graph: ModelGraph,
        read_points: list[MaskPoint],
        criterion: Callable[..., Any],
        max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS,
    ) -> None:
        if graph.method != "fx" or graph.traced is None:
            raise SuffixUnavailable("the model was traced with forward hooks only")
        self.traced = graph.traced
        self.criterion = criterion
        self.max_batch_elements = int(max_batch_elements)
        self.nodes = list(self.traced.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.site_of: dict[fx.Node, CallSite] = {s.node: s for s in graph.sites if s.node is not None}
        self.points = read_points
        self.node_of: dict[int, fx.Node] = {}
        for point in read_points:
            if point.site.node is None or point.site.node not in self.order:
                raise SuffixUnavailable(f"the point {point.site.label} is not a node of the traced graph")
            self.node_of[id(point)] = point.site.node
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.batched = _descendants(self.placeholders) | set(self.placeholders)  # input-dependent nodes
        if any(str(n.target).startswith("*") for n in self.placeholders):
            raise SuffixUnavailable("the model takes *args or **kwargs")
        (self.output_node,) = [n for n in self.nodes if n.op == "output"]
        masked_nodes = set(self.node_of.values())
        later = _descendants(masked_nodes)
        self.first = sorted(masked_nodes - later, key=self.order.__getitem__)
        self.masked_at = {self.node_of[id(p)]: p for p in read_points}
        self._channels_last_weights = _ChannelsLastWeights()
        #: 2-d max-pools run on a channels-last copy of a contiguous CPU input (the same values,
        #: several times faster); modules with hooks (which see what the model computes) excepted
        self.pools_via_channels_last: set[fx.Node] = (
            set() if _global_hooks() else {n for n in self.nodes if _is_max_pool(self, n) and not _hooked(self, n)}
        )
        self.program = _Program(self, self.first, None)
        self.prefix_nodes = self._prefix_for(self.program, self.first)

    # ---------------------------------------------------------------- prefix
    def _prefix_for(self, program: _Program, extra: Iterable[fx.Node]) -> list[fx.Node]:
        wanted = set(program.frontier) | set(extra)
        needed = _ancestors(wanted) | wanted
        return [n for n in self.nodes if n in needed and n.op != "output"]

    def _run_node(self, node: fx.Node, fetch: Callable[[fx.Node], Any], inputs: dict[fx.Node, Any]) -> Any:
        if node.op == "placeholder":
            return inputs[node]
        if node.op == "get_attr":
            return operator.attrgetter(_target_name(node))(self.traced)
        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        first = args[0] if args else None
        if node in self.pools_via_channels_last and _pools_faster_channels_last(first):
            x = first.contiguous(memory_format=torch.channels_last)
            pooled = self._call(node, (x, *args[1:]), kwargs)
            return pooled.contiguous()  # the layout the model's own max-pool gives
        return self._call(node, args, kwargs)

    def _call(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call ``node`` makes, on ``args`` and ``kwargs`` (values, not nodes)."""
        if node.op == "call_function" and callable(node.target):
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, _target_name(node))(*rest, **kwargs)
        if node.op == "call_module":
            return self.traced.get_submodule(_target_name(node))(*args, **kwargs)
        raise SuffixUnavailable(f"cannot evaluate the node {node.name} ({node.op})")

    def _inputs(self, batch: Batch) -> dict[fx.Node, Any]:
        values: dict[fx.Node, Any] = {}
        for i, node in enumerate(self.placeholders):
            name = str(node.target)
            if i < len(batch.args):
                values[node] = batch.args[i]
            elif name in batch.kwargs:
                values[node] = batch.kwargs[name]
            elif node.args:
                values[node] = node.args[0]
            else:
                raise SuffixUnavailable(f"no value for the model input {name!r}")
        return values

    def prefix(
        self, batch: Batch, extra: Iterable[fx.Node] = (), known: dict[fx.Node, Any] | None = None
    ) -> dict[fx.Node, Any]:
        """The values of the prefix nodes for ``batch`` (nothing zeroed); ``extra``: more nodes
        wanted (and their ancestors); ``known``: a prefix of this same batch whose values are
        reused (only the nodes it lacks are computed)."""
        inputs = known[_INPUTS] if known is not None else self._inputs(batch)  # type: ignore[index]
        nodes = self.prefix_nodes
        extra = list(extra)
        if extra:
            wanted = set(nodes) | set(extra) | _ancestors(extra)
            nodes = [n for n in self.nodes if n in wanted and n.op != "output"]
        env: dict[fx.Node, Any] = {}
        with torch.no_grad():
            for node in nodes:
                if known is not None and node in known:
                    env[node] = known[node]
                else:
                    env[node] = self._run_node(node, env.__getitem__, inputs)
        env[_INPUTS] = inputs  # type: ignore[index]
        return env

    # ---------------------------------------------------------------- stacked evaluation
    def evaluate(
        self,
        program: _Program,
        env: dict[fx.Node, Any],
        batch: Batch,
        rows: slice,
        repeats: int,
        given: dict[fx.Node, Any],
        masks: dict[fx.Node, torch.Tensor] | None = None,
        scratch: bool = False,
    ) -> Any:
        """Run ``program`` on ``repeats`` stacked copies of the examples ``rows`` of the batch:
        ``given`` supplies the stacked values of the program's starting nodes, ``masks`` the
        bool keep masks ``[repeats · n, size]`` applied at masked nodes; ``scratch=True``: the
        given values are the caller's scratch, which the program may overwrite. Returns the
        value of the program's output (the model output when it has none)."""
        inputs = env[_INPUTS]  # type: ignore[index]
        local: dict[fx.Node, Any] = {}
        size = batch.size

        def fetch(node: fx.Node) -> Any:
            if node in local:
                return local[node]
            if node.op == "placeholder":
                value = repeat_rows(inputs[node], rows, repeats, size)
            elif node in env:
                value = repeat_rows(env[node], rows, repeats, size) if node in self.batched else env[node]
            else:
                value = self._run_node(node, fetch, inputs)
            local[node] = value
            return value

        with torch.no_grad():
            for node, value in given.items():
                local[node] = self._mask(node, value, masks)
            for node in program.nodes:
                if node.op == "output" or node in program.deferred:
                    continue
                relu = program.pool_first.get(node)
                if relu is not None:  # the max-pool of the ReLU's input, then the ReLU in place
                    source = relu.all_input_nodes[0]
                    value = torch.relu_(self._run_node(node, lambda n: fetch(source if n is relu else n), inputs))
                elif node in program.in_place or (scratch and node in program.in_place_given):
                    value = torch.relu_(fetch(node.all_input_nodes[0]))
                elif node in program.views_as_reshape:
                    args = fx.node.map_arg(node.args, fetch)
                    shape: Any = args[1:]  # sizes (ints, or computed from stacked tensors)
                    if isinstance(args[0], torch.Tensor):
                        value = args[0].reshape(*shape)
                    else:  # a view of something else: as the model calls it
                        value = self._run_node(node, fetch, inputs)
                elif node in program.flat_linear:
                    value = self._flat_linear(node, fetch(program.flat_linear[node].all_input_nodes[0]))
                else:
                    value = self._run_node(node, fetch, inputs)
                local[node] = self._mask(node, value, masks)
            if program.output is not None:
                return fetch(program.output)
            return fx.node.map_arg(self.output_node.args[0], fetch)

    def _flat_linear(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """The linear layer ``node`` on ``flatten(x, 1)``; a channels-last ``x`` is read as it is
        laid out, against the weight's columns in the same order (no copy of ``x``)."""
        module = self.traced.get_submodule(str(node.target))
        assert isinstance(module, nn.Linear)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            weight = self._channels_last_weights.get(module, x.shape[1:])
            return F.linear(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1), weight, module.bias)
        out: torch.Tensor = module(torch.flatten(x, 1))
        return out

    def _mask(self, node: fx.Node, value: Any, masks: dict[fx.Node, torch.Tensor] | None) -> Any:
        if masks is None or node not in masks:
            return value
        point = self.masked_at[node]
        point.check(value)
        keep = masks[node].to(value.device)
        shape = [keep.shape[0]] + [1] * (value.dim() - 1)
        shape[point.axis] = point.size
        return torch.where(keep.reshape(shape), value, torch.zeros((), dtype=value.dtype, device=value.device))

    def losses(
        self,
        program: _Program,
        env: dict[fx.Node, Any],
        batch: Batch,
        rows: slice,
        repeats: int,
        given: dict[fx.Node, Any],
        masks: dict[fx.Node, torch.Tensor] | None = None,
        scratch: bool = False,
    ) -> torch.Tensor:
        """Per-example losses ``[repeats, n]`` (float64) of :meth:`evaluate`."""
        output = self.evaluate(program, env, batch, rows, repeats, given, masks, scratch)
        n = len(range(batch.size)[rows])
        target = repeat_rows(batch.target, rows, repeats, batch.size)
        loss = per_example_loss(self.criterion, output, target, repeats * n)
        return loss.to(torch.float64).reshape(repeats, n)

    def coalitions_per_call(self, program: _Program, n: int) -> int:
        return max(1, self.max_batch_elements // max(1, n * program.elements_per_example))

    def coalition_losses(
        self, env: dict[fx.Node, Any], batch: Batch, keeps: torch.Tensor, done: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Losses ``[K, N]`` of the coalitions ``keeps`` (bool ``[K, units]``), zeroing the units
        outside each at every read point; stacked within the memory budget. ``done(k)`` is called
        after each stacked evaluation with the number of coalitions evaluated so far."""
        program = self.program
        per_call = self.coalitions_per_call(program, batch.size)
        everything = slice(0, batch.size)
        out = []
        for start in range(0, keeps.shape[0], per_call):
            chunk = keeps[start : start + per_call]
            masks = {
                node: point_keep(point, chunk).repeat_interleave(batch.size, 0)
                for node, point in self.masked_at.items()
            }
            given = {node: repeat_rows(env[node], everything, chunk.shape[0], batch.size) for node in self.first}
            out.append(self.losses(program, env, batch, everything, chunk.shape[0], given, masks))
            if done is not None:
                done(start + chunk.shape[0])
        return torch.cat(out, 0)

    # ---------------------------------------------------------------- incremental walk
    def incremental(self, example: dict[fx.Node, Any], batch: Batch) -> Incremental:
        """The incremental form of this suffix (one read point whose units reach the output only
        through one linear layer); raises :class:`SuffixUnavailable` otherwise. ``example`` is
        a prefix of the batch (from :meth:`prefix`)."""
        return Incremental(self, example, batch)


#: The key of the model inputs in a prefix environment: not a node, hence the ``type: ignore[index]``
#: where an environment is indexed with it.
_INPUTS = object()


def point_keep(point: MaskPoint, keeps: torch.Tensor) -> torch.Tensor:
    """Bool ``[K, size]``: per coalition, False at the positions of the units outside it."""
    mask = torch.ones(keeps.shape[0], point.size, dtype=torch.bool)
    mask[:, point.positions] = keeps.cpu()[:, point.units]
    return mask


#: Walk the states of a 2-d convolution's output in channels-last layout.
CHANNELS_LAST = True


def state_buffer(count: int, like: torch.Tensor, storage: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised ``[count, *like.shape]`` whose slices ``[k]`` have ``like``'s layout
    (channels-last for a channels-last 4-d ``like``, contiguous otherwise); with ``storage`` (a
    flat tensor of ``like``'s dtype and device, at least ``count · like.numel()`` long) a view of
    it, so one allocation serves every chunk of a run (a fresh one per chunk costs page faults)."""
    channels_last = (
        like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    )
    if channels_last:
        n, c, h, w = like.shape
        shape: tuple[int, ...] = (count, n, h, w, c)
    else:
        shape = (count,) + tuple(like.shape)
    if storage is None:
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
    else:
        buffer = storage[: math.prod(shape)].view(shape)
    return buffer.permute(0, 1, 4, 2, 3) if channels_last else buffer


def empty_and_contributions_2d(
    module: nn.Conv2d, padding: tuple[int, ...], u: torch.Tensor, index: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contributions ``[units, n, out, h', w']`` of a 2-d convolution's input units (``index``:
    ``[units, k]`` input channels each), as one batched matrix product over the unfolded input:
    unit c's contribution at an output position is its ``k·kh·kw`` input patch times the matching
    weights. Several times faster on the CPU than a grouped convolution with one group per input
    channel, and the product comes out channels-last, the layout the walk uses."""
    units, k = index.shape
    n = u.shape[0]
    out_channels, _, kh, kw = module.weight.shape
    patches = F.unfold(
        u[:, index.reshape(-1)], (kh, kw), dilation=module.dilation, padding=padding, stride=module.stride
    )  # [n, units*k*kh*kw, h'*w']
    positions = patches.shape[-1]
    patches = patches.reshape(n, units, k * kh * kw, positions).permute(1, 0, 3, 2).reshape(units, n * positions, -1)
    weight = module.weight[:, index.reshape(-1)].reshape(out_channels, units, k * kh * kw).permute(1, 2, 0)
    product = torch.bmm(patches, weight)  # [units, n*h'*w', out]
    h, w = empty.shape[-2:]
    contributions = product.reshape(units, n, h, w, out_channels).permute(0, 1, 4, 2, 3)
    if CHANNELS_LAST:
        return empty.contiguous(memory_format=torch.channels_last), contributions
    return empty, contributions.contiguous()


class Incremental:
    """A suffix whose first consumer is linear: ``y(S) = y(∅) + Σ_{c∈S} contribution_c`` at the
    consumer's output, and only the ops after it run per coalition."""

    def __init__(self, suffix: Suffix, env: dict[fx.Node, Any], batch: Batch) -> None:
        if len(suffix.points) != 1:
            raise SuffixUnavailable("several read points")
        (point,) = suffix.points
        start = suffix.node_of[id(point)]
        chain, consumer = self._walk(suffix, start)
        self.suffix, self.point, self.start, self.chain, self.consumer = suffix, point, start, chain, consumer
        module = suffix.traced.get_submodule(_target_name(consumer))
        if not isinstance(module, _LINEAR_CONSUMERS):  # _walk returns only these
            raise SuffixUnavailable(f"{consumer.name} is not a linear layer")
        self.module: _LinearConsumer = module
        self.program = _Program(suffix, [consumer], None)
        touched = {start, *chain}
        leaking = [n for n in self.program.frontier if n in touched]
        if leaking:
            raise SuffixUnavailable(f"the values at {leaking[0].name} are read after {consumer.name}")
        self.chain_program = _Program(suffix, [start], chain[-1] if chain else start)
        self.layer_input = chain[-1] if chain else start
        self.num_units = int(point.units.max()) + 1 if len(point.units) else 0
        self._unit_layout(env, batch)
        self.prefix_nodes = suffix._prefix_for(self.program, [self.layer_input])

    @staticmethod
    def _walk(suffix: Suffix, start: fx.Node) -> tuple[list[fx.Node], fx.Node]:
        chain: list[fx.Node] = []
        node = start
        while True:
            users = [u for u in node.users if not _is_shape_query(u)]
            if len(users) != 1:
                raise SuffixUnavailable(f"{node.name} has {len(users)} consumers")
            (user,) = users
            tensor_inputs = [
                n for n in user.all_input_nodes if (s := suffix.site_of.get(n)) is not None and s.shape is not None
            ]
            if tensor_inputs != [node] or not user.args or user.args[0] is not node:
                raise SuffixUnavailable(f"{user.name} reads other tensors")
            if user.op == "call_module":
                module = suffix.traced.get_submodule(_target_name(user))
                if type(module) in _LINEAR_CONSUMERS and len(user.args) == 1 and not user.kwargs:
                    if isinstance(module, nn.modules.conv._ConvNd) and (
                        module.groups != 1 or module.padding_mode != "zeros"
                    ):
                        raise SuffixUnavailable(f"{user.name} is a grouped or padded convolution")
                    return chain, user
                if not isinstance(module, _CHAIN_MODULES):
                    raise SuffixUnavailable(f"{user.name} ({type(module).__name__}) is not per-channel")
            elif not (
                (user.op == "call_function" and user.target in _CHAIN_FUNCTIONS)
                or (user.op == "call_method" and user.target in _CHAIN_METHODS)
            ):
                raise SuffixUnavailable(f"{user.name} is not per-channel")
            chain.append(user)
            node = user

    def _unit_layout(self, env: dict[fx.Node, Any], batch: Batch) -> None:
        """Which positions of the consumer's input each unit owns, found by running the chain on
        one indicator per unit; checks that a zeroed unit stays zero and units stay apart."""
        suffix, point = self.suffix, self.point
        z = env[self.start]
        units = self.num_units
        one = slice(0, 1)
        unit_of = torch.full((point.size,), -1, dtype=torch.long)
        unit_of[point.positions] = point.units
        shape = [1] * z.dim()
        shape[point.axis] = point.size
        owner = unit_of.reshape(shape).to(z.device)
        indicator_shape = [units] + [1] * (z.dim() - 1)
        indicators = (owner == torch.arange(units, device=z.device).reshape(indicator_shape)).to(z.dtype)
        indicators = indicators.expand(units, *z.shape[1:]).contiguous()
        zeros = torch.zeros_like(z[one])

        def run(value: torch.Tensor, k: int) -> Any:
            return suffix.evaluate(self.chain_program, env, batch, one, k, {self.start: value})

        if bool((run(zeros, 1) != 0).any()):
            raise SuffixUnavailable("the ops before the linear layer do not keep zero at zero")
        owned = run(indicators, units) != 0  # [units, *input shape of the consumer]
        if bool((owned.sum(0) > 1).any()):
            raise SuffixUnavailable("the ops before the linear layer mix units")
        module = self.module
        if isinstance(module, nn.Linear):
            features = owned.reshape(units, -1, owned.shape[-1])
            per_feature = features.any(1)
            if not bool((features == per_feature[:, None]).all()):
                raise SuffixUnavailable("units do not own whole input features of the linear layer")
        else:
            features = owned.reshape(units, owned.shape[1], -1)
            per_feature = features.any(2)
            if not bool((features == per_feature[:, :, None]).all()):
                raise SuffixUnavailable("units do not own whole input channels of the convolution")
        counts = per_feature.sum(1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise SuffixUnavailable("units own different numbers of inputs of the linear layer")
        self.index = torch.nonzero(per_feature)[:, 1].reshape(units, -1)  # [units, k]
        self.rest = ~per_feature.any(0)  # inputs of no scored unit: always on
        #: unit c owns the inputs c·k .. c·k + k − 1 and no input is always on (a flattened
        #: channel-major activation, or the units themselves): the gathers are views
        self.blocks = per_feature.shape[1] == self.index.numel() and bool(
            (self.index.reshape(-1) == torch.arange(self.index.numel())).all()
        )

    def contributions(self, env: dict[fx.Node, Any], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_empty [n, ...], contributions [units, n, ...])`` at the consumer's output for the
        examples ``rows``: ``y(S) = y_empty + Σ_{c∈S} contributions[c]``."""
        u = env[self.layer_input][rows]
        module = self.module
        index = self.index.to(u.device)
        rest = self.rest.to(u.device)
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                empty = F.linear(u * rest.to(u.dtype), module.weight, module.bias)
                if self.blocks:  # the same values, without copying them
                    gathered = u.reshape(*u.shape[:-1], *index.shape)
                    weight = module.weight.reshape(-1, *index.shape)
                else:
                    gathered = u[..., index]  # [n, ..., units, k]
                    weight = module.weight[:, index]  # [out, units, k]
                contributions = torch.einsum("...ck,ock->c...o", gathered, weight)
            else:
                channel_shape = [1, -1] + [1] * (u.dim() - 2)
                empty = module._conv_forward(u * rest.to(u.dtype).reshape(channel_shape), module.weight, module.bias)
                padding = module.padding
                if isinstance(module, nn.Conv2d) and not isinstance(padding, str):
                    return empty_and_contributions_2d(module, padding, u, index, empty)
                units, k = index.shape
                selected = u[:, index.reshape(-1)]  # [n, units*k, *spatial]
                weight = module.weight[:, index.reshape(-1)]  # [out, units*k, *kernel]
                out_channels = weight.shape[0]
                per_input = weight.transpose(0, 1).reshape(units * k * out_channels, 1, *weight.shape[2:])
                conv = _CONV_FUNCTIONS[u.dim() - 2]
                each = conv(
                    selected, per_input, None, module.stride, module.padding, module.dilation, units * k
                )  # [n, units*k*out, *spatial']
                each = each.reshape(u.shape[0], units, k, out_channels, *each.shape[2:])
                each = each[:, :, 0] if k == 1 else each.sum(2)
                contributions = each.movedim(1, 0)
                if CHANNELS_LAST and contributions.dim() == 5:  # a 2-d convolution with padding="same"
                    empty = empty.contiguous(memory_format=torch.channels_last)
                    return empty, contributions.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return empty, contributions.contiguous()  # [units, ...] rows are gathered per ordering

    def elements_per_example(self) -> int:
        return self.num_units * max(1, self.program.elements_per_example)

    def rest_losses(
        self, env: dict[fx.Node, Any], batch: Batch, rows: slice, stacked: torch.Tensor, scratch: bool = False
    ) -> torch.Tensor:
        """Losses ``[K, n]`` with the consumer's output set to ``stacked`` (``[K · n, ...]``);
        ``scratch=True``: ``stacked`` is the caller's scratch, which may be overwritten (a ReLU
        right after the layer then runs in place on it)."""
        n = len(range(batch.size)[rows])
        given = {self.consumer: stacked}
        return self.suffix.losses(self.program, env, batch, rows, stacked.shape[0] // n, given, scratch=scratch)
