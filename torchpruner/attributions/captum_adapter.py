"""Any captum layer attribution of the per-example loss, as a pruning metric.

``run_all(targets)`` of a method that attributes a list of layers at once, each as it would
alone (:data:`LAYER_LIST_METHODS`: activation, gradient × activation), calls captum once per
batch for every target and splits the result; other methods call it once per target and batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .base import AttributionMetric, Reduction
from .data import Batch, BatchFn, first_tensor, per_example_loss
from .runner import MaskPoint, Runner, SharedPass


#: captum methods that hook the model's own modules and so need the model as forward function.
MODEL_HOOKING_METHODS = frozenset({"LayerDeepLift", "LayerDeepLiftShap", "LayerLRP"})
#: captum methods that interpolate between baseline and actual *inputs*.
INPUT_PATH_METHODS = frozenset({"LayerConductance", "InternalInfluence", "LayerGradientShap"})
#: captum methods that take a list of layers and attribute each as they would alone, in one call
#: (one forward, and one backward for the gradient). LayerIntegratedGradients takes a list too,
#: but interpolates every listed layer at once, which is the single-layer result only for layers
#: that do not feed each other: it is scored layer by layer.
LAYER_LIST_METHODS = frozenset({"LayerActivation", "LayerGradientXActivation"})


def lists_layers(method: type) -> bool:
    """``method`` is one of captum's :data:`LAYER_LIST_METHODS` and its constructor takes a list
    of layers (a check of the installed captum's signature, not of its version)."""
    if method.__name__ not in LAYER_LIST_METHODS or not method.__module__.startswith("captum."):
        return False
    try:
        layer = inspect.signature(method).parameters.get("layer")
    except (TypeError, ValueError):
        return False
    return layer is not None and "list" in str(layer.annotation).lower()


class _LayerProbe(nn.Identity):
    """Identity module the evaluation point's output is routed through; captum hooks this module.

    Using a probe instead of the real module makes call sites of functions (``F.relu``) and
    modules called several times per forward (torchvision ResNet's ReLU) work, and keeps
    captum's hooks off the user's model.
    """


class CaptumAttributionMetric(AttributionMetric):
    """Turn a captum layer attribution method into a pruning metric.

    The forward function given to captum returns the per-example **negative** loss ``−ℓₙ``
    (so positive attributions = the unit helps = keep); the attribution of the evaluation point is
    summed over positions to one score per example and unit, then reduced over examples.
    With ``method=LayerGradientXActivation`` the signed scores equal
    ``TaylorAttributionMetric(signed=True)``.

    Args:
        model, data_generator, criterion, device, reduction, max_batches, batch_fn, progress: as
            for :class:`~torchpruner.attributions.base.AttributionMetric`.
        method: a captum layer attribution class, ``cls(forward_func, layer, **init_kwargs)``
            with ``.attribute(inputs, additional_forward_args=..., **kwargs)``; default
            ``captum.attr.LayerConductance``.
        init_kwargs: keyword arguments for the method's constructor (e.g.
            ``{"multiply_by_inputs": False}``).
        attribute_kwargs: keyword arguments for ``attribute``, as a dict; needed for captum's
            own ``method=`` (the integration rule, e.g. ``{"method": "riemann_trapezoid"}``),
            whose name is taken by the captum class here.
        absolute: score ``|Σ_s attribution|`` instead of the signed sum (default ``False``).
        **more_attribute_kwargs: also passed to ``attribute`` (``n_steps=``, ``baselines=``,
            ``internal_batch_size=``, ``layer_mask=`` ...). ``run(..., **kwargs)`` overrides any
            of these options.

    Inputs must be positional tensors (captum expands them for path methods); keyword inputs from
    a dict ``batch_fn`` are passed unchanged, which is only right for methods that do not expand
    the batch (gradient × activation, activation, ablation). LayerConductance and
    InternalInfluence interpolate the inputs, so they need floating-point inputs; for token ids use
    LayerIntegratedGradients (tested) or LayerGradientXActivation.

    Tested with: LayerGradientXActivation, LayerActivation, LayerConductance, InternalInfluence,
    LayerIntegratedGradients, LayerFeatureAblation (LayerGradientShap runs). Not supported:
    LayerDeepLift, LayerDeepLiftShap, LayerLRP — they need the model itself as the forward
    function to hook its nonlinearities.

    ``run_all(targets)`` with LayerActivation or LayerGradientXActivation calls captum once per
    batch for all the targets (captum attributes the list of their points, each as alone); other
    methods are called once per target, as ``run`` does.
    """

    name: ClassVar[str] = "Captum"
    default_options: ClassVar[dict[str, Any]] = {
        "method": None,
        "init_kwargs": None,
        "attribute_kwargs": None,
        "absolute": False,
    }

    def __init__(
        self,
        model: nn.Module,
        data_generator: Iterable[Any],
        criterion: Callable[..., Any],
        device: torch.device | str | None = None,
        method: type | None = None,
        reduction: Reduction = "mean",
        max_batches: int | None = None,
        batch_fn: BatchFn | None = None,
        progress: bool | None = None,
        init_kwargs: dict[str, Any] | None = None,
        attribute_kwargs: dict[str, Any] | None = None,
        absolute: bool = False,
        **more_attribute_kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            data_generator,
            criterion,
            device,
            reduction,
            max_batches,
            batch_fn,
            progress,
            method=method,
            init_kwargs=init_kwargs,
            attribute_kwargs=attribute_kwargs,
            absolute=absolute,
            **more_attribute_kwargs,
        )

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return dict(options)  # everything that is not ours goes to captum's attribute()

    @staticmethod
    def _method_class(options: dict[str, Any]) -> type:
        method = options["method"]
        if method is None:
            from captum.attr import LayerConductance  # type: ignore[import-untyped]  # captum ships no types

            method = LayerConductance
        if not isinstance(method, type) or not hasattr(method, "attribute"):
            raise TypeError(f"method must be a captum layer attribution class, got {method!r}")
        if method.__name__ in MODEL_HOOKING_METHODS:
            raise TypeError(
                f"{method.__name__} is not supported: it needs the model itself as the forward "
                "function (to hook its nonlinearities), while this adapter attributes the "
                "per-example loss"
            )
        return method

    def prepare(self, runner: Runner, options: dict[str, Any]) -> None:
        if runner.group is not None:  # captum attributes one layer; a group unit lives in several tensors
            raise TypeError(
                f"{type(self).__name__} cannot score a coupled group: it attributes a single layer, "
                "while a group unit lives in several tensors; use TaylorAttributionMetric "
                "(gradient x activation summed over the group), or score one layer with run(module)"
            )
        runner.description = f"{self._method_class(options).__name__} {runner.label}"

    def _shares_pass(self, options: dict[str, Any]) -> bool:
        return lists_layers(self._method_class(options))

    def _call(self, batch: Batch, options: dict[str, Any]) -> tuple[type, dict[str, Any], Any]:
        """The method, the keyword arguments of ``attribute`` and its inputs for ``batch``;
        TypeError when the batch does not fit the method."""
        method_cls = self._method_class(options)
        attribute_kwargs = dict(options["attribute_kwargs"] or {})
        attribute_kwargs.update((k, v) for k, v in options.items() if k not in self.default_options)
        if not batch.args:
            raise TypeError(
                "CaptumAttributionMetric needs positional tensor inputs; make batch_fn return a "
                "tensor or a tuple of tensors"
            )
        if method_cls.__name__ in INPUT_PATH_METHODS and any(
            isinstance(a, torch.Tensor) and not a.is_floating_point() for a in batch.args
        ):
            raise TypeError(
                f"{method_cls.__name__} interpolates the model inputs, which needs floating-point "
                "inputs; for integer inputs (token ids) use LayerIntegratedGradients (it "
                "interpolates the layer) or LayerGradientXActivation"
            )
        inputs = batch.args[0] if len(batch.args) == 1 else batch.args
        return method_cls, attribute_kwargs, inputs

    def _forward_func(self, forward: Callable[..., Any], batch: Batch) -> Callable[..., torch.Tensor]:
        """The function captum attributes: the per-example negative loss of ``forward``."""
        criterion, kwargs = self.criterion, batch.kwargs

        def forward_func(*inputs_and_target: Any) -> torch.Tensor:
            *inputs, target = inputs_and_target
            output = forward(*inputs, **kwargs)
            first = first_tensor(inputs)
            return -per_example_loss(criterion, output, target, None if first is None else first.shape[0])

        return forward_func

    def _scores(
        self, runner: Runner, attribution: Any, method_cls: type, batch: Batch, options: dict[str, Any]
    ) -> torch.Tensor:
        """``[N, units]`` from captum's attribution of ``runner``'s point."""
        if isinstance(attribution, (tuple, list)):
            attribution = attribution[0]
        if not isinstance(attribution, torch.Tensor) or attribution.shape[0] != batch.size:
            raise RuntimeError(
                f"{method_cls.__name__} returned {type(attribution).__name__} "
                f"{tuple(getattr(attribution, 'shape', ()))}; expected a tensor shaped like the "
                f"activation at {runner.label}"
            )
        (point,) = runner.points
        scores = runner.sum_per_unit([(point, attribution.detach())])
        return scores.abs() if options["absolute"] else scores

    def score_batch(self, runner: Runner, batch: Batch, options: dict[str, Any]) -> torch.Tensor:
        method_cls, attribute_kwargs, inputs = self._call(batch, options)
        forward = runner.forward
        if forward is None:
            raise RuntimeError(f"{runner.label} is scored outside the data loop")
        probe = _LayerProbe()  # a fresh probe per batch: captum's hooks never outlive it

        def through_probe(point: MaskPoint, z: torch.Tensor) -> torch.Tensor:
            return _probed(z, [probe])

        attributor = method_cls(self._forward_func(forward, batch), probe, **(options["init_kwargs"] or {}))
        with torch.enable_grad(), runner.transformed(through_probe):
            attribution = attributor.attribute(inputs, additional_forward_args=(batch.target,), **attribute_kwargs)
        return self._scores(runner, attribution, method_cls, batch, options)

    def score_shared_batch(self, shared: SharedPass, batch: Batch, options: dict[str, Any]) -> list[torch.Tensor]:
        """One captum call for every runner: each runner's point goes through a probe of its
        own, captum attributes the list of probes, each attribution is split to its runner."""
        method_cls, attribute_kwargs, inputs = self._call(batch, options)
        probes = [_LayerProbe() for _ in shared.runners]  # fresh per batch, as in score_batch
        probe_of = {id(point): probe for runner, probe in zip(shared.runners, probes) for point in runner.points}

        def through_probes(site: Any, z: torch.Tensor) -> torch.Tensor:
            return _probed(z, [probe_of[id(point)] for point in shared.points_at(site)])

        forward_func = self._forward_func(
            lambda *args, **kwargs: shared.run_with(through_probes, *args, **kwargs), batch
        )
        attributor = method_cls(forward_func, probes, **(options["init_kwargs"] or {}))
        with torch.enable_grad():
            attributions = attributor.attribute(inputs, additional_forward_args=(batch.target,), **attribute_kwargs)
        if not isinstance(attributions, (list, tuple)) or len(attributions) != len(probes):
            raise RuntimeError(
                f"{method_cls.__name__} given {len(probes)} layers returned {type(attributions).__name__}; "
                "expected one attribution per layer"
            )
        return [
            self._scores(runner, attribution, method_cls, batch, options)
            for runner, attribution in zip(shared.runners, attributions)
        ]


def _probed(z: torch.Tensor, probes: list[_LayerProbe]) -> torch.Tensor:
    """``z`` routed through ``probes`` (captum hooks them), as a new tensor: downstream in-place
    ops leave captum's copies alone."""
    if torch.is_grad_enabled() and not z.requires_grad:
        z = z.detach().requires_grad_(True)
    for probe in probes:
        z = probe(z)
    return z.clone()
