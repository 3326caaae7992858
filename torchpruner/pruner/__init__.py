"""Structured pruning in place: the Pruner, plans, optimizer surgery, pruned checkpoints.

``Pruner(model, input_size, device, optimizer).prune_model(layer, indices, cascading_modules)``
removes units of ``layer`` and slices the layers that read them; the same ``nn.Parameter`` objects
keep their (sliced) data, gradients and optimizer state, so training continues with the same
model and optimizer. ``Pruner.plan(...)`` returns the :class:`Plan` without changing anything.
See :mod:`torchpruner.rules` for adding a slicing rule for your own layer (re-exported here).
"""

from torchpruner.rules import (
    DROPOUT_POLICIES,
    AttributeChange,
    SlicingRule,
    TensorSlice,
    UnitSelection,
    get_slicing_rule,
    kept_units,
    register_slicing_rule,
    set_attribute,
    slice_tensor,
)

from .checkpoint import load_pruned, pruning_manifest, resize_to_manifest, save_pruned
from .optimizer import OptimizerStateSlice, register_per_element_optimizer
from .plan import Plan
from .pruner import Pruner

__all__ = [
    "Pruner",
    "Plan",
    "TensorSlice",
    "AttributeChange",
    "OptimizerStateSlice",
    "SlicingRule",
    "UnitSelection",
    "register_slicing_rule",
    "get_slicing_rule",
    "slice_tensor",
    "set_attribute",
    "register_per_element_optimizer",
    "save_pruned",
    "load_pruned",
    "pruning_manifest",
    "resize_to_manifest",
    "kept_units",
    "DROPOUT_POLICIES",
]
