"""Automatic dependency discovery: which tensors lose which units when a layer is pruned.

Pruning output channel ``c`` of a convolution removes more than one weight row: the BatchNorm
after it loses channel ``c``, the next convolution loses input column ``c``, and if the channel
feeds a residual addition, every other tensor added to it must lose the same channel, and so must
every consumer of the sum. This module finds all of that in the traced graph
(:class:`~torchpruner.graph.ModelGraph`, fx mode).

Model
-----
Every tensor in the forward pass that carries units gets *slots*, one per position along its unit
axis. Ops connect slots that must disappear together:

- element-wise ops, BatchNorm, activations, Dropout, pooling, mean/sum over other dims connect
  slot ``i`` of their input(s) with slot ``i`` of their output (broadcast operands of size 1 are
  free; a residual addition therefore connects both operands);
- concatenation along the unit axis shifts by the branch offset;
- reshapes, flattens, permutes, indexing and expands are *followed empirically*: the op is run on
  a tensor of slot ids, then again with two slots removed; if the second result is not the first
  one with those slots removed (a hard-coded ``x.view(-1, 16*5*5)``, a channel shuffle) the op is
  refused. ``flatten`` into a Linear thereby maps channel ``c`` to its ``H*W`` inputs;
- a piece of the unit axis (an item of ``split``/``chunk``, ``x[:, a:b]``) maps each of its units
  back to the source. Equal pieces (``chunk(n)``, sizes computed from the tensor) need the same
  number of units removed from every piece (a group whose units sit in some pieces only is
  refused); with positions written in the code (``split(16)``, ``x[:, :16]``) the units up to the
  piece's end are pinned (their groups refused) and the units after it stay free;
- a functional call standing for its layer (``F.linear``/``F.conv*``/``F.batch_norm``/
  ``F.layer_norm``/``F.group_norm`` on a module's own tensors inside its forward: a subclass fx
  traces into, such as timm's ``Linear`` or ``BatchNormAct2d``) is that layer's call, sliced once by
  its rule; the settings it reads (``groups``, ``num_groups``, ``normalized_shape``) must come from
  the layer's attributes;
- depthwise convolutions pass channels through; grouped convolutions force equal pruning in every
  group; GroupNorm whole groups; ``nn.MultiheadAttention`` equal pruning in every head;
- attention heads (:mod:`~torchpruner.graph.flow_heads`): a reshape that splits a projection's units
  into (heads, head_dim) makes each head one unit (its channels of q, k, v and the output
  projection's columns go together; a head count read from ``self.num_heads`` is updated, a literal
  refuses the heads); batched matmul and ``F.scaled_dot_product_attention`` link the head axes, a
  KV head going with its group of query heads (``repeat_kv``, ``enable_gqa=True``);
- ``max``/``topk``/``sort``-like pairs are followed at their items (``[0]``/``.values``,
  ``[1]``/``.indices``) unless they run along the unit axis; tensor attributes that are views
  (``.mT``, ``.T``, ``.real``, ``.data``) like movement ops; any other attribute read that carries
  units is refused, never ignored;
- ``F.layer_norm`` over the units: the ``normalized_shape`` it reads is updated with the weights
  (the calling module's attribute, found by tracing it again with the attribute changed), or the
  op is refused when the shape is a literal in the code.

A module with weights called several times loses the same units at every call (its calls are
linked). A parameter-free module (a shared Dropout, ReLU, Identity) is one op per call site and
couples nothing; a shared Dropout's ``p`` changes only when every call site loses the same fraction.

A connected set of slots is one *unit*; units that share a tensor form a coupled *group*. Modules
own slots in three ways: ``out`` (Conv/Linear/Embedding output units: the group's *sources*),
``in`` (a consumer's weight columns, or a channel-wise layer such as BatchNorm) and bare
parameters read through ``get_attr`` (class tokens, position embeddings, layer scales).

A group is refused (with the op and the call site in the message) when one of its tensors is a
model input, flows into an op that cannot be followed, or is a model output (soft: allowed when
the caller asks to prune classifier outputs).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._state import collector_paused
from torchpruner._ops import (
    ATTENTION_FUNCTIONS,
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    DIM_WISE_FUNCTIONS,
    DIM_WISE_METHODS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    MOVEMENT_FUNCTIONS,
    MOVEMENT_METHODS,
    MOVEMENT_MODULES,
    PASS_THROUGH_MODULES,
    REDUCTION_FUNCTIONS,
    REDUCTION_METHODS,
    SHAPE_QUERY_FUNCTIONS,
    SHAPE_QUERY_METHODS,
    SPATIAL_FUNCTIONS,
    SPATIAL_MODULES,
)
from torchpruner.rules import AttributeChange

from .trace import CallSite, ModelGraph
from .flow_layers import LayerFlow
from .recapture import capture_again, same_ops, temporarily_pruned, trial_edits
from .slots import _name_target, shared_traces
from .spaces import (
    DependencyError,
    Member,
    RefusedGroupsWarning,
    _CannotFollow,
    _LiteralSize,
    _Role,
    _ShapeAttribute,
    _Space,
    _flatten_nodes,
    connected_components,
    pd_unique,
)

__all__ = [
    "DependencyGraph",
    "Group",
    "Member",
    "DependencyError",
    "RefusedGroupsWarning",
    "get_dependency_graph",
    "zeroing_functions",
    "connected_components",
]

#: ``positions_fn(units) -> (axis, positions)``: where the given group units sit in one tensor
PositionsFn = Callable[[Sequence[int]], Tuple[int, np.ndarray]]


def _as_unit_array(units: Iterable[int]) -> np.ndarray:
    """``units`` (a list, tuple, range, array, tensor, set or any iterable of ints) as an int64 array."""
    if not isinstance(units, (set, frozenset)):
        try:
            array = np.asarray(units, dtype=np.int64)
        except (TypeError, ValueError):
            pass
        else:
            if array.ndim == 1:
                return array
    return np.asarray([int(u) for u in units], dtype=np.int64)


class Group:
    """A coupled group: units that can only be removed together from all of its tensors.

    Attributes:
        index: position in ``pruner.groups()`` (no ignored layers); the groups that list leaves
            out follow, in the order of ``groups(include_outputs=True)`` and then of
            ``groups(prunable_only=False)``; ``print(group)`` shows this number.
        num_units: number of group units; unit ``u`` is ordered by the first source's channels.
        members: the modules and parameters that are sliced (see :class:`Member`).
        refusal: None when the group can be pruned, else the reason (names the op and call site).
        refusal_site: the call site of the op that refused the group (None when unknown).
        output_reason: set when the group reaches a model output (classifier outputs): prunable
            only when asked (``include_outputs=True``).
    """

    def __init__(self, dep: "DependencyGraph", index: int, unit_labels: np.ndarray) -> None:
        self._dep = dep
        self.index = index
        self._unit_labels = unit_labels  # global unit label of group unit u
        self._spaces: List[_Space] = []
        self._roles: List[_Role] = []
        self.refusal: Optional[str] = None
        self.refusal_site: Optional[CallSite] = None
        self.output_reason: Optional[str] = None
        self.members: List[Member] = []

    # -- description ---------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return len(self._unit_labels)

    @property
    def source_roles(self) -> List[_Role]:
        return [r for r in self._roles if r.direction in ("out", "param")]

    @property
    def sources(self) -> List[CallSite]:
        """Call sites whose output units are owned by a pruned layer (Conv/Linear/Embedding
        outputs, bare parameters): zeroing their channels there removes the group's units."""
        return [r.space.site for r in self._roles if r.direction in ("out", "param") and r.space.site is not None]

    @property
    def modules(self) -> List[nn.Module]:
        seen: List[nn.Module] = []
        for member in self.members:
            if all(member.module is not m for m in seen):
                seen.append(member.module)
        return seen

    @property
    def source_modules(self) -> List[nn.Module]:
        return [r.module for r in self._roles if r.direction == "out"]

    def prunable(self, include_outputs: bool = False) -> bool:
        return (
            self.refusal is None
            and (include_outputs or self.output_reason is None)
            and bool(self.source_roles)
            and self.num_units > 1
        )

    def why_not_prunable(self, include_outputs: bool = False) -> Optional[str]:
        if self.refusal is not None:
            return self.refusal
        if self.output_reason is not None and not include_outputs:
            return self.output_reason + " (pass include_outputs=True to prune it)"
        if not self.source_roles:
            return "no layer owns these units (they come from a model input or a fixed tensor)"
        if self.num_units <= 1:
            return "a single unit cannot be pruned"
        return None

    def normalizations(self) -> List[str]:
        """The modules whose hand-written RMSNorm (``x * rsqrt(x.pow(2).mean(-1, keepdim=True) +
        eps) * weight``, Hugging Face's Llama and T5) or global response normalisation (GRN,
        ConvNeXt-V2: ``x * g / (g.mean(units) + eps)``, ``g`` the spatial norm of each unit)
        normalises over these units: pruning them changes its statistic, as it changes an
        ``nn.RMSNorm``'s, so zeroing them is not exactly pruning them (compare with a rebuilt
        smaller model)."""
        owners = [owner for space, owner in self._dep._statistics if (self._unit_of(space) >= 0).any()]
        return list(dict.fromkeys(owners))

    def __contains__(self, module: nn.Module) -> bool:
        return any(m.module is module for m in self.members)

    def __repr__(self) -> str:
        first = self.members[0].module_name if self.members else "?"
        return f"Group({self.index}, {self.num_units} units, {len(self.members)} members, first={first!r})"

    def __str__(self) -> str:
        state = "prunable" if self.prunable() else f"not prunable: {self.why_not_prunable()}"
        lines = [f"Group {self.index}: {self.num_units} units, {len(self.members)} members ({state})"]
        lines += [f"  {member}" for member in self.members]
        return "\n".join(lines)

    # -- unit bookkeeping -----------------------------------------------------------------

    def _unit_of(self, space: _Space) -> np.ndarray:
        """Group-unit index of every slot of ``space`` (-1 for slots of other groups)."""
        labels = self._dep._labels[space.start : space.start + space.size]
        return np.where(self._dep._group_of_label[labels] == self.index, self._dep._unit_index[labels], -1)

    def positions(self, space: _Space, units: Iterable[int]) -> np.ndarray:
        """Positions along ``space``'s unit axis removed with the given group units."""
        unit_of = self._unit_of(space)  # in [-1, num_units): -1 marks the slots of other groups
        wanted = _as_unit_array(units)
        wanted = wanted[(wanted >= -1) & (wanted < self.num_units)]  # no other value can match
        chosen = np.zeros(self.num_units + 1, dtype=bool)  # chosen[u + 1]: unit u goes
        chosen[wanted + 1] = True
        return np.nonzero(chosen[unit_of + 1])[0]

    def _positions_fn(self, space: _Space) -> PositionsFn:
        """``units -> (space.axis, positions of those group units in space)``."""
        return lambda units: (space.axis, self.positions(space, units))

    def mask_points(self) -> List[Tuple[CallSite, PositionsFn]]:
        """Where zeroing is *exactly* pruning: the tensors that the group's consumers read.

        Returns ``[(call_site, positions_fn)]``; ``positions_fn(units) -> (axis, positions)``.
        Zeroing those positions at those call sites (eval mode) gives the pruned model's output
        unless the group contains LayerNorm/GroupNorm over the pruned axis (their statistics change).
        """
        points: List[Tuple[CallSite, PositionsFn]] = []
        seen: Set[int] = set()
        for role in self._roles:
            site = role.space.site
            if role.direction != "in" or site is None or id(role.space) in seen:
                continue
            if self._dep._passes_through(role):
                continue
            seen.add(id(role.space))
            points.append((site, self._positions_fn(role.space)))
        return points

    def source_points(self) -> List[Tuple[CallSite, PositionsFn]]:
        """The group's sources (layer outputs feeding the shared units), as
        ``[(call_site, positions_fn)]``; for attribution metrics that score a group unit by
        zeroing it at every source."""
        points: List[Tuple[CallSite, PositionsFn]] = []
        for role in self._roles:
            site = role.space.site
            if role.direction in ("out", "param") and site is not None:
                points.append((site, self._positions_fn(role.space)))
        return points

    def count_cells(self) -> Optional[np.ndarray]:
        """Cell of every group unit under the grouped-convolution count constraints, or None.

        A grouped convolution (``1 < groups < in_channels``) that reads or writes the group's units
        needs the same number of them removed from each of its conv groups. Units in one cell share
        their conv group in every such convolution: removing the same number from every cell
        satisfies all of them (see :func:`torchpruner.schedule.select_units`).
        """
        keys = np.zeros(self.num_units, dtype=np.int64)
        constrained = False
        for space, groups in self._dep._count_constraints:
            unit_of = self._unit_of(space)
            inside = unit_of >= 0
            if not inside.any():
                continue
            constrained = True
            block = np.arange(space.size) // (space.size // groups)
            keys[unit_of[inside]] = keys[unit_of[inside]] * groups + block[inside]
        if not constrained:
            return None
        return np.unique(keys, return_inverse=True)[1].reshape(-1)

    def reads(self, module: nn.Module) -> bool:
        """True when some call of ``module`` reads a tensor that holds units of this group (also for
        modules with nothing to slice: activations, pooling)."""
        graph = self._dep.graph
        if not graph.has_sites(module):
            return False
        for site in graph.sites_of(module):
            if site.node is None:  # a site of an fx graph always has its node
                continue
            for node in _flatten_nodes((site.node.args, site.node.kwargs)):
                space = self._dep._spaces.get(node)
                if space is not None and (self._unit_of(space) >= 0).any():
                    return True
        return False

    def entry_points(self) -> List[Tuple[CallSite, PositionsFn]]:
        """Where the group's units enter the shared stream, in the format of :meth:`mask_points`.

        For every source (a layer output, a bare ``[1, ...]`` parameter such as a position
        embedding), the tensor reached by following it through per-unit ops (BatchNorm,
        activations, Dropout, pooling, reshapes, depthwise convolutions, element-wise ops with one
        operand carrying these units) up to, not including, the first merge (an addition of two
        tensors with these units, a concatenation), consumer or fan-out; and every other operand
        of a merge that comes from outside the stream (an attention output). Zeroing there is
        pruning, and the points are not chained: a residual stream's block outputs are not entry
        points, so scaling a unit at every entry point counts it once per source. A product of
        two tensors with these units (a squeeze-excitation gate ``x * s``) keeps one of them: an
        operand whose only reader is the product (the gate ``s``) is not an entry point when
        another operand is scaled, since scaling both would scale the product twice.
        """
        dep = self._dep
        additive = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
        additive_methods = {"add", "add_", "sub", "sub_"}
        multiplicative = {operator.mul, operator.imul, torch.mul, torch.multiply}
        multiplicative_methods = {"mul", "mul_", "multiply", "multiply_"}

        def carries(node: Any) -> bool:
            space = dep._spaces.get(node) if isinstance(node, fx.Node) else None
            return space is not None and bool((self._unit_of(space) >= 0).any())

        def token_like(node: fx.Node) -> bool:  # a bare parameter that broadcasts over the batch
            shape = dep._shape(node)
            return node.op == "get_attr" and shape is not None and len(shape) >= 2 and shape[0] == 1

        def carrying_inputs(node: fx.Node) -> List[fx.Node]:
            return [n for n in node.all_input_nodes if carries(n)]

        def is_merge(node: fx.Node) -> bool:
            inputs = carrying_inputs(node)
            if (node.op == "call_function" and node.target in (torch.cat, torch.concat)) or (
                node.op == "call_method" and node.target == "cat"
            ):
                return bool(inputs)
            if (node.op == "call_function" and node.target in additive) or (
                node.op == "call_method" and node.target in additive_methods
            ):
                # a position embedding added to the stream enters it; a per-channel shift does not
                return len([n for n in inputs if n.op != "get_attr" or token_like(n)]) >= 2
            return len([n for n in inputs if n.op != "get_attr"]) >= 2

        def per_unit(node: fx.Node) -> bool:
            """``node`` reads these units from one tensor and keeps them unit by unit."""
            if (
                not carries(node)
                or is_merge(node)
                or len([n for n in carrying_inputs(node) if n.op != "get_attr"]) != 1
            ):
                return False
            if node.op == "call_module":
                module = dep._traced_modules[_name_target(node)]
                if isinstance(module, nn.modules.conv._ConvNd):
                    return module.groups == module.in_channels and module.groups > 1
                return isinstance(
                    module,
                    (nn.modules.batchnorm._NormBase, nn.PReLU, nn.modules.dropout._DropoutNd)
                    + PASS_THROUGH_MODULES
                    + SPATIAL_MODULES
                    + MOVEMENT_MODULES,
                )
            functions = (
                ELEMENTWISE_FUNCTIONS | SPATIAL_FUNCTIONS | MOVEMENT_FUNCTIONS | REDUCTION_FUNCTIONS | {F.batch_norm}
            )
            if node.op == "call_function":
                return node.target in functions
            return (
                node.op == "call_method" and node.target in ELEMENTWISE_METHODS | MOVEMENT_METHODS | REDUCTION_METHODS
            )

        def real_users(node: fx.Node) -> List[fx.Node]:
            return [u for u in node.users if not dep._is_shape_query(u)]

        entries: Dict[fx.Node, None] = {}
        on_chains: Set[fx.Node] = set()
        for role in self.source_roles:
            node = role.space.node
            if role.direction == "param" and not token_like(node):
                continue  # a per-channel scale or shift: part of the chain of the tensor it acts on
            on_chains.add(node)
            while True:
                users = real_users(node)
                if len(users) != 1 or not per_unit(users[0]):
                    break
                node = users[0]
                on_chains.add(node)
            entries[node] = None
        for space in self._spaces:
            merge = space.node
            if merge.op not in ("call_function", "call_method") or not is_merge(merge):
                continue
            for operand in carrying_inputs(merge):
                if operand.op == "get_attr" and not token_like(operand):
                    continue
                node = operand
                while node not in on_chains and not is_merge(node) and per_unit(node):
                    (node,) = [n for n in carrying_inputs(node) if n.op != "get_attr"]
                if node not in on_chains and not is_merge(node):
                    entries[operand] = None  # enters from outside the stream (an attention output)
        for space in self._spaces:
            # a product of tensors carrying the units (a squeeze-excitation gate ``x * s``) would
            # be scaled by (1 - t) once per operand: keep one scaled operand, drop the entries that
            # only feed the product (zeroing the other operand already removes the unit there)
            product = space.node
            if not (
                product.op == "call_function"
                and product.target in multiplicative
                or product.op == "call_method"
                and product.target in multiplicative_methods
            ):
                continue
            operands = [n for n in carrying_inputs(product) if n.op != "get_attr" or token_like(n)]
            if len(operands) < 2:
                continue
            only_product = [n for n in operands if n in entries and real_users(n) == [product]]
            dropped = only_product if len(only_product) < len(operands) else only_product[1:]
            for node in dropped:
                del entries[node]
        points: List[Tuple[CallSite, PositionsFn]] = []
        for node in entries:
            site, space = dep._site_by_node.get(node), dep._spaces[node]
            if site is not None:
                points.append((site, self._positions_fn(space)))
        return points

    def units_for(self, module: nn.Module, indices: Sequence[int], call_index: int = 0) -> List[int]:
        """Group units removed when ``indices`` of ``module``'s output units go.

        Raises:
            DependencyError: when ``indices`` are not a whole number of group units (a grouped
                convolution needs equal pruning in every group, GroupNorm whole groups...).
        """
        space = self._dep._output_space(module, call_index)
        unit_of = self._unit_of(space)
        wanted = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        units = sorted(set(int(u) for u in unit_of[wanted]))
        needed = self.positions(space, units)
        if len(needed) != len(wanted) or not np.array_equal(needed, wanted):
            extra = sorted(set(needed.tolist()) - set(wanted.tolist()))
            name = self._dep.graph.module_name(module)
            raise DependencyError(
                f"cannot prune units {wanted.tolist()[:20]} of '{name}' alone: they are coupled with its units "
                f"{extra[:20]}{'...' if len(extra) > 20 else ''} (grouped convolution / GroupNorm / attention heads / "
                f"pieces of a split or chunk that meet again require equal pruning in every group); add them to the "
                f"indices"
            )
        return units

    def unit_channels(self, module: nn.Module, call_index: int = 0) -> List[np.ndarray]:
        """For each group unit, the output positions of ``module`` it covers."""
        space = self._dep._output_space(module, call_index)
        unit_of = self._unit_of(space)
        return [np.nonzero(unit_of == u)[0] for u in range(self.num_units)]

    def removals(self, units: Sequence[int]) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, removed positions)]`` for every member, deduplicated per module and side."""
        return self._dep.removals({self: units})

    def member_units(self) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, unit_of)]`` for every member, deduplicated per module, side and parameter as in
        :meth:`removals`: ``unit_of[p]`` is the group unit removed with position ``p`` of the
        member's sliced axis, -1 where the position belongs to another group."""
        merged: Dict[Tuple[int, str, Optional[str]], Tuple[_Role, np.ndarray]] = {}
        for role in self._roles:
            key = (id(role.module), role.direction, role.parameter)
            unit_of = self._unit_of(role.space)
            if key in merged:  # several calls of one module are linked: same positions
                first = merged[key][1]
                if first.shape == unit_of.shape:
                    merged[key] = (merged[key][0], np.where(first >= 0, first, unit_of))
                continue
            merged[key] = (role, unit_of)
        return [entry for entry in merged.values() if (entry[1] >= 0).any()]


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


