"""Average percentage of zeros (Hu et al., "Network Trimming", 2016), as 1 − APoZ."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from ..base import AttributionMetric, Batch, SiteRunner, units_view


def _after_relu(site: Any) -> bool:
    """The site is a ReLU-like activation, possibly followed by Dropout / Identity / max pooling / flatten."""
    seen = 0
    while site is not None and seen < 16:
        if site.is_relu_like:
            return True
        passthrough = site.is_dropout or _is_flatten(site) or (
            site.kind == "module" and (isinstance(site.module, torch.nn.Identity)
                                       or type(site.module).__name__.startswith(("MaxPool", "AdaptiveMaxPool")))
        )
        if not passthrough or len(site.inputs) != 1:
            return False
        site, seen = site.inputs[0], seen + 1
    return False


def _is_flatten(site: Any) -> bool:
    """Flatten / view / reshape: the values (and their signs) are unchanged."""
    if site.kind == "module":
        return isinstance(site.module, torch.nn.Flatten)
    if site.kind == "function":
        return site.target in (torch.flatten, torch.reshape)
    return site.kind == "method" and site.target in ("flatten", "view", "reshape")


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

    def prepare_group(self, runner: Any, options: dict[str, Any]) -> None:
        others = [point.site for point in runner.points if not _after_relu(point.site)]
        if others:
            warnings.warn(
                f"APoZ of {runner.label}: the consumers read "
                + ", ".join(f"{site.label} ({_describe(site)})" for site in others[:3])
                + ", which is not a ReLU-like activation: the fraction of positive values is only "
                "meaningful after ReLU",
                UserWarning,
                stacklevel=4,
            )

    def score_group_batch(self, runner: Any, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """Positive values / all values of the unit, over every tensor the group's consumers read."""
        zs = runner.activations(batch)
        positive = runner.sum_per_unit([(z > 0).to(torch.float64) for z in zs])
        total = runner.sum_per_unit([torch.ones_like(z, dtype=torch.float64) for z in zs])
        return positive / total.clamp(min=1)
