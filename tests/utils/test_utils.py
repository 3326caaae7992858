"""FLOPs, parameters and latency helpers against hand counts."""

import torch
import torch.nn as nn

from torchpruner.utils import count_flops, count_parameters, measure_latency


def test_counts_match_hand_computation():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    assert count_parameters(model) == (2 * 4 * 9 + 4) + (64 * 5 + 5)
    conv = 2 * (4 * 4) * 4 * (2 * 9)  # 2 FLOPs per multiply-add, 16 positions, 4 filters, 18 taps
    linear = 2 * 64 * 5
    assert count_flops(model, (2, 6, 6)) == conv + linear
    assert count_flops(model, (2, 6, 6), batch_size=3) == 3 * (conv + linear)
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 4 + 64 * 5 + 5


def test_latency_leaves_mode_and_threads():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    threads = torch.get_num_threads()
    result = measure_latency(model, (8,), warmup=1, repeats=3, threads=1)
    assert set(result) == {"median_s", "min_s", "mean_s"} and result["min_s"] > 0
    assert model.training and torch.get_num_threads() == threads
