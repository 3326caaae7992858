"""Spawned gloo ranks for tests/test_distributed.py: the launcher, the models and data both sides
build, and the code each rank runs. Not a test module: the ranks import it by name.

Every rank runs every scenario of a job and records what it saw (scores, parameters, optimizer
state, the error it raised) in a file per rank; the test process compares the ranks with each
other and with single-process references it computes itself.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

WORLD_SIZE = 2
BATCH = 4  # per rank; the dataset divides WORLD_SIZE * BATCH (DistributedSampler pads otherwise)
EXAMPLES = 32


# -- what both sides build -----------------------------------------------------------------------


def mlp() -> nn.Module:
    """No BatchNorm, no Dropout: per-rank batch statistics and dropout draws would differ."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def dataset(seed: int = 0, examples: int = EXAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, 12, generator=generator, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (examples,), generator=generator))


def shard_indices(rank: int, examples: int = EXAMPLES) -> list[int]:
    """The examples DistributedSampler(shuffle=False) gives ``rank``, in order."""
    return list(range(examples))[rank::WORLD_SIZE]


def shard_loader(data: TensorDataset, rank: int, batch: int = BATCH) -> DataLoader:
    sampler = DistributedSampler(data, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
    return DataLoader(data, batch_size=batch, sampler=sampler)


def union_loader(data: TensorDataset, batch: int = BATCH) -> DataLoader:
    """The union of the shards in rank order (rank 0's examples, then rank 1's)."""
    order = [i for rank in range(WORLD_SIZE) for i in shard_indices(rank, len(data))]
    return DataLoader(torch.utils.data.Subset(data, order), batch_size=batch)


def global_batches(data: TensorDataset, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training step t of a single process: every rank's batch t together."""
    per_rank = [list(shard_loader(data, rank)) for rank in range(WORLD_SIZE)]
    return [
        (
            torch.cat([per_rank[r][t][0] for r in range(WORLD_SIZE)]),
            torch.cat([per_rank[r][t][1] for r in range(WORLD_SIZE)]),
        )
        for t in range(steps)
    ]


# -- the launcher --------------------------------------------------------------------------------


def _entry(rank: int, job: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        result = JOBS[job](rank)
        torch.save(result, f"{folder}/rank{rank}.pt")
    except BaseException:
        Path(f"{folder}/rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def launch(job: str, folder: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run ``JOBS[job]`` on WORLD_SIZE spawned gloo ranks; each rank's record. A rank still running
    after ``timeout`` seconds is killed and the test fails (no hang in CI)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(_entry, args=(job, str(folder)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {WORLD_SIZE} ranks of '{job}' did not finish within {timeout} s")
    except mp.ProcessRaisedException:
        errors = [p.read_text() for p in sorted(folder.glob("rank*.error"))]
        raise AssertionError(f"a rank of '{job}' failed:\n" + "\n".join(errors)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _error_of(call: Callable[[], Any]) -> str | None:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test compares the message of every rank
        return f"{type(error).__name__}: {error}"
    return None


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        state = {
            names[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
    return {"params": params, "optimizer": state}


# -- job 1: scoring ------------------------------------------------------------------------------


def scoring_job(rank: int) -> dict[str, Any]:
    from torchpruner import Pruner
    from torchpruner.attributions import (
        APoZAttributionMetric,
        MeanPlusStd,
        RandomAttributionMetric,
        SensitivityAttributionMetric,
        ShapleyAttributionMetric,
        TaylorAttributionMetric,
        WeightNormAttributionMetric,
    )

    model = mlp()
    ddp = DistributedDataParallel(model)
    forwards = []
    ddp.register_forward_pre_hook(lambda *_: forwards.append(1))
    loader = shard_loader(dataset(), rank)
    groups = Pruner(model, input_size=(12,)).groups()
    record: dict[str, Any] = {}
    reductions = {
        "mean": "mean",
        "sum": "sum",
        "none": "none",
        "mean+2std": MeanPlusStd(2.0),
        "callable": lambda s: s.max(0) - s.min(0),
    }
    for rname, reduction in reductions.items():
        for metric in (TaylorAttributionMetric, SensitivityAttributionMetric, APoZAttributionMetric):
            attr = metric(ddp, loader, F.cross_entropy, reduction=reduction)
            record[(metric.name, rname, "layer")] = attr.run(model[2])
            record[(metric.name, rname, "group")] = attr.run(groups[0])
    for rname in ("mean", "none", "mean+2std"):  # every target in one pass, one exchange
        for metric in (TaylorAttributionMetric, APoZAttributionMetric):
            attr = metric(ddp, loader, F.cross_entropy, reduction=reductions[rname])
            record[("run_all", metric.name, rname)] = attr.run_all([model[2]] + groups)
    record[("run_all", "Shapley")] = ShapleyAttributionMetric(  # run by run, rank 0's seed each time
        ddp, loader, F.cross_entropy, sv_samples=1, seed=rank
    ).run_all()
    record["run_all empty shard"] = _error_of(
        lambda: TaylorAttributionMetric(ddp, [] if rank == 1 else loader, F.cross_entropy).run_all()
    )
    record["run_all empty shard, run by run"] = _error_of(
        lambda: ShapleyAttributionMetric(ddp, [] if rank == 1 else loader, F.cross_entropy, sv_samples=1).run_all()
    )
    shapley = ShapleyAttributionMetric(
        model, loader, F.cross_entropy, process_group=dist.group.WORLD, sv_samples=2
    )  # seed None: rank 0 draws it
    record[("Shapley", "mean", "layer")] = shapley.run(model[2])
    record[("Shapley", "none", "group")] = ShapleyAttributionMetric(
        ddp, loader, F.cross_entropy, reduction="none", sv_samples=1, seed=rank
    ).run(groups[1])  # rank 0's seed
    record["shapley stderr"] = _error_of(
        lambda: ShapleyAttributionMetric(ddp, loader, F.cross_entropy, sv_samples=1).run(model[2], return_stderr=True)
    )
    record[("Random", "mean", "layer")] = RandomAttributionMetric(ddp, loader, F.cross_entropy).run(model[0])
    record[("WeightNorm", "mean", "group")] = WeightNormAttributionMetric(ddp, loader, F.cross_entropy).run(groups[0])
    # a rank without data: every rank raises the same error, nobody waits
    empty = [] if rank == 1 else loader
    record["empty shard"] = _error_of(lambda: TaylorAttributionMetric(ddp, empty, F.cross_entropy).run(model[0]))
    record["wrapper forwards while scoring"] = len(forwards)
    # DDP's bookkeeping is untouched: training through the wrapper still works afterwards
    x, y = next(iter(loader))
    F.cross_entropy(ddp(x), y).backward()
    record["grad"] = model[0].weight.grad.clone()
    return record


# -- job 2: pruning in the middle of a run ---------------------------------------------------------

STEPS_BEFORE, STEPS_AFTER = 4, 3
TRAIN_EXAMPLES = WORLD_SIZE * BATCH * (STEPS_BEFORE + STEPS_AFTER)


def train_steps(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()


def pruning_job(rank: int) -> dict[str, Any]:
    from torchpruner import Pruner, TaylorAttributionMetric
    from torchpruner.distributed import prune_ddp
    from torchpruner.schedule import select_units

    data = dataset(seed=3, examples=TRAIN_EXAMPLES)
    batches = list(shard_loader(data, rank))
    record: dict[str, Any] = {}

    # the run: train, score across ranks and prune 30% of every group, train on
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    ddp = DistributedDataParallel(model)
    old = ddp
    pruner = Pruner(ddp.module, input_size=(12,), optimizer=optimizer)
    for x, y in batches[:STEPS_BEFORE]:
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        scheduler.step()
    attr = TaylorAttributionMetric(ddp, shard_loader(data, rank), F.cross_entropy)
    groups = pruner.groups()
    record["scores"] = [attr.run(group) for group in groups]
    selection = select_units(groups, 0.3, scores=attr.run)
    record["selection"] = sorted((g.index, units) for g, units in selection.items())
    ddp = prune_ddp(ddp, pruner, selection if rank == 0 else None)
    record["after prune"] = _state(model, optimizer)
    for x, y in batches[STEPS_BEFORE : STEPS_BEFORE + STEPS_AFTER]:
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        scheduler.step()
    record["end"] = _state(model, optimizer)
    record["same objects"] = (
        ddp.module is model,
        pruner.optimizer is optimizer,
        scheduler.optimizer is optimizer,
        ddp is not old,
    )
    record["old wrapper"] = _error_of(lambda: old(batches[0][0]))
    record["lr"] = scheduler.get_last_lr()

    # ranks that disagree about indices: the same error everywhere, nothing pruned anywhere
    groups = pruner.groups()
    own = {groups[0]: [rank]}
    before = _state(model, optimizer)
    record["disagree"] = _error_of(lambda: prune_ddp(ddp, pruner, own, broadcast=False))
    record["unchanged after disagreeing"] = _same(before, _state(model, optimizer))
    # replicas that differ (one rank changed its model outside DDP): rank 0's decision does not fit rank 1
    if rank == 1:
        Pruner(model, input_size=(12,), optimizer=optimizer).prune_group(groups[0], [0])
    pruner = Pruner(model, input_size=(12,), optimizer=optimizer)
    groups = pruner.groups()
    before = _state(model, optimizer)
    record["replicas differ"] = _error_of(lambda: prune_ddp(ddp, pruner, {groups[1]: [1, 2]} if rank == 0 else None))
    record["unchanged after differing"] = _same(before, _state(model, optimizer))

    # applying fails on rank 1 after every rank validated: rank 0 puts its prune back too
    from torchpruner.pruner import plan as plan_module

    surgery = plan_module.apply_optimizer_surgery

    def failing_surgery(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("injected while slicing the optimizer state")

    healthy = mlp()
    adam = torch.optim.Adam(healthy.parameters(), lr=0.01)
    wrapper = DistributedDataParallel(healthy)
    train_steps(wrapper, adam, batches[:1])
    healthy_pruner = Pruner(wrapper.module, input_size=(12,), optimizer=adam)
    before = _state(healthy, adam)
    if rank == 1:
        plan_module.apply_optimizer_surgery = failing_surgery
    try:
        wrapper = prune_ddp(wrapper, healthy_pruner, {healthy_pruner.groups()[0]: [0, 1]})
    except Exception as error:  # noqa: BLE001
        record["failed apply"] = f"{type(error).__name__}: {error}"
        wrapper = error.ddp  # type: ignore[attr-defined]
    finally:
        plan_module.apply_optimizer_surgery = surgery
    record["unchanged after failed apply"] = _same(before, _state(healthy, adam))
    train_steps(wrapper, adam, batches[1:2])  # the wrapper from the error trains the unchanged model
    record["after failed apply"] = _state(healthy, adam)

    # a BatchNorm model prunes and keeps training under DDP
    torch.manual_seed(10 + rank)
    images = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))) for _ in range(4)]
    cnn = bn_cnn()
    sgd = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    wrapped = DistributedDataParallel(cnn)
    train_steps(wrapped, sgd, images[:2])
    cnn_pruner = Pruner(wrapped.module, input_size=(1, 8, 8), optimizer=sgd)
    cnn_groups = cnn_pruner.groups()
    taylor = TaylorAttributionMetric(wrapped, images, F.cross_entropy)
    wrapped = prune_ddp(wrapped, cnn_pruner, select_units(cnn_groups, 0.3, scores=taylor.run))
    train_steps(wrapped, sgd, images[2:])
    record["bn"] = _state(cnn, sgd)

    # a rank that never arrives: the others get an error naming it within the timeout
    if rank == 0:
        start = time.monotonic()
        record["absent"] = _error_of(lambda: prune_ddp(wrapped, cnn_pruner, {}, timeout=1.5))
        record["absent seconds"] = time.monotonic() - start
    else:
        time.sleep(3.0)
    return record


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["params"].keys() != b["params"].keys() or a["optimizer"].keys() != b["optimizer"].keys():
        return False
    if any(not torch.equal(a["params"][k], b["params"][k]) for k in a["params"]):
        return False
    return all(
        not isinstance(v, torch.Tensor) or torch.equal(v, b["optimizer"][n][k])
        for n, s in a["optimizer"].items()
        for k, v in s.items()
    )


JOBS: dict[str, Callable[[int], dict[str, Any]]] = {"scoring": scoring_job, "pruning": pruning_job}
