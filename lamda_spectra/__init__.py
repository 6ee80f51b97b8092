"""lamda_spectra: LaMDA++ rank plans from pretrained weight spectra, and LaMDA adapters.

The public names below load on first access, so that importing a light submodule (the command
line's ``--help``, the errors) does not import torch, pandas or matplotlib. ``scan``, ``plan``
and ``report`` are also the names of submodules; the package attribute is always the function,
so import submodule members with ``from lamda_spectra.plan import Plan``. ``LamdaCallback``
needs transformers, an optional dependency.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

from .errors import LamdaError, LamdaWarning

# Public name -> the submodule that defines it.
_EXPORTS = {
    "FreezeSchedule": ".adapter",
    "LamdaCallback": ".adapter.callback",
    "LamdaHandle": ".adapter",
    "LamdaLinear": ".adapter",
    "Plan": ".plan",
    "apply_plan": ".adapter",
    "export_peft": ".adapter",
    "load_adapter": ".adapter",
    "load_plan": ".plan",
    "merge_and_unload": ".adapter",
    "plan": ".plan",
    "report": ".report",
    "save_adapter": ".adapter",
    "scan": ".scan",
}
# Submodules that share their name with the function the package exports.
_SHADOWED_SUBMODULES = frozenset({"plan", "report", "scan"})

__all__ = sorted([*_EXPORTS, "LamdaError", "LamdaWarning"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing a submodule sets it as an attribute of the package. For plan, report and
        # scan that would hide the function of the same name, which __getattr__ then loads.
        if name in _SHADOWED_SUBMODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