def zeroing_functions(
    selection: Mapping["Group", Sequence[int]],
) -> Dict[CallSite, Callable[[torch.Tensor], torch.Tensor]]:
    """``{call_site: fn}`` that zeroes the selected units of each group at its mask points.

    For ``graph.intercept(...)`` on the graph the groups were computed on: the forward it yields
    is the model with those units masked where their consumers read them, which in eval mode equals
    the pruned model (except with a LayerNorm/GroupNorm over the pruned axis). ``fn`` returns a new
    tensor, so in-place ops downstream and autograd are safe.
    """
    entries: Dict[CallSite, List[Tuple[int, torch.Tensor]]] = {}
    for group, units in selection.items():
        for site, positions_fn in group.mask_points():
            axis, positions = positions_fn(units)
            if len(positions):
                entries.setdefault(site, []).append((axis, torch.as_tensor(positions, dtype=torch.long)))

    def zero(cuts: List[Tuple[int, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            for axis, positions in cuts:
                index: List[Any] = [slice(None)] * z.dim()
                index[axis] = positions.to(z.device)
                z[tuple(index)] = 0
            return z

        return fn

    return {site: zero(cuts) for site, cuts in entries.items()}


class DependencyGraph(LayerFlow):
    """Coupled groups of a traced model. Built once per :class:`ModelGraph` (see
    :func:`get_dependency_graph`).

    Args:
        graph: the traced model (must be in fx mode: the hooks fallback cannot see merges).
    """

    def __init__(self, graph: ModelGraph) -> None:
        if graph.method != "fx" or graph.traced is None:
            raise DependencyError(
                f"automatic dependency discovery needs torch.fx tracing, which failed on {graph.fx_failure}; "
                f"pass cascading_modules explicitly"
            )
        self.graph = graph
        self.model = graph.model
        self.tensor_shapes = tensor_shapes(self.model)  # a prune makes these groups stale
        self._site_by_node: Dict[fx.Node, CallSite] = graph._site_by_node
        self._spaces: Dict[fx.Node, _Space] = {}
        self._space_list: List[_Space] = []
        self._num_slots = 0
        self._edges: List[Tuple[np.ndarray, np.ndarray]] = []
        self._blocked: Dict[int, Tuple[str, bool, Optional[fx.Node]]] = {}  # id(space) -> (reason, hard, op)
        self._visiting: Optional[fx.Node] = None
        self._warned = False
        self._guessed: set[int] = set()  # spaces whose unit axis is a guess (after an op that could not be followed)
        self._roles: List[_Role] = []
        self._pending_attr_blocks: Dict[fx.Node, str] = {}
        self._first_role_space: Dict[Tuple[int, str], _Space] = {}
        self._shape_attributes: list[_ShapeAttribute] = []
        self._literal_sizes: list[_LiteralSize] = []
        self._statistics: list[tuple[_Space, str]] = []  # hand-written RMSNorms, GRNs: (input, owner)
        self._count_constraints: List[Tuple[_Space, int]] = []  # (space, conv groups): equal counts per block
        self._equal_pieces: list[_Space] = []  # tensors split into equal pieces (positions linked across pieces)
        self._count_sources: list[
            tuple[_Space, fx.Node, str, fx.Node]
        ] = []  # (counted units, the op, refusal, the counted tensor)
        # x[:, :self.a] pieces: (module id, attribute) -> {source space id: the piece's space}
        self._bounded_prefixes: Dict[Tuple[int, str], Dict[int, _Space]] = {}
        self._modules = dict(self.model.named_modules(remove_duplicate=False))
        self._traced_modules = dict(graph.traced.named_modules())
        with shared_traces():  # a module traced again alone is traced once per structure
            for node in graph.traced.graph.nodes:
                self._visiting = node  # the op a refusal is recorded at
                try:
                    self._visit(node)
                except _CannotFollow as exc:
                    self._block_node(node, self._refusal_upstream(node) or str(exc))
                except Exception as exc:  # arguments the analysis cannot read (a traced shape as an argument...)
                    self._block_node(
                        node,
                        f"cannot follow the units through {self._label(node)} ({type(exc).__name__}: {str(exc)[:120]})",
                    )
        self._visiting = None
        self._build_groups()

    def _refusal_upstream(self, node: fx.Node) -> str | None:
        """The reason of an input of ``node`` that was refused before (its unit axis is a guess):
        the op that failed on it is a consequence, the earlier refusal the cause to report."""
        for arg in self._slotted_inputs(node, attrs=True):
            space = self._spaces.get(arg)
            if space is not None and id(space) in self._guessed and id(space) in self._blocked:
                return self._blocked[id(space)][0]
        return None

    # -- visiting nodes -----------------------------------------------------------------------

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape, dtype = self._shape(node), self._dtype(node)
            if shape is not None and len(shape) >= 2 and dtype is not None and dtype.is_floating_point:
                site = self._site_by_node.get(node)
                self._block(
                    self._alloc(node, site.unit_axis if site is not None and site.unit_axis is not None else 1),
                    f"the units come from the model input '{node.target}'",
                )
            return
        if node.op == "get_attr":
            return  # slots on first use
        if node.op == "output":
            for arg in _flatten_nodes(node.args):
                space = self._space_of(arg)
                if space is not None:
                    self._block(space, f"the units reach the model output ({self._label(arg)})", hard=False)
            return
        slotted = self._slotted_inputs(node, attrs=True)
        shape = self._shape(node)
        if node.op in ("call_function", "call_method") and shape is not None:
            self._check_shape_sources(node)
        if node.op == "call_module":
            module = self._traced_modules[_name_target(node)]
            self._visit_module(node, module, slotted)
            return
        site = self._site_by_node.get(node)
        if node.op == "call_function" and site is not None and site.module is not None:
            self._visit_layer_call(node, site)
            return
        target = node.target
        is_fn, is_method = node.op == "call_function", node.op == "call_method"
        if is_fn and target is torch._assert:  # a decided shape check (graph.concrete)
            self._check_branch(node)
            return
        if is_fn and target is getattr:
            self._visit_getattr(node, slotted)
            return
        if (is_fn and target in SHAPE_QUERY_FUNCTIONS) or (is_method and target in SHAPE_QUERY_METHODS):
            return
        pair = self._tuple_op(node) if shape is None else None
        if pair is not None:
            self._check_pair_users(node, pair)  # followed at the items that are read
            return
        if shape is None:
            # tuples of split/chunk are followed at their getitem; any other op that takes the units
            # and returns no tensor (torch.sort's (values, indices)...) cannot be followed
            movement = (is_fn and target in MOVEMENT_FUNCTIONS) or (is_method and target in MOVEMENT_METHODS)
            if not movement and [n for n in slotted if n.op != "get_attr"] and not self._returns_none(node):
                raise _CannotFollow(
                    f"cannot follow the units through {self._label(node)}: it does not return one tensor"
                )
            return
        if (
            is_fn
            and target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_module"
            and self._shape(node.args[0]) is None
        ):
            self._visit_module_item(node)
            return
        if is_fn and target is operator.getitem and self._tuple_op(node.args[0]) is not None:
            self._pair_item(node, node.args[1])
            return
        if not [n for n in slotted if n.op != "get_attr"]:
            if not slotted:
                # a tensor created without any tensor input (torch.zeros(...)): fixed size
                site = self._site_by_node.get(node)
                if site is not None and site.unit_axis is not None:
                    self._block(
                        self._alloc(node, site.unit_axis), f"tensor of fixed size created by {self._label(node)}"
                    )
                return
        if (is_fn and target in ELEMENTWISE_FUNCTIONS) or (is_method and target in ELEMENTWISE_METHODS):
            self._elementwise(node)
        elif (is_fn and target in (torch.cat, torch.concat)) or (is_method and target == "cat"):
            self._concat(node)
        elif is_fn and target is torch.stack:
            self._stack(node)
        elif (is_fn and target in REDUCTION_FUNCTIONS) or (is_method and target in REDUCTION_METHODS):
            self._reduction(node)
        elif (is_fn and target in DIM_WISE_FUNCTIONS) or (is_method and target in DIM_WISE_METHODS):
            self._dim_wise(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
        elif is_fn and target in SPATIAL_FUNCTIONS:
            self._spatial(node)
        elif (is_fn and target in MATMUL_FUNCTIONS) or (is_method and target in MATMUL_METHODS):
            self._matmul(node)
        elif is_fn and target in ATTENTION_FUNCTIONS:
            self._sdpa(node)
        elif is_fn and target in (F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm):
            self._functional_norm(node)
        elif (is_fn and target in MOVEMENT_FUNCTIONS) or (is_method and target in MOVEMENT_METHODS):
            self._movement(node)
        elif not self._identity_call(node):
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}: unsupported op")

    # -- groups -------------------------------------------------------------------------------

    def _build_groups(self) -> None:
        self._resolve_count_sources()
        n = self._num_slots
        for space in self._space_list:  # bare parameters: roles for their owners
            if space.node.op == "get_attr":
                self._attr_role(space)
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        labels = connected_components(n, a, b)  # one label per unit
        self._labels = labels
        num_labels = int(labels.max()) + 1 if n else 0
        # units held by exactly the same tensors form a group (a residual stream; one branch of a
        # concatenation is its own group even though the concatenated tensor holds every branch)
        space_of_slot = np.repeat(np.arange(len(self._space_list)), [s.size for s in self._space_list])
        pairs = np.unique(space_of_slot.astype(np.int64) * max(num_labels, 1) + labels)
        pair_space, pair_label = pairs // max(num_labels, 1), pairs % max(num_labels, 1)
        rng = np.random.default_rng(0)
        keys = rng.integers(0, np.iinfo(np.int64).max, size=len(self._space_list), dtype=np.int64).astype(np.uint64)
        signature = np.zeros(num_labels, dtype=np.uint64)
        np.add.at(signature, pair_label, keys[pair_space])
        _, raw_group = np.unique(signature, return_inverse=True)
        raw_group = raw_group.reshape(-1)
        # order groups by their first tensor in data-flow order, units by a source's channels
        anchor: Dict[int, _Space] = {}
        for role in self._roles:
            if role.direction in ("out", "param"):
                for raw in np.unique(raw_group[labels[role.space.start : role.space.start + role.space.size]]):
                    anchor.setdefault(int(raw), role.space)
        self._group_of_label = np.full(num_labels, -1, dtype=np.int64)
        self._unit_index = np.full(num_labels, -1, dtype=np.int64)
        groups: List[Group] = []
        for space in self._space_list:
            lab = labels[space.start : space.start + space.size]
            for raw in pd_unique(raw_group[lab]):
                if self._group_of_label[lab[raw_group[lab] == raw][0]] >= 0:
                    continue
                first = anchor.get(int(raw), space)
                first_lab = labels[first.start : first.start + first.size]
                first_lab = pd_unique(first_lab[raw_group[first_lab] == raw])
                group = Group(self, len(groups), first_lab)
                self._group_of_label[first_lab] = group.index
                self._unit_index[first_lab] = np.arange(len(first_lab))
                groups.append(group)
        group_of_pair = self._group_of_label[pair_label]
        # pairs are sorted by space: the pairs of space k are one run, found by bisection
        bounds = np.searchsorted(pair_space, np.arange(len(self._space_list) + 1))
        groups_in = [np.unique(group_of_pair[bounds[k] : bounds[k + 1]]) for k in range(len(self._space_list))]
        for k, space in enumerate(self._space_list):
            reason = self._blocked.get(id(space))
            for gi in groups_in[k]:
                group = groups[gi]
                group._spaces.append(space)
                if reason is not None:
                    if reason[1] and group.refusal is None:
                        group.refusal = reason[0]
                        group.refusal_site = self._site_by_node.get(reason[2]) if reason[2] is not None else None
                    elif not reason[1] and group.output_reason is None:
                        group.output_reason = reason[0]
        space_index = {id(space): k for k, space in enumerate(self._space_list)}
        for role in self._roles:
            for gi in groups_in[space_index[id(role.space)]]:
                groups[gi]._roles.append(role)
        for group in groups:
            seen = set()
            for role in group._roles:
                key = (id(role.module), role.direction, role.parameter)
                if key in seen:
                    continue
                seen.add(key)
                mine = int((group._unit_of(role.space) >= 0).sum())
                group.members.append(
                    Member(
                        role.module_name,
                        role.module,
                        role.direction,
                        role.parameter,
                        role.space.size,
                        max(1, mine // max(1, group.num_units)),
                    )
                )
        self._refuse_tied(groups)
        self._check_literal_sizes(groups)
        self._groups = self._number_groups(groups)

    def _refuse_tied(self, groups: List[Group]) -> None:
        """Refuse the groups that would slice a Parameter registered in several modules (GPT-2's
        ``wte.weight`` is ``lm_head.weight``): the planner refuses tied weights, so such a group is
        listed with the reason instead of failing the prune of every group with it."""
        names: Dict[int, List[str]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for parameter_name, parameter in module._parameters.items():
                if parameter is not None:
                    qualified = f"{module_name}.{parameter_name}" if module_name else parameter_name
                    names.setdefault(id(parameter), []).append(qualified)
        for group in groups:
            if group.refusal is not None:
                continue
            for member in group.members:
                module = member.module
                if member.direction == "param":
                    sliced = [member.parameter] if member.parameter else []
                elif member.direction == "out":
                    sliced = list(module._parameters)
                else:
                    sliced = ["weight"] if "weight" in module._parameters else []
                for parameter_name in sliced:
                    parameter = module._parameters.get(parameter_name)
                    shared = names.get(id(parameter), []) if parameter is not None else []
                    if len(shared) > 1:
                        group.refusal = (
                            f"'{shared[0]}' is tied to {shared[1:]} (the same Parameter in several modules); "
                            f"pruning tied weights is not supported"
                        )
                        break
                if group.refusal is not None:
                    break

    def _check_literal_sizes(self, groups: List[Group]) -> None:
        """Refuse the groups whose units reach a literal size of an exported graph that does not
        follow them (see :mod:`~torchpruner.graph.recapture`): the model captured again with the
        last unit of each such group removed must run the same ops with the kept count there.
        One capture checks every group; when it fails, one capture per group finds which."""
        pending: Dict[int, List[_LiteralSize]] = {}
        for record in self._literal_sizes:
            assert record.space is not None  # set where the record is made
            for group in groups:
                if group.refusal is None and group.source_roles and (group._unit_of(record.space) >= 0).any():
                    pending.setdefault(group.index, []).append(record)
        if not pending:
            return
        checked = [groups[index] for index in pending]

        def choices(among: List[Group]) -> range:  # which attribute of each split size to try
            return range(max([len(r.attributes) for g in among for r in pending[g.index]] + [1]))

        if any(self._literals_follow(checked, pending, choice) for choice in choices(checked)):
            return
        for group in checked:
            if len(checked) > 1 and any(self._literals_follow([group], pending, c) for c in choices([group])):
                continue
            record = pending[group.index][0]
            group.refusal = (
                f"hard-coded shape in {self._label(record.node)}: the size {record.literal} is a literal in the "
                f"exported graph that does not follow the units (the model captured again with a unit removed "
                f"does not hold the kept count there)"
            )
            group.refusal_site = self._site_by_node.get(record.node)

    def _literals_follow(self, checked: List[Group], pending: Mapping[int, List[_LiteralSize]], choice: int) -> bool:
        """Whether the model, captured again with the last unit of every group in ``checked``
        removed (and attribute ``choice`` of each split size's candidates changed with it), runs
        the same ops and holds the kept count at each of their literal sizes. On success the
        chosen attributes are recorded for the prune to update."""
        if self.graph.export_inputs is None or self.graph.traced is None:
            return False
        selection = {group: [group.num_units - 1] for group in checked}
        edits = trial_edits(self.removals(selection))
        if edits is None:
            return False
        edits += self.shape_attribute_edits(selection)
        chosen: Dict[Tuple[int, str], _ShapeAttribute] = {}
        for group in checked:
            for record in pending[group.index]:
                assert record.space is not None  # set where the record is made
                if not record.attributes or record.owner is None:
                    continue
                attribute = record.attributes[min(choice, len(record.attributes) - 1)]
                key = (id(record.owner), attribute)
                if key not in chosen:
                    removed = sum(len(g.positions(record.space, units)) for g, units in selection.items())
                    old = getattr(record.owner, attribute)
                    edits.append(AttributeChange(record.owner, attribute, old, old - removed))
                    chosen[key] = _ShapeAttribute(record.space, record.owner, record.owner_name, attribute, None)
        args, kwargs = self.graph.export_inputs
        try:
            with temporarily_pruned(edits):
                exported = self.graph.capture == "export"
                again = capture_again(self.model, args, kwargs) if exported else self.graph.trace_again()
        except Exception:  # noqa: BLE001 - the model's own code fails with a unit fewer
            return False
        matched = same_ops(self.graph.traced.graph, again)
        if matched is None:
            return False
        for group in checked:
            for record in pending[group.index]:
                assert record.space is not None
                removed = sum(len(g.positions(record.space, units)) for g, units in selection.items())
                node = matched[record.node]
                if record.axis is None:
                    keyword = "split_size_or_sections" if node.op == "call_function" else "split_size"
                    value = self._dim_arg(node, 1, keyword)
                else:
                    shape = self._shape_list(node)
                    value = None if shape is None else shape[0][record.axis]
                if value != record.literal - removed:
                    return False
        self._shape_attributes.extend(chosen.values())
        return True

    def _number_groups(self, groups: List[Group]) -> List[Group]:
        """Renumber the groups so that ``group.index`` is the position users index with: the
        prunable groups first (``groups()``), then those reaching a model output
        (``groups(include_outputs=True)``), then the other groups with members
        (``groups(prunable_only=False)``), each part in data-flow order; groups without members
        (model inputs) last."""

        def part(group: Group) -> int:
            if not group.members:
                return 3
            if group.prunable():
                return 0
            return 1 if group.prunable(include_outputs=True) else 2

        ordered = sorted(groups, key=lambda g: (part(g), g.index))  # sorted() is stable
        renumber = np.full(len(groups) + 1, -1, dtype=np.int64)  # entry -1 keeps "no group"
        for new_index, group in enumerate(ordered):
            renumber[group.index] = new_index
            group.index = new_index
        self._group_of_label = renumber[self._group_of_label]
        return ordered

    def removals(self, selection: Mapping[Group, Sequence[int]]) -> List[Tuple[_Role, np.ndarray]]:
        """``[(role, removed positions)]`` when the given units of the given groups go, merged per
        module and side (a layer reading a concatenation loses inputs of several groups)."""
        merged: dict[tuple[int, str, str | None, int], tuple[_Role, np.ndarray]] = {}
        order: list[tuple[int, str, str | None, int]] = []
        for group, units in selection.items():
            for role in group._roles:
                # the calls of a module with weights are linked (same positions); a parameter-free
                # module's calls are not, so each keeps its own positions
                key = (id(role.module), role.direction, role.parameter, id(role.space) if role.per_call else 0)
                positions = group.positions(role.space, units)
                if key in merged:  # several calls of one module are linked: same positions
                    merged[key] = (merged[key][0], np.union1d(merged[key][1], positions))
                    continue
                merged[key] = (role, positions)
                order.append(key)
        return [merged[k] for k in order if len(merged[k][1])]

    def removed_positions(self, space: _Space, selection: Mapping[Group, Sequence[int]]) -> np.ndarray:
        """The positions of ``space`` that go when the given units of the given groups go (sorted);
        only the groups that hold a slot of ``space`` are looked at."""
        labels = self._labels[space.start : space.start + space.size]
        present = set(np.unique(self._group_of_label[labels]).tolist())
        parts = [
            group.positions(space, units)
            for group, units in selection.items()
            if group._dep is not self or group.index in present
        ]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def call_site_removals(
        self, module: nn.Module, selection: Mapping[Group, Sequence[int]]
    ) -> list[tuple[_Role, np.ndarray]]:
        """For a parameter-free module with a role per call site (Dropout): ``[(role, removed
        positions)]`` for *every* call site of ``module`` (empty positions where nothing goes)."""
        result = []
        for role in self._roles:
            if role.module is module and role.per_call:
                positions = [group.positions(role.space, units) for group, units in selection.items()]
                result.append((role, np.unique(np.concatenate(positions)) if positions else np.zeros(0, np.int64)))
        return result

    def shape_attribute_edits(self, selection: Mapping[Group, Sequence[int]]) -> list[AttributeChange]:
        """The changes of the module attributes that hold a size of the removed units (the
        ``normalized_shape`` a functional ``F.layer_norm`` reads), one per attribute."""
        edits: dict[tuple[int, str], AttributeChange] = {}
        for record in self._shape_attributes:
            key = (id(record.module), record.attribute)
            removed = sum(len(group.positions(record.space, units)) for group, units in selection.items())
            if not removed or key in edits:
                continue
            old = getattr(record.module, record.attribute)
            if record.index is None:
                new: Any = old - removed
            else:
                values = list(old)
                values[record.index] -= removed
                new = torch.Size(values) if isinstance(old, torch.Size) else type(old)(values)
            edits[key] = AttributeChange(module=record.module, attribute=record.attribute, old=old, new=new)
        return list(edits.values())

    # -- queries ------------------------------------------------------------------------------

    def _output_space(self, module: nn.Module, call_index: int = 0) -> _Space:
        site = self.graph.site(module, call_index)
        node = site.node
        assert node is not None  # the analysis runs on fx graphs only, whose sites have their node
        space = self._spaces.get(node)
        if space is None and isinstance(module, nn.MultiheadAttention):
            for user in node.users:
                if user.target is operator.getitem and user.args[1] == 0:
                    space = self._spaces.get(user)
        if space is None:
            raise DependencyError(f"module '{site.label}' ({type(module).__name__}) has no output units to prune")
        return space

    def groups(
        self, ignored_layers: Sequence[nn.Module] = (), include_outputs: bool = False, prunable_only: bool = True
    ) -> List[Group]:
        """The coupled groups (each once), in data-flow order.

        Args:
            ignored_layers: modules whose output units must not be pruned; a group with such a
                source is left out.
            include_outputs: also list groups that reach the model output (classifier outputs).
            prunable_only: leave out groups that cannot be pruned (see ``group.why_not_prunable``).
        """
        ignored = {id(m) for m in ignored_layers}
        result = []
        for group in self._groups:
            if not group.members:
                continue
            if prunable_only and not group.prunable(include_outputs):
                continue
            if any(id(m) in ignored for m in group.source_modules):
                continue
            result.append(group)
        return result

    def refused_groups(self, ignored_layers: Sequence[nn.Module] = ()) -> List[Group]:
        """The groups that hold units of a layer but cannot be pruned because an op cannot be
        followed (``group.refusal`` says why, ``group.refusal_site`` where); groups that only
        reach the model output or hold a single unit are not refusals."""
        ignored = {id(m) for m in ignored_layers}
        return [
            group
            for group in self._groups
            if group.members
            and group.refusal is not None
            and group.source_roles
            and not any(id(m) in ignored for m in group.source_modules)
        ]

    def warn_refused(self, ignored_layers: Sequence[nn.Module] = ()) -> None:
        """Warn (:class:`RefusedGroupsWarning`, once per analysis) when groups are refused: their
        count and the first reasons, so that a prune that leaves layers alone never does so silently."""
        if self._warned:
            return
        self._warned = True
        refused = self.refused_groups(ignored_layers)
        if not refused:
            return
        shown = "; ".join(f"group {g.index} ({g.members[0].module_name}): {g.refusal}" for g in refused[:3])
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        warnings.warn(
            RefusedGroupsWarning(
                f"{len(refused)} of {len(self.all_groups)} groups of {type(self.model).__name__} hold units of a layer but "
                f"cannot be pruned, and are left out: {shown}{more} (pruner.refused_groups() lists each with its call "
                f"site)"
            ),
            stacklevel=3,
        )

    @property
    def all_groups(self) -> List[Group]:
        return [g for g in self._groups if g.members]

    def groups_of(self, module: nn.Module, call_index: int = 0) -> List[Group]:
        """The groups holding ``module``'s output units (usually one)."""
        space = self._output_space(module, call_index)
        gids = self._group_of_label[self._labels[space.start : space.start + space.size]]
        return [self._groups[g] for g in pd_unique(gids)]

    def group_of(self, module: nn.Module, call_index: int = 0) -> Group:
        """The group holding ``module``'s output units (DependencyError if they span several)."""
        groups = self.groups_of(module, call_index)
        if len(groups) != 1:
            raise DependencyError(
                f"the output units of '{self.graph.module_name(module)}' belong to "
                f"{len(groups)} groups; use groups_of()"
            )
        return groups[0]

    def select(self, module: nn.Module, indices: Sequence[int], call_index: int = 0) -> Dict[Group, List[int]]:
        """``{group: units}`` removed when output units ``indices`` of ``module`` go."""
        space = self._output_space(module, call_index)
        wanted = np.asarray(sorted(set(int(i) for i in indices)), dtype=np.int64)
        gids = self._group_of_label[self._labels[space.start + wanted]]
        selection: Dict[Group, List[int]] = {}
        for gi in pd_unique(gids):
            group = self._groups[gi]
            selection[group] = group.units_for(module, wanted[gids == gi], call_index)
        return selection


def tensor_shapes(model: nn.Module) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return tuple((name, tuple(tensor.shape)) for name, tensor in named)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

_DEP_CACHE: Dict[int, Tuple[ModelGraph, DependencyGraph]] = {}


def get_dependency_graph(graph: ModelGraph) -> DependencyGraph:
    """The :class:`DependencyGraph` of ``graph`` (built once per graph object)."""
    cached = graph.__dict__.get("_torchpruner_dependencies")  # kept on the graph it describes
    if not isinstance(cached, DependencyGraph):
        with collector_paused():
            cached = DependencyGraph(graph)
        graph.__dict__["_torchpruner_dependencies"] = cached
    return cached
