"""The graph (floor 2): capture, call sites, evaluation points, and the one dependency analysis.

:mod:`.trace` records the call sites of a model (torch.fx, or forward hooks where fx fails) and
caches the result on the model; :mod:`.dependency` finds the coupled groups in an fx trace. Both
the attributions and the Pruner read this one graph; nothing traces twice.
"""

from torchpruner._ops import register_leaf_module
from torchpruner._state import make_example_inputs, preserved_state, unwrap_model

from .trace import CallSite, ModelGraph, get_graph, invalidate_graph

__all__ = [
    "CallSite",
    "ModelGraph",
    "get_graph",
    "invalidate_graph",
    "make_example_inputs",
    "preserved_state",
    "register_leaf_module",
    "unwrap_model",
]
