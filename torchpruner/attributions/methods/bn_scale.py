"""|γ| of the BatchNorm that follows a layer (Liu et al., "Learning Efficient Convolutional
Networks through Network Slimming", ICCV 2017).

The scale γ_c of a BatchNorm multiplies channel c after normalisation, so a channel whose γ_c is
near zero contributes (almost) only its shift β_c: it carries no information. Network slimming
trains with an L1 penalty on γ (:func:`torchpruner.regularize.update_bn`) to push unimportant
channels towards zero, then prunes the channels with the smallest |γ| over the whole model.

Scores need no data:

* ``run(batchnorm)``: ``|γ_c|`` of that BatchNorm;
* ``run(layer)``: ``|γ_c|`` of the BatchNorm that follows the layer in the data flow (past
  activations and Dropout, never past a merge such as add or cat). Finding it traces the model on
  the first batch of the data generator (the trace is cached; no scoring pass is made);
* ``run(group)``: ``Σ |γ_c|`` over every BatchNorm of the coupled group (a residual stream: the
  BatchNorm after the stem and after the last convolution of every block), with the positions of a
  BatchNorm after a concatenation mapped to the group's units.

A layer without a following BatchNorm, or a group without one, is refused with a ValueError
(BatchNorms without affine parameters have no γ and do not count).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from torchpruner.graph import CallSite, ModelGraph, get_graph, unwrap_model
from torchpruner.graph.dependency import Group

from ..base import AttributionMetric, Scored
from ..groups import group_label, member_slices
from .weight_norm import unit_weight_norms

logger = logging.getLogger(__name__)

BATCHNORM_LAYERS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)

_NO_BATCHNORM_FIX = (
    "score it with another metric (WeightNormAttributionMetric), or leave it out of a global "
    "pruning (prune_groups(..., ignored_layers=[layer]))"
)


def _label(name: str, module: nn.Module) -> str:
    return f"'{name}' ({type(module).__name__})"


def batchnorm_scales(module: nn.Module, name: str = "") -> torch.Tensor:
    """``|γ_c|`` of a BatchNorm with affine parameters, float64 ``[num_features]``.

    Raises:
        TypeError: ``module`` is not a BatchNorm.
        ValueError: the BatchNorm has no affine scale (``affine=False``).
    """
    label = _label(name or type(module).__name__, module)
    if not isinstance(module, BATCHNORM_LAYERS):
        raise TypeError(f"{label} is not a BatchNorm; BN scale reads the γ of a BatchNorm")
    if module.weight is None:
        raise ValueError(
            f"{label} has no scale γ (affine=False): BNScaleAttributionMetric cannot score it; "
            "build it with affine=True or use another metric"
        )
    return unit_weight_norms(module)


def following_batchnorm(graph: ModelGraph, site: CallSite) -> CallSite | None:
    """The BatchNorm module call that ``site``'s output flows into, past single-consumer
    activations and Dropout of the same shape (never past a merge); None when there is none."""
    while True:
        users = [u for u in site.users if u.shape is not None]  # ignore x.size(0) reads
        if len(users) != 1:
            return None
        user = users[0]
        if user.is_merge or user.shape != site.shape:
            return None
        if user.is_batchnorm:
            return user if user.kind == "module" and user.module is not None else None
        if not (user.is_activation or user.is_dropout):
            return None
        site = user


def group_batchnorm_scales(group: Group) -> torch.Tensor:
    """``Σ |γ_c|`` over the group's BatchNorms with affine parameters, float64 ``[units]``.

    Raises:
        ValueError: the group holds no BatchNorm with a scale γ, or no longer matches the model.
    """
    total = torch.zeros(group.num_units, dtype=torch.float64)
    counted = 0
    for member in member_slices(group):
        if not isinstance(member.module, BATCHNORM_LAYERS) or not isinstance(member.module.weight, torch.Tensor):
            continue
        scales = batchnorm_scales(member.module, member.module_name)
        if len(member.positions) and int(member.positions.max()) >= len(scales):
            raise ValueError(
                f"{group_label(group)} does not match {_label(member.module_name, member.module)} any more "
                f"(it has {len(scales)} channels); compute the groups again (pruner.groups()) after pruning"
            )
        total.index_add_(0, torch.as_tensor(member.units), scales[torch.as_tensor(member.positions)])
        counted += 1
    if not counted:
        layers = ", ".join(dict.fromkeys(m.module_name for m in group.members))
        raise ValueError(
            f"{group_label(group)} holds no BatchNorm with a scale γ (layers: {layers}), so "
            f"BNScaleAttributionMetric cannot score it; {_NO_BATCHNORM_FIX}"
        )
    return total


class BNScaleAttributionMetric(AttributionMetric):
    """|γ| of the BatchNorm that follows the scored layer; for a group, Σ |γ| over its BatchNorms.

    Needs no data pass. Scoring a BatchNorm or a group never reads the data generator (pass
    ``None``); scoring another layer traces the model once on the first batch to find its
    BatchNorm. ``find_best_evaluation_module`` does not change the scores. The ``reduction`` sees a
    single "example" (``"none"`` gives shape ``[1, units]``).

    ``BNScaleAttributionMetric(model, None, None).run`` is a ``scores=`` function for
    :func:`torchpruner.prune_groups` (network slimming's global threshold on |γ|)::

        prune_groups(pruner, fraction=0.5, scores=BNScaleAttributionMetric(model, None, None).run,
                     global_ranking=True, min_units=2)
    """

    name: ClassVar[str] = "BNScale"

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        if scored.group is not None:
            return group_batchnorm_scales(scored.group)
        module = scored.module
        if module is None:
            raise ValueError(
                "BNScaleAttributionMetric scores a layer, a BatchNorm or a group; got a call site of a function"
            )
        if isinstance(module, BATCHNORM_LAYERS):
            return batchnorm_scales(module, self._name_of(module))
        return batchnorm_scales(*self._batchnorm_after(module))

    def _name_of(self, module: nn.Module) -> str:
        model = unwrap_model(self.model)
        return next((name for name, m in model.named_modules() if m is module), type(module).__name__)

    def _batchnorm_after(self, module: nn.Module) -> tuple[nn.Module, str]:
        """The BatchNorm after every call of ``module`` (a trace on the first batch)."""
        label = _label(self._name_of(module), module)
        if self.data_generator is None:
            raise ValueError(
                f"BNScaleAttributionMetric needs one batch to find the BatchNorm that follows {label} "
                "in the traced model: pass a data generator, or score the BatchNorm itself or the "
                "layer's group (pruner.groups()), which need no data"
            )
        model = unwrap_model(self.model)
        first = self._first_batch(self._batches(model))
        graph = get_graph(model, first.args, first.kwargs or None)
        found: dict[int, tuple[nn.Module, str]] = {}
        for site in graph.sites_of(module):
            following = following_batchnorm(graph, site)
            if following is None:
                raise ValueError(
                    f"no BatchNorm follows {label} (call {site.call_index}) in the model, so "
                    f"BNScaleAttributionMetric has no γ to read; {_NO_BATCHNORM_FIX}"
                )
            # a module call site: the trace sets its module and its name
            assert following.module is not None and following.module_name is not None
            found[id(following.module)] = (following.module, following.module_name)
        if not found:
            raise ValueError(f"{label} is not called in the traced forward pass of the model")
        if len(found) > 1:
            names = ", ".join(name for _, name in found.values())
            raise ValueError(
                f"the calls of {label} are followed by different BatchNorms ({names}); score one of "
                "those BatchNorms directly"
            )
        batchnorm, name = next(iter(found.values()))
        logger.debug("BNScale of %s: the γ of %s", label, name)
        return batchnorm, name
