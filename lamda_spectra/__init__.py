"""lamda_spectra: LaMDA++ rank plans from pretrained weight spectra, and LaMDA adapters.

``scan``, ``plan`` and ``report`` are also the names of submodules; the functions imported here
take their place as package attributes, so import submodule members with ``from
lamda_spectra.plan import Plan``.
"""

__version__ = "0.1.0"
