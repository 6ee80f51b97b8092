"""lamda_spectra: LaMDA++ rank plans from pretrained weight spectra, and LaMDA adapters.

``scan``, ``plan`` and ``report`` are also the names of submodules; the functions imported here
take their place as package attributes, so import submodule members with ``from
lamda_spectra.plan import Plan``. ``LamdaCallback`` needs transformers, an optional dependency,
so it is imported on first use.
"""

__version__ = "0.1.0"

from .adapter import (
    FreezeSchedule,
    LamdaHandle,
    LamdaLinear,
    apply_plan,
    export_peft,
    load_adapter,
    merge_and_unload,
    save_adapter,
)
from .errors import LamdaError, LamdaWarning
from .plan import Plan, load_plan, plan
from .report import report
from .scan import scan

__all__ = [
    "FreezeSchedule",
    "LamdaCallback",
    "LamdaError",
    "LamdaHandle",
    "LamdaLinear",
    "LamdaWarning",
    "Plan",
    "apply_plan",
    "export_peft",
    "load_adapter",
    "load_plan",
    "merge_and_unload",
    "plan",
    "report",
    "save_adapter",
    "scan",
]


def __getattr__(name: str):
    if name == "LamdaCallback":
        from .adapter.callback import LamdaCallback

        return LamdaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
