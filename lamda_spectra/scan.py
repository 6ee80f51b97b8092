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
``fingerprint``, ``top_k`` and ``full_spectrum``.
"""

from __future__ import annotations

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
