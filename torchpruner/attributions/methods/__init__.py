"""One file per attribution metric."""

from .apoz import APoZAttributionMetric
from .leave_one_out import LeaveOneOutAttributionMetric
from .random import RandomAttributionMetric
from .sensitivity import SensitivityAttributionMetric
from .shapley import ShapleyAttributionMetric, draw_permutations
from .taylor import TaylorAttributionMetric
from .weight_norm import (WeightNormAttributionMetric, group_weight_norms, input_weight_norms,
                          unit_weight_norms)

__all__ = [
    "APoZAttributionMetric",
    "LeaveOneOutAttributionMetric",
    "RandomAttributionMetric",
    "SensitivityAttributionMetric",
    "ShapleyAttributionMetric",
    "TaylorAttributionMetric",
    "WeightNormAttributionMetric",
    "draw_permutations",
    "group_weight_norms",
    "input_weight_norms",
    "unit_weight_norms",
]
