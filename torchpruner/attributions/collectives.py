"""Scoring across the ranks of a ``torch.distributed`` job: each rank scores its shard of the data.

A metric built on a ``DistributedDataParallel`` model, or with ``process_group=``, runs its data
loop on the rank's own batches (its ``DistributedSampler`` shard) and then combines the partial
results so that every rank returns the scores of the union of the shards, in the same bits:

* the wrapper is never called: scoring runs the wrapped module (``ddp.module``), so no scoring
  pass enters DDP's gradient-reduction bookkeeping;
* a metric option ``seed`` (Shapley's permutations, Random's draws) is broadcast from rank 0
  before anything else, so every rank uses the same permutations;
* each rank's partial result (sums and counts, moments, or rows) is exchanged in **one**
  ``all_gather_object`` and merged in rank order on every rank, so the result is identical
  everywhere; data-free metrics (WeightNorm, Random) return rank 0's scores;
* an exception on one rank is exchanged in place of its partial result, and every rank raises
  the same :class:`DistributedScoringError` naming the failed ranks, instead of leaving the
  others waiting. A rank that never arrives is reported by torch when the process group's
  ``timeout`` (``init_process_group(timeout=...)``) expires.

Only ``torch.distributed`` is used; nothing here starts processes.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch import nn

from torchpruner._state import fsdp_modules, fsdp_refusal, unwrap_model

__all__ = ["DistributedScoringError", "Shards", "scoring_model"]


class DistributedScoringError(RuntimeError):
    """Scoring failed on some rank of a distributed run; every rank raises this same error."""


def _check_group(process_group: Any) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group= needs an initialized torch.distributed job (torch.distributed.init_process_group)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("this rank is not a member of process_group")
    return process_group


def scoring_model(model: nn.Module, process_group: Any = None) -> tuple[nn.Module, Shards | None]:
    """The module to score and, in a distributed run, its :class:`Shards`.

    A ``DistributedDataParallel`` wrapper gives its ``module`` (scored directly) and, unless
    ``process_group`` is given, its own process group. FSDP-sharded models are refused.
    """
    if isinstance(model, nn.Module) and fsdp_modules(model):
        raise TypeError(fsdp_refusal(model))
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group if process_group is None else process_group
        return unwrap_model(model.module), Shards(_check_group(group))
    model = unwrap_model(model)
    return model, None if process_group is None else Shards(_check_group(process_group))


class Shards:
    """The ranks of ``group`` scoring one shard each (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._exchanged = False
        self._what = "scoring"

    def shared_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with ``seed`` replaced by rank 0's (a fresh one drawn there when None)."""
        if "seed" not in options:
            return options
        seed = options["seed"]
        box = [int(secrets.randbits(63)) if seed is None else seed]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return {**options, "seed": box[0]}

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order (one collective); raises the shared error when
        some rank failed instead."""
        outcomes = self._gather(("ok", payload))
        self._raise_if_failed(outcomes, None)
        return [payload for _, payload in outcomes]

    @contextlib.contextmanager
    def failures_shared(self, what: str) -> Iterator[None]:
        """Run the rank's part of ``what``; an exception raised before :meth:`exchange` is sent to
        the other ranks (which are waiting in theirs), and every rank raises the same error."""
        self._exchanged = False
        self._what = what
        try:
            yield
        except Exception as error:
            if self._exchanged:
                raise
            outcomes = self._gather(("error", f"{type(error).__name__}: {error}"))
            self._raise_if_failed(outcomes, error)
            raise

    def _gather(self, item: tuple[str, Any]) -> list[tuple[str, Any]]:
        self._exchanged = True
        outcomes: list[Any] = [None] * self.world_size
        dist.all_gather_object(outcomes, item, group=self.group)
        return outcomes

    def _raise_if_failed(self, outcomes: list[tuple[str, Any]], error: BaseException | None) -> None:
        failed = [(rank, message) for rank, (status, message) in enumerate(outcomes) if status == "error"]
        if not failed:
            return
        details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise DistributedScoringError(
            f"{self._what} failed on rank(s) {[rank for rank, _ in failed]} of "
            f"{self.world_size} ({details}); every rank raises this error and nothing was scored"
        ) from error
