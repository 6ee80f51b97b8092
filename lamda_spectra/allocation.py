"""Rank allocation: split a rank budget over modules from their normalized spectra.

Each module ``j`` comes with its normalized spectrum ``p_j`` (``p_ji = s_ji^2 / ||W_j||_F^2``,
descending) and ``dim_j = min(d_out, d_in)``. A strategy, chosen by name from
:data:`STRATEGIES`, returns one rank per module:

- ``energy`` (LaMDA++, the default): rank proportional to the module's energy score
  ``E_j = sum_{i<r0} p_ji``, scaled so that the ranks spend the budget;
- ``waterfill``: greedy over all modules' ``p_ji``, which maximizes the total captured normalized
  energy ``sum_j sum_{i<r_j} p_ji`` under a total or avg budget (params budgets: see
  ``_waterfill``);
- ``uniform``: ``r0`` for every module (plain LaMDA), clipped to the rank bounds.

Every rank is a multiple of ``multiple_of`` and lies between ``min_rank`` (rounded up to that
multiple) and the module's cap ``min(max_rank, dim_j)`` (rounded down). A module whose cap is
below ``min_rank`` gets its cap. An all-zero weight has
energy score 0 and gets the minimum rank under every strategy. Ties break by module order, so
the same input always gives the same ranks.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Literal, Sequence

import numpy as np

from ._text import count_noun
from .errors import LamdaWarning, UsageError

logger = logging.getLogger(__name__)

BUDGET_FORMS = (
    "N (sum of ranks over all modules), avg:N (average rank per module) "
    "or params:N with an optional K, M or G suffix (sum of r^2 over all modules)"
)
_PARAM_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_TOTAL_PATTERN = re.compile(r"\d+")
_AVG_PATTERN = re.compile(r"avg:(\d+(?:\.\d+)?)", re.IGNORECASE)
_PARAMS_PATTERN = re.compile(r"params:(\d+(?:\.\d+)?)([KMG]?)", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A rank budget in one of three units.

    ``kind`` is ``"total"`` (sum of ranks over all modules), ``"avg"`` (average rank per
    module) or ``"params"`` (trainable core parameters ``sum r^2``). ``text`` is the form the
    user wrote, kept for the plan settings.
    """

    kind: Literal["total", "avg", "params"]
    value: int | float
    text: str

    @classmethod
    def parse(cls, spec: str | int | Budget) -> Budget:
        """Parse ``"4096"``, ``"avg:16"`` or ``"params:2M"`` (an int means a sum of ranks).

        Raises:
            UsageError: the text matches none of the accepted forms or its value is not positive.
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            spec = str(int(spec))
        if not isinstance(spec, str):
            raise UsageError(f"invalid budget {spec!r}: expected a string; use {BUDGET_FORMS}")
        text = spec.strip()
        not_positive = UsageError(f"invalid budget {spec!r}: the value must be positive; use {BUDGET_FORMS}")
        budget = _parse_budget_text(text)
        if budget is None:
            # The forms take unsigned numbers only, so a negative value would otherwise get no reason.
            unsigned = re.sub(r"^(avg:|params:)?-", r"\1", text, flags=re.IGNORECASE)
            if unsigned != text and _parse_budget_text(unsigned) is not None:
                raise not_positive
            raise UsageError(f"invalid budget {spec!r}; use {BUDGET_FORMS}")
        if budget.value <= 0:
            raise not_positive
        return budget

    def average_rank(self, n_modules: int) -> float:
        """Return the average rank per module that this budget implies for ``n_modules`` modules."""
        if self.kind == "total":
            return self.value / n_modules
        if self.kind == "avg":
            return float(self.value)
        return math.sqrt(self.value / n_modules)

    def __str__(self) -> str:
        return self.text


def _parse_budget_text(text: str) -> Budget | None:
    if _TOTAL_PATTERN.fullmatch(text):
        return Budget("total", int(text), text)
    match = _AVG_PATTERN.fullmatch(text)
    if match:
        number = Decimal(match.group(1))
        value = int(number) if number == number.to_integral_value() else float(number)
        return Budget("avg", value, text)
    match = _PARAMS_PATTERN.fullmatch(text)
    if match:
        number = Decimal(match.group(1)) * _PARAM_SUFFIXES[match.group(2).upper()]
        if number != number.to_integral_value():
            raise UsageError(f"invalid budget {text!r}: a params budget must be a whole number of parameters")
        return Budget("params", int(number), text)
    return None


@dataclass(frozen=True)
class Allocation:
    """The ranks a strategy chose, with the resolved settings that produced them."""

    ranks: tuple[int, ...]  # one per module, in input order
    energy_scores: tuple[float, ...]  # E_j = sum_{i<r0} p_ji, clipped to [0, 1]
    r0: int
    min_rank: int  # rounded up to multiple_of
    max_rank: int  # before each module's cap min(d_out, d_in)
    multiple_of: int


@dataclass(frozen=True)
class _Problem:
    """One allocation problem, with ranks counted in chunks of ``step`` (= multiple_of)."""

    strategy: str
    names: tuple[str, ...]
    normalized: tuple[np.ndarray, ...]
    dims: tuple[int, ...]
    budget: Budget
    target: int  # rank sum in chunks (total and avg budgets) or sum r^2 (params budgets)
    r0: int
    max_rank: int
    step: int
    low: np.ndarray  # per-module minimum, in chunks
    high: np.ndarray  # per-module cap, in chunks; equal to `low` for an all-zero weight

    @property
    def counts_params(self) -> bool:
        return self.budget.kind == "params"

    def cost(self, chunks: np.ndarray) -> int:
        """Return the budget that ``chunks`` spend, in the unit of ``target``."""
        if self.counts_params:
            return sum((self.step * int(c)) ** 2 for c in chunks)
        return int(sum(int(c) for c in chunks))

    def step_cost(self, chunks: int) -> int:
        """Return the extra budget that one more chunk costs a module with ``chunks`` chunks."""
        if self.counts_params:
            return self.step**2 * (2 * chunks + 1)
        return 1


def allocate(
    normalized: Sequence[np.ndarray],
    dims: Sequence[int],
    budget: Budget | str | int = "avg:16",
    strategy: str = "energy",
    *,
    r0: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple_of: int = 1,
    names: Sequence[str] | None = None,
) -> Allocation:
    """Allocate ranks to modules under a budget.

    Args:
        normalized: per module, the normalized spectrum ``p_i = s_i^2 / ||W||_F^2``, descending;
            either all ``dim`` values or at least the top ``max(max_rank, r0)`` of them.
        dims: per module, ``min(d_out, d_in)``.
        budget: a :class:`Budget` or its text (``"4096"``, ``"avg:16"``, ``"params:2M"``).
        strategy: a key of :data:`STRATEGIES`.
        r0: base rank of the energy score and of ``uniform``; default: the average rank the
            budget implies (``total/N``, ``avg``, or ``sqrt(params/N)``), rounded, at least 1.
        min_rank: smallest rank, rounded up to ``multiple_of``.
        max_rank: largest rank; default 4x the budget's average rank, rounded. Each module is
            also capped at its ``dim``.
        multiple_of: every rank is a multiple of this.
        names: module names for messages; default ``"module 0"``, ``"module 1"``, ...

    Returns:
        An :class:`Allocation`. ``energy`` and ``waterfill`` spend the budget. They hit a total
        or avg budget exactly, after rounding it down to a multiple of ``multiple_of``. Under a
        params budget they stop at a ``sum r^2`` at or below it where no module can grow by
        ``multiple_of`` without passing the budget or its cap. ``uniform`` uses the budget only
        for the defaults of ``r0`` and ``max_rank``.

    Raises:
        UsageError: unknown strategy, invalid bounds, ``max_rank < min_rank``, an ``r0`` above
            every module's ``min(d_out, d_in)``, a budget outside the feasible range (the message
            gives the bound that excludes it), or a module whose spectrum contains too few
            singular values for the strategy.
    """
    problem = _build_problem(normalized, dims, Budget.parse(budget), strategy, r0, min_rank, max_rank, multiple_of, names)
    chunks = STRATEGIES[strategy](problem)
    ranks = tuple(int(c) * problem.step for c in chunks)
    logger.debug("%s allocation over %d modules: rank sum %d", strategy, len(ranks), sum(ranks))
    return Allocation(
        ranks=ranks,
        energy_scores=tuple(_energy_scores(problem)),
        r0=problem.r0,
        min_rank=int(problem.step * math.ceil(min_rank / problem.step)),
        max_rank=problem.max_rank,
        multiple_of=problem.step,
    )


def check_budget(
    dims: Sequence[int],
    budget: Budget | str | int,
    *,
    r0: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple_of: int = 1,
    names: Sequence[str] | None = None,
) -> None:
    """Validate a budget and rank bounds from module sizes alone, before any spectrum is computed.

    Every module counts as having energy here: an all-zero weight found by the scan later keeps
    the minimum rank and can still make the budget infeasible then.

    Raises:
        UsageError: as :func:`allocate` does for bounds and budgets.
    """
    with_energy = [np.ones(1) for _ in dims]
    with warnings.catch_warnings():
        # The allocation that follows the scan repeats any warning about the budget.
        warnings.simplefilter("ignore", LamdaWarning)
        _build_problem(with_energy, dims, Budget.parse(budget), "uniform", r0, min_rank, max_rank, multiple_of, names)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise UsageError(f"invalid {name} {value!r}: expected a positive integer")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _build_problem(normalized, dims, budget, strategy, r0, min_rank, max_rank, multiple_of, names) -> _Problem:
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    for name, value in (("min_rank", min_rank), ("multiple_of", multiple_of), ("r0", r0), ("max_rank", max_rank)):
        if value is not None:
            _check_positive_int(name, value)
    n = len(normalized)
    if n == 0:
        raise UsageError("no modules to allocate ranks to; check the target modules of the scan")
    names = tuple(names) if names is not None else tuple(f"module {j}" for j in range(n))
    if len(dims) != n or len(names) != n:
        raise UsageError(f"got {n} spectra, {len(dims)} dims and {len(names)} names; expected one of each per module")

    dims = tuple(int(d) for d in dims)
    if r0 is not None:
        _check_r0(int(r0), dims, names)
    average = budget.average_rank(n)
    r0 = int(r0) if r0 is not None else max(1, _round_half_up(average))
    max_rank_origin = "" if max_rank is not None else f" (4x the average rank of budget {budget.text})"
    max_rank = int(max_rank) if max_rank is not None else max(1, _round_half_up(4 * average))
    step = int(multiple_of)
    low_rank, high_rank = _rank_bounds(min_rank, max_rank, step, max_rank_origin)

    spectra = tuple(np.asarray(p, dtype=np.float64) for p in normalized)
    low, high = _module_bounds(spectra, dims, names, low_rank, high_rank, step)
    # Each module's cap before an all-zero weight pins it to its minimum; only messages use it.
    caps = np.array([min(high_rank, step * (dim // step)) // step for dim in dims], dtype=np.int64)
    limits = _Limits(
        min_rank=min_rank,
        max_rank=max_rank,
        max_rank_origin=max_rank_origin,
        max_rank_binds=any(high_rank < step * (dim // step) for dim in dims),
        zero_modules=int(np.sum(high < caps)),
    )
    target = _budget_target(budget, n, step, low, high, limits)
    return _Problem(strategy, names, spectra, dims, budget, target, r0, max_rank, step, low, high)


def _check_r0(r0: int, dims: tuple[int, ...], names: tuple[str, ...]) -> None:
    """Reject a base rank above every module's ``min(d_out, d_in)``: every energy score would be 1."""
    widest = max(range(len(dims)), key=lambda j: dims[j])
    if r0 > dims[widest]:
        raise UsageError(
            f"r0 {r0} is above min(d_out, d_in) of every module (largest: {dims[widest]}, module "
            f"{names[widest]}); choose r0 of at most {dims[widest]}"
        )


