"""The studies' statistics (experiments/stats.py) against closed forms, brute force and a seeded
coverage experiment."""

import itertools
import math

import numpy as np
import pytest

from experiments.stats import binomial_tail, bootstrap_ci, mean_ci, sign_test, t_cdf, t_quantile


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(p):
    # df = 1 is the Cauchy distribution; df = 2 has q = (2p - 1) / sqrt(2 p (1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(1 - p, 2) == pytest.approx(-t_quantile(p, 2), rel=1e-12)


def test_t_quantile_matches_printed_tables_and_the_normal_limit():
    assert t_quantile(0.975, 10) == pytest.approx(2.228138851986, abs=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105198, abs=1e-9)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963984540, abs=1e-6)  # standard normal
    assert t_cdf(0.0, 3) == 0.5
    assert t_cdf(t_quantile(0.8, 5), 5) == pytest.approx(0.8, abs=1e-12)


def test_mean_ci_is_the_t_interval():
    values = np.array([0.41, 0.47, 0.44, 0.52])
    mean, low, high = mean_ci(values)
    half = 3.182446305284263 * values.std(ddof=1) / 2.0  # t(0.975, 3), n = 4
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx((values.mean() - half, values.mean() + half), rel=1e-9)
    single = mean_ci([0.3])
    assert single[0] == 0.3 and math.isnan(single[1]) and math.isnan(single[2])


def test_mean_ci_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(7)
    trials = 2000
    covered = 0
    for _ in range(trials):
        _, low, high = mean_ci(rng.normal(1.5, 2.0, size=3))  # n = 3: the t interval, not the normal one
        covered += low <= 1.5 <= high
    assert abs(covered / trials - 0.95) < 0.015  # binomial sd of the coverage ≈ 0.005


def test_bootstrap_ci_is_seeded_and_degenerate_on_constant_values():
    values = np.array([-0.3, -0.1, -0.25, 0.05, -0.2, -0.15])
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci(np.full(5, 0.7)) == pytest.approx((0.7, 0.7))
    low, high = bootstrap_ci(values)
    assert values.min() <= low < values.mean() < high <= values.max()


def test_bootstrap_ci_of_a_large_sample_is_the_normal_interval():
    values = np.random.default_rng(0).exponential(1.0, size=500)
    low, high = bootstrap_ci(values, resamples=5000, seed=1)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_bootstrap_ci_coverage_on_a_known_case():
    rng = np.random.default_rng(11)
    trials, covered = 400, 0
    for trial in range(trials):
        covered += (lambda ci: ci[0] <= 0.0 <= ci[1])(
            bootstrap_ci(rng.normal(0.0, 1.0, size=40), resamples=2000, seed=trial)
        )
    assert 0.90 <= covered / trials <= 0.98  # the percentile interval covers slightly under 95% at n = 40


def test_sign_test_known_counts():
    assert sign_test(-np.ones(9)).p_value == pytest.approx(2 / 512)
    result = sign_test([-1.0] * 8 + [2.0] * 2)
    assert (result.negative, result.positive, result.pairs) == (8, 2, 10)
    assert result.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert sign_test([1.0, -1.0, 0.0, 0.0]).p_value == 1.0
    assert sign_test([0.0, 0.0]).p_value == 1.0 and sign_test([0.0, 0.0]).pairs == 0
    assert binomial_tail(3, 3) == 1.0 and binomial_tail(0, 4) == 1 / 16


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_sign_test_equals_brute_force_over_every_sign_pattern(n):
    patterns = list(itertools.product([-1, 1], repeat=n))
    for negative in range(n + 1):
        observed = abs(negative - n / 2)
        extreme = sum(abs(sum(s < 0 for s in pattern) - n / 2) >= observed for pattern in patterns)
        differences = [-1.0] * negative + [0.5] * (n - negative) + [0.0]  # the zero is dropped
        assert sign_test(differences).p_value == pytest.approx(extreme / len(patterns), rel=1e-12)


def test_statistics_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="NaN"):
        sign_test([1.0, float("nan")])
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)
