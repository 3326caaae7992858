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

The pruned module is traced with ``torch.fx``, which cannot trace most ``transformers`` models
(they branch on their inputs): prune a traceable part (``model=``), such as a plain ``nn.Module``
body. Needs the extra ``transformers`` (``pip install "torchpruner-onthefly[transformers]"``, with
accelerate). One process: with several (``args.world_size > 1``) it refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

from .events import PruningRecord, Scores, ScheduledPruning

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:
    raise ImportError(
        "torchpruner.integrations.transformers needs transformers: pip install 'torchpruner-onthefly[transformers]'"
    ) from error

logger = logging.getLogger(__name__)

__all__ = ["PruningCallback"]


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
