"""ThiNet (Luo et al., "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression",
ICCV 2017): prune the channels the next layer can do without.

The next layer (the *consumer*) computes each output entry as a sum over its input channels,
``y = Σ_c x̂_c + bias``, where ``x̂_c`` is what channel c contributes (its inputs times the
consumer's weights that read them). Removing a set T of channels changes that entry by
``Σ_{c∈T} x̂_c``. On output entries sampled from the data, ThiNet removes channels greedily: each
step takes the channel whose removal, together with those already removed, gives the smallest
``Σ_entries (Σ_{c∈T} x̂_c)²``. The order of removal is the ranking.
"""

from __future__ import annotations

import itertools
import numbers
import secrets
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchpruner.graph import CallSite, ModelGraph, get_graph, unwrap_model
from torchpruner.graph.trace import base_layer_input
from torchpruner.graph.dependency import Group, get_dependency_graph

from ..base import AttributionMetric, left_as_found
from ..groups import check_group, group_label, group_runner

#: layers whose weights read the units: the candidates for "the next layer"
WEIGHT_LAYERS: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.Embedding,
)


def channel_contributions(
    consumer: nn.Linear | nn.Conv1d | nn.Conv2d, x: torch.Tensor, samples: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each input channel of ``consumer`` contributes to sampled entries of its output.

    Args:
        consumer: a ``Linear`` (input features on the last dim), or a ``Conv1d`` / ``Conv2d``
            with ``groups=1`` (channels on dim 1; any stride, dilation, padding and padding mode).
        x: the consumer's input for one batch.
        samples: how many output entries to draw, uniformly with replacement from every
            (example, output channel, position) of the batch; ``None`` (or at least as many as
            there are): every entry once.
        generator: the private generator the entries are drawn from (CPU).

    Returns:
        ``(contributions, index)``: float64 ``[samples, in channels]`` with
        ``contributions.sum(1)`` the consumer's output minus its bias at the sampled entries,
        and ``index`` those entries as flat indices into the output laid out as
        ``[N, out channels, positions]``.
    """
    weight = consumer.weight.detach().to(torch.float64)
    x = base_layer_input(consumer, x.detach().to(torch.float64))  # a same-padded conv pads first
    n = x.shape[0]
    if isinstance(consumer, nn.Linear):
        rows = x.reshape(n, -1, x.shape[-1])  # [N, L, F]
        out_channels, positions = weight.shape[0], rows.shape[1]
    else:
        if consumer.padding_mode == "zeros":
            x = F.pad(x, consumer._reversed_padding_repeated_twice)
        else:
            x = F.pad(x, consumer._reversed_padding_repeated_twice, mode=consumer.padding_mode)
        if x.dim() == 3:  # Conv1d as a Conv2d of height 1
            x, weight = x.unsqueeze(2), weight.unsqueeze(2)
            stride, dilation = (1,) + tuple(consumer.stride), (1,) + tuple(consumer.dilation)
        else:
            stride, dilation = tuple(consumer.stride), tuple(consumer.dilation)
        kernel = weight.shape[2:]
        height, width = ((x.shape[2 + a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in range(2))
        out_channels, positions = weight.shape[0], height * width
    total = n * out_channels * positions
    if samples is None or samples >= total:
        index = torch.arange(total)
    else:
        index = torch.randint(total, (samples,), generator=generator)
    example, channel, position = (
        index // (out_channels * positions),
        index // positions % out_channels,
        index % positions,
    )
    example, channel, position = (t.to(x.device) for t in (example, channel, position))
    if isinstance(consumer, nn.Linear):
        contributions = rows[example, position] * weight[channel]
    else:
        rows_at = (position // width * stride[0])[:, None] + torch.arange(kernel[0], device=x.device) * dilation[0]
        cols_at = (position % width * stride[1])[:, None] + torch.arange(kernel[1], device=x.device) * dilation[1]
        patches = x[example[:, None, None], :, rows_at[:, :, None], cols_at[:, None, :]]  # [m, kh, kw, C]
        contributions = torch.einsum("mhwc,mchw->mc", patches, weight[channel])
    return contributions, index


def greedy_removal_order(contributions: torch.Tensor) -> list[int]:
    """ThiNet's greedy selection on ``contributions`` ``[entries, channels]``: repeatedly remove the
    channel c that minimises ``Σ_entries (Σ_{removed ∪ {c}} contributions)²`` (ties: the lowest
    index); returns every channel in the order removed. ``O(channels² · entries)``."""
    values = contributions.to(torch.float64)
    count = values.shape[1]
    residual = torch.zeros(values.shape[0], dtype=torch.float64, device=values.device)
    squares = values.pow(2).sum(dim=0)
    left = torch.ones(count, dtype=torch.bool, device=values.device)
    order: list[int] = []
    for _ in range(count):
        # ‖r + x_c‖² = ‖r‖² + 2 r·x_c + ‖x_c‖²; ‖r‖² is the same for every candidate
        cost = (2 * (residual @ values) + squares).masked_fill(~left, float("inf"))
        chosen = int(torch.argmin(cost))
        order.append(chosen)
        left[chosen] = False
        residual += values[:, chosen]
    return order


def _check_samples(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"samples_per_batch must be a positive int or None (every output entry), got {value!r} "
            f"({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"samples_per_batch must be a positive int or None (every output entry), got {value!r}")


def _check_seed(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {value!r} ({type(value).__name__})")


class ThiNetAttributionMetric(AttributionMetric):
    """The order in which ThiNet's greedy selection removes a layer's units (see the module
    docstring): ``score = (k + 1) / units`` for the k-th unit removed, so the first removed has
    the lowest score, the last kept scores 1, and layers of different widths are comparable.

    The units are scored through the one Conv/Linear layer that reads them (the consumer): a
    ``Conv1d`` / ``Conv2d`` with ``groups=1`` or a ``Linear`` (also after a flatten, where a
    channel owns its ``H·W`` inputs). A layer whose units feed no such layer (the model output),
    or several (a residual stream, a fan-out) is refused with a ValueError, another kind of
    consumer with a TypeError.
    ``run(group)`` scores a coupled group the same way; ``find_best_evaluation_module`` and
    ``call_index`` play no part (the consumer reads the units after the BatchNorm / activation).

    Sampling: every batch is run once (eval mode, no gradients); from its consumer output,
    ``samples_per_batch`` entries (example, output channel, position) are drawn uniformly with
    replacement from a private generator seeded with ``seed``, so a run is reproducible and the
    global RNG is untouched. ``samples_per_batch=None`` uses every entry (exact, and costly).

    Cost: one forward pass per batch, plus ``samples_per_batch · in channels · kernel size``
    multiply-adds per batch for the contributions, and ``in channels² · M`` for the greedy
    selection, with ``M = samples_per_batch · batches`` kept in memory as ``M × in channels``
    float64 values. The scores are a ranking of the whole run, so ``reduction`` sees a single
    "example" (``"none"`` gives ``[1, units]``).

    Options:
        samples_per_batch (int | None): output entries sampled per batch, default 128.
        seed (int | None): seed of the sampling generator, default 0; ``None``: a fresh seed
            from the OS on every ``run``.
    """

    name: ClassVar[str] = "ThiNet"
    default_options: ClassVar[dict[str, Any]] = {"samples_per_batch": 128, "seed": 0}

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = super()._check_options(options)
        if "samples_per_batch" in options:
            _check_samples(options["samples_per_batch"])
        if "seed" in options:
            _check_seed(options["seed"])
        return options

    def run(
        self,
        module: nn.Module | CallSite | Group,
        find_best_evaluation_module: bool = False,
        *,
        call_index: int = 0,
        **kwargs: Any,
    ) -> np.ndarray:
        """Score the units of ``module`` (a layer of the model, or a coupled group from
        ``pruner.groups()``) by ThiNet's greedy order; see the class docstring."""
        options = self.options(kwargs)
        model = unwrap_model(self.model)
        if isinstance(module, Group):
            check_group(model, module)
        elif not isinstance(module, nn.Module):
            raise TypeError(
                f"ThiNetAttributionMetric scores a layer (nn.Module) or a group, got {type(module).__name__}"
            )
        elif all(module is not m for m in model.modules()):
            raise ValueError(
                f"{type(module).__name__} module is not part of the model {type(model).__name__} "
                "(scoring needs a submodule of the model)"
            )
        with left_as_found(model, self.data_generator):
            batches = self._batches(model)
            first = self._first_batch(batches)
            graph = get_graph(model, first.args, first.kwargs or None)
            group = module if isinstance(module, Group) else self._group_of(graph, module, call_index)
            consumer = self._consumer(graph, group)
            runner = group_runner(graph, group, self.criterion)
            seed = options["seed"]
            generator = torch.Generator().manual_seed(int(secrets.randbits(63) if seed is None else seed))
            collected = []
            with graph.intercept(runner.functions()) as forward:
                runner.forward = forward
                for batch in itertools.chain([first], batches):
                    ((point, z),) = runner.activations(batch)
                    contributions, _ = channel_contributions(consumer, z, options["samples_per_batch"], generator)
                    per_unit = torch.zeros(
                        contributions.shape[0], group.num_units, dtype=torch.float64, device=contributions.device
                    )
                    positions, units = point.positions.to(per_unit.device), point.units.to(per_unit.device)
                    collected.append(per_unit.index_add_(1, units, contributions.index_select(1, positions)))
            order = greedy_removal_order(torch.cat(collected))
            scores = torch.empty(group.num_units, dtype=torch.float64)
            scores[torch.as_tensor(order)] = (torch.arange(len(order), dtype=torch.float64) + 1) / len(order)
            if not isinstance(module, Group):
                channels = group.unit_channels(module, call_index)
                per_channel = torch.empty(sum(len(c) for c in channels), dtype=torch.float64)
                for unit, unit_positions in enumerate(channels):
                    per_channel[torch.as_tensor(unit_positions, dtype=torch.long)] = scores[unit]
                scores = per_channel
            return self._finish(scores)

    @staticmethod
    def _group_of(graph: ModelGraph, module: nn.Module, call_index: int) -> Group:
        label = f"'{graph.module_name(module)}' ({type(module).__name__})"
        if getattr(graph, "method", None) != "fx":
            raise ValueError(
                f"ThiNet finds the layer that reads the units of {label} in the data flow, which needs a "
                "model torch.fx can trace"
            )
        groups = get_dependency_graph(graph).groups_of(module, call_index)
        if len(groups) != 1:
            raise ValueError(
                f"ThiNet scores a layer whose output units form exactly one coupled group; those of "
                f"{label} form {len(groups)}"
            )
        return groups[0]

    @staticmethod
    def _consumer(graph: ModelGraph, group: Group) -> nn.Linear | nn.Conv1d | nn.Conv2d:
        """The one Conv/Linear layer that reads the group's units, checked to be supported."""
        label = group_label(group)
        readers = [m for m in group.modules if isinstance(m, WEIGHT_LAYERS) and group.reads(m)]
        if not readers:
            raise ValueError(
                f"ThiNet scores units by how the next layer reads them, but the units of {label} feed no "
                "Conv/Linear consumer (they reach the model output); score them with another metric"
            )
        if len(readers) != 1:
            names = ", ".join(f"'{graph.module_name(m)}'" for m in readers[:4])
            raise ValueError(
                f"ThiNet needs the units of {label} to feed exactly one Conv/Linear layer; they feed "
                f"{len(readers)} ({names}{', ...' if len(readers) > 4 else ''}): score the group "
                "with another metric (FPGM, WeightNorm, Taylor)"
            )
        (consumer,) = readers
        name = f"'{graph.module_name(consumer)}' ({type(consumer).__name__})"
        if isinstance(consumer, (nn.Conv1d, nn.Conv2d)):
            if consumer.groups != 1:
                raise ValueError(
                    f"ThiNet reads the units of {label} through {name}, which has groups="
                    f"{consumer.groups}; only convolutions with groups=1 are supported"
                )
        elif not isinstance(consumer, nn.Linear):
            raise TypeError(
                f"ThiNet reads the units of {label} through {name}; supported consumers: Linear, "
                "Conv1d and Conv2d (groups=1)"
            )
        if len(group.mask_points()) != 1 or not group.reads(consumer):
            raise ValueError(f"ThiNet needs the units of {label} to reach {name} as one tensor")
        return consumer
