"""Average percentage of zeros (Hu et al., "Network Trimming", 2016), as 1 − APoZ."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from torchpruner.graph import CallSite

from ..base import AttributionMetric
from ..data import Batch
from ..runner import Runner


def _after_relu(site: CallSite) -> bool:
    """The site is a ReLU-like activation, possibly followed by Dropout / Identity / max pooling / flatten."""
    seen = 0
    while site is not None and seen < 16:
        if site.is_relu_like:
            return True
        passthrough = (
            site.is_dropout
            or _is_flatten(site)
            or (
                site.kind == "module"
                and (
                    isinstance(site.module, torch.nn.Identity)
                    or type(site.module).__name__.startswith(("MaxPool", "AdaptiveMaxPool"))
                )
            )
        )
        if not passthrough or len(site.inputs) != 1:
            return False
        site, seen = site.inputs[0], seen + 1
    return False


def _is_flatten(site: CallSite) -> bool:
    """Flatten / view / reshape: the values (and their signs) are unchanged."""
    if site.kind == "module":
        return isinstance(site.module, torch.nn.Flatten)
    if site.kind == "function":
        return site.target in (torch.flatten, torch.reshape)
    return site.kind == "method" and site.target in ("flatten", "view", "reshape")


def _describe(site: CallSite) -> str:
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
    shares_pass: ClassVar[bool] = True

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        others = [point.site for point in runner.read_points if not _after_relu(point.site)]
        if not others:
            return
        if runner.group is None:
            message = (
                f"APoZ evaluated at {others[0].label} ({_describe(others[0])}), which is not a "
                "ReLU-like activation: the fraction of positive outputs is only meaningful after "
                "ReLU (try find_best_evaluation_module=True)"
            )
        else:
            message = (
                f"APoZ of {runner.label}: the consumers read "
                + ", ".join(f"{site.label} ({_describe(site)})" for site in others[:3])
                + ", which is not a ReLU-like activation: the fraction of positive values is only "
                "meaningful after ReLU"
            )
        warnings.warn(message, UserWarning, stacklevel=4 if runner.group is None else 5)  # the caller of run

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        """Positive values / all values of the unit, over every read point."""
        pairs = runner.activations(batch)
        positive = runner.sum_per_unit((point, (z > 0).to(torch.float64)) for point, z in pairs)
        total = runner.sum_per_unit((point, torch.ones_like(z, dtype=torch.float64)) for point, z in pairs)
        return positive / total.clamp(min=1)
