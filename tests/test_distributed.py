"""Scoring and pruning in the middle of a DistributedDataParallel run (torchpruner.distributed).

Two gloo ranks on the CPU are spawned once per job (tests/ddp_workers.py), each under a hard
timeout so that a hang fails instead of blocking CI. The ranks record what they saw; here the
records are compared with each other and with single-process references over the same data:
distributed scores equal the scores of the union of the shards (float64), and a run pruned
mid-training equals a single process trained on the same global batches.
"""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ddp_workers as workers
from torchpruner import Pruner
from torchpruner.attributions import (
    APoZAttributionMetric,
    MeanPlusStd,
    SensitivityAttributionMetric,
    ShapleyAttributionMetric,
    TaylorAttributionMetric,
    WeightNormAttributionMetric,
)
from torchpruner.attributions.groups import group_label
from torchpruner.attributions.reductions import Moments
from torchpruner.distributed import DistributedPruningError, ddp_arguments, plan_ddp, prune_ddp
from torchpruner.schedule import select_units

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

METRICS = {
    "Taylor": TaylorAttributionMetric,
    "Sensitivity": SensitivityAttributionMetric,
    "APoZ": APoZAttributionMetric,
}
REDUCTIONS = {
    "mean": "mean",
    "sum": "sum",
    "none": "none",
    "mean+2std": MeanPlusStd(2.0),
    "callable": lambda s: s.max(0) - s.min(0),
}


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    return workers.launch("scoring", tmp_path_factory.mktemp("scoring"))


@pytest.fixture(scope="module")
def pruning(tmp_path_factory):
    return workers.launch("pruning", tmp_path_factory.mktemp("pruning"))


# -- the reductions combine exactly ------------------------------------------------------------


def test_moments_of_shards_merge_to_the_moments_of_the_union():
    rows = np.random.default_rng(0).normal(size=(37, 5)) * 3 + 1
    merged = Moments.of(rows[:10]).merge(Moments.of(rows[10:11])).merge(Moments.of(rows[11:]))
    whole = Moments.of(rows)
    assert merged.count == 37
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12)
    np.testing.assert_allclose(MeanPlusStd(2.0)(rows), rows.mean(0) + 2 * rows.std(0), rtol=1e-13)
    np.testing.assert_allclose(
        MeanPlusStd(1.5, ddof=1).from_moments(merged), rows.mean(0) + 1.5 * rows.std(0, ddof=1), rtol=1e-12
    )


def test_mean_plus_std_streams_like_the_callable_over_batches():
    model = workers.mlp()
    loader = workers.union_loader(workers.dataset())
    streamed = TaylorAttributionMetric(model, loader, F.cross_entropy, reduction=MeanPlusStd(2.0)).run(model[2])
    rows = TaylorAttributionMetric(model, loader, F.cross_entropy, reduction="none").run(model[2])
    np.testing.assert_allclose(streamed, rows.mean(0) + 2 * rows.std(0), rtol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), "2", True])
def test_mean_plus_std_refuses_a_bad_k(bad):
    with pytest.raises(TypeError, match="k must be"):
        MeanPlusStd(bad)


# -- scoring across ranks equals scoring the union of the shards --------------------------------


def _reference(metric, reduction, target, **options):
    model = workers.mlp()
    groups = Pruner(model, input_size=(12,)).groups()
    what = model[2] if target == "layer" else groups[0]
    return metric(model, workers.union_loader(workers.dataset()), F.cross_entropy, reduction=reduction, **options).run(
        what
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_distributed_scores_equal_the_scores_of_the_union_of_the_shards(scoring, metric, reduction):
    for target in ("layer", "group"):
        expected = _reference(METRICS[metric], REDUCTIONS[reduction], target)
        for rank, record in enumerate(scoring):
            got = record[(metric, reduction, target)]
            assert got.shape == expected.shape, (rank, target)
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=f"rank {rank} {target}")
        np.testing.assert_array_equal(scoring[0][(metric, reduction, target)], scoring[1][(metric, reduction, target)])


