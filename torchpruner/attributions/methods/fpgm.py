"""Filter pruning via the geometric median (He et al., "Filter Pruning via Geometric Median for Deep
Convolutional Neural Networks Acceleration", CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from torchpruner.graph.dependency import Group

from ..base import AttributionMetric, Scored
from .weight_norm import group_member_slices, unit_weight_slices


def summed_distances(rows: torch.Tensor) -> torch.Tensor:
    """``Σ_j ‖rows[i] − rows[j]‖₂`` for every row i (float64, computed pairwise without the
    ``‖a‖² + ‖b‖² − 2ab`` shortcut, which loses precision for nearby filters)."""
    rows = rows.to(torch.float64)
    return torch.cdist(rows[None], rows[None], compute_mode="donot_use_mm_for_euclid_dist")[0].sum(dim=1)


def group_fpgm(group: Group) -> torch.Tensor:
    """FPGM of a coupled group's units, shape ``[units]``.

    Unit c is the concatenation, over every member of the group, of the weights removed with c
    there (:func:`~torchpruner.attributions.methods.weight_norm.group_member_slices`: output
    rows, input columns, BatchNorm scales...). Layers differ in size and scale, so each member's
    rows are first divided by their mean L2 norm over the group's units (normalised per layer, as
    WeightNorm: every member's rows have mean norm 1); the score is each unit's summed L2 distance
    to the other units. All-zero members contribute nothing.
    """
    parts = []
    for _, rows in group_member_slices(group, "FPGM"):
        mean = rows.norm(dim=1).mean()
        if mean > 0:
            parts.append(rows / mean)
    if not parts:
        return torch.zeros(group.num_units, dtype=torch.float64)
    return summed_distances(torch.cat(parts, dim=1))


class FPGMAttributionMetric(AttributionMetric):
    """Each filter's summed L2 distance to the other filters of its layer.

    Filters near the geometric median of the layer are the ones the others can stand in for, so
    the lowest scores are pruned first: ``score(i) = Σ_j ‖W_i − W_j‖₂`` over the weights each
    output unit owns (the layout of
    :func:`~torchpruner.attributions.methods.weight_norm.unit_weight_slices`: Conv rows,
    ConvTranspose blocks, Linear rows). Needs no data and no trace; ``reduction`` sees a single
    "example" (``"none"`` gives ``[1, units]``). Cost: ``units² · filter size`` operations.

    ``run(group)`` scores a coupled group over the concatenation of every weight slice removed
    with each unit, normalised per layer (see :func:`group_fpgm`).
    """

    name: ClassVar[str] = "FPGM"

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        if scored.group is not None:
            return group_fpgm(scored.group)
        if scored.module is None:
            raise ValueError("FPGMAttributionMetric scores a module's weights; got a call site of a function")
        return summed_distances(unit_weight_slices(scored.module))
