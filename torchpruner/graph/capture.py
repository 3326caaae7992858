"""Graph capture with ``torch.export`` for models that torch.fx symbolic tracing cannot trace.

torch.fx symbolic tracing runs the forward on proxies, so Python that looks at values (Hugging
Face's keyword handling, ``for x in tensor``, shape-dependent branches) stops it. ``torch.export``
in non-strict mode runs the forward as Python on fake tensors, so that code just runs, and records
every op at the ATen level with, for each op, the stack of modules that made it
(``nn_module_stack``) and, for each parameter and buffer, its state-dict name.

:func:`capture` turns that export into the fx graph the rest of the package reads, the same form
fx symbolic tracing gives:

- rooted at the model: parameters and buffers are ``get_attr`` nodes named by their state-dict
  keys, and the ops of one call of a leaf module (a torch.nn layer, a registered leaf type, a
  module with a slicing rule such as Hugging Face's ``Conv1D``) become one ``call_module`` node of
  that very module object;
- every other ATen op becomes the torch-level function or tensor method it stands for, through
  one table (:data:`ATEN_TO_TORCH`): ``aten.linear`` -> ``F.linear``, ``aten.add.Tensor`` ->
  ``operator.add``, ``aten.view`` -> ``x.view(...)``, ``aten.scaled_dot_product_attention`` ->
  ``F.scaled_dot_product_attention`` ... An op missing from the table stays in the graph as the
  ATen op itself, which the dependency analysis refuses by name (it is never guessed);
- the batch dimension of every tensor input is exported as dynamic where torch.export allows it
  (other dimensions are fixed to the example's), so the graph runs for other batch sizes;
- the output has the model's own structure (a Hugging Face ``ModelOutput``, a tuple, a dict):
  the graph returns the flat tensors and its generated code rebuilds the structure.

Limits: only the model's top-level inputs may be tensors or constants (a nested list/dict of
tensors is refused); non-tensor inputs are fixed to their example values; a dimension other than
the batch keeps its example size (a graph captured on 16 tokens runs on 16 tokens); export costs
seconds where fx costs a fraction of one (see ``benchmarks/zoo_capture.md``).
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

if TYPE_CHECKING:  # the signature of CodeGen.process_inputs (typing_extensions comes with torch)
    from typing_extensions import TypeVarTuple, Unpack

    _Inputs = TypeVarTuple("_Inputs")

from torchpruner._ops import user_leaf_types
from torchpruner._state import preserved_state
from torchpruner.rules import has_own_slicing_rule

logger = logging.getLogger(__name__)

__all__ = ["ATEN_TO_TORCH", "capture", "CaptureError"]

aten = torch.ops.aten


#: positional and keyword arguments of a call, and a mapper from the ATen form to the torch form
_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]
_Mapper = Callable[[_Args, _Kwargs], tuple[_Args, _Kwargs]]


class CaptureError(RuntimeError):
    """torch.export gave a graph that cannot be turned into a model graph (named inputs...)."""


# --------------------------------------------------------------------------------------------
# The table: ATen op -> torch-level call
# --------------------------------------------------------------------------------------------


def _same(*_names: str) -> _Mapper:
    """Arguments passed as they are."""
    return lambda args, kwargs: (args, kwargs)


def _first(count: int) -> _Mapper:
    """Only the first ``count`` positional arguments (drops ATen-only flags such as ``cudnn_enable``)."""
    return lambda args, kwargs: (args[:count], {})


def _spread(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.view(x, [a, b])`` -> ``x.view(a, b)`` (the form fx symbolic tracing records)."""
    return (args[0], *args[1]), {}


