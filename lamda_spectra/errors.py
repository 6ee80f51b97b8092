"""Exceptions and warnings raised by lamda_spectra.

Every user-facing failure is a :class:`LamdaError` whose message is one line that names the
file, tensor or module at fault and says what to do. The command line prints that line and
exits with :attr:`LamdaError.exit_code`.
"""

from __future__ import annotations


class LamdaError(Exception):
    """A failure caused by the input (files, weights, plan, model); exit code 1."""

    exit_code = 1


class UsageError(LamdaError):
    """Invalid options or option values (budget syntax, infeasible budget, rank bounds); exit code 2."""

    exit_code = 2


class SourceError(LamdaError):
    """A checkpoint that cannot be found, resolved or read (missing path, truncated file, bad header)."""


class SpectrumError(LamdaError):
    """A weight whose spectrum cannot be computed (non-finite values, quantized or packed dtype)."""


class PlanError(LamdaError):
    """A plan file or plan object that fails validation."""


class AdapterError(LamdaError):
    """A plan that does not fit the model it is applied to, or an invalid adapter setting."""


class ReportError(LamdaError):
    """Report inputs that do not belong together or cannot be written."""


class LamdaWarning(UserWarning):
    """A recoverable problem: a skipped tensor, an all-zero weight, a recomputed cache entry."""
