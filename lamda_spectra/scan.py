"""The scan: stream a checkpoint's target weights and tabulate their spectra.

The spectra table has one row per module, in module order, with columns:

==================  ============================================================================
module              full module name (tensor name minus ".weight")
tensor              tensor name in the checkpoint
layout              "linear" or "conv1d"
d_out, d_in         the layer's output and input features
dtype               stored safetensors dtype ("F32", "BF16", ...)
frobenius_norm      ||W||_F
spectral_norm       s_1
stable_rank         ||W||_F^2 / s_1^2
effective_rank      exp(-sum p_i log p_i); NaN unless the full spectrum was kept
n_values            number of singular values kept
full                True when every singular value was kept
method              routine that computed the values ("exact", "krylov", "gram")
singular_values     numpy float64 array, descending (space-separated in spectra.csv)
fingerprint         the checkpoint's weights fingerprint (same on every row)
==================  ============================================================================

``DataFrame.attrs`` holds ``source`` (dict: kind, path or repo_id, revision, model_name),
``fingerprint``, ``top_k``, ``full_spectrum``, and the counts of spectra ``computed`` and read
from the cache (``cached``).
"""

from __future__ import annotations

import csv
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ._io import atomic_write_text
from .cache import SpectraCache
from .errors import LamdaError, LamdaWarning, SpectrumError, UsageError
from .sources import Target, WeightSource, open_source, select_targets
from .spectra import Spectrum, compute_spectrum, spectrum_metrics

SPECTRA_COLUMNS = (
    "module",
    "tensor",
    "layout",
    "d_out",
    "d_in",
    "dtype",
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "effective_rank",
    "n_values",
    "full",
    "method",
    "singular_values",
    "fingerprint",
)

logger = logging.getLogger(__name__)

# Singular values kept per module unless a caller asks for more: enough for a max rank of 64.
DEFAULT_TOP_K = 64

ProgressCallback = Callable[[int, int, str], None]


