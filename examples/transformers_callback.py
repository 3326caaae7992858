"""Prune while a Hugging Face Trainer trains: PruningCallback slices the layers for real.

Any ``nn.Module`` that follows the Trainer's convention (keyword inputs, a ``loss`` when
``labels`` are given) works; its body is pruned after epochs 1 and 3 with the Trainer's own AdamW.
Needs ``pip install "torchpruner-onthefly[transformers]"`` (transformers and accelerate).

    python examples/transformers_callback.py
"""

import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments

from torchpruner import TaylorAttributionMetric, count_parameters
from torchpruner.integrations.transformers import PruningCallback


class DigitsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


if __name__ == "__main__":
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)

    model = DigitsClassifier()
    taylor = TaylorAttributionMetric(model.net, [(x[1500:], y[1500:])], F.cross_entropy)
    prune = PruningCallback(fraction=0.2, metric=taylor, epochs=[1, 3], model=model.net, input_size=(64,))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=5,
            per_device_train_batch_size=64,
            learning_rate=1e-2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="epoch",
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Digits(x[:1500], y[:1500]), callbacks=[prune])
        prune.trainer = trainer  # report through trainer.log (TensorBoard, W&B, ... when configured)
        before = count_parameters(model)
        trainer.train()

    for record in prune.records:  # also in trainer.state.log_history, as "pruning/parameters", ...
        print(
            f"epoch {record.epoch}: {record.parameters_before} -> {record.parameters} parameters, "
            f"{record.flops_before} -> {record.flops} FLOPs, widths {record.widths}"
        )
    print(f"parameters {before} -> {count_parameters(model)}")
