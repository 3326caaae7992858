"""Op and module families: the one place that says which ops and layers do what to units.

The tracer (:mod:`torchpruner.graph.trace`), the dependency analysis
(:mod:`torchpruner.graph.dependency`) and the slicing rules (:mod:`torchpruner.rules`) all read
these tables; nothing else lists activations, merges or movement ops. Also here: the registry of
user module types that the tracer keeps as single call sites (:func:`register_leaf_module`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["register_leaf_module", "user_leaf_types", "leaf_version"]


#: Modules whose output keeps the units of their input (element-wise activations).
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
)
ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.leaky_relu_,
    F.prelu,
    F.rrelu,
    F.elu,
    F.elu_,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.hardtanh_,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    F.softsign,
    F.tanhshrink,
    F.logsigmoid,
    F.threshold,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
#: Activations for which "fraction of positive outputs" (APoZ) is meaningful.
RELU_LIKE_MODULES: tuple[type, ...] = (nn.ReLU, nn.ReLU6)
RELU_LIKE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6}
RELU_LIKE_METHODS = {"relu", "relu_"}

DROPOUT_MODULES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
BATCHNORM_MODULES: tuple[type[nn.modules.batchnorm._BatchNorm], ...] = (nn.modules.batchnorm._BatchNorm,)
BATCHNORM_FUNCTIONS = {F.batch_norm}

#: Functions/methods that merge several tensors: an evaluation point never moves past them.
MERGE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    torch.add,
    operator.mul,
    operator.imul,
    torch.mul,
    operator.sub,
    torch.sub,
    torch.cat,
    torch.concat,
    torch.stack,
}
MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}

#: Module types whose units are on the last axis of their output ([N, ..., D]).
LAST_AXIS_MODULES: tuple[type, ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RMSNorm,
)
#: Module types whose units are on axis 1 ([N, C, ...]).
CHANNEL_AXIS_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)


#: Element-wise functions of any number of tensor operands (broadcasting): slot i <-> slot i.
ELEMENTWISE_FUNCTIONS = (
    set(ACTIVATION_FUNCTIONS)
    | set(DROPOUT_FUNCTIONS)
    | {
        operator.add,
        operator.iadd,
        operator.sub,
        operator.isub,
        operator.mul,
        operator.imul,
        operator.truediv,
        operator.itruediv,
        operator.neg,
        operator.pow,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.true_divide,
        torch.maximum,
        torch.minimum,
        torch.neg,
        torch.abs,
        torch.exp,
        torch.log,
        torch.sqrt,
        torch.rsqrt,
        torch.square,
        torch.pow,
        torch.clamp,
        torch.clip,
        torch.where,
        torch.erf,
        torch.sin,
        torch.cos,
        torch.reciprocal,
        F.hardtanh,
        F.hardshrink,
        F.softshrink,
        torch.clone,
        torch.detach,
        torch.nan_to_num,
        torch.addcmul,
        torch.addcdiv,
    }
)
ELEMENTWISE_METHODS = set(ACTIVATION_METHODS) | {
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "truediv",
    "pow",
    "pow_",
    "neg",
    "abs",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "square",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "clone",
    "contiguous",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "relu",
    "relu_",
    "exp_",
    "erf",
    "reciprocal",
    "maximum",
    "minimum",
    "masked_fill",
    "nan_to_num",
    "requires_grad_",
    "addcmul",
    "addcdiv",
}
#: Ops that only move data around: followed empirically (see module docstring).
MOVEMENT_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.swapdims,
    torch.movedim,
    torch.unsqueeze,
    torch.squeeze,
    torch.unflatten,
    torch.narrow,
    torch.t,
    operator.getitem,
    torch.split,
    torch.chunk,
    torch.unbind,
    torch.tensor_split,
    torch.roll,
    torch.flip,
    torch.tile,
    torch.split_with_sizes,
}
MOVEMENT_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "movedim",
    "unsqueeze",
    "squeeze",
    "expand",
    "unflatten",
    "narrow",
    "t",
    "split",
    "chunk",
    "unbind",
    "tensor_split",
    "roll",
    "flip",
    "repeat",
    "tile",
    "__getitem__",
    "split_with_sizes",
    "view_as",
    "reshape_as",
    "expand_as",
}
#: Matrix products: batch axes pass units, contracted axes link the operands.
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
#: Attention kernels on [B, heads, L, E]: the head axes of q, k, v and the output go together.
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}
#: Reductions over some dims: fine unless the unit axis is reduced.
REDUCTION_FUNCTIONS = {
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    torch.std,
    torch.var,
    torch.logsumexp,
    torch.nansum,
    torch.nanmean,
    torch.norm,
    torch.linalg.vector_norm,
}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum", "nanmean", "norm"}
#: Reductions whose ``dim`` is their third argument (``x.norm(p, dim, keepdim)``), not their second.
NORM_REDUCTIONS = {torch.norm, torch.linalg.vector_norm, "norm"}
#: Functions with a ``dim`` argument that act independently on the other dims.
DIM_WISE_FUNCTIONS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, F.normalize, torch.cumsum}
DIM_WISE_METHODS = {"softmax", "log_softmax", "cumsum"}
#: Spatial functions on [N, C, *spatial]: the channel axis (1) passes through.
SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.lp_pool1d,
    F.lp_pool2d,
    F.interpolate,
    F.upsample,
    F.upsample_nearest,
    F.upsample_bilinear,
    F.pad,
}
#: Ops whose output does not carry the tensor's units (shape queries): ignored.
SHAPE_QUERY_FUNCTIONS = {len, torch.numel}
SHAPE_QUERY_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous"}
#: Tensor attributes that are not tensors (``x.shape``, ``x.dtype``): shape queries too.
SHAPE_QUERY_ATTRIBUTES = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "layout",
    "is_cuda",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "is_leaf",
    "requires_grad",
    "names",
    "itemsize",
    "nbytes",
}
#: Tensor attributes that are views of the tensor (``x.mT``, ``x.data``): followed like movement ops.
#: Any other attribute read that gives a tensor is refused.
TENSOR_VIEW_ATTRIBUTES = {"T", "mT", "H", "mH", "real", "data"}
#: Ops along one dim that return a named pair ``(values, indices)`` (or ``(min, max)``): the pair's
#: items keep the units of the input unless the op runs along the unit axis.
#: name -> (position of ``dim`` in the call, its default (None: required), the items' names)
TUPLE_DIM_OPS: dict[str, tuple[int, int | None, tuple[str, str]]] = {
    "max": (1, None, ("values", "indices")),
    "min": (1, None, ("values", "indices")),
    "topk": (2, -1, ("values", "indices")),
    "sort": (1, -1, ("values", "indices")),
    "kthvalue": (2, -1, ("values", "indices")),
    "median": (1, None, ("values", "indices")),
    "nanmedian": (1, None, ("values", "indices")),
    "mode": (1, -1, ("values", "indices")),
    "cummax": (1, None, ("values", "indices")),
    "cummin": (1, None, ("values", "indices")),
    "aminmax": (99, None, ("min", "max")),  # dim is keyword-only
}
TUPLE_DIM_FUNCTIONS = {getattr(torch, name): name for name in TUPLE_DIM_OPS}

SPATIAL_MODULES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Upsample,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.ZeroPad2d,
)
PASS_THROUGH_MODULES: tuple[type, ...] = tuple(m for m in ACTIVATION_MODULES if m is not nn.PReLU) + (
    nn.Identity,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
MOVEMENT_MODULES: tuple[type, ...] = (nn.Flatten, nn.Unflatten)
DIM_WISE_MODULES: tuple[type[nn.Softmax] | type[nn.LogSoftmax] | type[nn.Softmin], ...] = (
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
)


#: Functional forms of the torch.nn layers. A call whose tensors are all parameters/buffers of one
#: module of the matching type, made inside that module's own forward (a subclass that fx traces
#: into: timm's ``Linear``, ``BatchNormAct2d``, ``GroupNorm1``), stands for a call of that module.
#: function -> (module types, tensor arguments, settings), each argument as
#: ``(position, keyword, module attribute)``; a *setting* is a module attribute the call reads as a
#: constant and that a prune can change (``groups``, ``num_groups``, ``normalized_shape``).
FunctionalArgument = tuple[int, str, str]
FUNCTIONAL_LAYERS: dict[
    object, tuple[tuple[type, ...], tuple[FunctionalArgument, ...], tuple[FunctionalArgument, ...]]
] = {
    F.linear: ((nn.Linear,), ((1, "weight", "weight"), (2, "bias", "bias")), ()),
    **{
        conv: ((module_type,), ((1, "weight", "weight"), (2, "bias", "bias")), ((6, "groups", "groups"),))
        for conv, module_type in ((F.conv1d, nn.Conv1d), (F.conv2d, nn.Conv2d), (F.conv3d, nn.Conv3d))
    },
    **{
        conv: ((module_type,), ((1, "weight", "weight"), (2, "bias", "bias")), ((6, "groups", "groups"),))
        for conv, module_type in (
            (F.conv_transpose1d, nn.ConvTranspose1d),
            (F.conv_transpose2d, nn.ConvTranspose2d),
            (F.conv_transpose3d, nn.ConvTranspose3d),
        )
    },
    F.batch_norm: (
        (nn.modules.batchnorm._BatchNorm,),
        (
            (1, "running_mean", "running_mean"),
            (2, "running_var", "running_var"),
            (3, "weight", "weight"),
            (4, "bias", "bias"),
        ),
        (),
    ),
    F.instance_norm: (
        (nn.modules.instancenorm._InstanceNorm,),
        (
            (1, "running_mean", "running_mean"),
            (2, "running_var", "running_var"),
            (3, "weight", "weight"),
            (4, "bias", "bias"),
        ),
        (),
    ),
    F.layer_norm: (
        (nn.LayerNorm,),
        ((2, "weight", "weight"), (3, "bias", "bias")),
        ((1, "normalized_shape", "normalized_shape"),),
    ),
    F.rms_norm: ((nn.RMSNorm,), ((2, "weight", "weight"),), ((1, "normalized_shape", "normalized_shape"),)),
    F.group_norm: ((nn.GroupNorm,), ((2, "weight", "weight"), (3, "bias", "bias")), ((1, "num_groups", "num_groups"),)),
}


#: Parameter-free modules whose output keeps the units of their input (nothing to slice).
PARAMETER_FREE_PASS_THROUGH_MODULES: tuple[type, ...] = (
    tuple(m for m in ACTIVATION_MODULES if m is not nn.PReLU)
    + (nn.Identity, nn.Flatten)
    + (
        nn.modules.pooling._MaxPoolNd,
        nn.modules.pooling._AvgPoolNd,
        nn.modules.pooling._AdaptiveAvgPoolNd,
        nn.modules.pooling._AdaptiveMaxPoolNd,
        nn.modules.pooling._LPPoolNd,
    )
)


# --------------------------------------------------------------------------------------------
# User leaf modules
# --------------------------------------------------------------------------------------------

#: User module types traced as one call site (see :func:`register_leaf_module`).
_USER_LEAF_TYPES: list[type] = []
_LEAF_VERSION = 0


def register_leaf_module(*module_types: type) -> None:
    """Trace modules of these types as single call sites instead of tracing through them.

    ``torchpruner.rules.register_slicing_rule`` calls this for your layer types, so the graph shows
    your layer (with its rule) rather than the ops inside it. Cached graphs are rebuilt.
    """
    global _LEAF_VERSION
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_leaf_module expects nn.Module subclasses, got {module_type!r}")
        if module_type not in _USER_LEAF_TYPES:
            _USER_LEAF_TYPES.append(module_type)
            _LEAF_VERSION += 1


def user_leaf_types() -> tuple[type, ...]:
    """The registered user leaf module types."""
    return tuple(_USER_LEAF_TYPES)


def leaf_version() -> int:
    """Changes whenever a leaf type is registered (part of the graph cache key)."""
    return _LEAF_VERSION
