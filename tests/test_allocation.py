import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamda_spectra.allocation import STRATEGIES, Budget, allocate
from lamda_spectra.errors import LamdaWarning, UsageError


def spectrum(head: list[float], dim: int) -> np.ndarray:
    """A complete normalized spectrum of ``dim`` values: ``head``, then a flat tail up to a sum of 1."""
    rest = dim - len(head)
    tail = (1.0 - sum(head)) / rest if rest else 0.0
    assert rest == 0 or tail <= head[-1]
    return np.array(head + [tail] * rest)


def with_scores(scores: list[float], r0: int, dim: int = 64) -> list[np.ndarray]:
    """Spectra whose energy score at ``r0`` is exactly ``scores[j]`` (equal shares in the head)."""
    return [spectrum([score / r0] * r0, dim) for score in scores]


def captured(normalized, ranks) -> float:
    return float(sum(np.sum(p[:r]) for p, r in zip(normalized, ranks)))


# ----------------------------------------------------------------------------------------------
# Budget syntax


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("4096", "total", 4096),
        (4096, "total", 4096),
        (np.int64(512), "total", 512),
        ("avg:16", "avg", 16),
        (" AVG:12.5 ", "avg", 12.5),
        ("params:2M", "params", 2_000_000),
        ("params:1.5k", "params", 1500),
        ("params:3G", "params", 3_000_000_000),
        ("params:12345", "params", 12345),
    ],
)
def test_budget_parse_forms(text, kind, value):
    budget = Budget.parse(text)

    assert budget.kind == kind
    assert budget.value == value
    assert isinstance(budget.value, type(value))
    assert budget.text == str(text).strip()


@pytest.mark.parametrize("text", ["", "abc", "avg:", "avg:-", "params:2T", "total:5", "16.5", "--4", True, 3.5])
def test_budget_parse_rejects_syntax(text):
    with pytest.raises(UsageError, match=r"invalid budget .*use N \(sum of ranks over all modules\), avg:N") as raised:
        Budget.parse(text)

    assert "must be positive" not in str(raised.value)


@pytest.mark.parametrize("text", ["0", "avg:0", "params:0K", "-4", "avg:-3", "AVG:-2.5", "params:-2M"])
def test_budget_parse_rejects_not_positive(text):
    with pytest.raises(UsageError, match=f"invalid budget '{text}': the value must be positive"):
        Budget.parse(text)


def test_budget_parse_rejects_fractional_params():
    with pytest.raises(UsageError, match="whole number of parameters"):
        Budget.parse("params:1.2345K")


@pytest.mark.parametrize(
    ("text", "expected"), [("100", 100 / 4), ("avg:12.5", 12.5), ("params:256", 8.0)]
)
def test_budget_average_rank(text, expected):
    assert Budget.parse(text).average_rank(4) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Defaults


def test_defaults_follow_budget_average():
    normalized = with_scores([0.5, 0.5, 0.5], r0=4, dim=512)

    total = allocate(normalized, [512] * 3, "100", "uniform")
    average = allocate(normalized, [512] * 3, "avg:12.5", "uniform")
    params = allocate(normalized, [512] * 3, "params:3000", "uniform")

    # 100 / 3 = 33.3; avg 12.5 rounds half up; sqrt(3000 / 3) = 31.6.
    assert (total.r0, total.max_rank) == (33, 133)
    assert (average.r0, average.max_rank) == (13, 50)
    assert (params.r0, params.max_rank) == (32, 126)
    assert total.min_rank == 1
    assert total.multiple_of == 1


def test_unknown_strategy_lists_choices():
    with pytest.raises(UsageError, match="unknown strategy 'greedy'; choose one of energy, uniform, waterfill"):
        allocate(with_scores([0.5], 4), [64], "avg:4", "greedy")


def test_strategies_mapping_names():
    assert set(STRATEGIES) == {"energy", "waterfill", "uniform"}


# ----------------------------------------------------------------------------------------------
# energy (LaMDA++)


def test_energy_ranks_proportional_to_scores():
    normalized = with_scores([0.8, 0.4, 0.4], r0=4)

    result = allocate(normalized, [64] * 3, "32", "energy", r0=4)

    assert result.ranks == (16, 8, 8)
    assert result.energy_scores == pytest.approx((0.8, 0.4, 0.4), abs=1e-12)


def test_energy_ties_break_by_module_order():
    normalized = with_scores([0.5, 0.5, 0.5], r0=4)

    # 10 / 3 each: the one left-over rank goes to the first module.
    assert allocate(normalized, [64] * 3, "10", "energy", r0=4).ranks == (4, 3, 3)


