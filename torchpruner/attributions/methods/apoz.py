"""Average percentage of zeros (Hu et al., "Network Trimming", 2016), as 1 − APoZ."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from ..base import AttributionMetric, Batch, SiteRunner, units_view


def _after_relu(site: Any) -> bool:
    """The site is a ReLU-like activation, possibly followed by Dropout / max pooling."""
    seen = 0
    while site is not None and seen < 16:
        if site.is_relu_like:
            return True
        passthrough = site.is_dropout or (
            site.kind == "module" and type(site.module).__name__.startswith(("MaxPool", "AdaptiveMaxPool"))
        )
        if not passthrough or len(site.inputs) != 1:
            return False
        site, seen = site.inputs[0], seen + 1
    return False


def _describe(site: Any) -> str:
    if site.kind == "module":
        return type(site.module).__name__
    return f"{site.kind} {getattr(site.target, '__name__', site.target)}"


class APoZAttributionMetric(AttributionMetric):
    """Fraction of positions where a unit is active: ``mean_s [z[n, c, s] > 0]`` in [0, 1].

    This is ``1 − APoZ``, so higher = more often active = keep. Meaningful after a ReLU-like
    activation (ReLU, ReLU6); elsewhere a ``UserWarning`` suggests
    ``find_best_evaluation_module=True``.
    """

    name: ClassVar[str] = "APoZ"

    def prepare(self, site: Any, options: dict[str, Any]) -> None:
        if not _after_relu(site):
            warnings.warn(
                f"APoZ evaluated at {site.label} ({_describe(site)}), "
                "which is not a ReLU-like activation: the fraction of positive outputs is only "
                "meaningful after ReLU (try find_best_evaluation_module=True)",
                UserWarning,
                stacklevel=4,
            )

    def score_batch(self, runner: SiteRunner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        z = runner.activation(batch)
        return (units_view(z, runner.unit_axis) > 0).to(torch.float64).mean(dim=2)
