"""L1 norm of the weights each unit owns (Li et al., "Pruning Filters for Efficient ConvNets")."""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from torchpruner.graph.dependency import Group

from ..base import AttributionMetric, Scored
from ..groups import member_slices

logger = logging.getLogger(__name__)

NORM_LAYERS: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def unit_weight_norms(module: nn.Module) -> torch.Tensor:
    """Σ|W| over the slice of ``module.weight`` that each output unit owns, shape ``[units]``.

    * ``Linear`` / ``Bilinear`` ``[out, ...]`` and ``Conv*d`` ``[out, in/groups, k...]``: dim 0.
    * ``ConvTranspose*d`` ``[in, out/groups, k...]``: output unit ``o = g·(out/groups) + j`` owns
      ``W[g·in/groups : (g+1)·in/groups, j]``.
    * ``Embedding`` ``[num_embeddings, dim]``: units are the ``dim`` columns.
    * normalisation layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm): ``|γ_c|``,
      the scale of each unit (the "network slimming" criterion); summed over leading dims of a
      multi-dimensional LayerNorm shape. Bias / shift terms are never counted.

    Raises:
        ValueError: the module has no weight (a norm layer without affine parameters, an
            activation, a container).
        TypeError: the layer type has no known unit layout.
    """
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{kind} module has no weight parameter, so WeightNormAttributionMetric cannot score it "
            "(score the Linear/Conv layer that produces these units instead)"
        )
    w = weight.detach().abs().to(torch.float64)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        in_per_group = w.shape[0] // groups
        out_per_group = w.shape[1]
        return w.reshape(groups, in_per_group, out_per_group, -1).sum(dim=(1, 3)).reshape(-1)
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
        return w.reshape(w.shape[0], -1).sum(dim=1)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return w.sum(dim=0)
    if isinstance(module, NORM_LAYERS):
        return w.reshape(-1, w.shape[-1]).sum(dim=0)
    raise TypeError(
        f"WeightNormAttributionMetric does not know which weights each unit of a {kind} owns; "
        "supported: Linear, Bilinear, Conv*d, ConvTranspose*d, Embedding, BatchNorm, InstanceNorm, "
        "LayerNorm, GroupNorm, RMSNorm"
    )


def input_weight_norms(module: nn.Module) -> torch.Tensor | None:
    """Σ|W| over the weights that read each *input* unit of ``module``, shape ``[in units]``
    (the slice removed when that input unit is pruned); None when the layer has no weight.

    * ``Linear`` ``[out, in]``: column j.
    * ``Conv*d`` ``[out, in/groups, k...]``: input channel ``j = g·(in/groups) + i`` is read by
      column i of the filters of group g (for a depthwise conv: the filters of channel j).
    * ``ConvTranspose*d`` ``[in, out/groups, k...]``: row j.
    * normalisation layers and ``PReLU`` (channel-wise: the input unit is the output unit): ``|γ_c|``.
    * self-attention ``MultiheadAttention``: embed dim i owns ``in_proj_weight`` column i and rows
      ``i, E+i, 2E+i`` (q, k, v) and ``out_proj.weight`` row and column i.

    Raises:
        TypeError: the layer type has no known unit layout.
    """
    if isinstance(module, nn.MultiheadAttention):
        return _attention_embed_norms(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    w = weight.detach().abs().to(torch.float64)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w.reshape(w.shape[0], -1).sum(dim=1)
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = module.groups
        return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum(dim=(1, 3)).reshape(-1)
    if isinstance(module, nn.Linear):
        return w.sum(dim=0)
    if isinstance(module, NORM_LAYERS):
        return unit_weight_norms(module)
    if isinstance(module, nn.PReLU):
        return w.reshape(-1)
    raise TypeError(f"no known input-unit layout for the weights of a {type(module).__name__}")


def _attention_embed_norms(module: nn.MultiheadAttention) -> torch.Tensor:
    if not module._qkv_same_embed_dim:
        raise TypeError("MultiheadAttention with kdim/vdim != embed_dim has no single embed-dim layout")
    embed = module.embed_dim
    w_in = module.in_proj_weight.detach().abs().to(torch.float64)          # [3E, E]
    w_out = module.out_proj.weight.detach().abs().to(torch.float64)        # [E, E]
    rows = w_in.reshape(3, embed, embed).sum(dim=(0, 2))
    return w_in.sum(dim=0) + rows + w_out.sum(dim=1) + w_out.sum(dim=0)


def group_weight_norms(group: Group) -> torch.Tensor:
    """WeightNorm of a coupled group's units, shape ``[units]``.

    For every member of the group (the sources' output rows, the consumers' input columns,
    BatchNorm/LayerNorm scales, bare parameters such as class tokens), ``n_m(c)`` is Σ|W| over
    the slice of its weight removed with group unit c. Layers differ in size and scale (a 3×3×512
    filter against one BatchNorm γ), so each member is normalised by its **mean** over the group's
    units (the mean rather than the max: one outlier filter does not shrink a whole layer), and
    the score is the sum over members: ``Σ_m n_m(c) / mean_c' n_m(c')``. Every member thus
    contributes 1 on average, and a single-source group of k layers averages k. Biases are not
    counted; members without weights (Dropout) and all-zero members contribute nothing; a layer
    type without a known layout is skipped with a warning.
    """
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for member in member_slices(group):
        module, label = member.module, f"'{member.module_name}' ({type(member.module).__name__})"
        try:
            if member.direction == "out":
                norms = unit_weight_norms(module) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
            elif member.direction == "in":
                norms = input_weight_norms(module)
            else:
                tensor = getattr(module, member.parameter).detach().abs().to(torch.float64)
                norms = tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1).sum(dim=1)
        except TypeError as error:
            warnings.warn(f"WeightNorm of a group: {label} is skipped: {error}", UserWarning, stacklevel=4)
            continue
        if norms is None:
            continue
        if len(member.positions) and int(member.positions.max()) >= len(norms):
            raise ValueError(
                f"the group does not match {label} any more (it has {len(norms)} units on the "
                "pruned side); compute the groups again (pruner.groups()) after pruning"
            )
        per_unit = torch.zeros(group.num_units, dtype=torch.float64).index_add_(
            0, torch.as_tensor(member.units), norms[torch.as_tensor(member.positions)].cpu()
        )
        mean = per_unit.mean()
        if mean > 0:
            total += per_unit / mean
        else:
            logger.debug("WeightNorm of a group: %s has zero weights on the group's units", label)
    return total


class WeightNormAttributionMetric(AttributionMetric):
    """Σ|W| over the weights each output unit of ``module`` owns (see :func:`unit_weight_norms`).

    Needs no data and no trace: ``find_best_evaluation_module`` and ``call_index`` do not change
    the scores (the units after a BatchNorm / activation are the module's own units). The
    ``reduction`` sees a single "example", so ``"none"`` gives shape ``[1, units]``.

    ``run(group)`` scores a coupled group over every weight slice removed with each unit,
    normalised per layer (see :func:`group_weight_norms`).
    """

    name: ClassVar[str] = "WeightNorm"

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        if scored.group is not None:
            return group_weight_norms(scored.group)
        if scored.module is None:
            raise ValueError("WeightNormAttributionMetric scores a module's weights; got a call site of a function")
        return unit_weight_norms(scored.module)
