"""On-disk cache of weight spectra, so that re-planning a model computes no SVD.

Each entry is one ``.npz`` file per (weights fingerprint, tensor name), written atomically, so a
scan that is killed midway keeps every spectrum it finished and resumes from there. The file
name hashes the fingerprint, the tensor name and :data:`~lamda_spectra.spectra.METHOD_VERSION`,
so a change of method never reuses old values. An entry serves every later request for at most
as many values as it contains, and every request when it contains the full spectrum.

Layout: ``<root>/<sha256(fingerprint)[:32]>/<sha256(tensor, method version, format)[:40]>.npz``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes
from .errors import LamdaError, LamdaWarning
from .spectra import METHOD_VERSION, Spectrum

logger = logging.getLogger(__name__)

# Version of the entry layout below. It is part of the key, like METHOD_VERSION.
CACHE_FORMAT = 1

DEFAULT_CACHE_DIR = Path("~/.cache/lamda_spectra")
CACHE_ENV = "LAMDA_SPECTRA_CACHE"

_FIELDS = ("format", "method_version", "fingerprint", "tensor", "singular_values", "frobenius_sq", "shape", "method", "full")


class SpectraCache:
    """Spectra stored under ``root``, keyed by weights fingerprint, tensor name and method version.

    Attributes:
        root: cache folder (``root`` argument, else ``$LAMDA_SPECTRA_CACHE``, else
            ``~/.cache/lamda_spectra``).
        hits: entries returned by :meth:`load`.
        misses: :meth:`load` calls that returned None (missing, too short or unreadable entry).
        stores: entries written by :meth:`store`.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0
        self.stores = 0
        self._write_failed = False

    def entry_path(self, fingerprint: str, tensor: str) -> Path:
        """Return the path of the entry for ``tensor`` (whether or not it exists)."""
        folder = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:32]
        key = "\0".join((tensor, METHOD_VERSION, str(CACHE_FORMAT)))
        return self.root / folder / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:40]}.npz"

    def load(self, fingerprint: str, tensor: str, k: int, full: bool) -> Spectrum | None:
        """Return the cached spectrum of ``tensor`` if it has at least ``k`` values (all when ``full``).

        The returned spectrum contains the first ``k`` values, or every value when ``full``. A
        corrupt or unreadable entry gives a :class:`LamdaWarning` naming its file and None, so
        the caller recomputes the spectrum and overwrites the entry.
        """
        path = self.entry_path(fingerprint, tensor)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            spectrum = _read_entry(path, fingerprint, tensor)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"spectra cache entry {path} for tensor {tensor} is unreadable ({err}); recomputing it",
                LamdaWarning,
                stacklevel=2,
            )
            self.misses += 1
            return None
        n_values = len(spectrum.singular_values)
        if not spectrum.full and (full or n_values < k):
            logger.debug("cache entry for %s has %d values, %s requested", tensor, n_values, "all" if full else k)
            self.misses += 1
            return None
        self.hits += 1
        if full:
            return spectrum
        values = spectrum.singular_values[:k]
        return Spectrum(
            singular_values=values,
            frobenius_sq=spectrum.frobenius_sq,
            shape=spectrum.shape,
            method=spectrum.method,
            full=len(values) == min(spectrum.shape),
        )

    def store(self, fingerprint: str, tensor: str, spectrum: Spectrum) -> Path | None:
        """Write the spectrum of ``tensor`` atomically; return its file, or None if it failed.

        A cache that cannot be written is not fatal: the first failure gives a
        :class:`LamdaWarning` and the scan goes on without caching.
        """
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.int64(CACHE_FORMAT),
            method_version=np.str_(METHOD_VERSION),
            fingerprint=np.str_(fingerprint),
            tensor=np.str_(tensor),
            singular_values=np.asarray(spectrum.singular_values, dtype=np.float64),
            frobenius_sq=np.float64(spectrum.frobenius_sq),
            shape=np.asarray(spectrum.shape, dtype=np.int64),
            method=np.str_(spectrum.method),
            full=np.bool_(spectrum.full),
        )
        path = self.entry_path(fingerprint, tensor)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except (LamdaError, OSError) as err:
            if not self._write_failed:
                warnings.warn(
                    f"cannot write the spectra cache under {self.root} ({err}); continuing without caching",
                    LamdaWarning,
                    stacklevel=2,
                )
            self._write_failed = True
            return None
        self.stores += 1
        return path


def _read_entry(path: Path, fingerprint: str, tensor: str) -> Spectrum:
    """Read and validate one entry.

    Raises:
        ValueError: a field is missing, has the wrong type, or belongs to another entry.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [name for name in _FIELDS if name not in data.files]
        if missing:
            raise ValueError(f"missing fields {', '.join(missing)}")
        fields = {name: data[name] for name in _FIELDS}
    if int(fields["format"]) != CACHE_FORMAT or str(fields["method_version"]) != METHOD_VERSION:
        raise ValueError(f"written by another cache format or method version ({fields['method_version']})")
    if str(fields["fingerprint"]) != fingerprint or str(fields["tensor"]) != tensor:
        raise ValueError(f"belongs to tensor {fields['tensor']} of weights {fields['fingerprint']}")
    values = np.asarray(fields["singular_values"], dtype=np.float64)
    shape = tuple(int(size) for size in fields["shape"])
    frobenius_sq = float(fields["frobenius_sq"])
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("singular values are not a finite non-negative vector")
    if len(shape) != 2 or len(values) > min(shape) or not math.isfinite(frobenius_sq) or frobenius_sq < 0:
        raise ValueError(f"shape {shape} or ||W||_F^2 {frobenius_sq} is invalid")
    return Spectrum(
        singular_values=values,
        frobenius_sq=frobenius_sq,
        shape=(shape[0], shape[1]),
        method=str(fields["method"]),
        full=bool(fields["full"]),
    )
