"""The handle that :func:`lamda_spectra.apply_plan` returns: adapter settings, counts and the schedule.

The handle is also stored on the adapted model as the attribute ``lamda_handle``, so that
:func:`save_adapter`, :func:`merge_and_unload` and :func:`export_peft` can work from the model.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import AdapterError, LamdaWarning
from ..plan import Plan
from .layer import LamdaLinear
from .schedule import FreezeSchedule

logger = logging.getLogger(__name__)

HANDLE_ATTRIBUTE = "lamda_handle"


@dataclass(frozen=True)
class AdapterSettings:
    """The settings every adapter of one :func:`apply_plan` call shares (see its Args)."""

    init: str = "zero-core"
    scaling: float = 1.0
    dropout: float = 0.0
    freeze_fraction: float = 0.3
    total_steps: int | None = None
    adapter_dtype: torch.dtype = torch.float32

    def to_json(self) -> dict:
        """Return the settings as JSON-ready values (the dtype as its name, e.g. ``"float32"``)."""
        values = asdict(self)
        values["adapter_dtype"] = str(self.adapter_dtype).removeprefix("torch.")
        return values


class LamdaHandle:
    """Controls the LaMDA adapters of one model: PMB freezing, parameter counts, plan and settings.

    Call :meth:`step` once after every ``optimizer.step()`` (or add :class:`LamdaCallback` to a
    ``transformers.Trainer``).

    Attributes:
        plan: the plan the adapters follow.
        settings: the :class:`AdapterSettings`.
        schedule: the PMB :class:`FreezeSchedule`.
        modules: model module name to its :class:`LamdaLinear`, in plan order.
        plan_names: model module name to the plan's name for it (they differ when the name was
            resolved through ``base_model_prefix``).
        steps_done: optimizer steps counted so far by :meth:`step`.
    """

    def __init__(
        self,
        plan: Plan,
        settings: AdapterSettings,
        modules: dict[str, LamdaLinear],
        plan_names: dict[str, str],
        steps_done: int = 0,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.schedule = FreezeSchedule(settings.freeze_fraction, settings.total_steps)
        self.modules = modules
        self.plan_names = plan_names
        self.steps_done = steps_done
        self.merged = False
        self._warned_no_optimizer = False
        # Rows already due (all of them when freeze_fraction is 0, or after a resumed run) freeze
        # now. No optimizer can hold state for them yet, so there is nothing to warn about.
        self._freeze_due_rows(optimizer=None, warn=False)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count one optimizer step and apply the PMB freezing schedule.

        Restores every frozen PMB row to its value at freeze time (undoing what momentum and
        weight decay did in the step), then freezes the rows that are due. A PMB whose rows
        are all frozen stops requiring grad, and its optimizer state is released.

        Args:
            optimizer: the optimizer that just stepped; needed to release the state of fully
                frozen PMBs. Without it the state stays allocated (a :class:`LamdaWarning`
                warns once), although the optimizer no longer updates those PMBs.

        Raises:
            AdapterError: if the adapters were merged into the base model.

        NOTE: every call counts as a step. When a mixed-precision gradient scaler skips an
        optimizer step, skip this call too if the schedule must count only applied updates.
        """
        if self.merged:
            raise AdapterError("the LaMDA adapters were merged by merge_and_unload; this handle no longer controls them")
        self.steps_done += 1
        self._freeze_due_rows(optimizer, warn=True)

    def _freeze_due_rows(self, optimizer: torch.optim.Optimizer | None, *, warn: bool) -> None:
        newly_frozen = []
        for name, module in self.modules.items():
            if module.freeze_rows(self.schedule.frozen_rows(module.rank, self.steps_done)):
                newly_frozen.append(name)
        if newly_frozen:
            logger.info("PMB fully frozen after %d steps in %d modules", self.steps_done, len(newly_frozen))
        if optimizer is not None:
            self._release_optimizer_state(optimizer)
        elif newly_frozen and warn and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            warnings.warn(
                "PMB of module "
                f"{newly_frozen[0]} is frozen but its optimizer state stays allocated; "
                "call handle.step(optimizer) to release it",
                LamdaWarning,
                stacklevel=3,
            )

    def _release_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # Wrappers such as accelerate's AcceleratedOptimizer keep the torch optimizer as .optimizer.
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        for module in self.modules.values():
            if module.frozen_rows == module.rank:
                optimizer.state.pop(module.lamda_B, None)

    @property
    def finished(self) -> bool:
        """Whether every PMB row of every module is frozen."""
        return all(module.frozen_rows == module.rank for module in self.modules.values())

    @property
    def trainable_parameters(self) -> int:
        """Adapter parameters still trained now: every core plus the PMB rows not yet frozen."""
        return sum(m.rank * m.rank + (m.rank - m.frozen_rows) * m.out_features for m in self.modules.values())

    @property
    def trainable_parameters_after_schedule(self) -> int:
        """Adapter parameters trained once the schedule has frozen every PMB: ``sum r^2``."""
        return sum(m.rank * m.rank for m in self.modules.values())

    @property
    def lora_parameters(self) -> int:
        """Trainable parameters of LoRA at the same ranks, ``sum r * (d_in + d_out)``, for comparison."""
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules.values())

    def frozen_rows(self) -> dict[str, tuple[int, int]]:
        """Return module name to ``(frozen PMB rows, rank)``."""
        return {name: (m.frozen_rows, m.rank) for name, m in self.modules.items()}

    def __repr__(self) -> str:
        return (
            f"LamdaHandle(modules={len(self.modules)}, init={self.settings.init!r}, steps_done={self.steps_done}, "
            f"trainable_parameters={self.trainable_parameters}, "
            f"after_schedule={self.trainable_parameters_after_schedule})"
        )


def find_handle(model: nn.Module) -> tuple[LamdaHandle, str]:
    """Find the handle of the adapters in ``model`` or in one of its submodules.

    Returns:
        ``(handle, prefix)`` where ``prefix`` is the name of the submodule that stores the
        handle (``""`` for ``model`` itself), so that ``prefix + "." + name`` names a handle
        module inside ``model``.

    Raises:
        AdapterError: if ``model`` has no LaMDA adapters, or adapters of several apply_plan calls.
    """
    found = [(prefix, module.__dict__[HANDLE_ATTRIBUTE]) for prefix, module in model.named_modules()
             if HANDLE_ATTRIBUTE in module.__dict__]
    if not found:
        raise AdapterError(
            f"{type(model).__name__} has no LaMDA adapters; call lamda_spectra.apply_plan or load_adapter first"
        )
    if len(found) > 1:
        holders = ", ".join(prefix or "<root>" for prefix, _ in found)
        raise AdapterError(f"model contains adapters of several apply_plan calls (in {holders}); pass one of those submodules")
    prefix, handle = found[0]
    return handle, prefix


def full_name(prefix: str, name: str) -> str:
    """Join a submodule prefix and a module name as ``named_modules()`` does."""
    return f"{prefix}.{name}" if prefix else name
