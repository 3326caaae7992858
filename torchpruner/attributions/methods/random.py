"""Random scores: the baseline every pruning criterion should beat."""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

import torch

from ..base import AttributionMetric, Scored


class RandomAttributionMetric(AttributionMetric):
    """One score per unit drawn from U(0, 1).

    No pass over the data: for a layer, one batch is only used to trace the model and count the
    units at the evaluation point; a group knows its unit count. The numbers come from a private
    ``torch.Generator``, so the global RNG is untouched.

    Options:
        seed (int | None): with an int, the same scores for the same seed and unit count; with
            ``None`` (default) a fresh seed from the OS on every ``run``.
    """

    name: ClassVar[str] = "Random"
    default_options: ClassVar[dict[str, Any]] = {"seed": None}

    def score_without_data(self, scored: Scored, options: dict[str, Any]) -> torch.Tensor:
        seed = options["seed"]
        generator = torch.Generator().manual_seed(int(secrets.randbits(63) if seed is None else seed))
        return torch.rand(scored.num_units, generator=generator, dtype=torch.float64)
