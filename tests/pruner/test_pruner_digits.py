"""End to end on scikit-learn's digits: prune 30% of a hidden layer at epoch 2 with the live
optimizer and LR scheduler, keep training with the same objects."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchpruner.pruner import Pruner

EPOCHS = 12
PRUNE_EPOCH = 2
HIDDEN = 128
PRUNE_FRACTION = 0.3


def digits() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(prune: bool, seed: int = 0) -> Tuple[List[float], float, nn.Module, Pruner | None]:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, HIDDEN), nn.ReLU(), nn.Dropout(0.2), nn.Linear(HIDDEN, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    pruner = Pruner(model, input_size=(64,), optimizer=optimizer) if prune else None
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(EPOCHS):
        if prune and epoch == PRUNE_EPOCH:
            scores = model[0].weight.detach().abs().sum(dim=1)  # L1 norm of each unit's weights
            weakest = scores.argsort()[: int(PRUNE_FRACTION * HIDDEN)]
            pruner.prune_model(model[0], weakest.tolist(), cascading_modules=[model[3], model[2]])
        model.train()
        epoch_loss = 0.0
        permutation = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), 32):
            batch = permutation[start : start + 32]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
        scheduler.step()
        losses.append(epoch_loss / len(x_train))
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return losses, accuracy, model, pruner


def test_prune_mid_training_on_digits():
    """Averaged over three seeds: the pruned run ends within one accuracy point of the unpruned one."""
    full_accuracies, accuracies = [], []
    pruned_units = int(PRUNE_FRACTION * HIDDEN)
    for seed in range(3):
        full_losses, full_accuracy, _, _ = train(prune=False, seed=seed)
        losses, accuracy, model, pruner = train(prune=True, seed=seed)
        full_accuracies.append(full_accuracy)
        accuracies.append(accuracy)
        assert model[0].out_features == HIDDEN - pruned_units and model[3].in_features == HIDDEN - pruned_units
        assert abs(model[2].p - 0.2 * (1 - pruned_units / HIDDEN)) < 1e-12
        assert len(pruner.kept_units(model[0])) == HIDDEN - pruned_units
        after = losses[PRUNE_EPOCH:]
        assert after[-1] < 0.5 * after[0], f"training loss must keep falling after the prune: {losses}"
        # the prune does not set training back: every epoch from the prune on stays within 25% of the
        # unpruned run's loss (same seed, same batches; SGD noise alone moves epoch losses ~15%)
        assert all(p < 1.25 * f for p, f in zip(after, full_losses[PRUNE_EPOCH:])), (
            f"loss jumped after the prune: {losses} (unpruned: {full_losses})"
        )
    assert np.mean(accuracies) >= np.mean(full_accuracies) - 0.01, (accuracies, full_accuracies)
    assert min(accuracies) > 0.95