@pytest.mark.parametrize("reduction", ["mean", "none", "mean+2std"])
@pytest.mark.parametrize("metric", ["Taylor", "APoZ"])
def test_distributed_run_all_equals_run_on_the_union_of_the_shards(scoring, metric, reduction):
    model = workers.mlp()
    groups = Pruner(model, input_size=(12,)).groups()
    reference = METRICS[metric](
        model, workers.union_loader(workers.dataset()), F.cross_entropy, reduction=REDUCTIONS[reduction]
    )
    expected = {"2": reference.run(model[2]), **{group_label(g): reference.run(g) for g in groups}}
    for rank, record in enumerate(scoring):
        got = record[("run_all", metric, reduction)]
        assert list(got) == list(expected), rank
        for key, want in expected.items():
            np.testing.assert_allclose(got[key], want, rtol=1e-10, atol=1e-12, err_msg=f"rank {rank} {key}")
            np.testing.assert_array_equal(got[key], scoring[0][("run_all", metric, reduction)][key])


def test_distributed_run_all_of_shapley_runs_each_group_with_rank_0s_seed(scoring):
    model = workers.mlp()
    groups = Pruner(model, input_size=(12,)).groups()
    reference = ShapleyAttributionMetric(
        model, workers.union_loader(workers.dataset()), F.cross_entropy, sv_samples=1, seed=0
    )
    for record in scoring:  # rank 1 asked for seed=1 and got rank 0's
        got = record[("run_all", "Shapley")]
        assert list(got) == [group_label(g) for g in groups]
        for group in groups:
            np.testing.assert_allclose(got[group_label(group)], reference.run(group), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["run_all empty shard", "run_all empty shard, run by run"])
def test_a_rank_that_fails_in_run_all_makes_every_rank_raise_the_same_error(scoring, case):
    messages = [record[case] for record in scoring]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "DistributedScoringError" in messages[0] and "rank(s) [1]" in messages[0]


def test_shapley_uses_rank_0s_seed_on_every_rank(scoring):
    np.testing.assert_array_equal(scoring[0][("Shapley", "mean", "layer")], scoring[1][("Shapley", "mean", "layer")])
    model = workers.mlp()
    group = Pruner(model, input_size=(12,)).groups()[1]
    expected = ShapleyAttributionMetric(
        model, workers.union_loader(workers.dataset()), F.cross_entropy, reduction="none", sv_samples=1, seed=0
    ).run(group)
    for record in scoring:  # rank 1 asked for seed=1 and got rank 0's
        np.testing.assert_allclose(record[("Shapley", "none", "group")], expected, rtol=1e-10, atol=1e-12)


def test_shapley_stderr_is_refused_on_every_rank_in_a_distributed_run(scoring):
    """Each rank's own stopping rule could differ and leave a rank waiting in a collective."""
    messages = [record["shapley stderr"] for record in scoring]
    assert messages[0] == messages[1] and "not available in a distributed run" in messages[0]


def test_data_free_metrics_give_rank_0s_scores(scoring):
    np.testing.assert_array_equal(scoring[0][("Random", "mean", "layer")], scoring[1][("Random", "mean", "layer")])
    model = workers.mlp()
    group = Pruner(model, input_size=(12,)).groups()[0]
    expected = WeightNormAttributionMetric(model, [], F.cross_entropy).run(group)
    for record in scoring:
        np.testing.assert_allclose(record[("WeightNorm", "mean", "group")], expected, rtol=1e-12)


def test_a_rank_that_fails_to_score_makes_every_rank_raise_the_same_error(scoring):
    messages = [record["empty shard"] for record in scoring]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "DistributedScoringError" in messages[0] and "rank(s) [1]" in messages[0]
    assert "yielded no batches" in messages[0]


def test_scoring_through_the_wrapper_never_calls_it_and_training_goes_on(scoring):
    assert [record["wrapper forwards while scoring"] for record in scoring] == [0, 0]
    torch.testing.assert_close(scoring[0]["grad"], scoring[1]["grad"], rtol=0, atol=0)  # all-reduced as usual


# -- pruning in the middle of a run ---------------------------------------------------------------


