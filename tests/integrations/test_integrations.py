"""The training-framework callbacks, end to end on the digits: after an event the model is
smaller, the Trainer's optimizer is the same object with its state sliced (the kept rows of the
state from just before the event, not a reset), training goes on and the loss keeps falling, and
the numbers reach the Trainer's logger."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchpruner import TaylorAttributionMetric, kept_units
from torchpruner.integrations import ScheduledPruning
from torchpruner.integrations.events import unwrap_optimizer
from torchpruner.utils import count_parameters

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = sklearn_datasets.load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10))


def state_rows(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().clone()
        for key, value in optimizer.state[parameter].items()
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape
    }


class Watch:
    """Records, around each event the callback runs, the optimizer it was given and the state of
    the first layer's weight just before and just after, with the units the layer kept."""

    def __init__(self, schedule: ScheduledPruning, layer: nn.Linear) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.states: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]] = []
        prune = schedule.prune

        def watched(trained, optimizer, **kwargs):
            inner = unwrap_optimizer(optimizer)
            before = state_rows(inner, layer.weight)
            record = prune(trained, optimizer, **kwargs)
            self.optimizers.append(inner)
            self.states.append((before, state_rows(inner, layer.weight), kept_units(layer)))
            return record

        schedule.prune = watched


def assert_state_sliced(watch: Watch, optimizer: torch.optim.Optimizer) -> None:
    """One event, with ``optimizer`` (the Trainer's, still in use after training): each
    per-element state tensor of the layer's weight became the kept rows of its value just before."""
    assert len(watch.optimizers) == 1 and watch.optimizers[0] is optimizer
    ((before, after, kept),) = watch.states
    assert before, "the optimizer had state before the event"
    assert after.keys() == before.keys()
    for key, old in before.items():
        torch.testing.assert_close(after[key], old[kept], rtol=0, atol=0)


def test_schedule_checks_its_arguments_first():
    with pytest.raises(ValueError, match="epochs=.*steps="):
        ScheduledPruning(0.2, input_size=(64,))
    with pytest.raises(ValueError, match="fraction"):
        ScheduledPruning(1.5, epochs=[0], input_size=(64,))
    with pytest.raises(ValueError, match="epochs must hold ints >= 0"):
        ScheduledPruning(0.2, epochs=[-1], input_size=(64,))
    with pytest.raises(TypeError, match="epochs must be a collection"):
        ScheduledPruning(0.2, epochs=3, input_size=(64,))
    with pytest.raises(ValueError, match="input_size"):
        ScheduledPruning(0.2, epochs=[0])
    with pytest.raises(TypeError, match="metric"):
        ScheduledPruning(0.2, epochs=[0], input_size=(64,), metric="taylor")
    with pytest.raises(ValueError, match="dropout_policy"):
        ScheduledPruning(0.2, epochs=[0], input_size=(64,), dropout_policy="half")
    with pytest.raises(TypeError, match="min_units"):
        ScheduledPruning(0.2, epochs=[0], input_size=(64,), min_units=0.5)


def test_schedule_event_slices_the_live_optimizer_state():
    """The shared core, without a framework: the optimizer's state after the event is exactly
    the kept rows of its state before, the optimizer object and param groups are the same."""
    x, y = digits()
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        adam.zero_grad()
        F.cross_entropy(model(x[:256]), y[:256]).backward()
        adam.step()
    before = state_rows(adam, model[0].weight)
    groups = [list(g["params"]) for g in adam.param_groups]
    taylor = TaylorAttributionMetric(model, [(x[:128], y[:128])], F.cross_entropy)
    schedule = ScheduledPruning(0.25, metric=taylor, steps=[3], input_size=(64,))
    assert schedule.due_at_step(3) and not schedule.due_at_step(2)
    record = schedule.prune(model, adam, epoch=0, step=3, at_step=True)
    kept = kept_units(model[0])
    assert len(kept) == 24 and model[0].out_features == 24 and model[2].out_features == 18
    for key, old in before.items():
        torch.testing.assert_close(adam.state[model[0].weight][key], old[kept], rtol=0, atol=0)
    assert [list(g["params"]) for g in adam.param_groups] == groups
    assert record.parameters == count_parameters(model) < record.parameters_before
    assert record.removed_units == 8 + 6 and record.flops < record.flops_before
    assert record.widths == {"0": 24, "2": 18}
    assert not schedule.due_at_step(3)  # fires once
    with pytest.raises(ValueError, match="build the metric on the module that is pruned"):
        ScheduledPruning(
            0.25, metric=TaylorAttributionMetric(mlp(), [(x, y)], F.cross_entropy), epochs=[0], input_size=(64,)
        ).prune(model, adam, epoch=0, step=0, at_step=False)


