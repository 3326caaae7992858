"""Compare two pruning criteria on the digits: which units can go without fine-tuning?

A small MLP is trained once; each criterion scores its 48 hidden units on a validation split,
and removing its 4, 8, ... 24 lowest-scored units (by real pruning, on a copy of the model) gives
a test-loss curve. A lower mean loss increase means a better ranking.

    python examples/compare_criteria.py
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from torchpruner import Pruner, RandomAttributionMetric, TaylorAttributionMetric

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
(x_train, y_train), (x_val, y_val), (x_test, y_test) = (
    (x[:1200], y[:1200]),
    (x[1200:1500], y[1200:1500]),
    (x[1500:], y[1500:]),
)

model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(100):
    optimizer.zero_grad()
    F.cross_entropy(model(x_train), y_train).backward()
    optimizer.step()
model.eval()


def test_loss(net: nn.Module) -> float:
    with torch.no_grad():
        return F.cross_entropy(net(x_test), y_test).item()


criteria = {
    "taylor": TaylorAttributionMetric(model, [(x_val, y_val)], F.cross_entropy),
    "random": RandomAttributionMetric(model, [(x_val, y_val)], F.cross_entropy, seed=0),
}
base = test_loss(model)
print(f"unpruned test loss {base:.4f}")
print("criterion  mean loss increase  loss after removing 8 / 16 / 24 units")
removed = range(4, 25, 4)
for name, metric in criteria.items():
    order = metric.run(model[0], find_best_evaluation_module=True).argsort()  # weakest first
    curve = []
    for k in removed:
        pruned = copy.deepcopy(model)
        Pruner(pruned, input_size=(64,)).prune_model(pruned[0], order[:k].tolist())
        curve.append(test_loss(pruned))
    increase = sum(loss - base for loss in curve) / len(curve)
    print(f"{name:<9}  {increase:18.4f}  {curve[1]:.4f} / {curve[3]:.4f} / {curve[5]:.4f}")
