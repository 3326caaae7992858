"""Attribution metrics: one score per unit of a layer, higher = more important = keep.

Every metric shares one data loop (:mod:`torchpruner.attributions.base`) and one runner
(:mod:`torchpruner.attributions.runner`), and leaves the model as
it found it. captum is imported only when :class:`CaptumAttributionMetric` runs. ``run(group)``
scores a coupled group from ``pruner.groups()`` (:mod:`torchpruner.attributions.groups`).
"""

from .base import AttributionMetric, BatchStatisticsWarning, default_batch_fn, per_example_loss
from .captum_adapter import CaptumAttributionMetric
from .groups import CoupledGroupWarning
from .methods import (APoZAttributionMetric, LeaveOneOutAttributionMetric, RandomAttributionMetric,
                      SensitivityAttributionMetric, ShapleyAttributionMetric,
                      TaylorAttributionMetric, WeightNormAttributionMetric)

__all__ = [
    "AttributionMetric",
    "APoZAttributionMetric",
    "BatchStatisticsWarning",
    "CaptumAttributionMetric",
    "CoupledGroupWarning",
    "LeaveOneOutAttributionMetric",
    "RandomAttributionMetric",
    "SensitivityAttributionMetric",
    "ShapleyAttributionMetric",
    "TaylorAttributionMetric",
    "WeightNormAttributionMetric",
    "default_batch_fn",
    "per_example_loss",
]