def test_energy_largest_remainder_rounding():
    normalized = with_scores([0.62, 0.26, 0.12], r0=4)

    # Shares 6.2, 2.6, 1.2 of 10: floors 6, 2, 1 and the one left over goes to the largest remainder.
    assert allocate(normalized, [64] * 3, "10", "energy", r0=4).ranks == (6, 3, 1)


def test_energy_min_rank_takes_from_others():
    normalized = with_scores([0.6, 0.3, 0.1], r0=4)

    # Proportional shares 4.2, 2.1, 0.7 put the last module below min_rank 1; it gets 1 and the
    # other two share the remaining 6 as 0.6 : 0.3.
    assert allocate(normalized, [64] * 3, "7", "energy", r0=4).ranks == (4, 2, 1)


def test_energy_surplus_from_max_rank_redistributed():
    normalized = with_scores([0.9, 0.05, 0.05], r0=4, dim=128)

    result = allocate(normalized, [128] * 3, "12", "energy", r0=4, max_rank=6)

    assert result.ranks == (6, 3, 3)
    assert sum(result.ranks) == 12


def test_energy_surplus_from_small_module_redistributed():
    normalized = [spectrum([0.5, 0.3, 0.2, 0.0], 4)] + with_scores([0.1, 0.1], r0=4)

    # The first module (score 1.0) would get 12 * 1.0 / 1.2 = 10 but has min(d_out, d_in) = 4.
    result = allocate(normalized, [4, 64, 64], "12", "energy", r0=4)

    assert result.ranks == (4, 4, 4)


def test_energy_params_budget_exact():
    normalized = with_scores([0.5, 0.25, 0.25], r0=8)

    # Ranks 2s, s, s with 6 s^2 = 96: s = 4.
    result = allocate(normalized, [64] * 3, "params:96", "energy", r0=8)

    assert result.ranks == (8, 4, 4)
    assert sum(r * r for r in result.ranks) == 96


def test_energy_params_budget_below_when_not_reachable():
    normalized = with_scores([0.5] * 4, r0=8)

    # sqrt(260 / 4) = 8.06 each; a ninth rank costs 17 more, which 260 - 256 cannot pay.
    result = allocate(normalized, [64] * 4, "params:260", "energy")

    assert result.ranks == (8, 8, 8, 8)


def test_energy_multiple_of_chunks():
    normalized = with_scores([0.8, 0.4, 0.4], r0=4)

    result = allocate(normalized, [64] * 3, "32", "energy", r0=4, multiple_of=4)

    assert result.ranks == (16, 8, 8)


def test_energy_multiple_of_rounds_min_rank_up():
    normalized = with_scores([0.9, 0.05, 0.05], r0=4, dim=128)

    # min_rank 1 becomes 4; the first module takes the other 16 of the 24.
    result = allocate(normalized, [128] * 3, "24", "energy", r0=4, multiple_of=4)

    assert result.ranks == (16, 4, 4)
    assert result.min_rank == 4


def test_budget_not_multiple_warns_and_rounds_down():
    normalized = with_scores([0.5, 0.5, 0.5], r0=4)

    with pytest.warns(LamdaWarning, match="rank sum of 30, not a multiple of multiple_of 4; the plan aims at 28"):
        result = allocate(normalized, [64] * 3, "30", "energy", r0=4, multiple_of=4)

    assert result.ranks == (12, 8, 8)


def test_avg_budget_hits_rank_sum():
    normalized = with_scores([0.7, 0.2, 0.1, 0.08], r0=4)

    result = allocate(normalized, [64] * 4, "avg:6", "energy")

    assert sum(result.ranks) == 24


# ----------------------------------------------------------------------------------------------
# waterfill


def test_waterfill_takes_largest_values():
    normalized = [np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.35, 0.25])]

    # Minimum ranks take 0.5 and 0.4; then 0.35 (second module) and 0.3 (first), then 0.25.
    assert allocate(normalized, [3, 3], "4", "waterfill", max_rank=3).ranks == (2, 2)
    assert allocate(normalized, [3, 3], "5", "waterfill", max_rank=3).ranks == (2, 3)


def test_waterfill_min_rank_taken_first():
    normalized = [np.array([0.9, 0.05, 0.05]), np.array([0.4, 0.35, 0.25])]

    # Without a minimum, the second module's 0.35 and 0.25 beat the first module's 0.05.
    assert allocate(normalized, [3, 3], "4", "waterfill", max_rank=3).ranks == (1, 3)
    assert allocate(normalized, [3, 3], "4", "waterfill", min_rank=2, max_rank=3).ranks == (2, 2)


