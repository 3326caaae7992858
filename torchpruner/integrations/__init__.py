"""Training-framework callbacks: score, prune and keep training, inside the loops people use.

- :mod:`torchpruner.integrations.lightning`: ``PruningCallback`` for a Lightning ``Trainer``
  (extra ``lightning``).
- :mod:`torchpruner.integrations.transformers`: ``PruningCallback`` for a Hugging Face ``Trainer``
  (extra ``transformers``).

Both share :class:`~torchpruner.integrations.events.ScheduledPruning`: at chosen epochs or steps,
score every coupled group with a metric and remove a fraction of each in one validated plan, with
the trainer's own optimizer sliced in place (its state is kept, not reset). Importing this package
imports neither framework; each callback module imports its framework when it is imported.
"""

from .events import PruningRecord, ScheduledPruning

__all__ = ["PruningRecord", "ScheduledPruning"]
