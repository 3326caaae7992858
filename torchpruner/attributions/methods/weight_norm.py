"""Norms of the weights each unit owns: L1 (Li et al., "Pruning Filters for Efficient ConvNets",
the FilterNorm criterion, the default) or any L_p.

The layout facts live here once: :func:`unit_weight_slices` and :func:`input_weight_slices` give,
per unit, the weights removed with it as one row; :func:`group_member_slices` does the same for
every member of a coupled group. WeightNorm takes a norm of each row, FPGM
(:mod:`~torchpruner.attributions.methods.fpgm`) the distances between rows.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from torchpruner.graph.dependency import Group
from torchpruner.rules.units import conv_weight_blocks

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


def unit_weight_slices(module: nn.Module) -> torch.Tensor:
    """The weights each output unit of ``module`` owns, one row per unit: ``[units, d]`` (float64,
    signed; rows of one layer are aligned element by element).

    * ``Linear`` / ``Bilinear`` ``[out, ...]`` and ``Conv*d`` ``[out, in/groups, k...]``: dim 0.
    * ``ConvTranspose*d`` ``[in, out/groups, k...]``: output unit ``o = g·(out/groups) + j`` owns
      ``W[g·in/groups : (g+1)·in/groups, j]``.
    * ``Embedding`` ``[num_embeddings, dim]``: units are the ``dim`` columns.
    * normalisation layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm): ``γ_c``, the
      scale of each unit (the leading dims of a multi-dimensional LayerNorm shape make the row).
      Bias / shift terms are never part of a row.

    Raises:
        ValueError: the module has no weight (a norm layer without affine parameters, an
            activation, a container).
        TypeError: the layer type has no known unit layout.
    """
    return _unit_weight_rows(module).to(torch.float64)


def _unit_weight_rows(module: nn.Module) -> torch.Tensor:
    """:func:`unit_weight_slices` in the weight's own dtype (a view where the layout allows)."""
    weight = getattr(module, "weight", None)
    kind = type(module).__name__
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{kind} module has no weight parameter, so its units cannot be scored by their weights "
            "(score the Linear/Conv layer that produces these units instead)"
        )
    w = weight.detach()
    if isinstance(module, nn.modules.conv._ConvNd):
        blocks = conv_weight_blocks(module, w)  # [groups, out/groups, in/groups, k]
        return blocks.reshape(module.out_channels, -1)
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return w.reshape(w.shape[0], -1)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return w.transpose(0, 1)
    if isinstance(module, NORM_LAYERS):
        return w.reshape(-1, w.shape[-1]).transpose(0, 1)
    raise TypeError(
        f"there is no known layout of which weights each unit of a {kind} owns; "
        "supported: Linear, Bilinear, Conv*d, ConvTranspose*d, Embedding, BatchNorm, InstanceNorm, "
        "LayerNorm, GroupNorm, RMSNorm"
    )


def input_weight_slices(module: nn.Module) -> torch.Tensor | None:
    """The weights that read each *input* unit of ``module`` (the slice removed when that input
    unit is pruned), one row per input unit: ``[in units, d]`` (float64, signed); None when the
    layer has no weight.

    * ``Linear`` ``[out, in]``: column j.
    * ``Conv*d`` ``[out, in/groups, k...]``: input channel ``j = g·(in/groups) + i`` is read by
      column i of the filters of group g (for a depthwise conv: the filters of channel j).
    * ``ConvTranspose*d`` ``[in, out/groups, k...]``: row j.
    * normalisation layers and ``PReLU`` (channel-wise: the input unit is the output unit): ``γ_c``.
    * self-attention ``MultiheadAttention``: embed dim i owns ``in_proj_weight`` column i and rows
      ``i, E+i, 2E+i`` (q, k, v) and ``out_proj.weight`` row and column i.

    Raises:
        TypeError: the layer type has no known unit layout.
    """
    rows = _input_weight_rows(module)
    return None if rows is None else rows.to(torch.float64)


