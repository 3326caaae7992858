"""Models for the experiments, their prunable layers, and a cached training helper.

Each model lists its prunable layers with :meth:`prunable_layers`: the layer whose output units are
removed, the modules that must be sliced with it (its *cascading modules*: the following BatchNorm,
Dropout and the consumer layer) and the activation whose output holds the units (the evaluation point
after BatchNorm and ReLU, where zeroing a unit is the same as removing it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from experiments.common import evaluate, seed_everything

ARCHITECTURES = ("cnn", "vgg", "mlp", "cnn1d")


@dataclass
class PrunableLayer:
    """A layer whose output units can be removed, and what has to be sliced with it."""

    name: str
    module: nn.Module
    cascading: list = field(default_factory=list)  # modules sliced on their input side (or BN/Dropout)
    activation: nn.Module | None = None  # its output is where the units live (post BN + ReLU)

    @property
    def num_units(self) -> int:
        module = self.module
        return module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features


class SmallCNN(nn.Module):
    """Two conv blocks (conv, BN, ReLU) and a two-layer classifier with Dropout.

    For 8x8 digits the only pooling is after the second block (4x4 maps); for 28x28 MNIST each block
    pools (7x7 maps). The flattened feature map feeds ``fc1``, so removing a channel of ``conv2``
    removes a block of ``fc1``'s input columns.
    """

    def __init__(self, input_size=(1, 8, 8), num_classes=10, widths=(16, 32), hidden=64, dropout=0.3):
        super().__init__()
        channels, height, width = input_size
        pool_first = min(height, width) >= 16
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2) if pool_first else nn.Identity()
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side_h, side_w = (height // 2 // 2, width // 2 // 2) if pool_first else (height // 2, width // 2)
        self.fc1 = nn.Linear(widths[1] * side_h * side_w, hidden)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc2(x)

    def prunable_layers(self) -> list[PrunableLayer]:
        return [
            PrunableLayer("conv1", self.conv1, [self.bn1, self.conv2], self.relu1),
            PrunableLayer("conv2", self.conv2, [self.bn2, self.fc1], self.relu2),
            PrunableLayer("fc1", self.fc1, [self.dropout, self.fc2], self.relu3),
        ]

    def current_options(self) -> dict:
        """Constructor options that build a fresh model with the current (possibly pruned) widths."""
        return {"widths": (self.conv1.out_channels, self.conv2.out_channels), "hidden": self.fc1.out_features}


class _BlocksThenClassifier(nn.Module):
    """``features`` (conv, BN, ReLU blocks, listed in ``_blocks``), Flatten, then fc1, ReLU, Dropout, fc2.

    Subclasses build the modules (in their own order: it decides the seeded initialisation)."""

    def forward(self, x):
        x = self.flatten(self.features(x))
        return self.fc2(self.dropout(self.relu_fc(self.fc1(x))))

    def prunable_layers(self) -> list[PrunableLayer]:
        layers = []
        for position, (conv, bn, relu) in enumerate(self._blocks):
            consumer = self._blocks[position + 1][0] if position + 1 < len(self._blocks) else self.fc1
            layers.append(PrunableLayer(f"conv{position + 1}", conv, [bn, consumer], relu))
        layers.append(PrunableLayer("fc1", self.fc1, [self.dropout, self.fc2], self.relu_fc))
        return layers


class VGGNet(_BlocksThenClassifier):
    """A VGG-style net for 32x32 images: (conv, BN, ReLU) blocks with max pooling, then two Linear.

    ``config`` lists conv widths and ``"M"`` for a 2x2 max pool, as in torchvision's VGG.
    """

    def __init__(
        self,
        input_size=(3, 32, 32),
        num_classes=10,
        config=(64, 64, "M", 128, 128, "M", 256, 256, "M"),
        hidden=256,
        dropout=0.5,
    ):
        super().__init__()
        channels, height, width = input_size
        layers: list[nn.Module] = []
        self._config = tuple(config)
        self._blocks = []  # (conv, bn, relu) for prunable_layers
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
                continue
            conv, bn, relu = nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()
            layers += [conv, bn, relu]
            self._blocks.append((conv, bn, relu))
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(channels * height * width, hidden)
        self.relu_fc = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def current_options(self) -> dict:
        widths = iter(conv.out_channels for conv, _, _ in self._blocks)
        config = tuple(item if item == "M" else next(widths) for item in self._config)
        return {"config": config, "hidden": self.fc1.out_features}


class CNN1d(_BlocksThenClassifier):
    """A 1-D convolutional net for signals ``[N, C, L]`` (MNIST-1D): (Conv1d, BN, ReLU, max pool 2)
    blocks, then a two-layer classifier with Dropout, as :class:`SmallCNN` in one dimension."""

    def __init__(self, input_size=(1, 40), num_classes=10, widths=(32, 64), hidden=128, kernel_size=5, dropout=0.3):
        super().__init__()
        channels, length = input_size
        self._blocks = []
        layers: list[nn.Module] = []
        for width in widths:
            conv = nn.Conv1d(channels, int(width), kernel_size, padding=kernel_size // 2)
            bn, relu = nn.BatchNorm1d(int(width)), nn.ReLU()
            layers += [conv, bn, relu, nn.MaxPool1d(2)]
            self._blocks.append((conv, bn, relu))
            channels, length = int(width), length // 2
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(channels * length, hidden)
        self.relu_fc = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def current_options(self) -> dict:
        return {"widths": tuple(conv.out_channels for conv, _, _ in self._blocks), "hidden": self.fc1.out_features}


class MLP(nn.Module):
    """A fully connected net: Flatten, then (Linear, ReLU[, Dropout]) per hidden layer, then Linear."""

    def __init__(self, input_size=(1, 8, 8), num_classes=10, hidden=(256, 256), dropout=0.0):
        super().__init__()
        in_features = 1
        for size in input_size:
            in_features *= int(size)
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList()
        self.activations = nn.ModuleList()
        self.dropouts = nn.ModuleList()
        for width in hidden:
            self.hidden.append(nn.Linear(in_features, int(width)))
            self.activations.append(nn.ReLU())
            self.dropouts.append(nn.Dropout(dropout))
            in_features = int(width)
        self.out = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = self.flatten(x)
        for linear, activation, dropout in zip(self.hidden, self.activations, self.dropouts):
            x = dropout(activation(linear(x)))
        return self.out(x)

    def prunable_layers(self) -> list[PrunableLayer]:
        layers = []
        for position, linear in enumerate(self.hidden):
            consumer = self.hidden[position + 1] if position + 1 < len(self.hidden) else self.out
            layers.append(
                PrunableLayer(
                    f"fc{position + 1}", linear, [self.dropouts[position], consumer], self.activations[position]
                )
            )
        return layers

    def current_options(self) -> dict:
        return {"hidden": tuple(linear.out_features for linear in self.hidden)}


def build_model(arch: str, input_size, num_classes: int, **options) -> nn.Module:
    """``cnn`` (SmallCNN), ``vgg`` (VGGNet), ``mlp`` (MLP) or ``cnn1d`` (CNN1d); options go to the constructor."""
    builders = {"cnn": SmallCNN, "vgg": VGGNet, "mlp": MLP, "cnn1d": CNN1d}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return builders[arch](input_size=tuple(input_size), num_classes=num_classes, **options)


def default_arch(dataset: str) -> str:
    return {"cifar10": "vgg", "mnist1d": "cnn1d"}.get(dataset, "cnn")


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """The prunable layers of one of our models, in data-flow order."""
    if not hasattr(model, "prunable_layers"):
        raise TypeError(f"{type(model).__name__} does not list its prunable layers")
    return model.prunable_layers()


# --------------------------------------------------------------------------------------------
# training with a checkpoint cache


def train_model(
    model: nn.Module,
    train_loader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device="cpu",
    val_loader=None,
    progress: bool = True,
    desc: str = "train",
):
    """Plain Adam training with cross-entropy; returns a per-epoch history list of dicts."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    history = []
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        train_one_epoch(model, train_loader, optimizer, criterion, device)
        if val_loader is not None:
            loss, accuracy = evaluate(model, val_loader, device=device)
            history.append({"epoch": epoch + 1, "val_loss": loss, "val_accuracy": accuracy})
    return history


