"""The dependency analysis, attention heads: reshapes that split the unit axis into (heads,
head_dim), batched matrix products and ``F.scaled_dot_product_attention`` (part of
:mod:`torchpruner.graph.dependency`).

Model
-----
A reshape that splits the units of a projection into several axes (``[B, N, C] -> [B, N, H, D]``,
timm's ``[B, N, 3, H, D]``) makes one *head* the unit: the new tensor's unit axis is the outermost
split axis whose size the code can change (``-1``, a size computed from the tensor, or a module
attribute such as ``self.num_heads``, updated by the prune), and each of its positions is linked to
every channel of the source that lands in it (the ``D`` dims of a head, for q, k and v alike). The
other split axes (``3``, ``head_dim``) keep their size. When the outermost changeable axis is
``head_dim`` (the head count is a literal), dim ``d`` of every head is the unit instead; a product
that contracts it (``q @ k^T``) is then refused, so only whole heads are pruned through attention.

Batched matrix products (``q @ k.transpose(-2, -1)``, ``attn @ v``, ``torch.matmul``/``bmm``) link
the batch axes of their operands with the output's (and a row or column axis with the output's);
units on a contracted axis are refused. ``F.scaled_dot_product_attention`` links the head axes
of q, k, v and its output; with ``enable_gqa=True`` query head ``j`` reads KV head ``j // (Hq / Hkv)``,
so a KV head and its group of query heads go together (as HF's ``repeat_kv`` expand + reshape gives).
Merging the heads back (``transpose(1, 2).reshape(B, N, C)``) is an ordinary movement op.

Every rule is checked on tensors of slot ids with units removed, as reshapes are; a size written as
a literal that a prune would change refuses the group, naming the op. In a graph captured with
torch.export every size is a literal (``repeat_kv``'s ``expand(B, 2, 2, L, D)``): one that holds the
unit count is followed, and the groups it carries are checked by capturing the model again with a
unit removed (:mod:`~torchpruner.graph.recapture`), refused when it does not follow them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .slots import SlotFlow, _is_kept_part, _slot_ids, _traced_with
from .spaces import _CannotFollow, _LiteralSize, _ShapeAttribute, _Space

_RESHAPE_METHODS = ("reshape", "view")
#: methods whose target shape is read like a reshape's (``x.expand(B, H, n_rep, L, D)``)
_SHAPED_METHODS = _RESHAPE_METHODS + ("expand",)

#: where a size that a prune changes comes from: a module attribute ``(module, name, attribute)``,
#: a literal of an exported graph to check by capturing again, or None (computed, or ``-1``)
#: where a reshape's literal size comes from: ``(module, name, attribute, index in a tuple attribute
#: or None)``, a literal of an exported graph, or nothing
SizeSource = tuple[nn.Module, str, str, int | None] | _LiteralSize | None


class HeadFlow(SlotFlow):
    """Attention heads: the split of a projection's units into heads, batched matrix products and
    ``F.scaled_dot_product_attention``."""

    # -- shape arguments ------------------------------------------------------------------

    def _shape_list(self, node: fx.Node) -> tuple[list[Any], int, bool] | None:
        """The target shape of a reshape/view/expand ``node`` as a list, where it sits in
        ``node.args`` (start index) and whether it is one tuple argument; None for any other op."""
        is_reshape = (node.op == "call_method" and node.target in _SHAPED_METHODS) or (
            node.op == "call_function" and node.target is torch.reshape
        )
        if not is_reshape:
            return None
        if "shape" in node.kwargs or "size" in node.kwargs:
            return None
        if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
            return list(node.args[1]), 1, True
        return list(node.args[1:]), 1, False

    def _with_shape(self, node: fx.Node, position: int, value: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``node``'s (args, kwargs) with entry ``position`` of its target shape replaced."""
        found = self._shape_list(node)
        assert found is not None, "only called on a reshape whose shape entry comes from an attribute"
        shape, start, packed = found
        shape = list(shape)
        shape[position] = value
        args = list(node.args)
        if packed:
            packed_shape = node.args[start]
            assert isinstance(packed_shape, (list, tuple))  # what _shape_list found there
            args[start] = type(packed_shape)(shape)
        else:
            args[start:] = shape
        return tuple(args), dict(node.kwargs)

    def _run_with(
        self, node: fx.Node, env: dict[fx.Node, torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run ``node``'s op on (args, kwargs) with their nodes evaluated against ``env``."""
        args, kwargs = self._evaluate_value((args, kwargs), env)
        target = node.target
        if isinstance(target, str):  # call_method: the name of a tensor method
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def _shape_attribute_at(self, node: fx.Node, position: int) -> tuple[nn.Module, str, str, int | None] | None:
        """``(module, name, attribute, index)`` when entry ``position`` of ``node``'s target shape is
        a literal that fx read from an int attribute of the module whose forward makes the call
        (``self.num_heads``; index None), or from entry ``index`` of a tuple attribute that is the
        whole shape (timm's ``x * self.scale.view(self.shape)``): checked by tracing that module
        again with the attribute changed and finding the change at that entry of the same call."""
        shape = self._shape_list(node)
        if shape is None or not (0 <= position < len(shape[0])):
            return None
        literal = shape[0][position]
        if type(literal) is not int:
            return None
        called = self._calling_owner(node)
        if called is None:
            return None
        owner, owner_name = called
        same = [
            n
            for n in node.graph.nodes
            if n.op == node.op and n.target == node.target and self._calling_module(n) == owner_name
        ]
        if node not in same:
            return None
        order = same.index(node)
        for attribute, value in list(vars(owner).items()):
            if attribute.startswith("_"):
                continue
            index: int | None = None
            if type(value) is int and value == literal:
                sentinel: Any = value + 7919
            elif (
                isinstance(value, (tuple, list, torch.Size))
                and shape[2]
                and len(value) == len(shape[0])
                and all(type(v) is int for v in value)
                and list(value) == shape[0]
            ):
                index = position
                entries = list(value)
                entries[position] += 7919
                sentinel = torch.Size(entries) if isinstance(value, torch.Size) else type(value)(entries)
            else:
                continue
            # traced alone, a forward argument that the call left at None is a traced value, and a
            # branch on it (Swin's `if mask is not None`) adds calls: then traced with it None
            for defaults in (False, True):
                traced = _traced_with(owner, attribute, sentinel, defaults)
                if traced is None:
                    continue
                calls = [
                    n
                    for n in traced.nodes
                    if n.op == node.op and n.target == node.target and not n.meta.get("nn_module_stack")
                ]
                if len(calls) != len(same):
                    continue
                found = self._shape_list(calls[order])
                if found is not None and len(found[0]) == len(shape[0]) and found[0][position] == literal + 7919:
                    return owner, owner_name or "(model)", attribute, index
                break
        return None

    def _sized_result(
        self,
        node: fx.Node,
        env: dict[fx.Node, torch.Tensor],
        axis: int,
        new_size: int,
        module: nn.Module | None,
        sized_by: SizeSource,
    ) -> Any:
        """``node`` run on ``env``; when entry ``axis`` of its target shape comes from a module
        attribute (or is a literal of an exported graph), with that entry set to ``new_size`` (the
        value the prune writes there)."""
        if sized_by is None:
            return self._evaluate(node, env, module)
        return self._run_with(node, env, *self._with_shape(node, axis, new_size))

    def _size_source(self, node: fx.Node, axis: int) -> tuple[bool, SizeSource]:
        """Whether the size of output ``axis`` of reshape ``node`` can change with a prune (``-1``, a
        size computed from a tensor, or a module attribute: then also the attribute). In a graph
        captured with torch.export a size the code computed is a literal: it may change, as a
        :class:`_LiteralSize` that a second capture checks."""
        shape = self._shape_list(node)
        if shape is None:
            return True, None  # not a reshape: the probes decide
        entries = shape[0]
        if len(entries) != len(self._shape(node) or ()):
            return False, None
        entry = entries[axis]
        if isinstance(entry, fx.Node) or (type(entry) is int and entry == -1):
            return True, None
        sized_by = self._shape_attribute_at(node, axis)
        if sized_by is None and type(entry) is int and self.graph.capture == "export":
            return True, _LiteralSize(node, axis, entry)
        return sized_by is not None, sized_by

    # -- movement with shape arguments from attributes --------------------------------------

    def _shape_upstream(self, x: fx.Node, count: int) -> dict[fx.Node, torch.Tensor]:
        """Stand-ins for the tensors upstream of ``x`` along a chain of movement ops (``k`` in
        ``k[:, :, None].expand(b, k.shape[1], ...)``, ``y`` in a channel shuffle's
        ``y.view(n, g, c // g, h, w)...reshape(n, c, h, w)``), with the unit count each has when
        ``x`` keeps ``count`` units (a head of ``x`` holds ``size(upstream) / size(x)`` of their
        units), for sizes the code reads from them."""
        found: dict[fx.Node, torch.Tensor] = {}
        space = self._spaces.get(x)
        node = x
        while space is not None:
            inputs = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
            if len(inputs) != 1 or node.op not in ("call_method", "call_function"):
                break
            upstream = self._spaces.get(inputs[0])
            if upstream is None or upstream.size % space.size:
                break
            count = count * (upstream.size // space.size)
            shape = list(upstream.shape)
            shape[upstream.axis] = count
            found[inputs[0]] = self._stand_in(inputs[0], shape)
            node, space = inputs[0], upstream
        return found

    def _counted_tensors(self, node: fx.Node) -> list[fx.Node]:
        """The tensors other than ``node``'s operands (and what they move from) whose sizes its
        arguments are computed from (``C`` of ``B, N, C = x.shape``)."""
        sources: list[fx.Node] = []
        stack = list(node.all_input_nodes)
        seen: set[fx.Node] = set()
        while stack:
            arg = stack.pop()
            if arg in seen:
                continue
            seen.add(arg)
            if self._shape(arg) is not None:
                continue  # a tensor operand, not shape arithmetic
            if self._is_shape_query(arg) or (arg.op == "call_function" and arg.target is getattr):
                tensor = arg.args[0]
                if isinstance(tensor, fx.Node) and self._shape(tensor) is not None:
                    sources.append(tensor)
                continue
            stack.extend(arg.all_input_nodes)
        operands = {n for n in node.all_input_nodes if self._shape(n) is not None}
        return [
            tensor
            for tensor in dict.fromkeys(sources)
            if tensor not in operands and not self._same_units_upstream(tensor, operands)
        ]

    def _same_units_upstream(self, tensor: fx.Node, operands: set[fx.Node]) -> bool:
        """``tensor`` is upstream of an operand along movement ops with the same unit count."""
        return any(tensor in self._shape_upstream(operand, 1) for operand in operands)

    def _probe_movement(
        self,
        node: fx.Node,
        x: fx.Node,
        space: _Space,
        y: torch.Tensor,
        out_axis: int,
        line: np.ndarray,
        module: nn.Module | None,
        probes: list[np.ndarray],
        reference: fx.Node | None = None,
    ) -> _ShapeAttribute | _LiteralSize | None:
        """Check that ``node`` gives ``y`` with the slots of every probe removed, else raise. When
        the output size along ``out_axis`` is a literal read from a module attribute (timm's
        ``reshape(B, N, self.attn_dim)``), run it with the size the prune writes there and return
        the attribute to update (a literal of an exported graph: the literal to check). A
        ``reference`` (the ``other`` of ``x.reshape_as(other)``) loses the output's units with it."""
        sized_by: SizeSource = None
        # a size read from another tensor with as many units (Swin's window_reverse reads C of the
        # block input): taken to lose them too, which linking the two makes true
        counted = [
            (tensor, other)
            for tensor in self._counted_tensors(node)
            if (other := self._spaces.get(tensor)) is not None and other.size == space.size
        ]
        for attempt in range(2):
            failure = None
            for removed in probes:
                keep = np.setdiff1d(np.arange(space.size), removed)
                env = {x: _slot_ids(space.shape, space.axis, keep), **self._shape_upstream(x, len(keep))}
                kept = np.nonzero(np.isin(line, keep))[0]
                if reference is not None:
                    shape = list(self._shape(reference) or ())
                    shape[out_axis] = len(kept)
                    env[reference] = self._stand_in(reference, shape)
                for tensor, other in counted:
                    if tensor not in env:
                        shape = list(other.shape)
                        shape[other.axis] = len(keep)
                        env[tensor] = self._stand_in(tensor, shape)
                try:
                    y_small = self._sized_result(node, env, out_axis, len(kept), module, sized_by)
                except Exception as exc:  # noqa: BLE001 - the model's own code fails on fewer units
                    failure = (
                        f"hard-coded shape in {self._label(node)}: it fails once units are removed "
                        f"({type(exc).__name__}: {str(exc)[:120]})"
                    )
                    break
                if not _is_kept_part(y_small, y, out_axis, kept):
                    failure = (
                        f"hard-coded shape in {self._label(node)}: its result is wrong once units are "
                        f"removed (e.g. x.view(-1, C*H*W) with a literal size)"
                    )
                    break
            if failure is None:
                if sized_by is None or isinstance(sized_by, _LiteralSize):
                    return sized_by
                return _ShapeAttribute(space, *sized_by)
            if attempt == 0:
                sized_by = self._size_source(node, out_axis)[1]
                if sized_by is not None:
                    continue
            raise _CannotFollow(failure)
        return None

    # -- heads --------------------------------------------------------------------------

    def _split_heads(self, node: fx.Node, x: fx.Node, space: _Space, y: torch.Tensor, module: nn.Module | None) -> bool:
        """``node`` splits the unit axis of ``x`` into several axes (heads): link each position of
        the outermost split axis whose size can change to the source units it holds. False when
        ``y`` (``node`` run on slot ids) is not such a split."""
        if self._shape_list(node) is None or y.dim() == 0:
            return False
        varying = []
        for axis in range(y.dim()):
            first = y.narrow(axis, 0, 1)
            if not torch.equal(y, first.expand_as(y)):
                varying.append(axis)
        if len(varying) < 2:
            return False
        for axis in varying:  # outermost first
            size = y.shape[axis]
            held = [np.unique(y.select(axis, h).numpy()) for h in range(size)]
            if sum(len(h) for h in held) != space.size or len(np.unique(np.concatenate(held))) != space.size:
                continue  # the positions along this axis share source units: not a partition
            changeable, sized_by = self._size_source(node, axis)
            if not changeable:
                continue
            probes = [np.array([0, size // 2]) if size >= 3 else np.array([0])]
            if size >= 4:
                probes.append(np.array([size - 1]))
            ok = True
            for removed in probes:
                keep_heads = np.setdiff1d(np.arange(size), removed)
                keep = np.sort(np.concatenate([held[h] for h in keep_heads]))
                env = {x: _slot_ids(space.shape, space.axis, keep), **self._shape_upstream(x, len(keep))}
                try:
                    y_small = self._sized_result(node, env, axis, len(keep_heads), module, sized_by)
                except Exception:  # noqa: BLE001 - the code fails with fewer heads: a literal size
                    ok = False
                    break
                if not _is_kept_part(y_small, y, axis, keep_heads):
                    ok = False
                    break
            if not ok:
                continue
            out = self._alloc(node, axis)
            for h in range(size):
                self._link(space, held[h], out, np.full(len(held[h]), h))
            if isinstance(sized_by, _LiteralSize):
                sized_by.space = out
                self._literal_sizes.append(sized_by)
            elif sized_by is not None:
                self._shape_attributes.append(_ShapeAttribute(out, *sized_by))
            return True
        return False

    # -- products -------------------------------------------------------------------------

    def _matmul(self, node: fx.Node) -> None:
        """A batched matrix product ``a @ b`` (``[..., n, k] @ [..., k, m]``)."""
        a, b = node.args[0], node.args[1]
        vectors = f"cannot follow the units through {self._label(node)}: it multiplies vectors"
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            raise _CannotFollow(vectors)  # a constant operand: no recorded shape
        out_shape, shape_a, shape_b = self._shape(node), self._shape(a), self._shape(b)
        if out_shape is None or shape_a is None or shape_b is None or len(shape_a) < 2 or len(shape_b) < 2:
            raise _CannotFollow(vectors)
        shapes = [shape_a, shape_b]
        spaces = [self._spaces.get(a), self._spaces.get(b)]
        nd = len(out_shape)
        mapped: list[tuple[_Space, int]] = []  # (operand space, output axis)
        contracted: list[_Space] = []
        for k, (space, shape) in enumerate(zip(spaces, shapes)):
            if space is None:
                continue
            ndim = len(shape)
            if space.axis < ndim - 2:
                mapped.append((space, nd - (ndim - space.axis)))
            elif (k == 0 and space.axis == ndim - 1) or (k == 1 and space.axis == ndim - 2):
                contracted.append(space)
            else:
                mapped.append((space, nd - 2 if k == 0 else nd - 1))
        if contracted:
            # the dims of each head (q @ k^T over head_dim): zeroing them is not a consumer's read,
            # and the attention scale of a fused kernel follows head_dim; only whole heads go through
            raise _CannotFollow(
                f"{self._label(node)} contracts the units (the dims of each head, when the head "
                f"count is a literal in the reshape before it); read the head count from a "
                f"module attribute (self.num_heads) or use -1 so that whole heads are pruned"
            )
        axes = {axis for _, axis in mapped}
        if len(axes) != 1:
            raise _CannotFollow(f"{self._label(node)} puts the units of its operands on different axes")
        axis = axes.pop()
        out = self._alloc(node, axis)
        for space, _ in mapped:
            if space.size != out.size:
                raise _CannotFollow(f"{self._label(node)} broadcasts units against another axis")
            self._link_same(space, out)
        for k, (space, shape) in enumerate(zip(spaces, shapes)):
            position = axis - (nd - len(shape))
            if space is None and 0 <= position < len(shape) - 2 and shape[position] != 1:
                self._block(
                    out,
                    f"{self._label(node)} combines the units with a tensor of fixed size ({self._label((a, b)[k])})",
                )

    def _sdpa(self, node: fx.Node) -> None:
        """``F.scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa)`` on ``[B, H, L, E]``:
        the head axes of q, k, v and the output go together (query head ``j`` with KV head
        ``j // (Hq / Hkv)`` under ``enable_gqa``); the sequence and head-dim axes carry no units."""
        names = ("query", "key", "value", "attn_mask")
        q, k, v, mask = (node.kwargs.get(n, node.args[i] if len(node.args) > i else None) for i, n in enumerate(names))
        label = self._label(node)
        sq, sk, sv = (self._spaces.get(t) if isinstance(t, fx.Node) else None for t in (q, k, v))
        if sq is None or sk is None or sv is None:
            raise _CannotFollow(
                f"{label}: the query, key and value must all carry units on their head axis "
                f"(cross-attention with fixed keys cannot lose heads)"
            )
        for space, what in zip((sq, sk, sv), ("query", "key", "value")):
            if space.ndim < 3 or space.axis != space.ndim - 3:
                raise _CannotFollow(
                    f"{label}: the {what} carries units on axis {space.axis}, not on its head "
                    f"axis {space.ndim - 3} (only whole heads can be pruned through it)"
                )
        out_shape = self._shape(node)
        assert out_shape is not None  # the analysis visits an attention op only when it returns a tensor
        out = self._alloc(node, len(out_shape) - 3)
        self._link_same(sq, out)
        if sk.size != sv.size:
            raise _CannotFollow(f"{label}: the key and value have different head counts")
        if sq.size == sk.size:
            self._link_same(sq, sk)
        elif node.kwargs.get("enable_gqa", False) and sq.size % sk.size == 0:
            group = sq.size // sk.size
            self._link(sq, np.arange(sq.size), sk, np.arange(sq.size) // group)
        else:
            raise _CannotFollow(f"{label}: {sq.size} query heads and {sk.size} key heads without enable_gqa")
        self._link_same(sk, sv)
        if not isinstance(mask, fx.Node):
            return
        ms = self._spaces.get(mask)
        if ms is not None and ms.axis == ms.ndim - 3 and ms.size == sq.size:
            self._link_same(ms, sq)
            return
        if ms is not None:
            # the mask's units (a sequence axis of a mask built from positions, say) are not the
            # heads: whatever group the mask's units belong to is refused
            self._block(ms, f"{label}: the attention mask carries units off the head axis")
        mask_shape = self._shape(mask) or ()
        if len(mask_shape) >= 3 and mask_shape[-3] != 1:
            # a mask with a head axis of its own (T5's position bias, built from an embedding of
            # one column per head): pruning the heads would leave it with every head
            self._block(
                sq,
                f"{label}: the attention mask ({self._label(mask)}) has {mask_shape[-3]} heads that do not "
                f"follow the heads of the query",
            )

    # -- helper functions that fx keeps as calls (timm's maybe_add_mask) ----------------------

    def _returns_none(self, node: fx.Node) -> bool:
        """``node`` (a call that returned no tensor) returns None: no units flow out of it (timm's
        ``resolve_self_attn_mask`` without a mask). Run on stand-ins of its inputs."""
        if node.op != "call_function":
            return False
        try:
            return self._evaluate(node, {}) is None
        except Exception:  # noqa: BLE001 - it cannot run on stand-ins: unknown
            return False

    def _identity_call(self, node: fx.Node) -> bool:
        """An unknown function that returns its one input with units unchanged (timm's
        ``maybe_add_mask(attn, None)``), verified on tensors of slot ids with and without units
        removed: the units pass. False when it is not."""
        inputs = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
        if node.op != "call_function" or len(inputs) != 1:
            return False
        x, space = inputs[0], self._spaces[inputs[0]]
        if self._shape(node) != space.shape:
            return False
        for keep in [np.arange(space.size)] + [
            np.setdiff1d(np.arange(space.size), r) for r in ([0], [space.size - 1]) if space.size >= 2
        ]:
            ids = _slot_ids(space.shape, space.axis, keep)
            try:
                result = self._evaluate(node, {x: ids})
            except Exception:  # noqa: BLE001 - it does not run on slot ids: not an identity
                return False
            if not isinstance(result, torch.Tensor) or result.shape != ids.shape or not torch.equal(result, ids):
                return False
        self._link_same(space, self._alloc(node, space.axis))
        return True