def _input_weight_rows(module: nn.Module) -> torch.Tensor | None:
    """:func:`input_weight_slices` in the weights' own dtype (a view where the layout allows)."""
    if isinstance(module, nn.MultiheadAttention):
        return _attention_embed_slices(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    w = weight.detach()
    if isinstance(module, nn.modules.conv._ConvNd):
        blocks = conv_weight_blocks(module, w).transpose(1, 2)  # [groups, in/groups, out/groups, k]
        return blocks.reshape(module.in_channels, -1)
    if isinstance(module, nn.Linear):
        return w.transpose(0, 1)
    if isinstance(module, NORM_LAYERS):
        return _unit_weight_rows(module)
    if isinstance(module, nn.PReLU):
        return w.reshape(-1, 1)
    raise TypeError(f"no known input-unit layout for the weights of a {type(module).__name__}")


def _attention_embed_slices(module: nn.MultiheadAttention) -> torch.Tensor:
    if not module._qkv_same_embed_dim:
        raise TypeError("MultiheadAttention with kdim/vdim != embed_dim has no single embed-dim layout")
    embed = module.embed_dim
    w_in = module.in_proj_weight.detach().to(torch.float64)  # [3E, E]
    w_out = module.out_proj.weight.detach().to(torch.float64)  # [E, E]
    rows = w_in.reshape(3, embed, embed).transpose(0, 1).reshape(embed, -1)
    return torch.cat([w_in.transpose(0, 1), rows, w_out, w_out.transpose(0, 1)], dim=1)


def check_p(p: Any) -> float:
    """``p`` of an L_p norm: a real number >= 1 (``math.inf`` allowed), else an error naming p."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(
            f"p must be a number >= 1 (1: L1 FilterNorm, 2: L2, math.inf: max), got {p!r} ({type(p).__name__})"
        )
    if math.isnan(p) or p < 1:
        raise ValueError(f"p must be a number >= 1 (1: L1 FilterNorm, 2: L2, math.inf: max), got {p!r}")
    return float(p)


def _norms(rows: torch.Tensor, p: float) -> torch.Tensor:
    if p == 1:
        return rows.abs().sum(dim=1)
    norms: torch.Tensor = torch.linalg.vector_norm(rows, ord=p, dim=1)
    return norms


def unit_weight_norms(module: nn.Module, p: float = 1) -> torch.Tensor:
    """‖·‖_p of the weights each output unit owns (:func:`unit_weight_slices`), shape ``[units]``;
    ``p=1``: Σ|W| (for a normalisation layer ``|γ_c|``, the "network slimming" criterion)."""
    return _norms(unit_weight_slices(module), check_p(p))


def input_weight_norms(module: nn.Module, p: float = 1) -> torch.Tensor | None:
    """‖·‖_p of the weights that read each input unit (:func:`input_weight_slices`), shape
    ``[in units]``; None when the layer has no weight."""
    rows = input_weight_slices(module)
    return None if rows is None else _norms(rows, check_p(p))


def group_member_slices(group: Group, what: str = "WeightNorm") -> list[tuple[str, torch.Tensor]]:
    """For every member of a coupled group, the weights removed with each group unit, one row per
    unit: ``[(label, [units, d])]`` (float64, signed).

    A member's row for unit c concatenates the slices of every position c removes there (the
    sources' output rows, the consumers' input columns — ``H·W`` of them after a flatten —,
    BatchNorm/LayerNorm scales, bare parameters such as class tokens), in position order. Biases
    are not counted; members without weights (Dropout) are left out; a layer type without a known
    layout is skipped with a warning naming ``what`` is computed.

    Raises:
        ValueError: the group was computed before the model was pruned.
    """
    return [
        (label, rows.cpu()[positions].reshape(group.num_units, -1).to(torch.float64))
        for label, rows, positions in _group_member_rows(group, what, stacklevel=6)
    ]


def _group_member_rows(group: Group, what: str, stacklevel: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """For every member of the group: ``(label, rows, positions)``, the member's rows in the
    weights' own dtype and the rows each group unit removes, unit by unit (``rows[positions]``
    reshaped to ``[units, -1]`` is :func:`group_member_slices`' entry, before its float64 copy)."""
    found = []
    for member in member_slices(group):
        module, label = member.module, f"'{member.module_name}' ({type(member.module).__name__})"
        try:
            if member.direction == "out":
                rows = _unit_weight_rows(module) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
            elif member.direction == "in":
                rows = _input_weight_rows(module)
            else:
                # a bare parameter: the member names it and its sliced axis
                assert member.parameter is not None and member.axis is not None
                tensor = getattr(module, member.parameter).detach()
                rows = tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1)
        except TypeError as error:
            warnings.warn(f"{what} of a group: {label} is skipped: {error}", UserWarning, stacklevel=stacklevel)
            continue
        if rows is None:
            continue
        if len(member.positions) and int(member.positions.max()) >= len(rows):
            raise ValueError(
                f"the group does not match {label} any more (it has {len(rows)} units on the "
                "pruned side); compute the groups again (pruner.groups()) after pruning"
            )
        # every unit of a group removes the same number of positions from each member
        order = np.lexsort((member.positions, member.units))  # by unit, then position
        positions = torch.as_tensor(member.positions[order])
        per_unit, remainder = divmod(len(order), group.num_units)
        units = torch.as_tensor(member.units[order])
        if remainder or not torch.equal(units, torch.arange(group.num_units).repeat_interleave(per_unit)):
            raise RuntimeError(f"internal: {label} does not hold every unit of the group equally often")
        found.append((label, rows, positions))
    return found


