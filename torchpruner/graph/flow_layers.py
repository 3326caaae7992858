"""The dependency analysis, layers: which parameters of a layer lose which units (part of
:mod:`torchpruner.graph.dependency`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from torchpruner._ops import (
    DIM_WISE_MODULES,
    FUNCTIONAL_LAYERS,
    MOVEMENT_MODULES,
    PASS_THROUGH_MODULES,
    SPATIAL_MODULES,
)
from torchpruner._state import preserved_state
from torchpruner.rules import get_slicing_rule

from .flow_ops import TensorOpFlow
from .slots import _layer_norm_reads, _reads_attribute, _reads_attribute_running, _same_shape_value, _slot_ids
from .spaces import _CannotFollow, _Role, _ShapeAttribute, _Space, _flatten_nodes, _is_torchvision
from .trace import CallSite


class LayerFlow(TensorOpFlow):
    """How layers own units: modules with a slicing rule (their ``out``/``in`` roles), functional
    calls standing for a module's own layer, convolutions (grouped, depthwise), normalisation
    layers, ``nn.MultiheadAttention``, and bare parameters read through ``get_attr``."""

    def _functional_norm(self, node: fx.Node) -> None:
        """F.layer_norm / group_norm / batch_norm / instance_norm with parameters read as attrs."""
        x, space = self._input_space(node)
        target = node.target
        shape_nodes: set[fx.Node] = set()
        if target is F.layer_norm:
            normalized = self._dim_arg(node, 1, "normalized_shape")
            shape_nodes = set(_flatten_nodes(normalized))
            full = _slot_ids(space.shape, space.axis, np.arange(space.size))
            value = self._evaluate_value(normalized, {x: full}) if shape_nodes else normalized
            dims = 1 if isinstance(value, int) else len(value)
            if space.axis < space.ndim - dims:
                self._link_same(space, self._alloc(node, space.axis))
                return
            if space.axis != space.ndim - 1:
                raise _CannotFollow(f"{self._label(node)} normalises units on a non-last axis")
        elif target is F.group_norm:
            raise _CannotFollow(f"functional group_norm at {self._label(node)} is not supported; use nn.GroupNorm")
        elif space.axis != 1:
            raise _CannotFollow(f"{self._label(node)} normalises channels on axis 1, the units are on {space.axis}")
        out = self._alloc(node, space.axis)
        self._link_same(space, out)
        if target is F.layer_norm:
            self._layer_norm_shape(node, x, space, normalized)
        for arg in node.all_input_nodes:
            if arg is x or arg in shape_nodes:
                continue
            if arg.op != "get_attr":
                raise _CannotFollow(f"{self._label(node)} reads a computed weight ({self._label(arg)})")
            param = self._space_of(arg, axis=0)
            if param is None or param.ndim != 1 or param.size != space.size:
                raise _CannotFollow(f"{self._label(node)} reads a parameter of unexpected shape")
            self._link_same(param, out)

    def _layer_norm_shape(self, node: fx.Node, x: fx.Node, space: _Space, normalized: Any) -> None:
        """``F.layer_norm`` normalises the units: the ``normalized_shape`` it reads must lose them too.

        Computed in the forward from the input (``x.shape[-1:]``): it follows by itself (checked).
        A constant: fx wrote the value of the module attribute into the graph, so the attribute of
        the calling module holding that value is updated by the prune (an ``nn.LayerNorm``
        subclass: by its rule); a literal in the code cannot be updated and is refused.
        """
        label = self._label(node)
        if _flatten_nodes(normalized):
            small = _slot_ids(space.shape, space.axis, np.arange(space.size - 1))
            try:
                after = self._evaluate_value(normalized, {x: small})
            except Exception as exc:  # noqa: BLE001 - any error of the model's own shape code
                raise _CannotFollow(
                    f"{label}: its normalized_shape cannot be recomputed once units are removed "
                    f"({type(exc).__name__}: {str(exc)[:120]})"
                ) from None
            after = [after] if isinstance(after, int) else list(after)
            if not after or after[-1] != space.size - 1:
                raise _CannotFollow(
                    f"{label} computes a normalized_shape that does not follow its input once units are removed"
                )
            return
        called = self._calling_owner(node)
        shown = normalized if isinstance(normalized, int) else tuple(normalized)
        if called is None:
            raise _CannotFollow(
                f"{label} reads normalized_shape {shown} as a constant of no known module; "
                f"use nn.LayerNorm or keep the shape in a module attribute"
            )
        owner, owner_name = called
        rule = get_slicing_rule(owner)
        if (
            rule is not None
            and rule.passes_units_through
            and _same_shape_value(getattr(owner, "normalized_shape", None), normalized)
        ):
            self._add_role(space, "in", owner, owner_name)  # an nn.LayerNorm subclass: its rule updates it
            return
        candidates = [
            attr
            for attr, value in vars(owner).items()
            if not attr.startswith("_") and _same_shape_value(value, normalized)
        ]
        if "normalized_shape" in candidates:
            candidates = ["normalized_shape"]
        if len(candidates) == 1 and not _layer_norm_reads(owner, candidates[0], normalized):
            candidates = []  # the value is also written as a literal in the code
        if len(candidates) != 1:
            found = "no attribute" if not candidates else f"several attributes ({', '.join(candidates)})"
            raise _CannotFollow(
                f"{label} reads normalized_shape {shown} as a constant, and '{owner_name}' "
                f"({type(owner).__name__}) has {found} holding it, so a prune cannot update "
                f"it; keep it in one module attribute (self.normalized_shape) or use nn.LayerNorm"
            )
        index = None if isinstance(normalized, int) else len(normalized) - 1
        self._shape_attributes.append(_ShapeAttribute(space, owner, owner_name or "(model)", candidates[0], index))

    # -- modules ----------------------------------------------------------------------------

    def _visit_layer_call(self, node: fx.Node, site: CallSite) -> None:
        """A functional call that stands for its layer (``F.linear`` on ``self.weight`` inside an
        ``nn.Linear`` subclass that fx traces into): followed as a call of that layer, whose rule
        slices all of its tensors once. The settings the call reads as constants and a prune
        changes (``groups`` of a grouped convolution, ``num_groups``, ``normalized_shape``) must
        come from the layer's attributes, not from literals in its code."""
        module = site.module
        assert module is not None  # the analysis calls this only for a call site with its layer
        _, _, settings = FUNCTIONAL_LAYERS[node.target]
        for position, keyword, attribute in settings:
            value = getattr(module, attribute)
            if attribute in ("groups", "num_groups") and value == 1:
                continue  # a prune never changes a single group
            if not _reads_attribute(module, attribute, node.target, position, keyword) and not (
                self._runs_with_attribute(module, attribute, node.target, position, keyword)
            ):
                raise _CannotFollow(
                    f"{self._label(node)} passes {keyword}={value!r} as a constant that does not "
                    f"come from '{site.module_name}.{attribute}', so a prune cannot update it; read "
                    f"it from self.{attribute} in the forward"
                )
        data = [n for n in self._slotted_inputs(node) if n.op != "get_attr"]
        self._visit_module(node, module, data)

    def _runs_with_attribute(
        self, module: nn.Module, attribute: str, function: Any, position: int, keyword: str
    ) -> bool:
        """Where fx cannot trace ``module`` alone, whether running it (on the inputs it gets from
        the example inputs of an exported graph) passes ``module.<attribute>`` to ``function``."""
        if self.graph.export_inputs is None:
            return False
        args, kwargs = self.graph.export_inputs
        with preserved_state(self.model):  # as the capture ran it: eval mode, buffers and RNG kept
            return _reads_attribute_running(
                module, attribute, function, position, keyword, lambda: self.model(*args, **kwargs)
            )

    def _visit_module(self, node: fx.Node, module: nn.Module, slotted: list[fx.Node]) -> None:
        name = self._site_by_node[node].module_name or str(node.target)
        shape = self._shape(node)
        if isinstance(module, nn.MultiheadAttention):
            return  # handled at its getitem (the module returns a tuple)
        data = [n for n in slotted if n.op != "get_attr"]
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            if shape is not None:
                self._add_role(self._alloc(node, len(shape) - 1), "out", module, name)
            return
        if isinstance(module, MOVEMENT_MODULES) or _is_torchvision(module, "Permute"):
            if data:
                self._movement(node, module)
            return
        if not data:
            if shape is not None:
                site = self._site_by_node[node]
                if site.unit_axis is not None:
                    space = self._alloc(node, site.unit_axis)
                    self._block(space, f"{self._label(node)} produces units from no input units")
            return
        if len(data) != 1:
            raise _CannotFollow(f"{self._label(node)} reads {len(data)} tensors with units")
        x = data[0]
        space = self._spaces[x]
        if shape is None:
            raise _CannotFollow(f"{self._label(node)} does not return a single tensor")
        rule = get_slicing_rule(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            self._conv(node, module, name, space)
        elif isinstance(module, nn.Linear) or (
            rule is not None
            and getattr(rule, "input_unit_axis", None) == -1
            and not getattr(rule, "passes_units_through", False)
        ):
            if space.axis != space.ndim - 1:
                # the layer maps the last axis; units on another axis (MLP-Mixer's token mixing on
                # [N, C, L]) pass through it unit by unit, and its own features are not units here
                # (after an op that could not be followed the axis is a guess: then it only blocks, so
                # the refusal stays in its group)
                if (
                    x.op != "placeholder"
                    and id(space) not in self._blocked
                    and id(space) not in self._guessed
                    and len(shape) == space.ndim
                    and shape[space.axis] == space.size
                ):
                    self._link_same(space, self._alloc(node, space.axis))
                    return
                if x.op != "placeholder":
                    self._block(
                        space,
                        f"{self._label(node)} reads its input units on the last axis but the "
                        f"units are on axis {space.axis} of a {space.ndim}-d tensor",
                    )
            else:
                self._add_role(space, "in", module, name)
            self._add_role(self._alloc(node, len(shape) - 1), "out", module, name)
        elif isinstance(module, nn.GroupNorm):
            self._require_axis(node, space, 1)
            out = self._alloc(node, 1)
            self._link_same(space, out)
            per = module.num_channels // module.num_groups
            slots = np.arange(space.size)
            self._link(space, slots, space, slots - slots % per)  # whole groups only
            self._add_role(space, "in", module, name)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            dims = len(module.normalized_shape)
            out = self._alloc(node, space.axis)
            self._link_same(space, out)
            if space.axis >= space.ndim - dims:
                self._add_role(space, "in", module, name)  # also updates normalized_shape
        elif isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, nn.PReLU):
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                self._link_same(space, self._alloc(node, space.axis))
                return
            self._require_axis(node, space, 1)
            self._link_same(space, self._alloc(node, 1))
            self._add_role(space, "in", module, name)
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            self._link_same(space, self._alloc(node, space.axis))
            # p follows the pruner's dropout_policy when every call site loses the same fraction
            self._add_role(space, "in", module, name, per_call=True)
        elif isinstance(module, PASS_THROUGH_MODULES) or _is_torchvision(module, "StochasticDepth"):
            self._link_same(space, self._alloc(node, space.axis))
        elif isinstance(module, DIM_WISE_MODULES):
            if module.dim is None or module.dim % space.ndim == space.axis:
                raise _CannotFollow(f"{self._label(node)} mixes the units along their axis")
            self._link_same(space, self._alloc(node, space.axis))
        elif isinstance(module, SPATIAL_MODULES):
            spatial = space.ndim - 2
            for digit in "123":
                if type(module).__name__.endswith(f"{digit}d"):
                    spatial = int(digit)
            if space.axis >= space.ndim - spatial or shape[space.axis] != space.size:
                raise _CannotFollow(f"{self._label(node)} acts on the unit axis {space.axis}")
            self._link_same(space, self._alloc(node, space.axis))
        elif rule is not None and getattr(rule, "passes_units_through", False):
            axis = getattr(rule, "input_unit_axis", None)
            if axis is not None and axis % space.ndim != space.axis:
                raise _CannotFollow(f"{self._label(node)} reads units on axis {axis}, they are on {space.axis}")
            self._link_same(space, self._alloc(node, space.axis))
            if getattr(rule, "has_unit_state", True):
                self._add_role(space, "in", module, name)
        elif rule is not None and rule.out_units(module) is not None:
            axis = getattr(rule, "input_unit_axis", None)
            if rule.in_units(module) is None or axis is None or axis % space.ndim != space.axis:
                raise _CannotFollow(f"{self._label(node)}: its rule does not say where it reads its units")
            self._add_role(space, "in", module, name)
            self._add_role(self._alloc(node, axis % len(shape)), "out", module, name)
        else:
            raise _CannotFollow(
                f"cannot follow the units through {self._label(node)}: no slicing rule for "
                f"{type(module).__name__} (register one with torchpruner.register_slicing_rule)"
            )

    def _require_axis(self, node: fx.Node, space: _Space, axis: int) -> None:
        if space.axis != axis:
            raise _CannotFollow(f"{self._label(node)} reads units on axis {axis}; they are on axis {space.axis}")

    def _conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, name: str, space: _Space) -> None:
        groups, cin, cout = module.groups, module.in_channels, module.out_channels
        if space.axis != 1 and groups == 1:
            # the input cannot lose units here; the output channels are the layer's own and stay prunable
            self._block(space, f"{self._label(node)} reads units on axis 1; they are on axis {space.axis}")
            self._add_role(self._alloc(node, 1), "out", module, name)
            return
        self._require_axis(node, space, 1)
        out = self._alloc(node, 1)
        if groups == 1:
            self._add_role(space, "in", module, name)
            self._add_role(out, "out", module, name)
        elif groups == cin:
            # depthwise: channel c -> output channels c*m .. c*m+m-1; pruned through its input
            mult = cout // cin
            self._link(space, np.repeat(np.arange(cin), mult), out, np.arange(cout))
            self._add_role(space, "in", module, name)
        else:
            # grouped: any positions, but the same *count* in every conv group (the weight stays a
            # valid grouped weight); nothing is linked, the count is a constraint on the selection
            self._count_constraints += [(space, groups), (out, groups)]
            self._add_role(space, "in", module, name)
            self._add_role(out, "out", module, name)

    def _visit_module_item(self, node: fx.Node) -> None:
        """``getitem`` on a module returning a tuple: ``nn.MultiheadAttention``'s output."""
        source = node.args[0]
        # the analysis calls this only for a getitem on a call_module node (its target: the module's path)
        assert isinstance(source, fx.Node) and isinstance(source.target, str)
        path = source.target
        module = self._traced_modules[path]
        name = self._site_by_node[source].module_name or path
        if isinstance(module, nn.MultiheadAttention) and node.args[1] == 0:
            self._attention(source, node, module, name)
            return
        if isinstance(module, nn.MultiheadAttention):
            return  # attention weights: no units of their own
        raise _CannotFollow(f"cannot follow the units through {self._label(source)}: it returns a tuple")

    def _attention(self, source: fx.Node, node: fx.Node, module: nn.MultiheadAttention, name: str) -> None:
        query = source.kwargs.get("query", source.args[0] if source.args else None)
        key = source.kwargs.get("key", source.args[1] if len(source.args) > 1 else None)
        value = source.kwargs.get("value", source.args[2] if len(source.args) > 2 else None)
        label = self._label(source)
        space = self._spaces.get(query) if isinstance(query, fx.Node) else None
        if space is None:
            raise _CannotFollow(f"{label}: query without units")
        if not (query is key is value) or not module._qkv_same_embed_dim:
            raise _CannotFollow(f"{label}: only self-attention (query is key is value) can be pruned")
        if space.axis != space.ndim - 1:
            raise _CannotFollow(f"{label}: units must be on the last axis")
        out_shape = self._shape(node)
        assert out_shape is not None  # the analysis visits a getitem only when it returns a tensor
        out = self._alloc(node, len(out_shape) - 1)
        self._link_same(space, out)
        head_dim = module.embed_dim // module.num_heads
        slots = np.arange(space.size)
        self._link(space, slots, space, slots % head_dim)  # embed dim i is head dim i % head_dim: all heads alike
        self._add_role(space, "in", module, name)

    def _add_role(self, space: _Space, direction: str, module: nn.Module, name: str, per_call: bool = False) -> None:
        if per_call:
            # nothing is shared between the calls of a parameter-free module: each is its own op
            self._roles.append(_Role(space=space, direction=direction, module=module, module_name=name, per_call=True))
            return
        first = self._first_role_space.setdefault((id(module), direction), space)
        if first is not space:
            # a module called several times shares its weights: each call loses the same units
            if first.size != space.size:
                raise _CannotFollow(f"module '{name}' is called with different unit counts")
            self._link_same(first, space)
            return
        self._roles.append(_Role(space=space, direction=direction, module=module, module_name=name))

    def _passes_through(self, role: _Role) -> bool:
        module = role.module
        if role.direction != "in":
            return False
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.groups == module.in_channels and module.groups > 1
        if isinstance(module, nn.MultiheadAttention):
            return True
        rule = get_slicing_rule(module)
        return bool(getattr(rule, "passes_units_through", False))

    def _attr_role(self, space: _Space) -> None:
        path = space.node.target
        assert isinstance(path, str)  # called for get_attr nodes: the target is the tensor's path
        owner_path, _, attr = path.rpartition(".")
        owner = self._modules.get(owner_path)
        if owner is None:
            self._block(space, f"cannot find the owner of the parameter '{path}'")
            return
        rule = get_slicing_rule(owner)
        sliced_by_rule = rule is not None and attr in (rule.tensors or ("weight", "bias"))
        if sliced_by_rule and any((id(owner), d) in self._first_role_space for d in ("in", "out")):
            # the layer's rule slices this tensor with the layer's units: a second, bare use of it
            # (a tied weight, a scale read by another op) cannot be kept consistent with that slice
            users = ", ".join(self._label(u) for u in space.node.users)
            self._block(
                space,
                f"'{path}' is read outside the call of its layer '{owner_path}' "
                f"({type(owner).__name__}) by {users}; pruning the layer would slice it for both",
            )
            return
        if sliced_by_rule and getattr(rule, "passes_units_through", False):
            role = _Role(space=space, direction="in", module=owner, module_name=owner_path)
        else:
            role = _Role(
                space=space,
                direction="param",
                module=owner,
                module_name=owner_path or "(model)",
                parameter=attr,
                axis=space.axis,
            )
        self._roles.append(role)