def test_importing_torchpruner_imports_no_framework():
    code = (
        "import sys, torchpruner, torchpruner.integrations; from torchpruner import Pruner; "
        "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------
def lightning_parts():
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import Logger

    class MemoryLogger(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.logged.append((step, dict(metrics)))

    class LitDigits(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.losses: list[tuple[int, float]] = []  # (optimizer steps before, loss)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.losses.append((self.global_step, float(loss.detach())))
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return lightning, MemoryLogger, LitDigits


@pytest.mark.parametrize("when", ["epochs", "steps"])
def test_lightning_callback_prunes_with_the_trainers_optimizer(when):
    lightning, MemoryLogger, LitDigits = lightning_parts()
    from torchpruner.integrations.lightning import PruningCallback

    x, y = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    lit = LitDigits()
    taylor = TaylorAttributionMetric(lit.net, [(x[:256], y[:256])], F.cross_entropy)
    moment = {"epochs": [0]} if when == "epochs" else {"steps": [20]}
    callback = PruningCallback(0.25, metric=taylor, model=lit.net, input_size=(64,), **moment)
    watch = Watch(callback.schedule, lit.net[0])
    memory = MemoryLogger()
    parameters = count_parameters(lit)
    trainer = lightning.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=memory,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer.fit(lit, loader)

    (record,) = callback.records
    assert count_parameters(lit) == record.parameters < parameters
    assert lit.net[0].out_features == 24 and lit.net[2].in_features == 24
    optimizer = trainer.optimizers[0]
    assert_state_sliced(watch, optimizer)  # the Trainer's own optimizer object, still in use
    assert optimizer.state[lit.net[0].weight]["step"] == trainer.global_step  # never reset
    logged = [(step, metrics) for step, metrics in memory.logged if "pruning/parameters" in metrics]
    assert logged == [(record.step, record.metrics())]
    after = [loss for step, loss in lit.losses if step > record.step]
    assert np.mean(after[-7:]) < np.mean(after[:7])  # training goes on and keeps learning


def test_lightning_callback_prunes_the_lightning_module_itself():
    lightning, MemoryLogger, LitDigits = lightning_parts()
    from torchpruner.integrations.lightning import PruningCallback

    x, y = digits()
    lit = LitDigits()
    callback = PruningCallback(0.5, steps=[2], input_size=(64,), count_flops=False)
    trainer = lightning.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, DataLoader(TensorDataset(x[:512], y[:512]), batch_size=128))
    assert lit.net[0].out_features == 16 and callback.records[0].flops is None
    assert trainer.global_step == 4


def test_lightning_callback_refuses_several_optimizers():
    lightning, MemoryLogger, LitDigits = lightning_parts()
    from torchpruner.integrations.lightning import PruningCallback

    class TwoOptimizers(LitDigits):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            x, y = batch
            self.manual_backward(F.cross_entropy(self.net(x), y))
            for optimizer in self.optimizers():
                optimizer.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2:].parameters(), lr=0.1),
            ]

    x, y = digits()
    lit = TwoOptimizers()
    before = copy.deepcopy(lit.net.state_dict())
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PruningCallback(0.5, steps=[1, 2], input_size=(64,), model=lit.net)],
    )
    with pytest.raises(ValueError, match="follows one optimizer; this Trainer has 2"):
        trainer.fit(lit, DataLoader(TensorDataset(x[:256], y[:256]), batch_size=128))
    assert all(lit.net.state_dict()[k].shape == v.shape for k, v in before.items())


# --------------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """The Trainer's calling convention: keyword inputs, ``labels`` gives a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class DigitsDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


def hf_trainer(model: nn.Module, callback, tmp_path, epochs: int = 4):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = digits()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=128,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=DigitsDataset(x, y), callbacks=[callback])


@pytest.mark.parametrize("when", ["epochs", "steps"])
def test_transformers_callback_prunes_with_the_trainers_optimizer(when, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from torchpruner.integrations.transformers import PruningCallback

    x, y = digits()
    model = DigitsClassifier()
    taylor = TaylorAttributionMetric(model.net, [(x[:256], y[:256])], F.cross_entropy)
    moment = {"epochs": [0]} if when == "epochs" else {"steps": [20]}
    callback = PruningCallback(0.25, metric=taylor, model=model.net, input_size=(64,), **moment)
    watch = Watch(callback.schedule, model.net[0])
    parameters = count_parameters(model)
    trainer = hf_trainer(model, callback, tmp_path)
    losses: list[tuple[int, float]] = []
    original_compute_loss = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        loss = original_compute_loss(*args, **kwargs)
        losses.append((trainer.state.global_step, float(loss[0] if isinstance(loss, tuple) else loss)))
        return loss

    trainer.compute_loss = compute_loss
    if when == "steps":
        callback.trainer = trainer
    trainer.train()

    (record,) = callback.records
    assert count_parameters(model) == record.parameters < parameters
    assert model.net[0].out_features == 24 and model.net[2].in_features == 24
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert_state_sliced(watch, optimizer)
    assert optimizer.state[model.net[0].weight]["step"] == trainer.state.global_step  # never reset
    logged = [entry for entry in trainer.state.log_history if "pruning/parameters" in entry]
    assert len(logged) == 1 and logged[0]["pruning/parameters"] == record.parameters
    assert logged[0]["pruning/removed_units"] == record.removed_units == 8 + 6
    after = [loss for step, loss in losses if step > record.step]
    assert np.mean(after[-7:]) < np.mean(after[:7])
