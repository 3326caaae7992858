"""A Hugging Face ``TrainerCallback`` that removes units for real while ``Trainer`` trains.

:class:`PruningCallback` scores every coupled group with a metric and slices the layers at the
epochs or steps you choose, with the Trainer's own optimizer kept live (accelerate's wrapper is
looked through; the state is sliced in place, not reset; ``TaylorAttributionMetric`` from :mod:`torchpruner`)::

    model = DigitsClassifier()            # forward(x, labels=None) -> {"loss", "logits"}; body in model.net
    taylor = TaylorAttributionMetric(model.net, val_loader, F.cross_entropy, max_batches=4)
    prune = PruningCallback(fraction=0.2, metric=taylor, epochs=[1], model=model.net, input_size=(64,))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[prune])
    prune.trainer = trainer                # optional: report through trainer.log (TensorBoard, W&B, ...)
    trainer.train()

What it removed and the parameter and FLOP counts go to ``trainer.log`` when ``prune.trainer`` is
set, else into ``state.log_history`` (saved with every checkpoint's ``trainer_state.json``).

The pruned module (``model=``, default the trained model) is captured as :class:`~torchpruner.Pruner`
captures any model: torch.fx, else torch.export from ``example_inputs=`` (for a ``transformers``
model, a dict of its keyword inputs). After pruning a ``transformers`` model, :func:`update_config` makes its config and its attention
modules' head attributes describe the pruned widths (so ``save_pretrained``/``from_pretrained``
round-trip it), or refuses, changing nothing, where the config cannot hold them. Needs the extra ``transformers`` (``pip install "torchpruner-onthefly[transformers]"``, with
accelerate). One process: with several (``args.world_size > 1``) it refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .events import PruningRecord, Scores, ScheduledPruning

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:
    raise ImportError(
        "torchpruner.integrations.transformers needs transformers: pip install 'torchpruner-onthefly[transformers]'"
    ) from error

logger = logging.getLogger(__name__)

__all__ = ["PruningCallback", "update_attention_attributes", "update_config"]


class PruningCallback(TrainerCallback):
    """Prune ``fraction`` of every coupled group at the end of chosen epochs or after chosen steps.

    Args:
        fraction: fraction of each group's units removed at every event, in [0, 1).
        metric: an attribution metric built on the pruned module, a function ``group -> scores``,
            or None (per-layer normalised weight norm).
        epochs: prune at the end of these epochs (0-based: ``epochs=[0]`` after the first).
        steps: prune after these optimizer steps (``state.global_step``).
        input_size / example_inputs: the model input, to trace the pruned module.
        model: the module to prune (a traceable body); None: the model the Trainer trains.
        trainer: when set (also later, ``callback.trainer = trainer``), the numbers go through
            ``trainer.log``; otherwise into ``state.log_history``.
        log_prefix: prefix of the logged names (``pruning/parameters``, ``pruning/flops``,
            ``pruning/removed_units``, ``pruning/removed_parameters``).
        **options: ``ignored_layers``, ``global_ranking``, ``min_units``, ``round_to``,
            ``dropout_policy``, ``count_flops`` (see :class:`~torchpruner.integrations.ScheduledPruning`).

    Attributes:
        records: one :class:`~torchpruner.integrations.PruningRecord` per event (the plan, counts, widths).
    """

    def __init__(
        self,
        fraction: float = 0.3,
        *,
        metric: Scores | None = None,
        epochs: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        input_size: Sequence[int] | None = None,
        example_inputs: Any = None,
        model: nn.Module | None = None,
        trainer: Any = None,
        log_prefix: str = "pruning/",
        **options: Any,
    ) -> None:
        self.schedule = ScheduledPruning(
            fraction,
            metric=metric,
            epochs=epochs,
            steps=steps,
            input_size=input_size,
            example_inputs=example_inputs,
            model=model,
            **options,
        )
        self.trainer = trainer
        self.log_prefix = log_prefix

    @property
    def records(self) -> list[PruningRecord]:
        return self.schedule.records

    # -- Trainer events --------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.world_size > 1:
            raise RuntimeError(
                f"PruningCallback runs in one process; these TrainingArguments use {args.world_size}: "
                "the distributed wrapper keeps the old parameter shapes. Prune in a single-process "
                "run (or between runs with Pruner) and wrap again"
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.schedule.due_at_step(state.global_step):
            self._prune(state, kwargs, at_step=True)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = max(0, int(round(state.epoch or 0.0)) - 1)  # state.epoch counts finished epochs here
        if self.schedule.due_at_epoch(epoch):
            self._prune(state, kwargs, at_step=False, epoch=epoch)

    # -- the event -------------------------------------------------------------------------

    def _prune(
        self, state: TrainerState, kwargs: dict[str, Any], at_step: bool, epoch: int | None = None
    ) -> PruningRecord:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise ValueError("the Trainer passed no model to the callback; PruningCallback needs the trained model")
        if epoch is None:
            epoch = int(state.epoch or 0.0)
        record = self.schedule.prune(
            model, kwargs.get("optimizer"), epoch=epoch, step=state.global_step, at_step=at_step
        )
        metrics = record.metrics(self.log_prefix)
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        return record


# -- the config and the attention attributes after a prune ------------------------------------

#: the q and k projections of a Hugging Face attention module, by child name
_QK_NAMES = (("query", "key"), ("q_proj", "k_proj"), ("q_lin", "k_lin"), ("q", "k"))
#: the attribute holding the size of one head
_HEAD_SIZE_NAMES = ("attention_head_size", "head_dim", "key_value_proj_dim")
#: config fields of the MLP width, by model family
_INTERMEDIATE_FIELDS = ("intermediate_size", "d_ff", "hidden_dim", "n_inner")


def _heads_of(module: nn.Module) -> tuple[int, int, int, int] | None:
    """``(heads, kv heads, head size, hidden size)`` of a Hugging Face attention module, read
    from its projections' widths (None: not an attention module this knows)."""
    head_size = next(
        (v for name in _HEAD_SIZE_NAMES if isinstance(v := getattr(module, name, None), int) and v > 0), None
    )
    if head_size is None:
        return None
    for q_name, k_name in _QK_NAMES:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q.out_features // head_size, k.out_features // head_size, head_size, q.in_features
    fused = getattr(module, "c_attn", None)  # GPT-2: one Conv1D for q, k and v, split by split_size
    split = getattr(module, "split_size", None)
    if fused is not None and isinstance(split, int) and isinstance(getattr(fused, "weight", None), torch.Tensor):
        return split // head_size, split // head_size, head_size, int(fused.weight.shape[0])
    return None


