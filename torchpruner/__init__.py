"""torchpruner: on-the-fly structured pruning for PyTorch.

Score the units (neurons, channels, filters) of a layer with an attribution metric computed over a
DataLoader, then remove the weakest for real: parameters are sliced, the layers that consume them
are sliced too, and the live training state (Dropout rates, gradients, BatchNorm statistics,
optimizer buffers) is fixed in place.

Everything public is re-exported here (``from torchpruner import Pruner, ShapleyAttributionMetric``).
Submodules are imported on first use, so ``import torchpruner`` is cheap and never imports
torchvision or captum.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # attributions
    "AttributionMetric": "torchpruner.attributions",
    "RandomAttributionMetric": "torchpruner.attributions",
    "APoZAttributionMetric": "torchpruner.attributions",
    "SensitivityAttributionMetric": "torchpruner.attributions",
    "TaylorAttributionMetric": "torchpruner.attributions",
    "WeightNormAttributionMetric": "torchpruner.attributions",
    "ShapleyAttributionMetric": "torchpruner.attributions",
    "FPGMAttributionMetric": "torchpruner.attributions",
    "ThiNetAttributionMetric": "torchpruner.attributions",
    "LeaveOneOutAttributionMetric": "torchpruner.attributions",
    "CaptumAttributionMetric": "torchpruner.attributions",
    "BNScaleAttributionMetric": "torchpruner.attributions",
    "find_best_module_for_attributions": "torchpruner.attributions",
    "MeanPlusStd": "torchpruner.attributions",
    # pruner
    "Pruner": "torchpruner.pruner",
    "Plan": "torchpruner.pruner",
    "register_slicing_rule": "torchpruner.rules",
    "SlicingRule": "torchpruner.rules",
    "register_per_element_optimizer": "torchpruner.pruner",
    "save_pruned": "torchpruner.pruner",
    "load_pruned": "torchpruner.pruner",
    "kept_units": "torchpruner.rules",
    # coupled groups
    "Group": "torchpruner.graph.dependency",
    "prune_groups": "torchpruner.schedule",
    "IterativePruning": "torchpruner.schedule",
    "Masker": "torchpruner.masking",
    # DistributedDataParallel
    "prune_ddp": "torchpruner.distributed",
    "CoupledGroupWarning": "torchpruner.attributions.groups",
    "BatchStatisticsWarning": "torchpruner.attributions.base",
    # graph
    "ModelGraph": "torchpruner.graph",
    "CallSite": "torchpruner.graph",
    "get_graph": "torchpruner.graph",
    # utils
    "count_parameters": "torchpruner.utils",
    "count_flops": "torchpruner.utils",
    "measure_latency": "torchpruner.utils",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'torchpruner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
