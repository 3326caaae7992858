"""Random scores: the baseline every pruning criterion should beat."""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

import torch
from torch import nn

from ..base import AttributionMetric


class RandomAttributionMetric(AttributionMetric):
    """One score per unit drawn from U(0, 1).

    No pass over the data: one batch is only used to trace the model and count the units at the
    evaluation point. The numbers come from a private ``torch.Generator``, so the global RNG is
    untouched.

    Options:
        seed (int | None): with an int, the same scores for the same seed and unit count; with
            ``None`` (default) a fresh seed from the OS on every ``run``.
    """

    name: ClassVar[str] = "Random"
    default_options: ClassVar[dict[str, Any]] = {"seed": None}
    needs_data: ClassVar[bool] = False

    def score_without_data(
        self, model: nn.Module, module: nn.Module | None, site: Any, options: dict[str, Any]
    ) -> torch.Tensor:
        return _draw(site.num_units, options["seed"])

    def score_group_without_data(self, model: nn.Module, group: Any, options: dict[str, Any]) -> torch.Tensor:
        """One draw per group unit (no data, no trace)."""
        return _draw(group.num_units, options["seed"])


def _draw(num_units: int, seed: int | None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(secrets.randbits(63) if seed is None else seed))
    return torch.rand(num_units, generator=generator, dtype=torch.float64)