def train_one_epoch(model, loader, optimizer, criterion, device="cpu") -> float:
    model.train()
    total, count = 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
    model.eval()
    return total / max(count, 1)


def load_or_train(
    arch: str,
    splits,
    results_dir: str | Path,
    seed: int = 0,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    device="cpu",
    model_options: dict | None = None,
    progress: bool = True,
    retrain: bool = False,
):
    """A trained model from ``<results>/checkpoints`` when one with this exact recipe exists, else train it.

    Returns ``(model, info)``; ``info`` holds the checkpoint path, whether it was cached, the training
    time and the test loss/accuracy. Checkpoints are plain state dicts loaded with ``weights_only=True``.
    """
    model_options = dict(model_options or {})
    recipe = {
        "arch": arch,
        "dataset": splits.name,
        "input_size": list(splits.input_size),
        "num_classes": splits.num_classes,
        "train_size": len(splits.train),
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "model_options": {k: list(v) if isinstance(v, tuple) else v for k, v in model_options.items()},
        # the trained weights depend on these too (float sums differ in the last bits otherwise)
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.device(device).type,
    }
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(results_dir) / "checkpoints"
    path = folder / f"{splits.name}_{arch}_seed{seed}_{digest}.pt"
    seed_everything(seed)
    model = build_model(arch, splits.input_size, splits.num_classes, **model_options)
    info = {"checkpoint": str(path), "recipe": recipe}
    if path.is_file() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(device)
        info.update(cached=True, train_seconds=0.0)
    else:
        train_loader, val_loader, _ = splits.loaders(batch_size=batch_size, seed=seed)
        start = time.perf_counter()
        train_model(
            model,
            train_loader,
            epochs,
            lr=lr,
            weight_decay=weight_decay,
            device=device,
            progress=progress,
            desc=f"train {arch} on {splits.name}",
        )
        info.update(cached=False, train_seconds=time.perf_counter() - start)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        path.with_suffix(".json").write_text(json.dumps(recipe, indent=2))
    model.eval()
    _, _, test_loader = splits.loaders(batch_size=batch_size, seed=seed)
    info["test_loss"], info["test_accuracy"] = evaluate(model, test_loader, device=device)
    return model, info
