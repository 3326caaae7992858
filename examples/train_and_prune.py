"""Score and prune inside a plain training loop, with the same model and the same optimizer.

A small MLP learns the handwritten digits that ship with scikit-learn. After epochs 2 and 4 every
hidden layer is scored with Taylor on a held-out batch and loses its weakest quarter of units;
Adam keeps its state for the units that stay, and training simply goes on.

    python examples/train_and_prune.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from torchpruner import Pruner, TaylorAttributionMetric, count_parameters, prune_groups

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True)
held_out = [(x[1500:], y[1500:])]  # one batch for scoring and testing

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
pruner = Pruner(model, input_size=(64,), optimizer=optimizer)
taylor = TaylorAttributionMetric(model, held_out, F.cross_entropy)


def test_accuracy() -> float:
    with torch.no_grad():
        return (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()


for epoch in range(6):
    for xb, yb in train:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    line = f"epoch {epoch}: accuracy {test_accuracy():.3f}, {count_parameters(model)} parameters"
    if epoch in (1, 3):
        prune_groups(pruner, fraction=0.25, scores=taylor.run)  # lowest quarter of every group, one plan
        line += f" -> pruned a quarter of every hidden layer: {count_parameters(model)} parameters"
    print(line)

print(model)
