"""Prune while a Lightning Trainer trains: PruningCallback slices the layers for real.

After epochs 1 and 3 every hidden layer loses its weakest fifth by Taylor score; the Trainer's
Adam keeps its state for the units that stay. Needs ``pip install "torchpruner-onthefly[lightning]"``.

    python examples/lightning_callback.py
"""

import logging

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from torchpruner import TaylorAttributionMetric, count_parameters
from torchpruner.integrations.lightning import PruningCallback


class LitDigits(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True)

    lit = LitDigits()
    taylor = TaylorAttributionMetric(lit.net, [(x[1500:], y[1500:])], F.cross_entropy)
    prune = PruningCallback(fraction=0.2, metric=taylor, epochs=[1, 3], model=lit.net, input_size=(64,))
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        callbacks=[prune],
        logger=CSVLogger("lightning_logs"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = count_parameters(lit)
    trainer.fit(lit, train)

    for record in prune.records:
        print(
            f"epoch {record.epoch}: {record.parameters_before} -> {record.parameters} parameters, "
            f"{record.flops_before} -> {record.flops} FLOPs, widths {record.widths}"
        )
    print(f"parameters {before} -> {count_parameters(lit)}; logged to {trainer.logger.log_dir}")