def test_waterfill_ties_break_by_module_order():
    normalized = [np.array([0.5, 0.3, 0.2])] * 3

    # Three second values of 0.3 tie for two places: the first two modules take them.
    assert allocate(normalized, [3, 3, 3], "5", "waterfill", max_rank=3).ranks == (2, 2, 1)
    # Equal values inside one module tie too: the first module takes its own before the next module.
    assert allocate([np.array([0.5, 0.25, 0.25])] * 3, [3, 3, 3], "5", "waterfill", max_rank=3).ranks == (3, 1, 1)


def test_waterfill_multiple_of_compares_chunks():
    normalized = [np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.3, 0.3, 0.3, 0.1])]

    # Chunks of 2: first module 0.7 then 0.3; second 0.6 then 0.4. After the minimums, 0.4 wins.
    result = allocate(normalized, [4, 4], "6", "waterfill", multiple_of=2, max_rank=4)

    assert result.ranks == (2, 4)


def test_waterfill_params_budget_hand_case():
    normalized = [np.array([0.6, 0.3, 0.1]), np.array([0.5, 0.3, 0.2])]

    # Minimums cost 2. A second rank costs 3 and gains 0.3 in both (a tie, first module wins);
    # after it, 5 is spent and every next rank costs more than the 1 left.
    result = allocate(normalized, [3, 3], "params:6", "waterfill", max_rank=3)

    assert result.ranks == (2, 1)


def brute_force_best(normalized, lows, highs, step, fits):
    """Best captured energy over every rank vector within bounds (multiples of step) that fits."""
    choices = [range(low, high + 1, step) for low, high in zip(lows, highs)]
    return max(captured(normalized, ranks) for ranks in itertools.product(*choices) if fits(ranks))


