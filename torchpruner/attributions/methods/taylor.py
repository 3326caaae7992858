"""First-order Taylor estimate of the loss change when a unit is removed (Molchanov et al., 2017)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..base import AttributionMetric
from ..data import Batch, wide
from ..runner import Runner


class TaylorAttributionMetric(AttributionMetric):
    """``|Σ_s −∂ℓₙ/∂z[n, c, s] · z[n, c, s]|`` per example n and unit c.

    ``−g·z`` is the first-order estimate of ``ℓ(z_c = 0) − ℓ(z)``: positive when removing the unit
    would increase the loss. For a coupled group the sum runs over the group's entry points e,
    ``|Σ_e Σ_s −g_e·z_e|`` with ``g_e`` the total derivative at e: ``dℓ/dt`` at ``t = 0`` for scaling
    the unit by ``1 − t`` once per source (see :mod:`torchpruner.attributions.groups`).

    Options:
        signed (bool): keep the sign (no absolute value), default ``False``.
    """

    name: ClassVar[str] = "Taylor"
    shares_pass: ClassVar[bool] = True
    default_options: ClassVar[dict[str, Any]] = {"signed": False}

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        triples = runner.activations_and_gradients(batch)
        scores = runner.sum_per_unit((point, -wide(g) * wide(z)) for point, z, g in triples)
        return scores if options["signed"] else scores.abs()
