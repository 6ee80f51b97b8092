"""The PMB freezing schedule: when each row of a LaMDA adapter's PMB stops training.

Over the first ``freeze_fraction`` of ``total_steps`` optimizer steps, the rows of every PMB
freeze one at a time in order of descending singular value. With ``T_f = round(freeze_fraction *
total_steps)`` and rank ``r``, row ``j`` (0-based) is frozen once ``ceil((j + 1) * T_f / r)``
optimizer steps have run. With ``freeze_fraction = 0`` the PMB is frozen from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from ..errors import AdapterError


@dataclass(frozen=True)
class FreezeSchedule:
    """A validated PMB freezing schedule.

    Attributes:
        freeze_fraction: share of ``total_steps``, in [0, 1], over which the PMB rows freeze.
        total_steps: number of optimizer steps of the whole run. ``None`` is allowed only when
            ``freeze_fraction`` is 0, because then nothing depends on the length of the run.
    """

    freeze_fraction: float = 0.3
    total_steps: int | None = None

    def __post_init__(self) -> None:
        problems = schedule_problems(self.freeze_fraction, self.total_steps)
        if problems:
            raise AdapterError("invalid PMB freezing schedule: " + "; ".join(problems))

    @property
    def freeze_steps(self) -> int:
        """``T_f``: the optimizer step by which every PMB row is frozen."""
        if self.freeze_fraction == 0:
            return 0
        # Python's round() rounds halves to even; the schedule is defined with that rounding.
        return round(self.freeze_fraction * self.total_steps)

    def frozen_rows(self, rank: int, steps_done: int) -> int:
        """Return how many leading PMB rows of a rank-``rank`` adapter are frozen after ``steps_done`` steps.

        Row ``j`` is frozen when ``ceil((j + 1) * T_f / r) <= steps_done``. Because ``steps_done``
        is an integer this equals ``(j + 1) * T_f <= steps_done * r``, which is evaluated here in
        exact integer arithmetic.
        """
        freeze_steps = self.freeze_steps
        if freeze_steps == 0:
            return rank
        return min(rank, (steps_done * rank) // freeze_steps)

    def freeze_step_of_row(self, rank: int, row: int) -> int:
        """Return the number of optimizer steps after which PMB row ``row`` is frozen."""
        return math.ceil((row + 1) * self.freeze_steps / rank)


def schedule_problems(freeze_fraction: object, total_steps: object) -> list[str]:
    """List what is wrong with a schedule's values (an empty list when they are valid)."""
    problems = []
    fraction_ok = isinstance(freeze_fraction, Real) and not isinstance(freeze_fraction, bool)
    if not fraction_ok or not 0.0 <= float(freeze_fraction) <= 1.0:
        problems.append(f"freeze_fraction={freeze_fraction!r} must be a number in [0, 1]")
        fraction_ok = False
    if total_steps is None:
        if not fraction_ok or float(freeze_fraction) != 0.0:
            problems.append(
                "total_steps=None: pass the number of optimizer steps of the run "
                "(or freeze_fraction=0 to freeze the PMB from the start)"
            )
    elif not isinstance(total_steps, Integral) or isinstance(total_steps, bool) or total_steps < 1:
        problems.append(f"total_steps={total_steps!r} must be a positive integer number of optimizer steps")
    return problems
