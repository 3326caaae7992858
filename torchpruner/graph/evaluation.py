"""Where a layer's units are scored, in the form the 2020 TorchPruner returned: a module.

The evaluation point of a layer is a call site of the traced graph
(:meth:`~torchpruner.graph.trace.ModelGraph.evaluation_point`); with ``find_best=True`` it moves
past the BatchNorm, activation and Dropout that follow the layer in the data flow and stops at a
merge (add, cat). The 2020 library walked ``model.modules()`` in registration order instead, which
picks the wrong module whenever a model registers its layers in another order than it calls them.

:func:`evaluation_module` turns a call site into what ``attr.run`` accepts and scores at exactly
that point: the module when the point is the first call of a module, else the call site itself (a
functional ``F.relu``, or the second call of a reused ``nn.ReLU``).
:func:`find_best_module_for_attributions` is the 2020 helper on top of the traced graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from torchpruner._state import make_example_inputs, unwrap_model

from .trace import CallSite, get_graph

__all__ = ["evaluation_module", "find_best_module_for_attributions"]


def evaluation_module(site: CallSite) -> nn.Module | CallSite:
    """The module whose output is ``site`` when ``run(module)`` scores exactly there (the first
    call of a module), else ``site`` itself (a functional op, a later call of a reused module)."""
    if site.kind == "module" and site.call_index == 0 and site.module is not None:
        return site.module
    return site


def find_best_module_for_attributions(
    model: nn.Module,
    module: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    example_inputs: Any = None,
    call_index: int = 0,
) -> nn.Module | CallSite:
    """Where attributions of ``module`` are best computed: after the BatchNorm, activation and
    Dropout that follow it in the data flow (stopping at a merge such as add or cat).

    The 2020 helper of the same name walked ``model.modules()`` in registration order and needed
    no input; this one follows the traced graph, so it needs the model's input to trace it (as
    the Pruner does). Tracing leaves mode, BatchNorm statistics and the RNG untouched.

    Args:
        model: the model that contains ``module``.
        module: a layer of the model (Linear, Conv, ...).
        input_size: the input shape without the batch dim (or give ``example_inputs``).
        example_inputs: a tensor, tuple or dict of inputs, used as given.
        call_index: which call of a module that runs several times per forward.

    Returns:
        the module whose output is the evaluation point, or the
        :class:`~torchpruner.graph.trace.CallSite` when that point is not the first call of a
        module (a functional activation, a reused ``nn.ReLU``); either can be passed to
        ``attr.run``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: neither ``input_size`` nor ``example_inputs`` given; ``module`` not in the model,
            never called, a container, or called fewer than ``call_index + 1`` times.
    """
    model = unwrap_model(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module of the model, got {type(module).__name__}")
    if input_size is None and example_inputs is None:
        raise ValueError(
            "find_best_module_for_attributions follows the traced data flow of the model, so it "
            "needs the model's input: pass input_size=(...) (the shape without the batch dim) or "
            "example_inputs=..., as for Pruner; or call attr.find_evaluation_module(module, "
            "find_best_evaluation_module=True) on a metric, which traces with its first batch"
        )
    args, kwargs = make_example_inputs(model, input_size, example_inputs)
    graph = get_graph(model, args, kwargs)
    graph.module_name(module)  # not a submodule: ValueError naming it
    if not graph.has_sites(module) and any(True for _ in module.children()):
        raise ValueError(
            f"module '{graph.module_name(module)}' ({type(module).__name__}) is a container: it has "
            "no units of its own; pass one of its layers"
        )
    return evaluation_module(graph.evaluation_point(module, find_best=True, call_index=call_index))
