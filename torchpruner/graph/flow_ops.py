"""The dependency analysis, tensor ops: how units flow through element-wise ops, merges,
concatenations, reductions and movement ops (part of :mod:`torchpruner.graph.dependency`)."""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, TypeGuard

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._ops import NORM_REDUCTIONS, SHAPE_QUERY_ATTRIBUTES, TENSOR_VIEW_ATTRIBUTES, TUPLE_DIM_OPS
from torchpruner.rules import get_slicing_rule

from .spaces import _CannotFollow, _LiteralSize, _ShapeAttribute, _Space, _flatten_nodes
from .flow_heads import HeadFlow
from .slots import (
    _int_attributes,
    _is_kept_part,
    _probe_removals,
    _reads_attribute,
    _shape_values,
    _slices_at_attribute,
    _slot_ids,
    _unit_line,
)


_MULTIPLY = (operator.mul, torch.mul)


def _single_user(n: fx.Node | None) -> fx.Node | None:
    if n is None:
        return None
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _is_op(n: Any, functions: tuple[Any, ...], method: str) -> TypeGuard[fx.Node]:
    return isinstance(n, fx.Node) and (
        (n.op == "call_function" and n.target in functions) or (n.op == "call_method" and n.target == method)
    )


def _uncast(n: Any) -> Any:
    """``x.to(torch.float32)``, ``x.float()``: the same units, so the tensor they cast."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in ("to", "float", "type"):
        n = n.args[0]
    return n


def _cast_of(n: fx.Node) -> fx.Node:
    """The last dtype cast after ``n`` (each with one user), or ``n``."""
    while True:
        user = _single_user(n)
        if user is None or not (user.op == "call_method" and user.target in ("to", "float", "type")):
            return n
        n = user


class TensorOpFlow(HeadFlow):
    """How tensor ops move units: element-wise ops and merges, concatenation and stacking,
    reductions and dim-wise ops, pooling-like spatial ops, movement ops (reshape, permute,
    indexing: followed on tensors of slot ids), pieces of the unit axis, max/sort-like pairs and
    tensor attributes."""

    def _check_shape_sources(self, node: fx.Node) -> None:
        """``node`` computes an argument from the size of another tensor (``B, N, C = x.shape`` then
        ``attn_out.reshape(B, N, C)``): when that size is the unit count of a tensor with units, a
        prune changes the argument (checked by computing it with two units of that tensor removed),
        so that tensor's units are refused here, naming the op."""
        args = (node.args, dict(node.kwargs))
        for tensor in self._counted_tensors(node):
            space = self._spaces.get(tensor)
            if space is None or space.size < 3:
                continue
            try:
                before, after = self._with_two_units_fewer(args, tensor, space)
            except Exception:  # noqa: BLE001 - the shape code fails on fewer units: it depends on them
                before, after = None, ()
            if _shape_values(before) != _shape_values(after):
                # decided once every op is visited: a reshape whose units take that count keeps it
                self._count_sources.append(
                    (
                        space,
                        node,
                        f"{self._label(node)} computes an argument from the number of units of "
                        f"{self._label(tensor)} (e.g. B, N, C = x.shape reused for another tensor); a prune "
                        f"would change it",
                        tensor,
                    )
                )

    def _with_two_units_fewer(self, value: Any, tensor: fx.Node, space: _Space) -> tuple[Any, Any]:
        """``value`` (nested arguments) computed with all units of ``tensor`` and with two of them
        removed (the first and the middle one); raises what the model's code raises."""
        before = self._evaluate_value(value, {tensor: _slot_ids(space.shape, space.axis, np.arange(space.size))})
        removed = np.setdiff1d(np.arange(space.size), [0, space.size // 2])
        return before, self._evaluate_value(value, {tensor: _slot_ids(space.shape, space.axis, removed)})

    def _check_branch(self, node: fx.Node) -> None:
        """``node`` guards a shape check that the tracer decided on the example
        (``torch._assert(cond)``, :mod:`torchpruner.graph.concrete`). When the condition reads the
        unit count of a tensor with units and some count a prune can leave (1 to all of them) makes
        it go the other way, the model would compute something else after that prune: those units
        are refused, naming the check. Every count is tried (the condition is shape arithmetic,
        computed on meta tensors)."""
        condition = node.args[0] if node.args else None
        if not isinstance(condition, fx.Node):
            return
        for tensor in self._counted_tensors(node):
            space = self._spaces.get(tensor)
            if space is None:
                continue
            outcomes: set[bool] = set()
            try:
                for count in range(1, space.size + 1):
                    shape = list(space.shape)
                    shape[space.axis] = count
                    stand_in = torch.empty(shape, device="meta")
                    outcomes.add(bool(self._evaluate(condition, {tensor: stand_in})))
                    if len(outcomes) > 1:
                        break
            except Exception:  # noqa: BLE001 - the check fails on fewer units: it depends on them
                outcomes = {True, False}
            if len(outcomes) > 1:
                self._block(
                    space,
                    f"a shape check in the forward ({self._label(condition)}, decided on the example "
                    f"input) tests the number of units of {self._label(tensor)}; a prune could make "
                    f"it go the other way",
                )

    def _resolve_count_sources(self) -> None:
        """A reshape that takes the size of its unit axis from another tensor's unit count
        (``B, H, W, C = x.shape`` then ``windows.view(-1, N, C)``, Swin): both lose the same
        positions (linked), so the count it reads stays its own. Any other use of a unit count
        (a tensor created with it, a size on another axis) refuses the counted units, naming the op."""
        for space, node, reason, tensor in self._count_sources:
            out = self._spaces.get(node)
            shape = self._shape_list(node)
            if (
                out is not None
                and out.size == space.size
                and id(out) not in self._blocked
                and shape is not None
                and (
                    (len(shape[0]) == out.ndim and isinstance(shape[0][out.axis], fx.Node))
                    or self._counts_only_its_unit_axis(shape[0], out, space, tensor)
                )
            ):
                self._link_same(space, out)
            else:
                self._block(space, reason)

    def _counts_only_its_unit_axis(self, shape: list[Any], out: _Space, space: _Space, tensor: fx.Node) -> bool:
        """The target shape is one computed tuple (``x.view(input_shape + (h.size(-1),))``, GPT-2)
        whose only entry that follows the units of ``tensor`` is the output's unit axis, and it
        follows them exactly (two units removed: two fewer there)."""
        if len(shape) != 1 or not isinstance(shape[0], fx.Node):
            return False
        try:
            before, after = self._with_two_units_fewer(shape[0], tensor, space)
        except Exception:  # noqa: BLE001 - it fails on fewer units
            return False
        if not isinstance(before, (tuple, list)) or not isinstance(after, (tuple, list)):
            return False
        if len(before) != out.ndim or len(after) != out.ndim:
            return False
        changed = [axis for axis in range(out.ndim) if before[axis] != after[axis]]
        return changed == [out.axis] and before[out.axis] == space.size and after[out.axis] == space.size - 2

    def _check_pair_users(self, node: fx.Node, pair: str) -> None:
        """A pair (``node`` runs the op ``pair``) is followed at its items; refuse it when it is read
        any other way."""
        fields = TUPLE_DIM_OPS[pair][2]
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1, -1, -2):
                continue
            if user.op == "call_function" and user.target is getattr and user.args[1] in fields:
                continue
            if [n for n in self._slotted_inputs(node) if n.op != "get_attr"]:
                raise _CannotFollow(
                    f"cannot follow the units through {self._label(node)}: its result is read "
                    f"as a whole by {self._label(user)}"
                )

    def _pair_item(self, node: fx.Node, index: Any) -> None:
        """Item ``index`` (``[0]``/``.values``, ``[1]``/``.indices``) of a pair-returning op along one
        dim: the units pass unless the op runs along the unit axis."""
        source = node.args[0]
        name = self._tuple_op(source)
        assert isinstance(source, fx.Node) and name is not None  # the callers check that source gives a pair
        position, default, fields = TUPLE_DIM_OPS[name]
        if index not in (0, 1, -1, -2):
            raise _CannotFollow(f"cannot follow the units through item {index!r} of {self._label(source)}")
        _, space = self._input_space(source)
        dim = self._dim_arg(source, position, "dim", default)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise _CannotFollow(f"cannot read the dim of {self._label(source)}")
        dim %= space.ndim
        if dim == space.axis:
            raise _CannotFollow(
                f"{self._label(source)} runs along the unit axis {space.axis} (dim={dim}): "
                f"its {fields[index % 2]} mix the units"
            )
        out_shape = self._tensor_shape(node)
        if len(out_shape) == space.ndim:
            axis = space.axis
        elif len(out_shape) == space.ndim - 1:
            axis = space.axis - (1 if dim < space.axis else 0)
        else:
            raise _CannotFollow(f"cannot follow the units through {self._label(source)}")
        if out_shape[axis] != space.size:
            raise _CannotFollow(f"cannot follow the units through {self._label(source)}")
        self._link_same(space, self._alloc(node, axis))

    def _visit_getattr(self, node: fx.Node, slotted: list[fx.Node]) -> None:
        """``x.<name>``: a pair's item, a view of the tensor (``.mT``, ``.data``), a shape query
        (``.shape``), or refused: an attribute read is never ignored while it carries units."""
        source, name = node.args[0], node.args[1]
        label = f"the attribute '.{name}' at call site '{node.name}'"
        pair = self._tuple_op(source)
        if pair is not None and isinstance(source, fx.Node):
            fields = TUPLE_DIM_OPS[pair][2]
            if name not in fields:
                raise _CannotFollow(f"cannot follow the units through {label} of {self._label(source)}")
            self._pair_item(node, fields.index(name))
            return
        if name in SHAPE_QUERY_ATTRIBUTES:
            return
        carries_units = bool([n for n in slotted if n.op != "get_attr"])
        if self._shape(node) is None:
            if carries_units:
                raise _CannotFollow(f"cannot follow the units through {label}: it is not a tensor")
            return
        if not slotted:
            return
        if name in TENSOR_VIEW_ATTRIBUTES:
            self._movement(node)
            return
        raise _CannotFollow(f"cannot follow the units through {label}: unknown tensor attribute")

    # -- element-wise, concat, reductions ----------------------------------------------------

    def _elementwise(self, node: fx.Node) -> None:
        shape = self._tensor_shape(node)
        nd = len(shape)
        operands = [n for n in _flatten_nodes((node.args, node.kwargs)) if self._shape(n) is not None]
        # the output's unit axis: from the first operand with real (non-attr) slots; for
        # ``torch.where(condition, a, b)`` from the values first (a mask built from positions may
        # carry fixed units on another axis: T5's position bias has its heads on axis 1)
        candidates = operands
        if node.op == "call_function" and node.target is torch.where and operands and operands[0] is node.args[0]:
            candidates = operands[1:] + operands[:1]
        out_axis = None
        space: _Space | None
        for n in candidates:
            if n in self._spaces and n.op != "get_attr":
                space = self._spaces[n]
                out_axis = space.axis + (nd - space.ndim)
                if space.shape[space.axis] == shape[out_axis]:
                    break
        if out_axis is None:
            for n in operands:
                if n.op == "get_attr":
                    space = self._space_of(n)
                    if space is not None:
                        out_axis = space.axis + (nd - space.ndim)
                        break
        if out_axis is None or out_axis < 0:
            raise _CannotFollow(f"cannot align the units of the operands of {self._label(node)}")
        out = self._alloc(node, out_axis)
        for n in operands:
            op_shape = self._tensor_shape(n)
            b = out_axis - (nd - len(op_shape))
            existing = self._spaces.get(n)
            if b < 0 or op_shape[b] == 1:
                # broadcast along the unit axis: the operand has no units here
                if existing is not None and existing.shape[existing.axis] > 1:
                    self._block(existing, f"its units are broadcast against another axis in {self._label(node)}")
                continue
            if existing is None and n.op != "get_attr":
                self._block(
                    out, f"{self._label(node)} combines the units with a tensor of fixed size ({self._label(n)})"
                )
                continue
            space = self._space_of(n, axis=b)
            if space is None or space.axis != b or space.size != out.size:
                self._block(out, f"the operands of {self._label(node)} carry units on different axes")
                if space is not None:
                    self._block(space, f"the operands of {self._label(node)} carry units on different axes")
                continue
            self._link_same(space, out)

    def _concat(self, node: fx.Node) -> None:
        tensors = self._dim_arg(node, 0, "tensors")
        dim = self._dim_arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _CannotFollow(f"cannot read the arguments of {self._label(node)}")
        shape = self._tensor_shape(node)
        dim = dim % len(shape)
        spaces = [self._spaces.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        axes = {s.axis for s in spaces if s is not None and s.node.op != "get_attr"}
        if len(axes) != 1:
            raise _CannotFollow(f"the inputs of {self._label(node)} carry units on different axes")
        axis = axes.pop()
        out = self._alloc(node, axis)
        if dim == axis:
            offset = 0
            for t, space in zip(tensors, spaces):
                if not isinstance(t, fx.Node):
                    raise _CannotFollow(f"{self._label(node)} concatenates {t!r:.40}, not a tensor")
                size = self._tensor_shape(t)[dim]
                if space is None:
                    space = self._space_of(t, axis=dim)
                if space is None or space.axis != dim:
                    self._block(out, f"{self._label(node)} concatenates a tensor without units ({self._label(t)})")
                else:
                    self._link(space, np.arange(size), out, offset + np.arange(size))
                offset += size
        else:
            for t, space in zip(tensors, spaces):
                if space is None:
                    space = self._space_of(t, axis=axis)
                if space is None or space.axis != axis or space.size != out.size:
                    self._block(out, f"the inputs of {self._label(node)} carry units on different axes")
                    continue
                self._link_same(space, out)

    def _stack(self, node: fx.Node) -> None:
        tensors = self._dim_arg(node, 0, "tensors")
        dim = self._dim_arg(node, 1, "dim", 0)
        shape = self._tensor_shape(node)
        dim = dim % len(shape)
        found = [self._space_of(t) for t in tensors]
        spaces = [s for s in found if s is not None]
        axes = {s.axis for s in spaces}
        if len(axes) != 1 or len(spaces) != len(found):
            raise _CannotFollow(f"the inputs of {self._label(node)} carry units on different axes")
        axis = axes.pop()
        out = self._alloc(node, axis + 1 if dim <= axis else axis)
        for space in spaces:
            self._link_same(space, out)

    def _reduction(self, node: fx.Node) -> None:
        x, space = self._input_space(node)
        dims = self._dim_arg(node, 2 if node.target in NORM_REDUCTIONS else 1, "dim", None)
        if dims is None or isinstance(dims, bool):  # x.std(False): the bool is `unbiased`, all dims go
            raise _CannotFollow(f"{self._label(node)} reduces over all dims, including the units")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d % space.ndim for d in dims]
        if space.axis in dims:
            owner = self._rms_statistic(node, x, space, dims) or self._response_statistic(node, x, space, dims)
            if owner is None:
                raise _CannotFollow(f"{self._label(node)} reduces over the unit axis {space.axis}")
            # the mean square of a hand-written RMSNorm, the mean response of a GRN: a statistic of
            # each row, carrying no units (pruning changes it, as it changes an nn.RMSNorm's: not
            # exactly masking)
            self._statistics.append((space, owner))
            return
        # keepdim from the traced output rank, not from argument positions (std/var put `unbiased` 3rd)
        out_shape = self._shape(node)
        keepdim = out_shape is not None and len(out_shape) == space.ndim
        axis = space.axis if keepdim else space.axis - sum(1 for d in dims if d < space.axis)
        self._link_same(space, self._alloc(node, axis))

    def _rms_statistic(self, node: fx.Node, x: fx.Node, space: _Space, dims: list[int]) -> str | None:
        """The name of the module whose hand-written RMSNorm ``node`` computes the statistic of,
        or None when ``node`` is not that. Verified op by op on the graph, as Hugging Face's Llama
        and T5 write it: ``x.pow(2).mean(-1, keepdim=True)`` over the unit axis only (the last),
        ``+ eps``, ``rsqrt``, a product with ``x`` itself, then (dtype casts aside) a product with
        the module's own 1-d weight of one entry per unit."""
        if space.axis != space.ndim - 1 or not self._keeps_one_unit_axis(node, space, dims):
            return None
        if not _is_op(x, (torch.pow, operator.pow), "pow") or len(x.args) != 2 or x.args[1] != 2:
            return None
        source = _uncast(x.args[0])
        rsqrt = _single_user(self._plus_epsilon(node))
        if not _is_op(rsqrt, (torch.rsqrt,), "rsqrt"):
            return None
        product = _single_user(rsqrt)
        if not _is_op(product, _MULTIPLY, "mul") or not any(
            _uncast(a) is source for a in product.args if a is not rsqrt
        ):
            return None
        product = _cast_of(product)
        return self._weighted_by_own_weight(node, product, _single_user(product), space)

    def _response_statistic(self, node: fx.Node, x: fx.Node, space: _Space, dims: list[int]) -> str | None:
        """The name of the module whose global response normalisation (ConvNeXt-V2's GRN)
        ``node`` computes the statistic of, or None when ``node`` is not that. Verified op by op:
        ``g = x.norm(p, dim=<the other axes>, keepdim=True)`` (one value per unit, so ``g`` carries
        the units), ``g.mean(<unit axis>, keepdim=True)``, ``+ eps``, ``g / that``, a product with
        ``x`` itself, then a product with the module's own 1-d weight of one entry per unit
        (``torch.addcmul(bias, weight, x * n)`` or ``weight * (x * n)``, through views). Pruning
        changes the mean over the units, as it changes an RMSNorm's: not exactly masking."""
        if not self._keeps_one_unit_axis(node, space, dims):
            return None
        if not _is_op(x, (torch.norm, torch.linalg.vector_norm), "norm"):
            return None
        source = _uncast(x.args[0])
        divide = _single_user(self._plus_epsilon(node))
        if (
            not _is_op(divide, (operator.truediv, torch.div, torch.true_divide), "div")
            or divide.args[0] is not x
            or len(divide.args) != 2
            or divide.kwargs
        ):
            return None  # not g / (mean + eps) (a rounding division is not a normalisation)
        product = _single_user(divide)
        if not _is_op(product, _MULTIPLY, "mul") or not any(
            _uncast(a) is source for a in product.args if a is not divide
        ):
            return None
        return self._weighted_by_own_weight(node, product, _single_user(product), space)

    def _keeps_one_unit_axis(self, node: fx.Node, space: _Space, dims: list[int]) -> bool:
        """``node`` is a mean over the unit axis alone, with ``keepdim=True``."""
        out_shape = self._shape(node)
        return (
            dims == [space.axis]
            and _is_op(node, (torch.mean,), "mean")
            and out_shape is not None
            and len(out_shape) == space.ndim
            and out_shape[space.axis] == 1
        )

    @staticmethod
    def _plus_epsilon(node: fx.Node) -> fx.Node | None:
        """The only user of ``node`` when it adds a positive float constant to it, else None."""
        add = _single_user(node)
        if not _is_op(add, (operator.add, torch.add), "add") or not any(
            isinstance(a, float) and a > 0 for a in add.args[1:] + tuple(add.args[:1])
        ):
            return None
        return add

    def _weighted_by_own_weight(
        self, node: fx.Node, product: fx.Node, scaled: fx.Node | None, space: _Space
    ) -> str | None:
        """The module owning the one 1-d weight of ``space.size`` entries that ``scaled`` (a product,
        or ``torch.addcmul``'s product term) multiplies the normalised ``product`` by, lined up with
        the unit axis (the weight itself on the last axis, or a view of it with every other axis of
        size 1), when ``node`` is computed inside that module; else None."""
        if _is_op(scaled, (torch.addcmul,), "addcmul"):
            factors = list(scaled.args[1:3])
        elif _is_op(scaled, _MULTIPLY, "mul"):
            factors = list(scaled.args)
        else:
            return None
        if sum(1 for f in factors if f is product) != 1:
            return None  # the weight must scale the normalised tensor itself
        (factor,) = [f for f in factors if f is not product] or [None]
        weight = factor
        while _is_op(weight, (), "view") or _is_op(weight, (), "reshape"):
            weight = weight.args[0]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or self._shape(weight) != (space.size,):
            return None
        shape = self._shape(factor)
        if shape is None or len(shape) > space.ndim:
            return None
        offset = space.ndim - len(shape)
        if any(size != (space.size if offset + i == space.axis else 1) for i, size in enumerate(shape)):
            return None  # the weight runs along another axis than the units
        owner, _, _attribute = str(weight.target).rpartition(".")
        caller = self._calling_module(node)
        if caller is not None and caller != owner:
            return None  # the weight of another module: not this norm's
        return owner or "(model)"

    def _dim_wise(self, node: fx.Node, dim: Any) -> None:
        x, space = self._input_space(node)
        if not isinstance(dim, int):
            raise _CannotFollow(f"cannot read the dim of {self._label(node)}")
        if dim % space.ndim == space.axis:
            raise _CannotFollow(f"{self._label(node)} mixes the units (dim={dim} is the unit axis)")
        self._link_same(space, self._alloc(node, space.axis))

    def _spatial(self, node: fx.Node, spatial_dims: Optional[int] = None) -> None:
        x, space = self._input_space(node)
        out_shape = self._tensor_shape(node)
        if spatial_dims is None and node.target is F.pad:
            pad = self._dim_arg(node, 1, "pad")
            if not isinstance(pad, (list, tuple)):
                raise _CannotFollow(f"cannot read the padding of {self._label(node)}")
            # pairs from the last dim backwards: the unit axis may be among them, padded by (0, 0)
            pair = 2 * (space.ndim - 1 - space.axis)
            if pair + 1 < len(pad):
                full = _slot_ids(space.shape, space.axis, np.arange(space.size))
                before, after = self._evaluate_value([pad[pair], pad[pair + 1]], {x: full})
                if before != 0 or after != 0:
                    raise _CannotFollow(f"{self._label(node)} pads the unit axis {space.axis}")
            spatial_dims = 0
        if spatial_dims is None:
            name = getattr(node.target, "__name__", "")
            spatial_dims = int(name[-2]) if name[-2:-1].isdigit() and name.endswith("d") else space.ndim - 2
        if (
            space.axis >= space.ndim - spatial_dims
            or len(out_shape) != space.ndim
            or out_shape[space.axis] != space.size
        ):
            raise _CannotFollow(f"{self._label(node)} acts on the unit axis {space.axis}")
        self._link_same(space, self._alloc(node, space.axis))

    # -- data movement (followed empirically) -------------------------------------------------

    def _movement(self, node: fx.Node, module: Optional[nn.Module] = None) -> None:
        inputs = [n for n in self._slotted_inputs(node, attrs=True)]
        reference = self._shape_reference(node, inputs)
        if reference is not None:
            inputs = [n for n in inputs if n is not reference]
        if len(inputs) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(inputs)} tensors with units")
        layer = self._weight_of_layer(inputs[0])
        if layer is not None:
            # a conv/linear weight has units on two axes, a slot space on one: any axis chosen here
            # would be a guess (a kernel axis), so its computation cannot be followed
            raise _CannotFollow(
                f"{self._label(node)} computes with '{inputs[0].target}', the weight of a layer (units on more "
                f"than one axis), outside the layer's own call (a weight standardisation or reparametrisation "
                f"in {type(layer).__name__}.forward); register {type(layer).__name__} as a leaf module with a "
                f"slicing rule that slices all of its parameters"
            )
        self._follow_movement(node, inputs[0], reference, module)

    def _weight_of_layer(self, x: fx.Node) -> Optional[nn.Module]:
        """The layer (a module with a slicing rule) whose own parameter of 2 or more dims ``x`` reads."""
        if x.op != "get_attr" or len(self._shape(x) or ()) < 2:
            return None
        owner = self._modules.get(str(x.target).rpartition(".")[0])
        return owner if owner is not None and get_slicing_rule(owner) is not None else None

    def _follow_movement(
        self, node: fx.Node, x: fx.Node, reference: Optional[fx.Node], module: Optional[nn.Module]
    ) -> None:
        space = self._space_of(x)
        if space is None:
            raise _CannotFollow(f"{self._label(node)}: input without units")
        out_shape = self._shape(node)
        full = _slot_ids(space.shape, space.axis, np.arange(space.size))
        try:
            y = self._evaluate(node, {x: full}, module)
        except _CannotFollow:
            raise
        except Exception as exc:
            raise _CannotFollow(
                f"cannot follow the units through {self._label(node)} ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(y, torch.Tensor) or out_shape is None or tuple(y.shape) != out_shape:
            raise _CannotFollow(f"cannot follow the units through {self._label(node)}")
        unit_line = _unit_line(y)
        if unit_line is None:
            if self._split_heads(node, x, space, y, module):
                return
            raise _CannotFollow(
                f"{self._label(node)} spreads the units over several axes (a channel shuffle, or a split into "
                f"heads whose sizes are literals in the code); it cannot be pruned"
            )
        out_axis, line = unit_line
        present = set(np.unique(line).tolist())
        reference_space = None
        if reference is not None:
            reference_space = self._space_of(reference, axis=out_axis)
            if (
                present != set(range(space.size))
                or reference_space is None
                or reference_space.axis != out_axis
                or reference_space.size != len(line)
            ):
                raise _CannotFollow(
                    f"{self._label(node)} takes its shape from {self._label(reference)}, whose units do not "
                    f"line up with the units of its result (axis {out_axis})"
                )
        if present != set(range(space.size)):
            self._piece(node, x, space, y, out_axis, line, module)
            return
        sized_by = (
            self._probe_movement(
                node, x, space, y, out_axis, line, module, _probe_removals(space.size), reference=reference
            )
            if space.size >= 2
            else None
        )
        out = self._alloc(node, out_axis)
        self._link(space, line, out, np.arange(out.size))
        if reference_space is not None:
            # the output has the reference's shape: position j of both loses its unit together
            self._link_same(reference_space, out)
        if sized_by is not None:
            sized_by.space = out
            if isinstance(sized_by, _LiteralSize):
                self._literal_sizes.append(sized_by)
            else:
                self._shape_attributes.append(sized_by)

    def _shape_reference(self, node: fx.Node, inputs: list[fx.Node]) -> Optional[fx.Node]:
        """The tensor ``x.view_as(other)`` / ``reshape_as`` / ``expand_as`` reads only for its shape
        (``other``) when it carries units too; None otherwise."""
        if node.op != "call_method" or node.target not in ("view_as", "reshape_as", "expand_as"):
            return None
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if not isinstance(other, fx.Node) or other is node.args[0] or other not in inputs:
            return None
        return other

    def _piece(
        self,
        node: fx.Node,
        x: fx.Node,
        space: _Space,
        y: torch.Tensor,
        out_axis: int,
        line: np.ndarray,
        module: Optional[nn.Module],
    ) -> None:
        """``node`` keeps a part of the unit axis (a piece of ``split``/``chunk``, ``x[:, a:b]``): each
        unit of the piece maps back to its source unit. Two kinds are followed, each checked by
        running the op on slot ids with units removed:

        - *equal pieces* (``chunk(n)``, ``split(x.size(1) // n)``, or ``split(self.width)`` with the
          size read from a module attribute, which the prune then updates): the piece is block
          ``k`` of ``n`` equal blocks and stays so when every block loses the same units. Position
          ``j`` of every block is linked (one unit removes it from every piece, as the dims of
          attention heads), so the pieces stay equal whatever the selection;
        - *fixed positions* (sizes written in the code: ``split(16)``, ``x[:, :16]``): removing units
          after the piece leaves it unchanged; the units up to its end cannot be removed (their
          groups are refused, naming the op), the others are free.
        """
        label = op = self._label(node)
        source = node.args[0] if node.target is operator.getitem else None
        if isinstance(source, fx.Node) and self._shape(source) is None:  # an item of split/chunk's tuple
            op = self._label(source)
            label = f"item {node.args[1]!r} of {op}"
        size = space.size

        def result_without(removed: np.ndarray) -> torch.Tensor | None:
            keep = np.setdiff1d(np.arange(size), removed)
            try:
                value = self._evaluate(node, {x: _slot_ids(space.shape, space.axis, keep)}, module)
            except Exception:  # noqa: BLE001 - the model's own code fails on the smaller tensor
                return None
            return value if isinstance(value, torch.Tensor) else None

        def equals(value: torch.Tensor | None, removed: np.ndarray) -> bool:
            return _is_kept_part(value, y, out_axis, np.nonzero(~np.isin(line, removed))[0])

        length, first = len(line), int(line[0])
        contiguous = bool(np.array_equal(line, np.arange(first, first + length)))
        blocks = size // length if contiguous and size % length == 0 and first % length == 0 else 0
        sized_by = (
            self._split_size_attribute(source, length, blocks) if blocks >= 2 and isinstance(source, fx.Node) else None
        )
        literal = (
            self._exported_split_size(source, length)
            if blocks >= 2 and sized_by is None and isinstance(source, fx.Node)
            else None
        )
        if blocks >= 2 and (
            sized_by is not None
            or literal is not None
            or all(
                equals(result_without(np.arange(blocks) * length + r), np.arange(blocks) * length + r)
                for r in sorted({0, length // 2, length - 1})
            )
        ):
            out = self._alloc(node, out_axis)
            self._link(space, line, out, np.arange(out.size))
            if space not in self._equal_pieces:
                self._equal_pieces.append(space)
                slots = np.arange(size)
                self._link(space, slots, space, slots % length)  # position j of every piece goes together
            if sized_by is not None:
                owner, owner_name, attribute, total = sized_by
                # the attribute is one piece's length, or the whole width that the code divides
                self._shape_attributes.append(
                    _ShapeAttribute(space if total else out, owner, owner_name, attribute, None)
                )
            if literal is not None:
                literal.space = out
                self._literal_sizes.append(literal)
            return
        end = int(line.max())
        if contiguous and self._bounded_piece(node, x, space, out_axis, line, first, end):
            return
        free = np.arange(end + 1, size)
        probes = [free[[0]], free[[-1]], free[[len(free) // 2]]] if len(free) else []
        results = [result_without(p) for p in probes]
        if any(r is None or r.shape != y.shape or not torch.equal(r, y) for r in results):
            raise _CannotFollow(
                f"{label} selects units of the unit axis that do not follow once units are "
                f"removed (hard-coded indexing)"
            )
        out = self._alloc(node, out_axis)
        self._link(space, line, out, np.arange(out.size))
        self._pin(
            space,
            np.arange(end + 1),
            f"{label} takes units {first}..{end} of {size} at positions written in the code (a split or "
            f"slice with literal sizes): removing any unit up to {end} would shift it; compute the sizes "
            f"from the tensor (x.size(1) // 2, chunk) to prune them",
        )

    def _bounded_piece(
        self, node: fx.Node, x: fx.Node, space: _Space, out_axis: int, line: np.ndarray, first: int, end: int
    ) -> bool:
        """``x[:, :self.a]`` and ``x[:, self.a:]`` (DPN, ReXNet): the boundary is an int attribute of
        the calling module (checked by tracing it again with the attribute changed), which the
        prune sets to the number of units kept before it. The prefix piece records the attribute;
        every prefix read with the same attribute loses the same units (their positions are linked:
        one attribute holds their common length). A suffix piece follows once its source's prefix
        piece was seen (else the units before it are pinned, as for a literal). False when
        ``node`` is no such piece."""
        size = space.size
        prefix = first == 0 and end + 1 < size
        suffix = first > 0 and end == size - 1
        if node.target is not operator.getitem or not (prefix or suffix):
            return False
        called = self._calling_owner(node)
        if called is None:
            return False
        owner, owner_name = called
        boundary = end + 1 if prefix else first
        found = [
            attr
            for attr in _int_attributes(owner, boundary)
            if _slices_at_attribute(owner, attr, "stop" if prefix else "start")
        ]
        if len(found) != 1:
            return False
        key = (id(owner), found[0])
        prefixes = self._bounded_prefixes.setdefault(key, {})
        if suffix and id(space) not in prefixes:
            return False  # nothing records the attribute for this source's units before the boundary
        out = self._alloc(node, out_axis)
        self._link(space, line, out, np.arange(out.size))
        if prefix:
            anchor = next(iter(prefixes.values()), None)
            prefixes.setdefault(id(space), out)
            if anchor is None:
                self._shape_attributes.append(_ShapeAttribute(out, owner, owner_name or "(model)", found[0], None))
            elif anchor.size == out.size:
                self._link_same(anchor, out)
            else:
                raise _CannotFollow(f"{self._label(node)} and another slice read '{found[0]}' for different sizes")
        return True

    def _exported_split_size(self, source: fx.Node | None, length: int) -> _LiteralSize | None:
        """In a graph captured with torch.export, ``split(64)`` whose size the code may read from an
        int attribute of the calling module (GPT-2's ``split(self.split_size, dim=2)``): the pieces
        are taken as equal, and the attribute (among those equal to ``length``) is found by
        capturing the model again with it changed (:class:`_LiteralSize`); None otherwise."""
        if source is None or self.graph.export_inputs is None:  # exported, or fx on a wrapped forward
            return None
        called = self._split_in_module(source, length)
        if called is None:
            return None
        owner, owner_name = called
        attributes = tuple(_int_attributes(owner, length))
        if not attributes:
            return None
        # tried in this order by the check (each try is a capture): names that say "split" first
        attributes = tuple(sorted(attributes, key=lambda attr: "split" not in attr))
        existing = next((r for r in self._literal_sizes if r.node is source), None)
        if existing is not None:  # another piece of the same split: one record, one attribute
            return _LiteralSize(source, None, length, None, owner, owner_name or "(model)", existing.attributes)
        return _LiteralSize(source, None, length, None, owner, owner_name or "(model)", attributes)

    def _split_in_module(self, source: fx.Node, length: int) -> tuple[nn.Module, str] | None:
        """``(module, name)`` of the module whose code calls ``source`` when ``source`` is
        ``split(size)`` with ``size == length`` given as an int; None otherwise."""
        is_split = (source.op == "call_function" and source.target is torch.split) or (
            source.op == "call_method" and source.target == "split"
        )
        size = self._dim_arg(source, 1, "split_size_or_sections" if source.op == "call_function" else "split_size")
        if not is_split or type(size) is not int or size != length:
            return None
        return self._calling_owner(source)

    def _split_size_attribute(
        self, source: fx.Node, length: int, blocks: int
    ) -> tuple[nn.Module, str, str, bool] | None:
        """``(module, name, attribute, whole)`` when ``source`` is ``split(size)`` with ``size`` read
        from an int attribute of the module that calls it: the piece's length
        (``torch.split(x, self.width, 1)``; ``whole`` False) or the whole width divided by the
        number of pieces (CSPNet's ``x.split(self.expand_chs // 2)``; ``whole`` True). Checked by
        tracing the module again with the attribute changed; None otherwise."""
        called = self._split_in_module(source, length)
        if called is None:
            return None
        owner, owner_name = called
        function: Callable[..., Any] | str = torch.split if source.op == "call_function" else "split"
        keyword = "split_size_or_sections" if source.op == "call_function" else "split_size"
        whole = length * blocks
        found = [
            (attr, False)
            for attr in _int_attributes(owner, length)
            if _reads_attribute(owner, attr, function, 1, keyword)
        ]
        found += [
            (attr, True)
            for attr in _int_attributes(owner, whole)
            if _reads_attribute(
                owner,
                attr,
                function,
                1,
                keyword,
                literal=length,
                sentinel=whole + blocks * 7919,
                expected=length + 7919,
            )
        ]
        if len(found) != 1:
            return None
        return owner, owner_name or "(model)", found[0][0], found[0][1]
