"""Prune in the middle of a DistributedDataParallel run: the digits CNN trained on 2 CPU ranks (gloo).

Each rank trains on its DistributedSampler shard. At the end of epoch ``--prune-epoch`` every
coupled group is scored with Taylor across the ranks (each rank scores its shard of the validation
split, the scores of the union come back on every rank), the lowest ``--fraction`` of every group
is chosen, and ``torchpruner.distributed.prune_ddp`` prunes every rank alike (Adam's state sliced
in place) and re-wraps the model; training goes on with the same optimizer. Prints one row per
epoch (loss, validation accuracy, parameters, seconds) and the time of the prune step (score +
decide + prune + re-wrap) next to the mean epoch time; rank 0 writes ``results.json``.

    torchrun --standalone --nproc_per_node=2 experiments/ddp_prune.py
    python -m experiments.ddp_prune --nproc 2          # the same, spawning the ranks itself
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: torchrun experiments/ddp_prune.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from experiments.common import evaluate, format_table, results_folder, seed_everything, write_json
from experiments.data import load_dataset
from experiments.models import SmallCNN
from torchpruner import Pruner, TaylorAttributionMetric
from torchpruner.distributed import prune_ddp
from torchpruner.schedule import select_units
from torchpruner.utils import count_parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune-epoch", type=int, default=4, help="prune at the end of this epoch")
    parser.add_argument("--fraction", type=float, default=0.3, help="fraction of every group removed")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--widths", default="16,32", help="conv widths of the CNN")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not started by torchrun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--results", default="results", help="folder for results.json")
    return parser


def run_rank(args: argparse.Namespace) -> dict:
    """One rank's run (the process group is initialised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)  # the same initial model everywhere (DDP broadcasts rank 0's anyway)
    splits = load_dataset("digits")
    train_sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(splits.train, batch_size=args.batch_size, sampler=train_sampler)
    val_shard = DataLoader(
        splits.val, batch_size=256, sampler=DistributedSampler(splits.val, num_replicas=world, rank=rank, shuffle=False)
    )
    model = SmallCNN(
        splits.input_size, splits.num_classes, widths=tuple(int(w) for w in args.widths.split(",")), hidden=args.hidden
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ddp = DistributedDataParallel(model)
    pruner = Pruner(ddp.module, input_size=splits.input_size, optimizer=optimizer)
    attr = TaylorAttributionMetric(ddp, val_shard, F.cross_entropy)  # each rank scores its shard
    parameters_before = count_parameters(model)
    rows, prune_seconds, plan_text = [], None, ""
    for epoch in range(1, args.epochs + 1):
        train_sampler.set_epoch(epoch)
        dist.barrier()
        start = time.perf_counter()
        ddp.train()
        total, count = 0.0, 0
        for inputs, targets in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(inputs), targets)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(targets), count + len(targets)
        dist.barrier()
        epoch_seconds = time.perf_counter() - start
        if epoch == args.prune_epoch:
            start = time.perf_counter()
            selection = select_units(pruner.groups(), args.fraction, scores=attr.run)  # the two lines
            ddp = prune_ddp(ddp, pruner, selection)
            dist.barrier()
            prune_seconds = time.perf_counter() - start
            plan_text = ", ".join(f"{len(units)} of group {group.index}" for group, units in selection.items())
        val_loss, val_accuracy = evaluate(model, DataLoader(splits.val, batch_size=512))
        rows.append(
            {
                "epoch": epoch,
                "train_loss": total / max(count, 1),
                "val_accuracy": val_accuracy,
                "parameters": count_parameters(model),
                "epoch_s": epoch_seconds,
                "pruned": "yes" if epoch == args.prune_epoch else "",
            }
        )
    test_loss, test_accuracy = evaluate(model, DataLoader(splits.test, batch_size=512))
    epoch_mean = sum(row["epoch_s"] for row in rows) / len(rows)
    return {
        "rows": rows,
        "prune_seconds": prune_seconds,
        "epoch_seconds": epoch_mean,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "removed": plan_text,
        "world_size": world,
        "parameters_before": parameters_before,
        "first_weight": model.conv1.weight.detach().clone(),
    }


def report(result: dict) -> None:
    print(format_table(result["rows"], ["epoch", "train_loss", "val_accuracy", "parameters", "epoch_s", "pruned"]))
    print(f"removed: {result['removed']}")
    print(
        f"prune step (score + decide + prune + re-wrap) on {result['world_size']} ranks: "
        f"{result['prune_seconds']:.3f} s; one training epoch: {result['epoch_seconds']:.3f} s "
        f"(ratio {result['prune_seconds'] / result['epoch_seconds']:.2f})"
    )
    print(f"test accuracy after pruning and training on: {result['test_accuracy']:.4f}")


def _finish(args: argparse.Namespace, result: dict) -> dict:
    weights = [torch.zeros_like(result["first_weight"]) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, result["first_weight"])
    result["ranks_identical"] = all(torch.equal(w, weights[0]) for w in weights)
    if dist.get_rank() == 0:
        report(result)
        print(f"parameters identical on every rank: {result['ranks_identical']}")
        folder = results_folder(args.results, "ddp_prune")
        write_json(folder / "results.json", {k: v for k, v in result.items() if k != "first_weight"})
    return result


def _spawned(rank: int, args: argparse.Namespace, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=args.nproc, timeout=datetime.timedelta(seconds=120)
    )
    try:
        result = _finish(args, run_rank(args))
        if rank == 0:
            torch.save({k: v for k, v in result.items() if k != "first_weight"}, out)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            return _finish(args, run_rank(args))
        finally:
            dist.destroy_process_group()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/result.pt"
        mp.spawn(_spawned, args=(args, f"{folder}/store", out), nprocs=args.nproc)
        return torch.load(out, weights_only=False)


if __name__ == "__main__":
    main()
