"""Tracing, call sites and evaluation points: the one graph shared by attributions and the Pruner."""

from .trace import (CallSite, ModelGraph, get_graph, invalidate_graph, make_example_inputs,
                    preserved_state, register_leaf_module, unwrap_model)

__all__ = ["CallSite", "ModelGraph", "get_graph", "invalidate_graph", "make_example_inputs",
           "preserved_state", "register_leaf_module", "unwrap_model"]
