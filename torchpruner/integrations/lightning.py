"""A Lightning callback that removes units for real while the Trainer trains.

Lightning's own ``ModelPruning`` callback masks weights through ``torch.nn.utils.prune``: the
model keeps its size. :class:`PruningCallback` scores every coupled group with a metric and slices
the layers, at the epochs or steps you choose, with the Trainer's own optimizer kept live (its
state sliced in place, not reset), and sends what it removed and the parameter and FLOP counts to
the Trainer's loggers (``TaylorAttributionMetric`` from :mod:`torchpruner`)::

    lit = LitClassifier()                                  # holds the network as lit.net
    taylor = TaylorAttributionMetric(lit.net, val_loader, F.cross_entropy, max_batches=4)
    prune = PruningCallback(fraction=0.2, metric=taylor, epochs=[2, 4], model=lit.net, input_size=(64,))
    Trainer(max_epochs=10, callbacks=[prune]).fit(lit, train_loader)
    print(prune.records[-1].plan)

Needs the extra ``lightning`` (``pip install "torchpruner-onthefly[lightning]"``); the callback is a
``lightning.pytorch.Callback`` (``pytorch_lightning.Callback`` when only that package is
installed). One process and one optimizer: with several optimizers or processes (DDP) it refuses,
since the distributed wrapper holds the old parameter shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch.nn as nn

from .events import PruningRecord, Scores, ScheduledPruning

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import (  # type: ignore[assignment, unused-ignore]  # the same classes
            Callback,
            LightningModule,
            Trainer,
        )
    except ImportError as error:
        raise ImportError(
            "torchpruner.integrations.lightning needs Lightning: pip install 'torchpruner-onthefly[lightning]'"
        ) from error

logger = logging.getLogger(__name__)

__all__ = ["PruningCallback"]


class PruningCallback(Callback):
    """Prune ``fraction`` of every coupled group at the end of chosen epochs or after chosen steps.

    Args:
        fraction: fraction of each group's units removed at every event, in [0, 1).
        metric: an attribution metric built on the pruned module, a function ``group -> scores``,
            or None (per-layer normalised weight norm).
        epochs: prune at the end of these epochs (0-based ``trainer.current_epoch``).
        steps: prune after these optimizer steps (``trainer.global_step``).
        input_size / example_inputs: the model input, to trace the pruned module.
        model: the module to prune (``lit.net``); None: the LightningModule itself.
        log_prefix: prefix of the logged metric names (``pruning/parameters``, ``pruning/flops``,
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
        log_prefix: str = "pruning/",
        **options: Any,
    ) -> None:
        super().__init__()
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
        self.log_prefix = log_prefix

    @property
    def records(self) -> list[PruningRecord]:
        return self.schedule.records

    # -- Lightning hooks -------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                f"PruningCallback runs in one process; this Trainer has {trainer.world_size}: the "
                "distributed wrapper keeps the old parameter shapes. Prune in a single-process run "
                "(or between runs with Pruner) and wrap again"
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule.due_at_step(trainer.global_step):
            self._prune(trainer, pl_module, at_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule.due_at_epoch(trainer.current_epoch):
            self._prune(trainer, pl_module, at_step=False)

    # -- the event -------------------------------------------------------------------------

    def _prune(self, trainer: Trainer, pl_module: LightningModule, at_step: bool) -> PruningRecord:
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            raise ValueError(
                f"PruningCallback follows one optimizer; this Trainer has {len(optimizers)}. Prune "
                "with torchpruner.Pruner in your LightningModule to choose which one follows"
            )
        record = self.schedule.prune(
            pl_module,
            optimizers[0] if optimizers else None,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            at_step=at_step,
        )
        metrics = record.metrics(self.log_prefix)
        for lightning_logger in trainer.loggers:
            lightning_logger.log_metrics(metrics, step=trainer.global_step)
        return record