def _single_process_run():
    """The reference: one process trained on the global batches (both ranks' batches of a step),
    scored on the union of the shards, pruned with the selection its own scores give."""
    data = workers.dataset(seed=3, examples=workers.TRAIN_EXAMPLES)
    model = workers.mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    steps = workers.global_batches(data, workers.STEPS_BEFORE + workers.STEPS_AFTER)
    for x, y in steps[: workers.STEPS_BEFORE]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    pruner = Pruner(model, input_size=(12,), optimizer=optimizer)
    attr = TaylorAttributionMetric(model, workers.union_loader(data), F.cross_entropy)
    groups = pruner.groups()
    scores = [attr.run(group) for group in groups]
    selection = select_units(groups, 0.3, scores=attr.run)
    pruner.plan_groups(selection).apply(model, optimizer)
    after = workers._state(model, optimizer)
    for x, y in steps[workers.STEPS_BEFORE :]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    return scores, sorted((g.index, u) for g, u in selection.items()), after, workers._state(model, optimizer)


def _assert_states_close(got, expected, atol):
    assert got["params"].keys() == expected["params"].keys()
    for key in expected["params"]:
        torch.testing.assert_close(got["params"][key], expected["params"][key], rtol=0, atol=atol, msg=key)
    assert got["optimizer"].keys() == expected["optimizer"].keys()
    for name, state in expected["optimizer"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    got["optimizer"][name][key].double(), value.double(), rtol=0, atol=atol, msg=f"{name}.{key}"
                )


def test_a_run_pruned_mid_training_equals_a_single_process_on_the_same_global_batches(pruning):
    scores, selection, after, end = _single_process_run()
    for rank, record in enumerate(pruning):
        for got, expected in zip(record["scores"], scores):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        assert record["selection"] == selection and selection
        _assert_states_close(record["after prune"], after, 1e-10)
        _assert_states_close(record["end"], end, 1e-10)
    assert record["after prune"]["params"]["0.weight"].shape[0] == 10 - 3  # 30% of the first hidden layer went


def _parameters_only(state):
    """BatchNorm statistics are rank-local between forwards (DDP broadcasts rank 0's at the next one)."""
    return {**state, "params": {k: v for k, v in state["params"].items() if "running" not in k and "batches" not in k}}


def test_every_rank_holds_identical_parameters_and_optimizer_state(pruning):
    for stage in ("after prune", "end", "bn"):
        _assert_states_close(_parameters_only(pruning[1][stage]), _parameters_only(pruning[0][stage]), 0)


