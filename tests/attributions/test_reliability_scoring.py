"""Scoring and dry runs leave the model, its buffers and the training loop's data exactly as found.

- Modules whose ``train()`` has side effects (a RepVGG-style block that fuses its branches in eval
  mode) are put back with ``train(mode)``, so the side effects run again, also in mixed states.
- Every buffer (quantization-aware-training observers included) is restored bit for bit, shapes
  included.
- BatchNorm without running statistics normalises with the batch: scoring warns.
- Scoring with the DataLoader the training loop is iterating (persistent workers) does not reset
  the training loop's iterator.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import assert_unchanged, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchpruner import Pruner
from torchpruner.attributions import (
    APoZAttributionMetric,
    BatchStatisticsWarning,
    RandomAttributionMetric,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)

DTYPE = torch.float64

METRICS = {
    "random": lambda m, d, **kw: RandomAttributionMetric(m, d, F.cross_entropy, "cpu", seed=0, **kw),
    "weight_norm": lambda m, d, **kw: WeightNormAttributionMetric(m, d, F.cross_entropy, "cpu", **kw),
    "apoz": lambda m, d, **kw: APoZAttributionMetric(m, d, F.cross_entropy, "cpu", **kw),
    "sensitivity": lambda m, d, **kw: SensitivityAttributionMetric(m, d, F.cross_entropy, "cpu", **kw),
    "taylor": lambda m, d, **kw: TaylorAttributionMetric(m, d, F.cross_entropy, "cpu", **kw),
    "shapley": lambda m, d, **kw: ShapleyAttributionMetric(m, d, F.cross_entropy, "cpu", sv_samples=1, seed=0, **kw),
}
DATA_METRICS = ["apoz", "sensitivity", "taylor", "shapley"]


def images(n=8, channels=2, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g))


# --------------------------------------------------------------------------------------------
# Modules whose train() has side effects
# --------------------------------------------------------------------------------------------
class RepBlock(nn.Module):
    """RepVGG-style block: 3x3 + 1x1 + identity branches in training; ``train(False)`` fuses them
    into one 3x3 kernel that the forward then uses instead, ``train(True)`` drops the fused kernel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.fused_weight: torch.Tensor | None = None
        self.fused_bias: torch.Tensor | None = None

    def train(self, mode: bool = True) -> RepBlock:
        super().train(mode)
        if mode:
            self.fused_weight = self.fused_bias = None
        else:
            with torch.no_grad():
                weight = self.conv3.weight.clone()
                weight[:, :, 1, 1] += self.conv1.weight[:, :, 0, 0]
                weight[:, :, 1, 1] += torch.eye(weight.shape[0], dtype=weight.dtype)
                self.fused_weight = weight
                self.fused_bias = self.conv3.bias + self.conv1.bias
        return self

    @property
    def fused(self) -> bool:
        return self.fused_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            return F.conv2d(x, self.fused_weight, self.fused_bias, padding=1)
        return self.conv3(x) + self.conv1(x) + x


def rep_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(2, 4, 3, padding=1),
            act=nn.ReLU(),
            block=RepBlock(4),
            head=nn.Conv2d(4, 4, 1),
            head_act=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    ).to(DTYPE)


def flags(model):
    return {name: module.training for name, module in model.named_modules()}


def assert_branches_get_gradients(model):
    model.zero_grad(set_to_none=True)
    x, y = images()
    F.cross_entropy(model(x), y).backward()
    block = model.block
    for conv in (block.conv3, block.conv1):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_rep_block_fuses_and_unfuses_as_written():
    model = rep_model()
    x, _ = images(channels=4)
    branches = model.block(x)
    model.eval()
    assert model.block.fused
    torch.testing.assert_close(model.block(x), branches)
    model.train()
    assert not model.block.fused


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", list(METRICS))
def test_scoring_a_training_model_leaves_the_rep_block_unfused(name):
    model = rep_model()
    model.train()
    METRICS[name](model, [images()]).run(model.stem)
    assert all(flags(model).values())
    assert not model.block.fused
    assert_branches_get_gradients(model)


