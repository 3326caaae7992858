"""One file per attribution metric."""

from .apoz import APoZAttributionMetric
from .bn_scale import BNScaleAttributionMetric
from .fpgm import FPGMAttributionMetric
from .leave_one_out import LeaveOneOutAttributionMetric
from .random import RandomAttributionMetric
from .sensitivity import SensitivityAttributionMetric
from .shapley import ShapleyAttributionMetric, draw_permutations
from .taylor import TaylorAttributionMetric
from .thinet import ThiNetAttributionMetric
from .weight_norm import (
    WeightNormAttributionMetric,
    group_member_slices,
    group_weight_norms,
    input_weight_norms,
    input_weight_slices,
    unit_weight_norms,
    unit_weight_slices,
)

__all__ = [
    "APoZAttributionMetric",
    "BNScaleAttributionMetric",
    "FPGMAttributionMetric",
    "LeaveOneOutAttributionMetric",
    "RandomAttributionMetric",
    "SensitivityAttributionMetric",
    "ShapleyAttributionMetric",
    "TaylorAttributionMetric",
    "ThiNetAttributionMetric",
    "WeightNormAttributionMetric",
    "draw_permutations",
    "group_member_slices",
    "group_weight_norms",
    "input_weight_norms",
    "input_weight_slices",
    "unit_weight_norms",
    "unit_weight_slices",
]