def scan(
    source: str | Path | WeightSource,
    *,
    revision: str | None = None,
    target: list[str] | None = None,
    exclude: list[str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    full_spectrum: bool = False,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    skip_unsupported: bool = False,
    skip_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
) -> pd.DataFrame:
    """Stream the target weights of a checkpoint and tabulate their spectra.

    Tensors are read one at a time, upcast to float32 (float64 stays float64), and dropped before
    the next one is read, so peak memory follows the largest target tensor, not the model.

    Args:
        source: folder, ``.safetensors`` file, Hub repo id, or an opened :class:`WeightSource`.
        revision: Hub revision (branch, tag or commit); only for repo ids.
        target: module-name suffixes or regexes selecting modules (default: every linear
            projection inside the repeated blocks).
        exclude: module-name suffixes or regexes to drop from the selection.
        top_k: number of leading singular values to compute per module (capped at its smaller
            dimension). Plans can use ranks up to this value.
        full_spectrum: keep every singular value (needed for the effective rank and full plots).
        device: ``"cpu"`` (default) or ``"cuda"``; where each SVD runs.
        cache_dir: spectra cache folder (default: ``$LAMDA_SPECTRA_CACHE`` or
            ``~/.cache/lamda_spectra``).
        use_cache: read and write the spectra cache.
        skip_unsupported: skip quantized or packed weights with a warning instead of failing.
        skip_nonfinite: skip weights holding NaN or Inf with a warning instead of failing.
        progress: called as ``progress(done, total, module)`` after each module.

    Returns:
        The spectra table described in this module's docstring, one row per module.

    Raises:
        SourceError: the checkpoint cannot be resolved or read, or no module matched.
        SpectrumError: a weight is non-finite or quantized and not skipped.
        UsageError: invalid ``top_k`` or ``device``.
    """
    if top_k < 1:
        raise UsageError(f"top_k must be a positive number of singular values, got {top_k}")
    device = _resolve_device(device)
    weights = source if isinstance(source, WeightSource) else open_source(str(source), revision=revision)
    targets = select_targets(weights, target, exclude, skip_unsupported=skip_unsupported)
    cache = SpectraCache(cache_dir) if use_cache else None

    rows = []
    counts = {"computed": 0, "cached": 0}
    for done, module in enumerate(targets, start=1):
        spectrum, origin = _module_spectrum(weights, module, top_k, full_spectrum, device, cache, skip_nonfinite)
        if spectrum is not None:
            rows.append(_row(module, spectrum, weights.fingerprint))
            counts[origin] += 1
        if progress is not None:
            progress(done, len(targets), module.module)

    table = pd.DataFrame(rows, columns=list(SPECTRA_COLUMNS))
    table.attrs.update(
        source=source_record(weights),
        fingerprint=weights.fingerprint,
        top_k=top_k,
        full_spectrum=full_spectrum,
        **counts,
    )
    return table


def source_record(weights: WeightSource) -> dict:
    """Describe where the weights came from, as plans and reports store it."""
    record = {"kind": weights.kind, "model_name": weights.model_name}
    if weights.kind == "hub":
        record.update(repo_id=weights.repo_id, revision=weights.revision)
    else:
        record["path"] = _portable_path(Path(weights.source).resolve())
    return record


def _portable_path(path: Path) -> str:
    """Return ``path`` relative to the working directory when it lies below it, else absolute.

    A plan made inside a project (such as the committed demo, whose weights live in the
    project's virtualenv) then reads the same in every clone of that project.
    """
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"invalid device {device!r}: use 'cpu' or 'cuda'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def _module_spectrum(
    weights: WeightSource,
    module: Target,
    top_k: int,
    full: bool,
    device: torch.device,
    cache: SpectraCache | None,
    skip_nonfinite: bool,
) -> tuple[Spectrum | None, str]:
    """Return the module's spectrum (None when skipped) and whether it was "computed" or "cached"."""
    k = min(top_k, *module.shape)
    if cache is not None:
        cached = cache.load(weights.fingerprint, module.tensor, k, full)
        if cached is not None:
            return cached, "cached"

    matrix = _read_matrix(weights, module)
    bad = _count_nonfinite(matrix)
    if bad is not None:
        message = f"tensor {module.tensor} in {weights.source} holds {bad}"
        if not skip_nonfinite:
            raise SpectrumError(f"{message}; fix the checkpoint or pass --skip-nonfinite to skip the module")
        warnings.warn(f"{message}; skipped", LamdaWarning, stacklevel=3)
        return None, "computed"

    started = time.perf_counter()
    spectrum = compute_spectrum(matrix, k, full=full, device=device)
    del matrix
    logger.debug("%s: %s in %.2f s", module.module, spectrum.method, time.perf_counter() - started)
    if spectrum.frobenius_sq == 0.0:
        warnings.warn(
            f"weight {module.tensor} is all zeros: it gets energy score 0 and the minimum rank",
            LamdaWarning,
            stacklevel=3,
        )
    if cache is not None:
        cache.store(weights.fingerprint, module.tensor, spectrum)
    return spectrum, "computed"


def _read_matrix(weights: WeightSource, module: Target) -> torch.Tensor:
    """Read one weight as a ``(d_out, d_in)`` float32 (or float64) matrix."""
    stored = weights.read(module.tensor)
    # Upcast at once: torch's CPU decompositions reject half precision, and half matmuls are slow.
    matrix = stored.to(torch.float64 if stored.dtype == torch.float64 else torch.float32)
    del stored
    if module.layout == "conv1d":
        matrix = matrix.T
    return matrix


def _count_nonfinite(matrix: torch.Tensor) -> str | None:
    """Describe the NaN and Inf values of ``matrix``, or return None when it is finite."""
    if bool(torch.isfinite(matrix).all()):
        return None
    nan = int(torch.isnan(matrix).sum())
    inf = int(torch.isinf(matrix).sum())
    return f"{nan} NaN and {inf} Inf values"


