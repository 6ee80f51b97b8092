"""LamdaCallback: runs the PMB freezing schedule inside a ``transformers.Trainer``.

This module imports transformers, an optional dependency; ``lamda_spectra.adapter`` imports it
only when ``LamdaCallback`` is first used.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from ..errors import LamdaWarning
from .handle import LamdaHandle


class LamdaCallback(TrainerCallback):
    """Calls ``handle.step(optimizer)`` after every optimizer step of a ``Trainer``.

    Example::

        handle = lamda_spectra.apply_plan(model, plan, total_steps=args.max_steps)
        trainer = Trainer(model, args, ..., callbacks=[lamda_spectra.LamdaCallback(handle)])

    Args:
        handle: the handle returned by :func:`lamda_spectra.apply_plan` or ``load_adapter``.
    """

    def __init__(self, handle: LamdaHandle) -> None:
        self.handle = handle

    def on_train_begin(self, args, state, control, **kwargs):
        total_steps = self.handle.settings.total_steps
        if total_steps is not None and state.max_steps != total_steps:
            warnings.warn(
                f"the Trainer runs {state.max_steps} optimizer steps but the PMB schedule was set up "
                f"for total_steps={total_steps}; pass total_steps={state.max_steps} to apply_plan",
                LamdaWarning,
                stacklevel=2,
            )

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # Trainer fires on_step_end once per optimizer step, after gradient accumulation.
        self.handle.step(optimizer)
