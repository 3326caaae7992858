"""Attribution metrics: one score per unit of a layer, higher = more important = keep.

Every metric shares one data loop (:mod:`torchpruner.attributions.base`) and one runner
(:mod:`torchpruner.attributions.runner`), and leaves the model as
it found it. captum is imported only when :class:`CaptumAttributionMetric` runs. ``run(group)``
scores a coupled group from ``pruner.groups()`` (:mod:`torchpruner.attributions.groups`).
"""

from torchpruner.graph.evaluation import find_best_module_for_attributions

from .base import AttributionMetric, BatchStatisticsWarning, default_batch_fn, per_example_loss
from .captum_adapter import CaptumAttributionMetric
from .collectives import DistributedScoringError
from .groups import CoupledGroupWarning
from .methods import (
    APoZAttributionMetric,
    FPGMAttributionMetric,
    LeaveOneOutAttributionMetric,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    ThiNetAttributionMetric,
    WeightNormAttributionMetric,
)
from .methods.bn_scale import BNScaleAttributionMetric
from .reductions import MeanPlusStd

__all__ = [
    "AttributionMetric",
    "APoZAttributionMetric",
    "BNScaleAttributionMetric",
    "BatchStatisticsWarning",
    "CaptumAttributionMetric",
    "CoupledGroupWarning",
    "FPGMAttributionMetric",
    "DistributedScoringError",
    "MeanPlusStd",
    "LeaveOneOutAttributionMetric",
    "RandomAttributionMetric",
    "SensitivityAttributionMetric",
    "ShapleyAttributionMetric",
    "TaylorAttributionMetric",
    "ThiNetAttributionMetric",
    "WeightNormAttributionMetric",
    "default_batch_fn",
    "find_best_module_for_attributions",
    "per_example_loss",
]