def _row(module: Target, spectrum: Spectrum, fingerprint: str) -> dict:
    metrics = spectrum_metrics(spectrum)
    return {
        "module": module.module,
        "tensor": module.tensor,
        "layout": module.layout,
        "d_out": module.shape[0],
        "d_in": module.shape[1],
        "dtype": module.dtype,
        "frobenius_norm": metrics["frobenius_norm"],
        "spectral_norm": metrics["spectral_norm"],
        "stable_rank": metrics["stable_rank"],
        "effective_rank": metrics["effective_rank"],
        "n_values": len(spectrum.singular_values),
        "full": spectrum.full,
        "method": spectrum.method,
        "singular_values": np.asarray(spectrum.singular_values, dtype=np.float64),
        "fingerprint": fingerprint,
    }


def write_spectra_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a spectra table as CSV atomically; singular values become space-separated floats."""
    frame = table.copy()
    frame["singular_values"] = [" ".join(repr(float(v)) for v in values) for values in table["singular_values"]]
    return atomic_write_text(path, frame.to_csv(index=False))


def read_spectra_csv(path: str | Path) -> pd.DataFrame:
    """Read a spectra table written by :func:`write_spectra_csv`.

    Raises:
        LamdaError: the file is missing, not CSV, lacks spectra columns (all of them named), looks
            truncated (its last row is cut short) or has a malformed row (named by line and module).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise LamdaError(f"spectra table {path} not found; pass the spectra.csv written by lamda-plan") from err
    except IsADirectoryError as err:
        raise LamdaError(f"spectra table {path} is a folder; pass the spectra.csv file itself") from err
    except UnicodeDecodeError as err:
        raise LamdaError(f"spectra table {path} is not a readable CSV file: {err}") from err
    try:
        frame = pd.read_csv(io.StringIO(text), keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise LamdaError(f"spectra table {path} is not a readable CSV file: {err}") from err
    missing = [column for column in SPECTRA_COLUMNS if column not in frame.columns]
    if missing:
        raise LamdaError(
            f"spectra table {path} lacks columns {', '.join(missing)}; regenerate it with lamda-plan"
        )
    rows = _data_rows(path, text, len(frame.columns))
    _check_numeric_cells(path, frame, rows)
    frame["singular_values"] = _parse_singular_values(path, frame, rows)
    _check_last_fingerprint(path, frame, rows)
    fingerprints = frame["fingerprint"].unique()
    frame.attrs.update(
        fingerprint=str(fingerprints[0]) if len(fingerprints) == 1 else None,
        full_spectrum=bool(frame["full"].all()) if len(frame) else False,
        top_k=int(frame["n_values"].max()) if len(frame) else 0,
    )
    return frame


def _data_rows(path: Path, text: str, n_columns: int) -> list[tuple[int, str]]:
    """Return the line number and module of each data row, raising when a row has too few fields.

    pandas fills the missing fields of a short row with NaN, so a spectra.csv cut off in the
    middle of its last row would otherwise load without an error.
    """
    reader = csv.reader(io.StringIO(text))
    # pandas skips blank lines as well, so these rows line up with the frame's rows.
    records = [(reader.line_num, fields) for fields in reader if fields][1:]
    for index, (line, fields) in enumerate(records):
        if len(fields) < n_columns:
            detail = f"has {len(fields)} of {n_columns} fields"
            raise LamdaError(_bad_row_message(path, line, fields[0], detail, last=index == len(records) - 1))
    return [(line, fields[0]) for line, fields in records]


# Numeric columns: (allows NaN, must be a whole number). The scan writes NaN as the stable rank
# of an all-zero weight and as the effective rank of a partial spectrum.
_NUMERIC_COLUMNS = {
    "d_out": (False, True),
    "d_in": (False, True),
    "n_values": (False, True),
    "frobenius_norm": (False, False),
    "spectral_norm": (False, False),
    "stable_rank": (True, False),
    "effective_rank": (True, False),
}


def _check_numeric_cells(path: Path, frame: pd.DataFrame, rows: list[tuple[int, str]]) -> None:
    """Convert the numeric and boolean columns in place, naming the first cell that is not valid.

    A single bad cell makes pandas read its whole column as text, which later checks would
    report against every module instead of the broken one.
    """
    for column, (nan_allowed, whole) in _NUMERIC_COLUMNS.items():
        values = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
        valid = values.notna() & (values >= 0) & np.isfinite(values.fillna(0.0))
        if whole:
            valid &= values == values.round()
        if nan_allowed:
            valid |= frame[column].isna()
        if not valid.all():
            index = int(np.flatnonzero(~valid.to_numpy())[0])
            line, module = rows[index]
            kind = "whole number" if whole else "number"
            detail = f"has {column} {frame[column].iloc[index]!r}, not a finite non-negative {kind}"
            raise LamdaError(_bad_row_message(path, line, module, detail, last=False))
        frame[column] = values.astype(np.int64) if whole else values
    flags = frame["full"].astype(str)
    bad = ~flags.isin(["True", "False"])
    if bad.any():
        line, module = rows[int(np.flatnonzero(bad.to_numpy())[0])]
        detail = f"has full {frame['full'][bad].iloc[0]!r}, not True or False"
        raise LamdaError(_bad_row_message(path, line, module, detail, last=False))
    frame["full"] = flags == "True"


def _parse_singular_values(path: Path, frame: pd.DataFrame, rows: list[tuple[int, str]]) -> list[np.ndarray]:
    """Parse each space-separated singular_values cell and check its length against n_values."""
    parsed = []
    for (line, module), text, n_values in zip(rows, frame["singular_values"], frame["n_values"]):
        try:
            values = np.array(text.split(), dtype=np.float64) if isinstance(text, str) else np.zeros(0)
        except ValueError as err:
            raise LamdaError(
                f"spectra table {path} has a malformed singular_values cell on line {line} (module {module}): "
                f"{err}; rerun lamda-plan to regenerate it"
            ) from err
        try:
            expected = int(n_values)
        except (TypeError, ValueError):
            expected = None
        if expected != len(values):
            detail = f"has {len(values)} singular values but n_values is {n_values}"
            raise LamdaError(_bad_row_message(path, line, module, detail, last=False))
        if not (np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(np.diff(values) <= 0)):
            detail = "has singular values that are not finite, non-negative and descending"
            raise LamdaError(_bad_row_message(path, line, module, detail, last=False))
        parsed.append(values)
    return parsed


def _check_last_fingerprint(path: Path, frame: pd.DataFrame, rows: list[tuple[int, str]]) -> None:
    """Raise when the last row's fingerprint is a cut-off copy of the row before it.

    The fingerprint is the last column, so a file cut inside it still has every field.
    """
    if len(frame) < 2:
        return
    # An empty last fingerprint (read as NaN) counts as a cut-off one too.
    fingerprints = frame["fingerprint"].fillna("").astype(str)
    last, previous = fingerprints.iloc[-1], fingerprints.iloc[-2]
    if len(last) < len(previous) and previous.startswith(last):
        line, module = rows[-1]
        detail = f"has a fingerprint of {len(last)} characters where the other rows have {len(previous)}"
        raise LamdaError(_bad_row_message(path, line, module, detail, last=True))


def _bad_row_message(path: Path, line: int, module: str, detail: str, *, last: bool) -> str:
    if last:
        return f"spectra table {path} looks truncated: its last row (line {line}) {detail}; rerun lamda-plan to regenerate it"
    return f"spectra table {path} is malformed: line {line} (module {module}) {detail}; rerun lamda-plan to regenerate it"