def test_plan_dry_run_leaves_the_rep_block_unfused():
    model = rep_model()
    model.train()
    pruner = Pruner(model, input_size=(2, 5, 5))
    plan = pruner.plan(model.head, [0])
    assert "head" in str(plan)
    assert all(flags(model).values())
    assert not model.block.fused
    assert_branches_get_gradients(model)


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", ["taylor", "apoz", "weight_norm"])
def test_mixed_state_training_model_with_fused_block_restored_exactly(name):
    model = rep_model()
    model.train()
    model.block.eval()  # the user fused this block on purpose
    before = flags(model)
    fused_weight = model.block.fused_weight.clone()
    METRICS[name](model, [images()]).run(model.stem)
    assert flags(model) == before
    assert model.block.fused
    torch.testing.assert_close(model.block.fused_weight, fused_weight, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", ["taylor", "apoz", "weight_norm"])
def test_mixed_state_eval_model_with_training_block_restored_exactly(name):
    model = rep_model()
    model.eval()
    model.block.train()  # fine-tune the block alone, its branches unfused
    before = flags(model)
    METRICS[name](model, [images()]).run(model.stem)
    assert flags(model) == before
    assert not model.block.fused
    assert_branches_get_gradients(model)


def test_module_that_freezes_a_child_in_train_keeps_it_frozen():
    class FrozenNorm(nn.Module):
        """A common pattern: ``train()`` keeps the BatchNorm in eval mode."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 25, 3)

        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()
            return self

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))

    model = FrozenNorm().to(DTYPE).train()
    before = flags(model)
    assert before == {"": True, "conv": True, "bn": False, "fc": True}
    TaylorAttributionMetric(model, [images()], F.cross_entropy, "cpu").run(model.conv)
    assert flags(model) == before


# --------------------------------------------------------------------------------------------
# Every buffer restored: quantization-aware-training observers
# --------------------------------------------------------------------------------------------
class QuantizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 25, 3)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.flatten(1)))


def qat_model():
    torch.manual_seed(0)
    model = QuantizedNet().train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    return torch.ao.quantization.prepare_qat(model)


def buffer_objects(model):
    return {name: buffer for name, buffer in model.named_buffers()}


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", DATA_METRICS)
def test_scoring_leaves_every_qat_observer_buffer_as_found(name):
    model = qat_model()
    x, y = images()
    data = [(x.float(), y)]
    assert any(b.numel() == 0 for b in model.buffers())  # observers that get resized on first use
    before, objects = snapshot(model), buffer_objects(model)
    METRICS[name](model, data).run(model.conv)
    assert_unchanged(before, model)
    after = buffer_objects(model)
    assert after.keys() == objects.keys()
    assert all(after[key] is objects[key] for key in objects)  # the same tensor objects


def test_qat_observers_still_observe_after_scoring():
    model = qat_model()
    x, y = images()
    TaylorAttributionMetric(model, [(x.float(), y)], F.cross_entropy, "cpu").run(model.conv)
    model(x.float())  # the user's next training step
    observed = dict(model.named_buffers())
    assert observed["conv.weight_fake_quant.activation_post_process.min_val"].numel() == 4


def test_scoring_restores_buffers_a_forward_replaces_or_adds():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
            self.register_buffer("last", torch.empty(0))

        def forward(self, x):
            self.calls += 1  # in place
            self.last = x.detach().mean(0)  # a new tensor object, a new shape
            return self.head(self.fc(x))

    model = Counting().to(DTYPE)
    calls, last = model.calls, model.last
    before = snapshot(model)
    x = torch.randn(4, 3, dtype=DTYPE)
    TaylorAttributionMetric(model, [(x, torch.tensor([0, 1, 0, 1]))], F.cross_entropy, "cpu").run(model.fc)
    assert_unchanged(before, model)
    assert model.calls is calls and model.last is last


def test_scoring_between_forward_and_backward_keeps_the_users_graph():
    model = (
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
        .to(DTYPE)
        .train()
    )
    x, y = images()
    loss = F.cross_entropy(model(x), y)  # BatchNorm saved its running statistics for backward
    TaylorAttributionMetric(model, [(x, y)], F.cross_entropy, "cpu").run(model[0])
    loss.backward()  # untouched buffers are not rewritten (their version counters stay)
    assert model[0].weight.grad is not None


# --------------------------------------------------------------------------------------------
# BatchNorm that normalises with the batch
# --------------------------------------------------------------------------------------------
def batch_stats_model(track_running_stats: bool):
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(2, 4, 3, padding=1),
            norm=nn.BatchNorm2d(4, track_running_stats=track_running_stats),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(4 * 25, 3),
        )
    ).to(DTYPE)


def batches(n=8, batch_size=2):
    x, y = images(n)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize("name", DATA_METRICS)
def test_batch_statistics_batchnorm_warns_once_per_run_naming_it(name):
    model = batch_stats_model(track_running_stats=False)
    with pytest.warns(BatchStatisticsWarning, match="'norm'") as record:
        METRICS[name](model, batches()).run(model.conv)
    ours = [w for w in record if issubclass(w.category, BatchStatisticsWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__  # points at the caller of run
    with pytest.warns(BatchStatisticsWarning, match="'norm'"):  # once per run, every run
        METRICS[name](model, batches()).run(model.conv)


def test_batch_statistics_warning_scores_really_depend_on_the_batch():
    model = batch_stats_model(track_running_stats=False)
    with pytest.warns(BatchStatisticsWarning):
        small = TaylorAttributionMetric(model, batches(batch_size=2), F.cross_entropy, "cpu").run(model.conv)
    with pytest.warns(BatchStatisticsWarning):
        large = TaylorAttributionMetric(model, batches(batch_size=8), F.cross_entropy, "cpu").run(model.conv)
    assert not np.allclose(small, large)


@pytest.mark.filterwarnings("ignore:APoZ evaluated")
@pytest.mark.parametrize(
    ("name", "track_running_stats"), [(name, True) for name in METRICS] + [("random", False), ("weight_norm", False)]
)
def test_no_batch_statistics_warning_with_running_statistics_or_without_a_data_pass(name, track_running_stats):
    model = batch_stats_model(track_running_stats=track_running_stats)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        METRICS[name](model, batches()).run(model.conv)
    assert not [w for w in record if issubclass(w.category, BatchStatisticsWarning)]


# --------------------------------------------------------------------------------------------
# The training loop's own DataLoader with persistent workers
# --------------------------------------------------------------------------------------------
def indexed_dataset(n=8):
    x, y = images(n)
    return TensorDataset(x, y, torch.arange(n))


def persistent_loader(dataset, shuffle):
    generator = torch.Generator().manual_seed(1) if shuffle else None
    return DataLoader(
        dataset, batch_size=2, shuffle=shuffle, generator=generator, num_workers=1, persistent_workers=True
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_scoring_mid_epoch_with_the_training_loader_sees_every_batch_once(shuffle):
    dataset = indexed_dataset()
    loader = persistent_loader(dataset, shuffle)
    model = batch_stats_model(track_running_stats=True)
    metric = TaylorAttributionMetric(model, loader, F.cross_entropy, "cpu")
    reference = TaylorAttributionMetric(model, DataLoader(dataset, batch_size=2), F.cross_entropy, "cpu").run(
        model.conv
    )
    for epoch in range(2):
        seen: list[int] = []
        scores = None
        for step, (_x, _y, index) in enumerate(loader):
            seen.extend(index.tolist())
            if step == 1:
                scores = metric.run(model.conv)  # mid-epoch, the very same loader
            if len(seen) > 3 * len(dataset):
                break  # the old behaviour: the loop restarts after every scoring
        assert sorted(seen) == list(range(len(dataset))), f"epoch {epoch}"
        np.testing.assert_allclose(scores, reference, rtol=1e-10, atol=0)  # scored on every example


def test_scoring_with_a_persistent_loader_before_and_between_epochs():
    dataset = indexed_dataset()
    loader = persistent_loader(dataset, shuffle=False)
    model = batch_stats_model(track_running_stats=True)
    metric = TaylorAttributionMetric(model, loader, F.cross_entropy, "cpu", max_batches=1)
    metric.run(model.conv)  # before the training loop ever iterated the loader
    for _epoch in range(2):
        seen = [i for _x, _y, index in loader for i in index.tolist()]
        assert seen == list(range(len(dataset)))
        metric.run(model.conv)  # between epochs