def bounds(dims, min_rank, max_rank, step):
    highs = [min(max_rank, d) // step * step for d in dims]
    lows = [min(math.ceil(min_rank / step) * step, h) for h in highs]
    return lows, highs


@st.composite
def spectra_cases(draw, max_modules=3, max_dim=5):
    n = draw(st.integers(1, max_modules))
    dims = draw(st.lists(st.integers(2, max_dim), min_size=n, max_size=n))
    normalized = []
    for dim in dims:
        weights = draw(st.lists(st.floats(0.01, 1.0), min_size=dim, max_size=dim))
        values = np.sort(np.array(weights))[::-1]
        normalized.append(values / values.sum())
    return normalized, dims


@settings(max_examples=150, deadline=None)
@given(case=spectra_cases(), min_rank=st.integers(1, 2), step=st.sampled_from([1, 2]), data=st.data())
def test_waterfill_optimal_for_rank_sum(case, min_rank, step, data):
    normalized, dims = case
    lows, highs = bounds(dims, min_rank, 5, step)
    budget = data.draw(st.integers(sum(lows), sum(highs)).map(lambda b: b // step * step).filter(lambda b: b >= sum(lows)))

    result = allocate(normalized, dims, str(budget), "waterfill", min_rank=min_rank, max_rank=5, multiple_of=step)
    best = brute_force_best(normalized, lows, highs, step, lambda ranks: sum(ranks) == budget)

    assert sum(result.ranks) == budget
    assert captured(normalized, result.ranks) == pytest.approx(best, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(case=spectra_cases(), min_rank=st.integers(1, 2), data=st.data())
def test_waterfill_params_within_one_step_of_optimum(case, min_rank, data):
    normalized, dims = case
    lows, highs = bounds(dims, min_rank, 5, 1)
    budget = data.draw(st.integers(sum(r * r for r in lows), sum(r * r for r in highs)))

    result = allocate(normalized, dims, f"params:{budget}", "waterfill", min_rank=min_rank, max_rank=5)
    ranks = result.ranks
    spent = sum(r * r for r in ranks)
    best = brute_force_best(normalized, lows, highs, 1, lambda rs: sum(r * r for r in rs) <= budget)
    next_values = [p[r] for p, r, high in zip(normalized, ranks, highs) if r < high]

    assert spent <= budget
    # No module can grow by one rank without passing the budget.
    for r, high in zip(ranks, highs):
        assert r == high or spent + 2 * r + 1 > budget
    # The greedy misses the optimum by at most the value of one chunk it could not afford.
    assert captured(normalized, ranks) >= best - max(next_values, default=0.0) - 1e-12
    # With every module at its cap, no allocation captures more.
    if not next_values:
        assert captured(normalized, ranks) == pytest.approx(best, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Properties shared by energy and waterfill


@settings(max_examples=100, deadline=None)
@given(
    case=spectra_cases(max_modules=6, max_dim=16),
    strategy=st.sampled_from(["energy", "waterfill"]),
    step=st.sampled_from([1, 2, 4]),
    data=st.data(),
)
def test_rank_sum_budget_hit_exactly(case, strategy, step, data):
    normalized, dims = case
    dims = [max(d, step) for d in dims]
    normalized = [np.sort(np.resize(p, d))[::-1] for p, d in zip(normalized, dims)]
    normalized = [p / p.sum() for p in normalized]
    lows, highs = bounds(dims, 1, 12, step)
    budget = data.draw(st.integers(sum(lows) // step, sum(highs) // step)) * step

    result = allocate(normalized, dims, str(budget), strategy, max_rank=12, multiple_of=step)

    assert sum(result.ranks) == budget
    for rank, low, high in zip(result.ranks, lows, highs):
        assert low <= rank <= high
        assert rank % step == 0


@settings(max_examples=60, deadline=None)
@given(case=spectra_cases(max_modules=6, max_dim=16), data=st.data())
def test_energy_higher_score_never_lower_rank(case, data):
    normalized, dims = case
    dims = [16] * len(dims)
    normalized = [np.concatenate([p, np.zeros(16 - len(p))]) for p in normalized]
    budget = data.draw(st.integers(len(dims), 16 * len(dims)))

    result = allocate(normalized, dims, str(budget), "energy", r0=2, max_rank=16)

    for i, j in itertools.permutations(range(len(dims)), 2):
        if result.energy_scores[i] > result.energy_scores[j] + 1e-9:
            assert result.ranks[i] >= result.ranks[j]


@pytest.mark.parametrize("strategy", ["energy", "waterfill"])
def test_same_input_same_ranks(strategy):
    rng = np.random.default_rng(0)
    normalized = [np.sort(rng.random(32))[::-1] for _ in range(20)]
    normalized = [p / p.sum() for p in normalized]

    first = allocate(normalized, [32] * 20, "avg:7", strategy)
    second = allocate([p.copy() for p in normalized], [32] * 20, "avg:7", strategy)

    assert first == second


# ----------------------------------------------------------------------------------------------
# uniform


def test_module_below_min_rank_gets_its_cap():
    normalized = [spectrum([0.5, 0.5], 2), spectrum([0.5], 64)]

    for strategy in ("energy", "waterfill", "uniform"):
        assert allocate(normalized, [2, 64], "10", strategy, min_rank=4, r0=8).ranks == (2, 8)


def test_uniform_r0_clipped_to_bounds():
    normalized = [spectrum([0.5, 0.5], 2), spectrum([0.5], 64)]

    assert allocate(normalized, [2, 64], "avg:8", "uniform").ranks == (2, 8)


@pytest.mark.parametrize(("r0", "expected"), [(5, 4), (6, 8), (7, 8)])
def test_uniform_r0_rounded_to_multiple(r0, expected):
    normalized = with_scores([0.5, 0.5], r0=4)

    result = allocate(normalized, [64, 64], "avg:8", "uniform", r0=r0, multiple_of=4)

    assert result.ranks == (expected, expected)


# ----------------------------------------------------------------------------------------------
# All-zero weights


@pytest.mark.parametrize("strategy", ["energy", "waterfill", "uniform"])
def test_zero_weight_gets_min_rank(strategy):
    normalized = [np.zeros(64), spectrum([0.5] * 1, 64)]

    result = allocate(normalized, [64, 64], "10", strategy, min_rank=2, r0=8)

    assert result.ranks[0] == 2
    assert result.energy_scores[0] == 0.0


def test_zero_weight_not_counted_in_feasible_range():
    normalized = [np.zeros(64), spectrum([0.5] * 1, 64)]

    with pytest.raises(
        UsageError,
        match=r"largest feasible budget is 9, because .* modules with an all-zero weight keep the minimum rank \(1 module\)",
    ):
        allocate(normalized, [64, 64], "12", "energy", max_rank=8)


# ----------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("2", r"budget 2 is infeasible for 3 modules: the smallest feasible budget is 3, because every module gets "
         r"at least min_rank 1 .*; choose a budget of at least 3 or lower min_rank$"),
        ("25", r"budget 25 is infeasible for 3 modules: the largest feasible budget is 24, because each module's rank "
         r"is capped at max_rank 8 or min\(d_out, d_in\), whichever is smaller; choose a budget of at most 24 or "
         r"raise max_rank$"),
        ("avg:9", r"budget avg:9 is infeasible .* the largest feasible budget is avg:8,"),
        ("params:2", r"budget params:2 is infeasible .* the smallest feasible budget is params:3,"),
        ("params:200", r"the largest feasible budget is params:192,"),
    ],
)
def test_infeasible_budget_prints_range(budget, message):
    normalized = with_scores([0.5, 0.5, 0.5], r0=4)

    with pytest.raises(UsageError, match=message):
        allocate(normalized, [64] * 3, budget, "energy", r0=4, max_rank=8)


def test_infeasible_budget_counts_module_dims():
    normalized = [spectrum([0.5, 0.5], 2), spectrum([0.5], 64)]

    with pytest.raises(UsageError, match="the largest feasible budget is avg:5,"):
        allocate(normalized, [2, 64], "avg:6", "energy", max_rank=8)


def test_budget_above_dims_omits_default_max_rank():
    normalized = with_scores([0.5, 0.5], r0=4, dim=32)

    capped = r"largest feasible budget is 64, because each module's rank is capped at min\(d_out, d_in\);"
    with pytest.raises(UsageError, match=capped) as caught:
        allocate(normalized, [32, 32], "100", "energy")

    assert "max_rank" not in str(caught.value)


def test_budget_below_minimum_for_one_module():
    with pytest.raises(UsageError, match=r"^budget 2 is infeasible for 1 module: the smallest feasible budget is 4,"):
        allocate(with_scores([0.5], 4), [64], "2", "energy", min_rank=4, max_rank=8)


@pytest.mark.parametrize("strategy", ["energy", "uniform"])
def test_r0_above_every_module_rejected(strategy):
    normalized = [spectrum([0.5], 16), spectrum([0.5], 32)]

    message = r"^r0 33 is above min\(d_out, d_in\) of every module \(largest: 32, module b\); choose r0 of at most 32$"
    with pytest.raises(UsageError, match=message):
        allocate(normalized, [16, 32], "avg:4", strategy, r0=33, names=["a", "b"])


def test_r0_above_some_modules_allowed():
    normalized = [spectrum([0.5], 16), spectrum([0.5], 32)]

    assert allocate(normalized, [16, 32], "avg:4", "uniform", r0=32).ranks == (16, 16)


def test_max_rank_below_min_rank():
    with pytest.raises(UsageError, match="max_rank 4 is below min_rank 8; raise max_rank or lower min_rank"):
        allocate(with_scores([0.5], 4), [64], "avg:16", "energy", min_rank=8, max_rank=4)


def test_default_max_rank_below_min_rank_names_default():
    with pytest.raises(UsageError, match=r"max_rank 4 \(4x the average rank of budget avg:1\) is below min_rank 8"):
        allocate(with_scores([0.5], 4), [64], "avg:1", "energy", min_rank=8)


def test_max_rank_below_min_rank_after_multiple_of():
    with pytest.raises(UsageError, match="with multiple_of 8, max_rank 12 rounds down to 8, below min_rank 9 rounded up to 16"):
        allocate(with_scores([0.5], 4), [64], "avg:16", "energy", min_rank=9, max_rank=12, multiple_of=8)


@pytest.mark.parametrize(("name", "value"), [("min_rank", 0), ("max_rank", -1), ("multiple_of", 0), ("r0", 2.5)])
def test_invalid_bounds_rejected(name, value):
    with pytest.raises(UsageError, match=f"invalid {name} {value!r}: expected a positive integer"):
        allocate(with_scores([0.5], 4), [64], "avg:16", "energy", **{name: value})


def test_module_smaller_than_multiple_of():
    with pytest.raises(UsageError, match="module tiny has min\\(d_out, d_in\\) = 4, below multiple_of 8"):
        allocate([spectrum([0.5], 4)], [4], "8", "energy", multiple_of=8, names=["tiny"])


@pytest.mark.parametrize("strategy", ["energy", "waterfill"])
def test_too_few_singular_values_asks_rescan(strategy):
    truncated = [np.full(16, 0.01), np.full(16, 0.01), np.full(32, 0.01)]

    with pytest.raises(
        UsageError,
        match=rf"module a \(and 1 more module\) has 16 singular values in the spectra table but the {strategy} "
        r"strategy needs 32 \(max_rank 32, r0 8\); rescan with a larger top_k \(at least 32\)",
    ):
        allocate(truncated, [64] * 3, "avg:8", strategy, names=["a", "b", "c"])


def test_uniform_needs_only_its_ranks():
    truncated = [np.full(16, 0.01)] * 3

    assert allocate(truncated, [64] * 3, "avg:8", "uniform").ranks == (8, 8, 8)


def test_no_modules():
    with pytest.raises(UsageError, match="no modules to allocate"):
        allocate([], [], "avg:8")