def _embedding(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    weight, indices = args[0], args[1]
    padding_idx = args[2] if len(args) > 2 and args[2] != -1 else None
    return (indices, weight), {"padding_idx": padding_idx}


def _batch_norm(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    x, weight, bias, mean, var, training, momentum, eps = args[:8]
    return (x, mean, var, weight, bias, training, momentum, eps), {}


def _slice(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.slice(x, dim, start, end, step)`` -> ``x[:, ..., start:end:step]``."""
    x, dim = args[0], args[1] if len(args) > 1 else 0
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    if isinstance(end, int) and end >= 2**62:
        end = None
    if start == 0:
        start = None
    return (x, _index_at(dim, slice(start, end, None if step == 1 else step))), {}


def _select(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.select(x, dim, i)`` -> ``x[:, ..., i]``."""
    x, dim, index = args
    return (x, _index_at(dim, index)), {}


def _true_division(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.div(x, y)`` -> ``x / y``; a floor or trunc ``rounding_mode`` is not translated."""
    if kwargs.get("rounding_mode") is not None:
        raise _Untranslated(f"div with rounding_mode={kwargs['rounding_mode']!r}")
    return tuple(args[:2]), {}


def _avg_pool2d(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)``."""
    override = args[6] if len(args) > 6 else kwargs.get("divisor_override")
    if override is not None:
        raise _Untranslated(f"avg_pool2d with divisor_override={override!r}")
    return tuple(args[:6]), {}


def _index_at(dim: int, index: Any) -> _Args:
    """The subscript that applies ``index`` at ``dim`` (negative: counted from the end)."""
    if dim >= 0:
        return (slice(None),) * dim + (index,)
    return (Ellipsis, index) + (slice(None),) * (-dim - 1)


def _to(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.to.device(x, device, dtype, non_blocking, copy)`` -> ``x.to(device, dtype)``."""
    kept = {k: v for k, v in kwargs.items() if k in ("dtype", "device")}
    return (args[0], *(a for a in args[1:] if not isinstance(a, bool) and a is not None)), kept


def _copy_to(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    kept = {k: v for k, v in kwargs.items() if k in ("dtype", "device")}
    return (args[0],), kept


def _binary(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    if kwargs.get("alpha", 1) != 1:
        raise _Untranslated
    return args[:2], {}


def _sdpa(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    names = ("attn_mask", "dropout_p", "is_causal")
    extra = {name: value for name, value in zip(names, args[3:])}
    extra.update(
        {k: v for k, v in kwargs.items() if k in ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")}
    )
    if extra.get("attn_mask") is None:
        extra.pop("attn_mask", None)
    return args[:3], extra


def _gelu(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return (args[0],), ({} if approximate == "none" else {"approximate": approximate})


def _pad(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    value = args[2] if len(args) > 2 else kwargs.get("value", 0.0)
    return (args[0], list(args[1])), {"value": value}


def _pad_mode(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    """``aten.pad(x, pad, mode="constant", value=None)`` (what ``F.pad`` exports to)."""
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value")
    extra: dict[str, Any] = {"mode": mode}
    if value is not None:
        extra["value"] = value
    return (args[0], list(args[1])), extra


def _pad_as(mode: str) -> _Mapper:
    """``aten.reflection_pad2d(x, padding)`` and its kin: ``F.pad`` with that mode."""

    def mapper(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
        return (args[0], list(args[1])), {"mode": mode}

    return mapper


def _softmax(args: _Args, kwargs: _Kwargs) -> tuple[_Args, _Kwargs]:
    if len(args) > 2 and args[2] is not None:
        return args[:2], {"dtype": args[2]}
    return args[:2], {}


class _Untranslated(Exception):
    """This call of a known op uses an argument the torch-level form cannot express."""


#: ATen op (overload packet) -> ("function" or "method", torch-level target, argument mapper).
#: The one place that says what an exported op is at the torch level; anything else is kept as
#: the ATen op and refused by the analysis when units flow through it.
ATEN_TO_TORCH: dict[Any, tuple[str, Any, _Mapper]] = {
    # layers called functionally (a module's own weights: the analysis treats them as that layer)
    aten.linear: ("function", F.linear, _same()),
    aten.conv1d: ("function", F.conv1d, _same()),
    aten.conv2d: ("function", F.conv2d, _same()),
    aten.conv3d: ("function", F.conv3d, _same()),
    aten.layer_norm: ("function", F.layer_norm, _first(5)),
    aten.group_norm: ("function", F.group_norm, _first(5)),
    aten.rms_norm: ("function", F.rms_norm, _first(4)),
    aten.batch_norm: ("function", F.batch_norm, _batch_norm),
    aten.embedding: ("function", F.embedding, _embedding),
    # element-wise
    aten.add: ("function", operator.add, _binary),
    aten.sub: ("function", operator.sub, _binary),
    aten.mul: ("function", operator.mul, _first(2)),
    # in place (``hidden += residual`` in Hugging Face's ResNet): the same op on the same tensor
    aten.add_: ("function", operator.iadd, _binary),
    aten.sub_: ("function", operator.isub, _binary),
    aten.mul_: ("function", operator.imul, _first(2)),
    aten.div: ("function", operator.truediv, _true_division),
    aten.neg: ("function", operator.neg, _first(1)),
    aten.pow: ("function", torch.pow, _first(2)),
    aten.exp: ("function", torch.exp, _first(1)),
    aten.log: ("function", torch.log, _first(1)),
    aten.sqrt: ("function", torch.sqrt, _first(1)),
    aten.rsqrt: ("function", torch.rsqrt, _first(1)),
    aten.abs: ("function", torch.abs, _first(1)),
    aten.erf: ("function", torch.erf, _first(1)),
    aten.sin: ("function", torch.sin, _first(1)),
    aten.cos: ("function", torch.cos, _first(1)),
    aten.reciprocal: ("function", torch.reciprocal, _first(1)),
    aten.tanh: ("function", torch.tanh, _first(1)),
    aten.sigmoid: ("function", torch.sigmoid, _first(1)),
    aten.relu: ("function", F.relu, _first(1)),
    aten.relu6: ("function", F.relu6, _first(1)),
    aten.gelu: ("function", F.gelu, _gelu),
    aten.silu: ("function", F.silu, _first(1)),
    aten.mish: ("function", F.mish, _first(1)),
    aten.hardswish: ("function", F.hardswish, _first(1)),
    aten.hardsigmoid: ("function", F.hardsigmoid, _first(1)),
    aten.hardtanh: ("function", F.hardtanh, _first(3)),
    aten.leaky_relu: ("function", F.leaky_relu, _first(2)),
    aten.elu: ("function", F.elu, _first(2)),
    aten.clamp: ("function", torch.clamp, _first(3)),
    aten.where: ("function", torch.where, _first(3)),
    aten.maximum: ("function", torch.maximum, _first(2)),
    aten.minimum: ("function", torch.minimum, _first(2)),
    aten.dropout: ("function", F.dropout, _first(3)),
    aten.clone: ("function", torch.clone, _first(1)),
    aten.masked_fill: ("method", "masked_fill", _first(3)),
    aten.to: ("method", "to", _to),
    aten._to_copy: ("method", "to", _copy_to),
    aten.type_as: ("method", "type_as", _first(2)),
    aten.contiguous: ("method", "contiguous", _first(1)),
    aten.detach: ("method", "detach", _first(1)),
    # along a dim / reductions
    aten.softmax: ("function", F.softmax, _softmax),
    aten.log_softmax: ("function", F.log_softmax, _softmax),
    aten.mean: ("function", torch.mean, _same()),
    aten.sum: ("function", torch.sum, _same()),
    aten.amax: ("function", torch.amax, _same()),
    aten.linalg_vector_norm: ("function", torch.linalg.vector_norm, _same()),
    aten.cat: ("function", torch.cat, _same()),
    aten.stack: ("function", torch.stack, _same()),
    # products
    aten.matmul: ("function", torch.matmul, _first(2)),
    aten.bmm: ("function", torch.bmm, _first(2)),
    aten.scaled_dot_product_attention: ("function", F.scaled_dot_product_attention, _sdpa),
    # spatial
    aten.adaptive_avg_pool1d: ("function", F.adaptive_avg_pool1d, _first(2)),
    aten.adaptive_avg_pool2d: ("function", F.adaptive_avg_pool2d, _first(2)),
    aten.max_pool2d: ("function", F.max_pool2d, _first(6)),
    aten.avg_pool2d: ("function", F.avg_pool2d, _avg_pool2d),
    aten.constant_pad_nd: ("function", F.pad, _pad),
    aten.pad: ("function", F.pad, _pad_mode),
    aten.reflection_pad1d: ("function", F.pad, _pad_as("reflect")),
    aten.reflection_pad2d: ("function", F.pad, _pad_as("reflect")),
    aten.reflection_pad3d: ("function", F.pad, _pad_as("reflect")),
    aten.replication_pad1d: ("function", F.pad, _pad_as("replicate")),
    aten.replication_pad2d: ("function", F.pad, _pad_as("replicate")),
    aten.replication_pad3d: ("function", F.pad, _pad_as("replicate")),
    # movement
    aten.view: ("method", "view", _spread),
    aten.reshape: ("method", "reshape", _spread),
    aten.permute: ("method", "permute", _spread),
    aten.expand: ("method", "expand", _spread),
    aten.transpose: ("method", "transpose", _first(3)),
    aten.t: ("method", "t", _first(1)),
    aten.unsqueeze: ("method", "unsqueeze", _first(2)),
    aten.squeeze: ("method", "squeeze", _same()),
    aten.flatten: ("function", torch.flatten, _same()),
    aten.split: ("method", "split", _first(3)),
    aten.split_with_sizes: ("method", "split", _first(3)),
    aten.chunk: ("method", "chunk", _first(3)),
    aten.unbind: ("method", "unbind", _first(2)),
    aten.slice: ("function", operator.getitem, _slice),
    aten.select: ("function", operator.getitem, _select),
    aten.repeat: ("method", "repeat", _spread),
    aten.flip: ("method", "flip", _first(2)),
    aten.roll: ("method", "roll", _first(3)),
    aten.sym_size: ("method", "size", _first(2)),
}

#: ATen ops that only check or annotate at export time: left out of the graph.
_DROPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size, aten._assert_async}
#: ATen ops that return their input (views kept as the same tensor).
_IDENTITY = {aten.alias, aten.lift_fresh_copy}


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


# --------------------------------------------------------------------------------------------
# Output structure
# --------------------------------------------------------------------------------------------


class _OutputTree(_PyTreeCodeGen):
    """Generated forward takes the placeholders as plain arguments and returns the model's
    output structure (the export's ``out_spec``) rebuilt from the graph's flat outputs."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **options: Any) -> str:
        # ``options``: whatever this torch's CodeGen takes (``expanded_def`` in newer releases)
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, **options)

    def process_inputs(self, *inputs: Unpack[_Inputs]) -> tuple[Unpack[_Inputs]]:
        return inputs


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def _collapsible(module: nn.Module) -> bool:
    """Modules shown as one call site: the torch.nn layers fx keeps as leaves, registered leaf
    types and modules whose own class has a slicing rule (Hugging Face ``Conv1D``). A subclass of a
    torch.nn layer defined elsewhere may compute something else (a channels-first LayerNorm): its
    ops are kept, and a functional call on its own weights stands for the layer where it matches."""
    leaves = user_leaf_types()
    if leaves and isinstance(module, leaves):
        return True
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    path = type(module).__module__
    if path.startswith(("torch.nn", "torch.ao.nn")) and not any(True for _ in module.children()):
        return True
    return has_own_slicing_rule(module) and not any(True for _ in module.children())


def _input_names(model: nn.Module, args: _Args, kwargs: _Kwargs) -> list[str]:
    try:
        parameters = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        parameters = []
    names = [parameters[i].name if i < len(parameters) else f"input_{i}" for i in range(len(args))]
    return names + list(kwargs)


def _dynamic_batch(names: list[str], values: list[Any]) -> dict[str, Any]:
    """Dim 0 of every tensor input dynamic (``Dim.AUTO``: kept static where the model needs it)."""
    return {
        name: ({0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() >= 1 else None)
        for name, value in zip(names, values)
    }


def export_model(model: nn.Module, args: _Args, kwargs: _Kwargs) -> torch.export.ExportedProgram:
    """``torch.export.export`` in non-strict mode, the batch dimension dynamic where possible."""
    for name, value in list(zip(range(len(args)), args)) + list(kwargs.items()):
        if isinstance(value, (tuple, list, dict)) and any(
            isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value)
        ):
            raise CaptureError(
                f"the model input {name!r} is a nested structure of tensors; only tensors and "
                f"constants can be model inputs of a captured graph"
            )
    with preserved_state(model), torch.no_grad():
        try:
            names = _input_names(model, args, kwargs)
            return torch.export.export(
                model,
                tuple(args),
                dict(kwargs),
                strict=False,
                dynamic_shapes=_dynamic_batch(names, list(args) + list(kwargs.values())),
            )
        except Exception as exc:  # a batch size the model needs fixed: export it as it is
            _raise_for_output(model, exc)
            logger.info("torch.export with a dynamic batch failed (%s); exporting with fixed shapes", exc)
            try:
                return torch.export.export(model, tuple(args), dict(kwargs), strict=False)
            except Exception as error:
                _raise_for_output(model, error)
                raise


def _raise_for_output(model: nn.Module, error: BaseException) -> None:
    """An output torch.export cannot flatten (a Hugging Face key/value cache) gets its fix named."""
    if "in output, which is not a known type" in str(error):
        raise CaptureError(
            f"{type(model).__name__} returns an object torch.export cannot take apart (a key/value "
            f"cache...): make the forward return tensors only (Hugging Face models: add "
            f"use_cache=False to the example inputs); {error}"
        ) from error


def capture(model: nn.Module, args: _Args = (), kwargs: _Kwargs | None = None) -> fx.GraphModule:
    """An fx graph module of ``model`` built from ``torch.export`` (see the module docstring).

    Runs the model once on fake tensors in eval mode, then the model and the captured graph once
    each on the real example to check that they agree; the model, its buffers and the RNG are left
    as they were. Raises whatever torch.export raises when it cannot export the model, and
    :class:`CaptureError` for inputs a captured graph cannot take or a graph that computes
    something else.
    """
    kwargs = dict(kwargs or {})
    ep = export_model(model, args, kwargs)
    module = from_exported(model, ep, _input_names(model, args, kwargs), list(args) + list(kwargs.values()))
    _check_same_outputs(model, module, args, kwargs)
    return module


def _check_same_outputs(model: nn.Module, module: fx.GraphModule, args: _Args, kwargs: _Kwargs) -> None:
    """The translated graph must compute what the model computes on the example (eval mode)."""
    with preserved_state(model), torch.no_grad():
        expected = pytree.tree_leaves(model(*args, **kwargs))
        got = pytree.tree_leaves(module(*args, **kwargs))
    same = len(expected) == len(got) and all(
        type(e) is type(g)
        if not isinstance(e, torch.Tensor)
        else isinstance(g, torch.Tensor)
        and e.shape == g.shape
        and torch.allclose(e, g, rtol=1e-4, atol=1e-5, equal_nan=True)
        for e, g in zip(expected, got)
    )
    if not same:
        raise CaptureError(
            f"the graph captured from {type(model).__name__} with torch.export does not compute "
            f"what the model computes on the example inputs"
        )


def from_exported(
    model: nn.Module, ep: torch.export.ExportedProgram, input_names: list[str], example_values: list[Any]
) -> fx.GraphModule:
    """Translate the exported program ``ep`` of ``model`` (see the module docstring)."""
    signature = ep.graph_signature
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    root: dict[str, Any] = {}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user_specs = [s for s in signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(user_specs) != len(input_names):
        raise CaptureError(f"torch.export saw {len(user_specs)} model inputs, the example has {len(input_names)}")
    user_input_of = {spec.arg.name: name for spec, name in zip(user_specs, input_names)}
    by_name = {}
    for name, value in zip(input_names, example_values):
        by_name[name] = (
            graph.placeholder(name) if isinstance(value, torch.Tensor) else graph.placeholder(name, default_value=value)
        )
    state_names = {
        spec.arg.name: spec.target
        for spec in signature.input_specs
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT
    }
    for node in placeholders:
        if node.name in user_input_of:
            env[node] = by_name[user_input_of[node.name]]
        elif node.name in state_names:
            target = state_names[node.name]
            tensor = _model_tensor(model, target)
            root[target] = tensor if tensor is not None else ep.constants[target]
            new = graph.get_attr(target)
            env[node] = new
        else:
            raise CaptureError(f"exported input {node.name!r} is neither a model input nor a model tensor")

    regions = _leaf_regions(model, ep.graph, state_names)
    region_of = {node: region for region in regions for node in region["nodes"]}
    for node in ep.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        region = region_of.get(node)
        if region is not None:
            if node is region["last"]:
                root[region["path"]] = region["module"]
                new = graph.call_module(region["path"], (env[region["input"]],))
                new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
                env[node] = new
            continue
        env[node] = _translate(graph, node, env)
    output = next(n for n in ep.graph.nodes if n.op == "output")
    flat = [fx.node.map_arg(a, lambda n: env[n]) for a in output.args[0]]
    user_out = [s for s in signature.output_specs if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    if len(user_out) != len(flat):
        raise CaptureError("the exported program returns more than the model's outputs (mutated buffers)")
    graph.output(tuple(flat))
    graph._codegen = _OutputTree(_PyTreeInfo(input_names, None, ep.call_spec.out_spec))  # type: ignore[arg-type]
    module = fx.GraphModule(root, graph, type(model).__name__)
    if module.graph.eliminate_dead_code():
        module.recompile()
    return module


def _translate(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    def mapped(value: Any) -> Any:
        return fx.node.map_arg(value, lambda n: env[n])

    args, kwargs = mapped(node.args), mapped(dict(node.kwargs))
    meta: dict[str, Any] = {k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta}
    packet = _packet(node.target)
    if node.op == "call_function" and packet in _IDENTITY:
        return args[0]
    if node.op == "call_function" and packet in _DROPPED:
        return None
    entry = ATEN_TO_TORCH.get(packet) if node.op == "call_function" else None
    new: fx.Node
    if entry is not None:
        kind, target, mapper = entry
        try:
            new_args, new_kwargs = mapper(tuple(args), kwargs)
        except _Untranslated:
            entry = None
        else:
            new = (
                graph.call_function(target, new_args, new_kwargs)
                if kind == "function"
                else graph.call_method(target, new_args, new_kwargs)
            )
    if entry is None:
        new = graph.create_node(node.op, node.target, tuple(args), kwargs)
    new.meta.update(meta)
    return new


def _leaf_regions(model: nn.Module, graph: fx.Graph, state_names: dict[str, str]) -> list[dict[str, Any]]:
    """The ops of each call of a collapsible module that reads one tensor and gives one tensor."""
    by_key: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        key = list(stack)[-1]
        by_key.setdefault(key, []).append(node)
    regions = []
    for nodes in by_key.values():
        path = list(nodes[0].meta["nn_module_stack"].values())[-1][0]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if not path or not _collapsible(module):
            continue
        inside = set(nodes)
        # by identity: a tied weight (GPT-2's wte and lm_head) has one state-dict name in the export
        own = {id(t) for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))}
        inputs: list[fx.Node] = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in inside or arg in inputs or not isinstance(arg.meta.get("val"), torch.Tensor):
                    continue  # sizes read from outside (SymInts): the module computes its own
                if (
                    arg.op == "placeholder"
                    and arg.name in state_names
                    and id(_model_tensor(model, state_names[arg.name])) in own
                ):
                    continue
                inputs.append(arg)
        leaving = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(leaving) != 1 or leaving[0] is not nodes[-1]:
            continue
        regions.append({"path": path, "module": module, "nodes": nodes, "input": inputs[0], "last": nodes[-1]})
    return regions


def _model_tensor(model: nn.Module, target: str) -> Any:
    try:
        return model.get_parameter(target)
    except AttributeError:
        try:
            return model.get_buffer(target)
        except AttributeError:
            return None
