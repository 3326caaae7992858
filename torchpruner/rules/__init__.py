"""Slicing rules (floor 1): the edits a prune is made of, the rule registry, every built-in rule.

Importing this package registers the rules of the torch.nn layers (:mod:`.layers`) and of
``nn.MultiheadAttention`` (:mod:`.attention`), so every planner and :func:`torchpruner.load_pruned`
see the same rules in any process.
"""

from . import attention, layers  # noqa: F401  (registers the built-in rules)
from .edits import (
    KEPT_UNITS_ATTRIBUTE,
    RECORD_ATTRIBUTES,
    SHAPE_ATTRIBUTES_ATTRIBUTE,
    AttributeChange,
    Edit,
    TensorSlice,
    apply_slice,
    set_attribute,
    slice_tensor,
)
from .registry import (
    DROPOUT_POLICIES,
    GroupedSliceError,
    SlicingRule,
    UnitSelection,
    get_slicing_rule,
    has_own_slicing_rule,
    register_slicing_rule,
    register_slicing_rule_by_path,
    unaccounted_tensors,
    unaccounted_tensors_message,
)
from .units import (
    complement,
    conv_blocked_side,
    conv_weight_blocks,
    kept_units,
    kept_units_edit,
    normalize_indices,
    param_record_key,
    shape_attributes_edit,
)

__all__ = [
    "AttributeChange",
    "DROPOUT_POLICIES",
    "Edit",
    "GroupedSliceError",
    "KEPT_UNITS_ATTRIBUTE",
    "RECORD_ATTRIBUTES",
    "SHAPE_ATTRIBUTES_ATTRIBUTE",
    "SlicingRule",
    "TensorSlice",
    "UnitSelection",
    "apply_slice",
    "complement",
    "conv_blocked_side",
    "conv_weight_blocks",
    "get_slicing_rule",
    "has_own_slicing_rule",
    "kept_units",
    "kept_units_edit",
    "normalize_indices",
    "param_record_key",
    "register_slicing_rule",
    "register_slicing_rule_by_path",
    "set_attribute",
    "shape_attributes_edit",
    "slice_tensor",
    "unaccounted_tensors",
    "unaccounted_tensors_message",
]