def test_the_optimizer_and_scheduler_stay_and_the_old_wrapper_is_retired(pruning):
    for record in pruning:
        assert record["same objects"] == (True, True, True, True)
        assert "use the wrapper that prune_ddp returned" in record["old wrapper"]
        assert record["lr"] == pytest.approx([0.01 * 0.5 ** ((workers.STEPS_BEFORE + workers.STEPS_AFTER) // 2)])


def test_ranks_that_disagree_about_indices_all_raise_the_same_error_and_nothing_is_pruned(pruning):
    messages = [record["disagree"] for record in pruning]
    assert messages[0] == messages[1] and "DistributedPruningError" in messages[0]
    assert "planned different prunes" in messages[0] and "rank(s) [1]" in messages[0]
    assert all(record["unchanged after disagreeing"] for record in pruning)


def test_replicas_that_differ_refuse_rank_0s_decision_on_every_rank(pruning):
    messages = [record["replicas differ"] for record in pruning]
    assert messages[0] == messages[1] and "DistributedPruningError" in messages[0]
    assert all(record["unchanged after differing"] for record in pruning)


def test_a_prune_that_fails_on_one_rank_while_applying_is_put_back_on_every_rank(pruning):
    messages = [record["failed apply"] for record in pruning]
    assert messages[0] == messages[1] and "applying the distributed prune failed on rank(s) [1]" in messages[0]
    assert "MemoryError: injected" in messages[0]
    assert all(record["unchanged after failed apply"] for record in pruning)
    _assert_states_close(pruning[1]["after failed apply"], pruning[0]["after failed apply"], 0)
    assert pruning[0]["after failed apply"]["params"]["0.weight"].shape == (10, 12)


def test_a_batchnorm_model_prunes_and_keeps_training(pruning):
    params = pruning[0]["bn"]["params"]
    assert params["0.weight"].shape[0] == 6 - 1 and params["1.running_mean"].shape == (5,)
    assert all(torch.isfinite(t).all() for t in params.values() if t.is_floating_point())


def test_a_rank_that_never_arrives_is_reported_within_the_timeout(pruning):
    message = pruning[0]["absent"]
    assert "DistributedPruningError" in message and "not every rank reached" in message
    assert pruning[0]["absent seconds"] < 3.0


# -- one process: what is refused before any collective ----------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, timeout=datetime.timedelta(seconds=20)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_pruner_refuses_a_ddp_wrapper_and_names_the_helper(one_rank):
    with pytest.raises(TypeError, match="prune_ddp"):
        Pruner(DistributedDataParallel(workers.mlp()), input_size=(12,))


def test_prune_ddp_needs_the_pruner_of_the_wrapped_module(one_rank):
    ddp = DistributedDataParallel(workers.mlp())
    with pytest.raises(ValueError, match="Pruner\\(ddp.module"):
        prune_ddp(ddp, Pruner(workers.mlp(), input_size=(12,)), {})
    with pytest.raises(TypeError, match="DistributedDataParallel wrapper"):
        prune_ddp(ddp.module, Pruner(ddp.module, input_size=(12,)), {})


def test_a_stale_or_foreign_group_is_refused_naming_the_fix(one_rank):
    model = workers.mlp()
    ddp = DistributedDataParallel(model)
    pruner = Pruner(model, input_size=(12,))
    foreign = Pruner(workers.mlp(), input_size=(12,)).groups()[0]
    with pytest.raises(DistributedPruningError, match="take them from pruner.groups"):
        prune_ddp(ddp, pruner, {foreign: [0]})
    assert ddp.module is model  # still the usable wrapper


def test_ddp_arguments_round_trip_and_hooks_are_refused(one_rank):
    ddp = DistributedDataParallel(
        workers.mlp(), find_unused_parameters=True, gradient_as_bucket_view=True, bucket_cap_mb=5
    )
    arguments = ddp_arguments(ddp)
    assert arguments["find_unused_parameters"] and arguments["gradient_as_bucket_view"]
    assert arguments["bucket_cap_mb"] == pytest.approx(5)
    again = DistributedDataParallel(workers.mlp(), **arguments)
    assert ddp_arguments(again) == arguments
    ddp.register_comm_hook(None, lambda state, bucket: None)
    with pytest.raises(ValueError, match="wrap="):
        ddp_arguments(ddp)


def test_one_rank_prune_with_wrap_and_a_plan_checked_not_broadcast(one_rank):
    model = workers.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ddp = DistributedDataParallel(model)
    pruner = Pruner(model, input_size=(12,), optimizer=optimizer)
    plan = pruner.plan(model[0], [1, 4])
    with pytest.raises(ValueError, match="broadcast=False"):
        plan_ddp(pruner, plan)
    made = []
    new = prune_ddp(
        ddp, pruner, plan, broadcast=False, wrap=lambda module: made.append(module) or DistributedDataParallel(module)
    )
    assert made == [model] and new.module is model and model[0].out_features == 8
    x, y = workers.dataset()[:4]
    optimizer.zero_grad()
    F.cross_entropy(new(x), y).backward()  # the new reducer fits the new shapes
    optimizer.step()
    assert model[2].weight.grad.shape == (8, 8)


def test_fsdp_is_refused_with_what_to_do(one_rank):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):  # torch < 2.6: the same function before it was made public
        fsdp = pytest.importorskip("torch.distributed._composable.fsdp")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    fsdp.fully_shard(model)
    with pytest.raises(TypeError, match="Prune before sharding"):
        Pruner(model, input_size=(4,))
    with pytest.raises(TypeError, match="FSDP"):
        TaylorAttributionMetric(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], F.cross_entropy).run(model[0])
    with pytest.raises(TypeError, match="FSDP"):
        prune_ddp(model, None, {})  # type: ignore[arg-type]


def test_process_group_must_be_a_process_group(one_rank):
    model = workers.mlp()
    with pytest.raises(TypeError, match="ProcessGroup"):
        TaylorAttributionMetric(model, [], F.cross_entropy, process_group="world").run(model[0])
