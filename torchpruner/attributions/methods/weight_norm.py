"""L1 norm of the weights each unit owns (Li et al., "Pruning Filters for Efficient ConvNets")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..base import AttributionMetric

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


class WeightNormAttributionMetric(AttributionMetric):
    """Σ|W| over the weights each output unit of ``module`` owns (see :func:`unit_weight_norms`).

    Needs no data and no trace: ``find_best_evaluation_module`` and ``call_index`` do not change
    the scores (the units after a BatchNorm / activation are the module's own units). The
    ``reduction`` sees a single "example", so ``"none"`` gives shape ``[1, units]``.
    """

    name: ClassVar[str] = "WeightNorm"
    needs_data: ClassVar[bool] = False
    needs_trace: ClassVar[bool] = False

    def score_without_data(
        self, model: nn.Module, module: nn.Module | None, site: Any, options: dict[str, Any]
    ) -> torch.Tensor:
        if module is None:
            raise ValueError("WeightNormAttributionMetric scores a module's weights; got a call site of a function")
        return unit_weight_norms(module)