def _attention_attributes(heads: int, kv_heads: int, head_size: int, hidden: int) -> dict[str, int]:
    return {
        "num_attention_heads": heads,
        "num_heads": heads,
        "n_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_key_value_groups": heads // max(1, kv_heads),
        "all_head_size": heads * head_size,
        "inner_dim": heads * head_size,
        "split_size": heads * head_size,
        "embed_dim": hidden,
        "dim": hidden,
        "hidden_size": hidden,
    }


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _config_model_shapes(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``type(model)(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return _shapes(type(model)(config))


def update_config(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """After a prune of a Hugging Face model, make its attention modules' attributes and its
    ``config`` describe the pruned widths, so that ``save_pretrained`` / ``from_pretrained``
    round-trip it. Returns ``{"config.<field>" or "<module>.<attribute>": (old, new)}``.

    torchpruner slices the weights; Hugging Face modules also keep the head count in attributes
    (``num_attention_heads``, ``all_head_size``, ``n_heads``, ``num_key_value_groups``, ...) and the
    model's ``config`` keeps every width. This sets the attributes from the projections' widths
    (read from the weights) and the config's ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim`` and MLP width where every layer agrees, then checks the
    result: a model built from the new config must have exactly the pruned model's tensor shapes.

    Raises:
        ValueError: the pruned widths cannot be written as this config (layers with different
            head counts or MLP widths, or a config that ties the head size to
            ``hidden_size // num_attention_heads`` while the hidden size was pruned, as BERT's,
            DistilBERT's, ViT's and GPT-2's do); nothing is changed. Save such a model with
            :func:`torchpruner.save_pruned` instead.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"update_config needs a Hugging Face model with a config, got {type(model).__name__}")
    before = _config_model_shapes(model, config)
    after = _shapes(model)
    attention = {name: found for name, module in model.named_modules() if (found := _heads_of(module)) is not None}
    fields: dict[str, Any] = {}
    if attention:
        counts = {found[:3] for found in attention.values()}
        if len(counts) > 1:
            raise ValueError(
                f"the attention layers have different (heads, KV heads, head size) after the prune: {sorted(counts)}; "
                "a config holds one; save the model with torchpruner.save_pruned instead"
            )
        ((heads, kv_heads, head_size),) = counts
        fields["num_attention_heads"] = heads
        if hasattr(config, "num_key_value_heads"):
            fields["num_key_value_heads"] = kv_heads
        if "head_dim" in getattr(config, "attribute_map", {}) or isinstance(getattr(config, "head_dim", None), int):
            fields["head_dim"] = head_size
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        fields["hidden_size"] = embeddings.embedding_dim
    fields.update(_intermediate_field(config, before, after))
    old = {name: getattr(config, name, None) for name in fields}
    changes: dict[str, tuple[Any, Any]] = {}
    try:
        for name, value in fields.items():
            setattr(config, name, value)
        validate = getattr(config, "validate", None)  # transformers' own checks (save_pretrained runs them)
        if callable(validate):
            try:
                validate()
            except Exception as error:
                raise ValueError(
                    f"the pruned widths {fields} do not make a valid {type(config).__name__} ({error}); "
                    "prune with round_to= so that they divide as the config needs, or save the model "
                    "with torchpruner.save_pruned instead"
                ) from error
        try:
            rebuilt = _config_model_shapes(model, config)
        except Exception as error:  # the model class refuses the widths (e.g. hidden % heads != 0)
            raise ValueError(
                f"{type(model).__name__} cannot be built from the pruned widths {fields} ({error}); "
                "save it with torchpruner.save_pruned instead"
            ) from error
        mismatched = sorted(k for k, shape in rebuilt.items() if after.get(k) != shape)
        if mismatched:
            raise ValueError(
                f"the pruned {type(model).__name__} cannot be described by its config "
                f"({type(config).__name__} ties some widths together): a model built from the updated config "
                f"differs at {mismatched[:3]}{' ...' if len(mismatched) > 3 else ''}; save it with "
                "torchpruner.save_pruned instead"
            )
    except Exception:
        for name, value in old.items():
            setattr(config, name, value)
        raise
    changes.update({f"config.{name}": (old[name], value) for name, value in fields.items() if old[name] != value})
    changes.update(update_attention_attributes(model))
    return changes


def update_attention_attributes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Set the head-count attributes of a Hugging Face model's attention modules
    (``num_attention_heads``, ``num_heads``, ``n_heads``, ``num_key_value_heads``,
    ``num_key_value_groups``, ``all_head_size``, ``inner_dim``, ``split_size``, and the hidden
    size they hold) from their projections' widths after a prune; the config is left alone (see
    :func:`update_config`). Returns ``{"<module>.<attribute>": (old, new)}``."""
    changes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        found = _heads_of(module)
        if found is None:
            continue
        for attribute, value in _attention_attributes(*found).items():
            current = getattr(module, attribute, None)
            if isinstance(current, int) and not isinstance(current, bool) and current != value:
                setattr(module, attribute, value)
                changes[f"{name}.{attribute}"] = (current, value)
    return changes


def _intermediate_field(
    config: Any, before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]
) -> dict[str, int]:
    """The config's MLP width, read from the 2-d weights whose side of that width changed (one
    value in every layer, else none is set and the final shape check refuses)."""
    for field in _INTERMEDIATE_FIELDS:
        width = getattr(config, field, None)
        if isinstance(width, int) and width > 0:
            break
    else:
        return {}
    seen = set()
    for key, old in before.items():
        new = after.get(key)
        if new is None or len(old) != 2 or len(new) != 2 or old == new:
            continue
        for axis in (0, 1):
            if old[axis] == width and new[axis] != width:
                seen.add(new[axis])
    return {field: seen.pop()} if len(seen) == 1 else {}
