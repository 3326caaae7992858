"""Shapley values of units by permutation sampling (Ancona et al., 2020)."""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

import torch

from ..base import AttributionMetric
from ..data import Batch
from ..runner import Runner


def draw_permutations(num_units: int, samples: int, seed: int | None = None) -> list[torch.Tensor]:
    """The orderings a Shapley run uses: ``samples`` permutations of ``range(num_units)`` from a
    private generator seeded with ``seed`` (``None``: a fresh seed from the OS). Exposed so that
    faster implementations can be checked against this one on the same orderings."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"sv_samples must be a positive int, got {samples!r}")
    generator = torch.Generator().manual_seed(int(secrets.randbits(63) if seed is None else seed))
    return [torch.randperm(num_units, generator=generator) for _ in range(samples)]


class ShapleyAttributionMetric(AttributionMetric):
    """Shapley value of unit c in the game ``v(S) = −ℓₙ(only the units in S active)``.

    Units outside S are zeroed at the evaluation point. Estimated by permutation sampling: for each
    of ``sv_samples`` random orderings of the units, units are switched on one at a time and each
    gets its marginal ``v(S ∪ {c}) − v(S)``; the estimate is the mean over orderings. Per ordering
    the marginals telescope, so one sample's scores sum to ``ℓ(no unit) − ℓ(all units)`` for each
    example. The same orderings are used for every batch, and payoffs are per example so every
    ``reduction`` applies. Cost: ``sv_samples · (units + 1)`` forward passes per batch.

    For a coupled group (``run(group)``) the players are the group units and a coalition zeroes
    the units outside it at every tensor the group's consumers read, which is exactly pruning them:
    the loss of the coalition "all but c" is the loss after ``Pruner.prune_model`` removes c.

    This is the straightforward reference implementation (every coalition runs the whole model).

    Options:
        sv_samples (int): number of sampled orderings, default 5.
        seed (int | None): seed of the private generator that draws the orderings; ``None``
            (default) draws a fresh seed from the OS on every ``run``.
    """

    name: ClassVar[str] = "Shapley"
    default_options: ClassVar[dict[str, Any]] = {"sv_samples": 5, "seed": None}

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        self._permutations = draw_permutations(runner.num_units, options["sv_samples"], options["seed"])
        runner.description = f"Shapley {runner.label}: 0/{options['sv_samples']} permutations"

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """The players are the units (of the layer, or of the group: a coalition then zeroes the
        units outside it at every read point of the group together)."""
        num_units = runner.num_units
        total = torch.zeros(batch.size, num_units, dtype=torch.float64)
        label = runner.label
        for k, permutation in enumerate(self._permutations):
            runner.set_progress(f"Shapley {label}: {k}/{len(self._permutations)} permutations")
            keep = torch.zeros(num_units, dtype=torch.bool)
            value_before = -runner.losses(batch, keep).cpu()
            for unit in permutation.tolist():
                keep[unit] = True
                value_after = -runner.losses(batch, keep).cpu()
                total[:, unit] += value_after - value_before
                value_before = value_after
        runner.set_progress(f"Shapley {label}: {len(self._permutations)}/{len(self._permutations)} permutations")
        return total / len(self._permutations)
