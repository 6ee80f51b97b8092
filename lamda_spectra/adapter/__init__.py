"""LaMDA adapters: apply a rank plan to a model, train it with a PMB freezing schedule, and export it.

``LamdaCallback`` needs transformers, an optional dependency, so it is imported on first use.
"""

from .apply import apply_plan
from .export import export_peft, merge_and_unload
from .handle import AdapterSettings, LamdaHandle
from .initializers import INITIALIZERS
from .io import load_adapter, save_adapter
from .layer import LamdaLinear
from .schedule import FreezeSchedule

__all__ = [
    "INITIALIZERS",
    "AdapterSettings",
    "FreezeSchedule",
    "LamdaCallback",
    "LamdaHandle",
    "LamdaLinear",
    "apply_plan",
    "export_peft",
    "load_adapter",
    "merge_and_unload",
    "save_adapter",
]


def __getattr__(name: str):
    if name == "LamdaCallback":
        from .callback import LamdaCallback

        return LamdaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