def _rank_bounds(min_rank: int, max_rank: int, step: int, max_rank_origin: str) -> tuple[int, int]:
    """Round the rank bounds to multiples of ``step``: the minimum up, the maximum down."""
    if max_rank < min_rank:
        raise UsageError(
            f"max_rank {max_rank}{max_rank_origin} is below min_rank {min_rank}; raise max_rank or lower min_rank"
        )
    low_rank = step * math.ceil(min_rank / step)
    high_rank = step * (max_rank // step)
    if high_rank < low_rank:
        raise UsageError(
            f"with multiple_of {step}, max_rank {max_rank}{max_rank_origin} rounds down to {high_rank}, below "
            f"min_rank {min_rank} rounded up to {low_rank}; raise max_rank or lower min_rank or multiple_of"
        )
    return low_rank, high_rank


def _module_bounds(spectra, dims, names, low_rank: int, high_rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Return each module's minimum and cap in chunks; the cap also respects ``min(d_out, d_in)``."""
    low = np.empty(len(dims), dtype=np.int64)
    high = np.empty(len(dims), dtype=np.int64)
    for j, (p, dim) in enumerate(zip(spectra, dims)):
        if dim < step:
            raise UsageError(
                f"module {names[j]} has min(d_out, d_in) = {dim}, below multiple_of {step}; "
                "lower multiple_of or exclude the module"
            )
        high[j] = min(high_rank, step * (dim // step)) // step
        low[j] = min(low_rank // step, high[j])
        if not np.any(p > 0):
            high[j] = low[j]  # an all-zero weight has no energy to capture, so it keeps the minimum
    return low, high


@dataclass(frozen=True)
class _Limits:
    """The rank bounds behind a feasible range, for the message of an infeasible budget."""

    min_rank: int
    max_rank: int
    max_rank_origin: str  # why max_rank has its value when the caller gave none, else ""
    max_rank_binds: bool  # max_rank is below some module's min(d_out, d_in)
    zero_modules: int  # number of all-zero weights, which keep the minimum rank


def _budget_target(budget: Budget, n: int, step: int, low: np.ndarray, high: np.ndarray, limits: _Limits) -> int:
    """Convert the budget to the problem's unit and check that some allocation reaches it."""
    if budget.kind == "params":
        lowest = int(sum((step * int(c)) ** 2 for c in low))
        highest = int(sum((step * int(c)) ** 2 for c in high))
        target = requested = int(budget.value)
    else:
        ranks = int(budget.value) if budget.kind == "total" else math.floor(budget.value * n + 1e-9)
        usable = step * (ranks // step)
        if usable != ranks:
            warnings.warn(
                f"budget {budget.text} gives a rank sum of {ranks}, not a multiple of multiple_of {step}; "
                f"the plan aims at {usable}",
                LamdaWarning,
                stacklevel=4,
            )
        lowest, highest = step * int(low.sum()), step * int(high.sum())
        target = usable // step
        requested = usable
    if not lowest <= requested <= highest:
        raise _infeasible_budget(budget, n, requested, lowest, highest, limits)
    return target


def _infeasible_budget(
    budget: Budget, n: int, requested: int, lowest: int, highest: int, limits: _Limits
) -> UsageError:
    """Build the error for a budget outside ``[lowest, highest]``, naming the bound that excludes it."""
    modules = count_noun(n, "module")
    if requested < lowest:
        smallest = _budget_text(budget, lowest, n)
        return UsageError(
            f"budget {budget.text} is infeasible for {modules}: the smallest feasible budget is {smallest}, "
            f"because every module gets at least min_rank {limits.min_rank} (or its min(d_out, d_in) if smaller); "
            f"choose a budget of at least {smallest} or lower min_rank"
        )
    cap = "min(d_out, d_in)"
    fix = ""
    if limits.max_rank_binds:
        cap = f"max_rank {limits.max_rank}{limits.max_rank_origin} or min(d_out, d_in), whichever is smaller"
        fix = " or raise max_rank"
    if limits.zero_modules:
        zero = count_noun(limits.zero_modules, "module")
        cap += f", except that modules with an all-zero weight keep the minimum rank ({zero})"
    largest = _budget_text(budget, highest, n)
    return UsageError(
        f"budget {budget.text} is infeasible for {modules}: the largest feasible budget is {largest}, "
        f"because each module's rank is capped at {cap}; choose a budget of at most {largest}{fix}"
    )


def _budget_text(budget: Budget, amount: int, n: int) -> str:
    """Write ``amount`` (a rank sum, or a sum of r^2 for params budgets) in the budget's own form."""
    if budget.kind == "params":
        return f"params:{amount}"
    if budget.kind == "avg":
        return f"avg:{_short(amount / n)}"
    return str(amount)


def _short(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _energy_scores(problem: _Problem) -> list[float]:
    return [min(1.0, float(np.sum(p[: problem.r0]))) for p in problem.normalized]


def _require_values(problem: _Problem, ranks: Sequence[int]) -> None:
    """Raise unless each module's spectrum covers ``max(rank, r0)`` values or is complete."""
    short = []
    for j, (p, dim) in enumerate(zip(problem.normalized, problem.dims)):
        needed = min(dim, max(int(ranks[j]), problem.r0))
        if len(p) < dim and len(p) < needed:
            short.append((j, len(p), needed))
    if not short:
        return
    j, available, needed = short[0]
    others = f" (and {count_noun(len(short) - 1, 'more module')})" if len(short) > 1 else ""
    largest_need = max(need for _, _, need in short)
    raise UsageError(
        f"module {problem.names[j]}{others} has {available} singular values in the spectra table but the "
        f"{problem.strategy} strategy needs {needed} (max_rank {problem.max_rank}, r0 {problem.r0}); "
        f"rescan with a larger top_k (at least {largest_need}) or lower max_rank"
    )


def _chunk_values(p: np.ndarray, step: int, count: int) -> np.ndarray:
    """Sum ``p`` over each of the first ``count`` chunks of ``step`` values (zeros past the end)."""
    padded = np.zeros(count * step)
    copied = min(len(p), count * step)
    padded[:copied] = p[:copied]
    return padded.reshape(count, step).sum(axis=1)


def _energy(problem: _Problem) -> np.ndarray:
    """Give each module a rank proportional to its energy score, spending the budget."""
    _require_values(problem, problem.high * problem.step)
    scores = np.array(_energy_scores(problem))
    low, high = problem.low.astype(np.float64), problem.high.astype(np.float64)
    if problem.counts_params:
        shares = _scale_to_goal(scores, low, high, problem.target / problem.step**2, power=2)
    else:
        shares = _scale_to_goal(scores, low, high, float(problem.target), power=1)
    return _round_to_budget(problem, shares)


def _scale_to_goal(weights: np.ndarray, low: np.ndarray, high: np.ndarray, goal: float, power: int) -> np.ndarray:
    """Find ``x = clip(scale * weights, low, high)`` with ``sum(x**power) == goal``.

    The clipped sum grows monotonically with ``scale``, so bisection finds it; clipping is what
    moves the surplus of capped modules to the others. The caller checked that
    ``sum(low**power) <= goal <= sum(high**power)``.
    """
    positive = weights > 0
    if not positive.any():
        return low.copy()
    below, above = 0.0, float(np.max(high[positive] / weights[positive]))
    for _ in range(200):
        middle = 0.5 * (below + above)
        if middle in (below, above):
            break
        if np.sum(np.clip(middle * weights, low, high) ** power) < goal:
            below = middle
        else:
            above = middle
    return np.clip(above * weights, low, high)


def _round_to_budget(problem: _Problem, shares: np.ndarray) -> np.ndarray:
    """Round fractional chunk counts to integers by largest remainder, without passing the budget.

    Modules are rounded up in order of their fractional part (ties by module order) while the
    budget allows. Passes repeat until no module can take another chunk, so a total budget is
    hit exactly and a params budget is left with less than any module's next step.
    """
    chunks = np.clip(np.floor(shares).astype(np.int64), problem.low, problem.high)
    remainders = shares - chunks
    # Floating-point error in `shares` can put the floor a chunk over budget; undo that first.
    by_smallest = sorted(range(len(chunks)), key=lambda j: (remainders[j], j))
    while problem.cost(chunks) > problem.target:
        j = next(j for j in by_smallest if chunks[j] > problem.low[j])
        chunks[j] -= 1

    spent = problem.cost(chunks)
    by_largest = sorted(range(len(chunks)), key=lambda j: (-remainders[j], j))
    grew = True
    while grew and spent < problem.target:
        grew = False
        for j in by_largest:
            extra = problem.step_cost(int(chunks[j]))
            if chunks[j] < problem.high[j] and spent + extra <= problem.target:
                chunks[j] += 1
                spent += extra
                grew = True
    return chunks


def _waterfill(problem: _Problem) -> np.ndarray:
    """Take chunks of singular directions greedily, best captured energy per unit of budget first.

    Every module first gets its minimum. Then the next chunk of every module waits in a heap
    keyed by ``(-value / cost, module index)``, where ``value`` is the chunk's sum of ``p_i``.

    For a total or avg budget each chunk costs the same and each module's chunk values are
    non-increasing, so the greedy choice maximizes the captured energy exactly (an exchange
    argument). For a params budget the cost of a module's next chunk grows with its rank. The
    value/cost ratio still falls along each module, so every allocation that the greedy passes
    through is optimal for its own ``sum r^2``. A chunk that no longer fits closes its module,
    because its later chunks cost more, and the greedy continues with the others. The final
    captured energy is then at most the value of the first closed chunk below the optimum.
    """
    _require_values(problem, problem.high * problem.step)
    chunk_values = [_chunk_values(p, problem.step, int(h)) for p, h in zip(problem.normalized, problem.high)]
    chunks = problem.low.copy()
    spent = problem.cost(chunks)

    def push(heap: list, j: int) -> None:
        if chunks[j] < problem.high[j]:
            ratio = chunk_values[j][chunks[j]] / problem.step_cost(int(chunks[j]))
            heapq.heappush(heap, (-ratio, j))

    heap: list[tuple[float, int]] = []
    for j in range(len(chunks)):
        push(heap, j)
    while heap and spent < problem.target:
        _, j = heapq.heappop(heap)
        extra = problem.step_cost(int(chunks[j]))
        if spent + extra > problem.target:
            continue
        chunks[j] += 1
        spent += extra
        push(heap, j)
    return chunks


def _uniform(problem: _Problem) -> np.ndarray:
    """Give every module ``r0`` (to the nearest multiple of ``multiple_of``) within its bounds."""
    base = max(1, _round_half_up(problem.r0 / problem.step))
    chunks = np.clip(np.full(len(problem.low), base, dtype=np.int64), problem.low, problem.high)
    _require_values(problem, chunks * problem.step)
    return chunks


STRATEGIES: dict[str, Callable[[_Problem], np.ndarray]] = {
    "energy": _energy,
    "waterfill": _waterfill,
    "uniform": _uniform,
}
"""Allocation strategies by name. Each takes the problem and returns chunk counts per module."""