def group_weight_norms(group: Group, p: float = 1) -> torch.Tensor:
    """WeightNorm of a coupled group's units, shape ``[units]``.

    For every member of the group (see :func:`group_member_slices`), ``n_m(c)`` is ‖·‖_p of the
    weights removed with group unit c there. Layers differ in size and scale (a 3×3×512 filter
    against one BatchNorm γ), so each member is normalised by its **mean** over the group's units
    (the mean rather than the max: one outlier filter does not shrink a whole layer), and the
    score is the sum over members: ``Σ_m n_m(c) / mean_c' n_m(c')``. Every member thus contributes
    1 on average, and a single-source group of k layers averages k. All-zero members contribute
    nothing.
    """
    p = check_p(p)
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for label, rows, positions in _group_member_rows(group, "WeightNorm", stacklevel=5):
        rows = rows.cpu()
        if not (
            rows.is_contiguous() and len(positions) == len(rows) and torch.equal(positions, torch.arange(len(rows)))
        ):
            rows = rows[positions]  # else every row, in order: the rows themselves, without a copy
        rows = rows.reshape(group.num_units, -1)
        # |w| is exact in the weights' dtype and the sum runs in float64: the same numbers as
        # converting the rows to float64 first, without the float64 copy
        per_unit = rows.abs().sum(dim=1, dtype=torch.float64) if p == 1 else _norms(rows.to(torch.float64), p)
        mean = per_unit.mean()
        if mean > 0:
            total += per_unit / mean
        else:
            logger.debug("WeightNorm of a group: %s has zero weights on the group's units", label)
    return total


class WeightNormAttributionMetric(AttributionMetric):
    """‖·‖_p of the weights each output unit of ``module`` owns (see :func:`unit_weight_slices`):
    ``p=1`` (default) is Σ|W|, the FilterNorm criterion; ``p=2`` the L2 norm.

    Needs no data and no trace: ``find_best_evaluation_module`` and ``call_index`` do not change
    the scores (the units after a BatchNorm / activation are the module's own units). The
    ``reduction`` sees a single "example", so ``"none"`` gives shape ``[1, units]``.

    ``run(group)`` scores a coupled group over every weight slice removed with each unit,
    normalised per layer (see :func:`group_weight_norms`).

    Options:
        p (float): the norm, a number >= 1 (``math.inf``: the largest magnitude); default 1.
    """

    name: ClassVar[str] = "WeightNorm"
    default_options: ClassVar[dict[str, Any]] = {"p": 1}

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._check_options(options)
        if "p" in options:
            check_p(options["p"])
        return options

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        if scored.group is not None:
            return group_weight_norms(scored.group, options["p"])
        if scored.module is None:
            raise ValueError("WeightNormAttributionMetric scores a module's weights; got a call site of a function")
        return unit_weight_norms(scored.module, options["p"])
