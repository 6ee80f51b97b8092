"""Singular-value spectra of weight matrices, and the metrics derived from them.

Conventions: a weight ``W`` has shape ``(d_out, d_in)`` and ``U, S, Vh = torch.linalg.svd(W)``.
The LaMDA adapter maps these factors as PMA ``A = Vh[:r].T``, core ``diag(S[:r])`` (or zero) and
PMB ``B = U[:, :r].T``. The normalized spectrum is ``p_i = S_i**2 / ||W||_F**2``.

Accuracy contract of :func:`compute_spectrum`: singular values within 1e-3 relative of an exact
float64 SVD, and energy scores ``sum_{i<r0} p_i`` within 1e-4 absolute for every ``r0`` up to
the number of values returned. Values below about 1e-6 * s_1 (numerically zero) are accurate
only to about that absolute level, as with any floating-point SVD.

Every method works on the tall orientation of ``W`` (a transposed view, not a copy), because
torch's exact routines run about 3x slower on a wide matrix than on its transpose. Which method
runs is recorded in ``Spectrum.method``:

``krylov``
    The top ``k`` values of a weight whose smaller side ``n`` exceeds ``GRAM_MAX_DIM``, unless
    ``k`` is large for ``n``. Randomized block Krylov iteration on ``W^T W`` with full
    reorthogonalization (block width ``max(24, 3k/4)``): float32 products with ``W``, a
    seeded start block, and a float64 Rayleigh-Ritz problem built from the stored products, so
    checking convergence costs no extra pass over ``W``. It stops when the Ritz residuals
    ``rho_i = ||W^T W v_i - theta_i v_i||`` prove the contract with a 4x margin (see
    :func:`_error_bounds`). If the basis reaches ``n / 2`` columns first (flat or rank-deficient
    top spectra), the weight falls back to ``gram``. Plain subspace iteration
    (``torch.svd_lowrank`` with 4 power iterations) is faster but misses the energy bound on
    flat spectra by 10-100x.
``gram``
    Every value from ``eigvalsh`` of the float64 Gram matrix of the smaller side, accumulated
    from float64 row chunks so that no float64 copy of ``W`` exists. Its eigenvalue errors are
    about 1e-16 * s_1^2, so values above about 1e-6 * s_1 keep 1e-3 relative accuracy. It runs
    for small weights, for ``k`` close to ``n``, for ``full=True``, and as the fallback.
``exact``
    An all-zero weight: every singular value is exactly zero.

Costs were measured as process CPU time on one thread of a shared 2-core AMD EPYC with ``k=64``
(``benchmarks/bench_methods.py --threads 1 --clock cpu``). There ``krylov`` takes 0.8 s for a
4096 x 4096 q_proj-like weight, 2.2 s for a Gaussian 4096 x 4096 one (flat spectrum, the
slowest case), and 3.7-3.9 s for 11008 x 4096 and 4096 x 11008. ``torch.linalg.svd`` takes 20,
20, 36 and 69 s there, and ``eigvalsh`` of the float32 Gram matrix 3.4-5.9 s. Energy-score
errors stayed below 2e-8 and value errors below 4e-7.
Memory besides ``W`` in float32: the Krylov run keeps ``Q`` and ``W Q`` in float32 and
``W^T W Q`` in float64, with at most ``n / 2`` columns each. The Gram method keeps an ``n x n``
float64 matrix and one float64 row chunk of about 32 MB.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import SpectrumError, UsageError

logger = logging.getLogger(__name__)

# Part of every cache key: bump it when a change to the methods below changes their results.
METHOD_VERSION = "krylov-gram-2"

# Weights whose smaller side is at most this size use the Gram eigensolve, which is exact and
# costs about as much as a Krylov run there (0.1-0.4 s).
GRAM_MAX_DIM = 1024

# Stopping bounds of the Krylov run, 4x inside the accuracy contract (1e-3 and 1e-4).
VALUE_RTOL = 2.5e-4
ENERGY_ATOL = 2.5e-5
# top_svd needs singular vectors as well. With this bound, rank-16 and rank-64 approximations of a
# 2048 x 1536 weight with s_i = i^-0.5 matched the exact ones to 4e-7 and 4e-6 relative (1e-3
# and 5e-5 with VALUE_RTOL), and the rank-16 one of a Gaussian weight to 4e-6.
# NOTE: residuals alone do not bound vector errors when s_r and s_{r+1} nearly coincide, so
# weights with such a pair may miss 1e-5.
VECTOR_RTOL = 1e-6

# Rows per float64 chunk when accumulating ||W||_F^2 and the Gram matrix (about 32 MB per chunk).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Spectrum:
    """The top singular values of one weight and its total energy."""

    singular_values: np.ndarray  # float64, descending; top k, or all min(d_out, d_in) when full
    frobenius_sq: float  # ||W||_F^2, accumulated in float64
    shape: tuple[int, int]  # (d_out, d_in)
    method: str  # "krylov", "gram" or "exact": which routine produced the values
    full: bool  # True when singular_values holds all min(d_out, d_in) values

    @property
    def normalized(self) -> np.ndarray:
        """The normalized spectrum ``p_i = s_i^2 / ||W||_F^2`` (zeros for an all-zero weight)."""
        if self.frobenius_sq <= 0.0:
            return np.zeros_like(self.singular_values)
        return self.singular_values**2 / self.frobenius_sq


def compute_spectrum(
    weight: torch.Tensor,
    k: int,
    *,
    full: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    method: str = "auto",
) -> Spectrum:
    """Compute the top ``k`` singular values of ``weight`` (all of them when ``full``).

    The caller checks that the weight is finite. See the module docstring for the method that
    runs and its cost.

    Args:
        weight: ``(d_out, d_in)`` matrix in float16, bfloat16, float32 or float64. Half precision
            is upcast to float32: torch's CPU decompositions reject it, and its 8- or 11-bit
            mantissa cannot reach 1e-3 relative accuracy in long products.
        k: number of leading singular values wanted (at least 1); capped at ``min(d_out, d_in)``.
        full: return every singular value (always by the Gram eigensolve).
        device: where to compute, for example ``"cuda"`` (default: the weight's device).
        seed: seed of the random start block, so results are reproducible.
        method: ``"auto"`` chooses by the rules in the module docstring. ``"krylov"`` or
            ``"gram"`` forces a routine, and a forced Krylov run may grow its basis to the whole
            space.

    Returns:
        A :class:`Spectrum` whose values are within 1e-3 relative of an exact float64 SVD and
        whose energy scores are within 1e-4 absolute.

    Raises:
        SpectrumError: ``weight`` is not a 2-D floating-point matrix, or is not finite.
        UsageError: ``k`` is below 1, ``method`` is unknown, or ``device`` is not available.
    """
    if k < 1:
        raise UsageError(f"number of singular values k={k} is invalid; ask for at least 1")
    if method not in ("auto", "krylov", "gram"):
        raise UsageError(f"spectrum method {method!r} is unknown; use 'auto', 'krylov' or 'gram'")
    matrix = _working_matrix(weight, device)
    tall = _tall(matrix)
    n = tall.shape[1]
    k = min(k, n)
    frobenius_sq = _frobenius_sq(tall)
    if not math.isfinite(frobenius_sq):
        # Callers count NaN and Inf values for their message; this only guards the solvers.
        raise SpectrumError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf values")
    chosen = method
    if method == "auto" or full or frobenius_sq == 0.0:
        chosen = _choose_method(n, k, full, frobenius_sq)
    max_size = n if method == "krylov" else n // 2
    values = _METHODS[chosen](tall, k, seed=seed, max_size=max_size, frobenius_sq=frobenius_sq)
    if values is None:
        logger.info("Krylov bound not reached for a %dx%d weight; using the Gram eigensolve", *matrix.shape)
        chosen = "gram"
        values = _gram_values(tall, k)
    if not full:
        values = values[:k]
    return Spectrum(
        singular_values=values.astype(np.float64, copy=True),
        frobenius_sq=frobenius_sq,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        method=chosen,
        full=len(values) == n,
    )


def top_svd(weight: torch.Tensor, r: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the leading ``r`` singular triplets of ``weight`` on its own device.

    Small weights (smaller side up to ``GRAM_MAX_DIM``) use a float64 ``torch.linalg.svd``.
    Larger ones use the Krylov run of :func:`compute_spectrum` with the value bound tightened
    from ``VALUE_RTOL`` to ``VECTOR_RTOL``, or a float64 Gram eigendecomposition when that bound
    is not reached. Each pair ``(U[:, i], Vh[i])`` is signed so that the largest-magnitude entry
    of ``U[:, i]`` is positive.

    Args:
        weight: ``(d_out, d_in)`` floating-point matrix.
        r: number of triplets, ``1 <= r <= min(d_out, d_in)``.
        seed: seed of the Krylov start block.

    Returns:
        ``(U, S, Vh)`` in float32 with shapes ``(d_out, r)``, ``(r,)`` and ``(r, d_in)``, as the
        first ``r`` columns/values/rows of ``torch.linalg.svd(weight)`` would be.

    Raises:
        SpectrumError: ``weight`` is not a 2-D floating-point matrix, or is not finite.
        UsageError: ``r`` is outside ``[1, min(d_out, d_in)]``.
    """
    matrix = _working_matrix(weight, None)
    n = min(matrix.shape)
    if not 1 <= r <= n:
        raise UsageError(f"rank r={r} is invalid for a {tuple(matrix.shape)} weight; use 1 <= r <= {n}")
    tall = _tall(matrix)
    frobenius_sq = _frobenius_sq(tall)
    if not math.isfinite(frobenius_sq):
        raise SpectrumError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf values")
    factors = None
    if _choose_method(n, r, False, frobenius_sq) == "krylov":
        factors = _krylov_triplets(tall, r, seed=seed, frobenius_sq=frobenius_sq)
    if factors is None:
        factors = _exact_triplets(tall, r)
    left, values, right = factors
    if tall is not matrix:  # tall = W^T = V S U^T
        left, right = right, left
    U, S, V = _flip_signs(left, values, right)
    return U.float(), S.float(), V.T.contiguous().float()


def energy_score(spectrum: Spectrum, r0: int) -> float:
    """Return the share of the weight's energy in its top-``r0`` directions: ``sum_{i<r0} p_i``.

    Raises:
        SpectrumError: ``r0`` is negative, or exceeds the number of values of a partial spectrum.
    """
    if r0 < 0:
        raise SpectrumError(f"base rank r0={r0} is invalid; use r0 >= 0")
    if r0 > len(spectrum.singular_values) and not spectrum.full:
        raise SpectrumError(
            f"the spectrum contains {len(spectrum.singular_values)} singular values, fewer than r0={r0}; "
            "compute at least r0 values"
        )
    return float(np.sum(spectrum.normalized[:r0]))


def spectrum_metrics(spectrum: Spectrum) -> dict[str, float]:
    """Compute spectral norm, Frobenius norm, stable rank and entropy effective rank.

    The effective rank ``exp(-sum p_i log p_i)`` needs every singular value, so it is NaN unless
    ``spectrum.full``. The stable rank ``||W||_F^2 / s_1^2`` is NaN for an all-zero weight.
    """
    s1 = float(spectrum.singular_values[0]) if len(spectrum.singular_values) else 0.0
    frobenius_sq = spectrum.frobenius_sq
    effective_rank = math.nan
    if spectrum.full and frobenius_sq > 0.0:
        p = spectrum.normalized
        p = p[p > 0]
        effective_rank = float(np.exp(-np.sum(p * np.log(p))))
    return {
        "spectral_norm": s1,
        "frobenius_norm": math.sqrt(frobenius_sq),
        "stable_rank": frobenius_sq / s1**2 if s1 > 0 else math.nan,
        "effective_rank": effective_rank,
    }


# --- preparation ---------------------------------------------------------------------------


def _working_matrix(weight: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    """Return ``weight`` detached, on ``device``, in float32 (float64 stays float64)."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise SpectrumError(
            f"expected a 2-D floating-point weight, got shape {tuple(weight.shape)} and dtype {weight.dtype}; "
            "quantized or packed weights have no spectrum"
        )
    target = torch.device(device) if device is not None else weight.device
    # NOTE: the tests run on CPU only; the CUDA path uses the same torch calls but is untested.
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {str(target)!r} requested but CUDA is not available; use 'cpu'")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(device=target, dtype=dtype)


def _tall(matrix: torch.Tensor) -> torch.Tensor:
    """Return ``matrix`` or its transposed view, whichever has at least as many rows as columns."""
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


def _row_chunks(matrix: torch.Tensor):
    """Yield float64 copies of consecutive row blocks of ``matrix``, about 32 MB each."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        yield matrix[start : start + rows].to(torch.float64)


def _matmul_float64(matrix: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Return ``matrix @ other`` in float64 without a float64 copy of all of ``matrix``."""
    out = torch.empty(matrix.shape[0], other.shape[1], dtype=torch.float64, device=matrix.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], rows):
        out[start : start + rows] = matrix[start : start + rows].to(torch.float64) @ other
    return out


def _frobenius_sq(matrix: torch.Tensor) -> float:
    """Return ``||matrix||_F^2`` summed in float64 (squares of float32 entries are exact there)."""
    total = 0.0
    for chunk in _row_chunks(matrix):
        flat = chunk.reshape(-1)
        total += float(torch.dot(flat, flat))
    return total


def _choose_method(n: int, k: int, full: bool, frobenius_sq: float) -> str:
    """Name the routine for a tall weight with ``n`` columns (see the module docstring)."""
    if frobenius_sq == 0.0:
        return "exact"
    if full or n <= GRAM_MAX_DIM or _block_size(k) * 3 > n // 2:
        return "gram"
    return "krylov"


@contextlib.contextmanager
def _small_lapack(matrix: torch.Tensor):
    """Run a dense decomposition of a small CPU matrix on one thread.

    LAPACK's reductions of small matrices are sequences of short parallel loops, each ending in
    a barrier. When another process runs on one of the cores, every barrier waits for a thread
    that is not scheduled: a 384 x 384 ``eigvalsh`` with 2 threads took 0.01-0.9 s under such load.

    One-off measurements on a 2-core machine (ad-hoc scripts, one run each, so estimates):
    idle, the MiniLM scan took 0.38 s with one thread and 0.45 s with two, and one 7B-shaped
    block took 8.9 s either way. Next to another torch process doing small decompositions, the
    figures were 1.4-1.7 s against 1.7-2.0 s, and 28 s against 43 s. Next to two busy loops the
    block took 38 s against 30 s, which is within that load's noise.
    """
    if matrix.device.type != "cpu" or min(matrix.shape) > GRAM_MAX_DIM:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- exact routines ------------------------------------------------------------------------


def _gram_matrix(tall: torch.Tensor) -> torch.Tensor:
    """Return the ``(n, n)`` float64 Gram matrix ``tall^T tall``, accumulated over row chunks."""
    n = tall.shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64, device=tall.device)
    for chunk in _row_chunks(tall):
        gram.addmm_(chunk.T, chunk)
    return gram


def _gram_values(tall: torch.Tensor, k: int, **_: object) -> np.ndarray:
    """Return every singular value, descending, from ``eigvalsh`` of the float64 Gram matrix."""
    gram = _gram_matrix(tall)
    with _small_lapack(gram):
        eigenvalues = torch.linalg.eigvalsh(gram).flip(0)
    return eigenvalues.clamp_min(0.0).sqrt().cpu().numpy()


def _zero_values(tall: torch.Tensor, k: int, **_: object) -> np.ndarray:
    return np.zeros(tall.shape[1])


def _exact_triplets(tall: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the top ``r`` triplets ``(U (m, r), S (r,), V (n, r))`` of a tall matrix in float64.

    Small matrices use ``torch.linalg.svd``. For large ones a float64 copy would break the
    memory budget, so ``V`` comes from the Gram matrix and ``U = tall V / S``.
    """
    n = tall.shape[1]
    if n <= GRAM_MAX_DIM:
        with _small_lapack(tall):
            U, S, Vh = torch.linalg.svd(tall.to(torch.float64), full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].T
    eigenvalues, eigenvectors = torch.linalg.eigh(_gram_matrix(tall))
    S = eigenvalues.flip(0)[:r].clamp_min(0.0).sqrt()
    V = eigenvectors.flip(1)[:, :r]
    return _left_vectors(_matmul_float64(tall, V), S), S, V


def _left_vectors(image: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return orthonormal ``U`` with ``U S = image`` (``W V``), shape ``(m, r)``, float64.

    Columns of numerically zero singular values (below 1e-6 * s_1, where Gram eigenvectors are
    rounding noise) carry no direction. They are replaced by random directions orthogonal to
    the others, which changes ``U S V^T`` by less than that rounding.
    """
    zero = values <= 1e-6 * float(values.max())
    left = image / torch.where(zero, torch.ones_like(values), values)
    if not bool(zero.any()):
        return left
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(left.shape[0], int(zero.sum()), generator=generator, dtype=left.dtype)
    left[:, zero] = random.to(left.device)
    # QR with the non-zero columns first keeps them, up to the signs of R's diagonal.
    order = torch.cat([torch.nonzero(~zero).flatten(), torch.nonzero(zero).flatten()])
    Q, R = torch.linalg.qr(left[:, order])
    left[:, order] = Q * torch.where(R.diagonal() < 0, -1.0, 1.0)
    return left


def _flip_signs(
    left: torch.Tensor, values: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign each pair so that the largest-magnitude entry of its left vector is positive."""
    pivots = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivots, torch.arange(left.shape[1], device=left.device)])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return left * signs, values, right * signs


# --- block Krylov --------------------------------------------------------------------------


def _block_size(k: int) -> int:
    """Return the Krylov block width for ``k`` wanted values.

    Narrower blocks reach a given polynomial degree with fewer products: at k=64, widths 32-48
    needed 60-65% of the CPU time of width 80 on the four weights of
    ``benchmarks/bench_methods.py`` (860-1100 basis columns instead of 1280-1360 for the
    flatter ones). Width 16 stalled on flat spectra.
    """
    # NOTE: a block narrower than k cannot see more than its width of (nearly) equal top
    # singular values at once, so a cluster of more than 3k/4 equal values at the top could be
    # certified too early. Exactly equal values are safe: their products are deficient columns,
    # which the basis replaces by random ones.
    return max(24, (3 * k) // 4)


@dataclass
class _RitzPairs:
    """Top Ritz pairs of ``W^T W`` on the current Krylov basis, with one extra pair below."""

    theta: torch.Tensor  # (k + 1,) float64 Ritz values, descending (approximate s_i^2)
    coefficients: torch.Tensor  # (L, k + 1) float64 Ritz vectors in basis coordinates
    residuals: torch.Tensor  # (k + 1,) float64 rho_i = ||W^T W v_i - theta_i v_i||


class _KrylovBasis:
    """Orthonormal Krylov basis ``Q`` of ``W^T W`` with the stored products ``W Q`` and ``W^T W Q``.

    ``basis`` (Q, ``(n, L)``) and ``images`` (W Q, ``(m, L)``) are in the weight's dtype;
    ``gram_images`` (W^T W Q, ``(n, L)``) and the projected matrix ``Q^T W^T W Q`` (``(L, L)``)
    are float64, because the residuals and Ritz values are differences of these products.
    """

    def __init__(self, tall: torch.Tensor, block: int, seed: int, capacity: int):
        self.tall = tall
        self.generator = torch.Generator().manual_seed(seed)
        m, n = tall.shape
        capacity = min(n, capacity + block)
        # Preallocated, so growing costs no copies. On Linux, pages of a large torch.empty
        # buffer become resident only when written, so an early stop does not pay for them.
        self._basis = tall.new_empty(n, capacity)
        self._images = tall.new_empty(m, capacity)
        self._gram_images = torch.empty(n, capacity, dtype=torch.float64, device=tall.device)
        self._projected = torch.empty(capacity, capacity, dtype=torch.float64, device=tall.device)
        self.size = 0
        self.steps = 0
        self._block_width = block
        self._next = self._orthonormalize(self._random(min(block, n)))

    @property
    def basis(self) -> torch.Tensor:
        return self._basis[:, : self.size]

    @property
    def images(self) -> torch.Tensor:
        return self._images[:, : self.size]

    @property
    def gram_images(self) -> torch.Tensor:
        return self._gram_images[:, : self.size]

    @property
    def projected(self) -> torch.Tensor:
        return self._projected[: self.size, : self.size]

    def extend(self) -> None:
        """Multiply the next block by ``W`` and ``W^T``, then build the block after it."""
        block = self._next
        old, width = self.size, block.shape[1]
        if old + width > self._basis.shape[1]:
            raise RuntimeError("Krylov basis exceeds its capacity")  # guarded by _run_krylov
        image = self.tall @ block
        gram_image = self.tall.T @ image
        self._grow_projected(block.to(torch.float64), gram_image.to(torch.float64))
        self._basis[:, old : old + width] = block
        self._images[:, old : old + width] = image
        self.size += width
        self.steps += 1
        room = self.tall.shape[1] - self.size
        if room > 0:
            self._next = self._orthonormalize(gram_image[:, : min(self._block_width, room)])

    def ritz_pairs(self, count: int) -> _RitzPairs:
        """Solve the projected eigenproblem for its top ``count`` pairs and measure their residuals."""
        count = min(count, self.size)
        # scipy's subset driver (MRRR) solves these sizes in 0.6x the time. On 2 cores, though,
        # its BLAS threads slowed torch's next products, and the 7B-shaped scan ran 25% slower.
        # Held to one thread, scipy made the scan no faster: these solves are 3-8% of it.
        with _small_lapack(self.projected):
            theta, vectors = torch.linalg.eigh(self.projected)
        theta = theta.flip(0)[:count]
        coefficients = vectors.flip(1)[:, :count]
        gram_ritz = self.gram_images @ coefficients
        ritz = _matmul_float64(self.basis, coefficients)
        residuals = torch.linalg.vector_norm(gram_ritz - ritz * theta, dim=0)
        return _RitzPairs(theta, coefficients, residuals)

    def vectors(self, pairs: _RitzPairs, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(W v_i (m, k), s_i (k,), v_i (n, k))`` for the top ``k`` Ritz pairs, in float64."""
        coefficients = pairs.coefficients[:, :k]
        right = _matmul_float64(self.basis, coefficients)
        # ||W v_i|| from the stored products: unlike sqrt(theta_i), it is accurate for tiny values.
        image = _matmul_float64(self.images, coefficients)
        return image, torch.linalg.vector_norm(image, dim=0), right

    def _grow_projected(self, block: torch.Tensor, gram_image: torch.Tensor) -> None:
        """Append the block column ``Q^T W^T W Q_new``, using ``Q_old^T W^T W Q_new = (W^T W Q_old)^T Q_new``."""
        old, width = self.size, block.shape[1]
        cross = self.gram_images.T @ block
        self._projected[:old, old : old + width] = cross
        self._projected[old : old + width, :old] = cross.T
        corner = block.T @ gram_image
        self._projected[old : old + width, old : old + width] = (corner + corner.T) / 2
        self._gram_images[:, old : old + width] = gram_image

    def _random(self, width: int) -> torch.Tensor:
        sample = torch.randn(self.tall.shape[1], width, generator=self.generator, dtype=self.tall.dtype)
        return sample.to(self.tall.device)

    def _project_out(self, block: torch.Tensor, *, local_first: bool) -> torch.Tensor:
        """Remove the basis components of ``block`` by block Gram-Schmidt.

        In exact arithmetic ``W^T W Q_j`` only has components along the last two blocks (the
        block Lanczos recurrence), so a cheap pass against them comes first. A full pass then
        removes what rounding leaves along the older blocks; without it the basis loses
        orthogonality as values converge.
        """
        if self.size == 0:
            return block
        if local_first:
            recent = self.basis[:, -2 * self._block_width :]
            block = block - recent @ (recent.T @ block)
        else:
            block = block - self.basis @ (self.basis.T @ block)
        return block - self.basis @ (self.basis.T @ block)

    def _orthonormalize(self, block: torch.Tensor) -> torch.Tensor:
        """Orthonormalize ``block`` against the basis and itself.

        Columns that are (nearly) inside the span already carry no new direction, and their
        QR factor would be rounding noise that is not orthogonal to the basis. They are
        replaced by random columns, which keep the basis a superset of the Krylov space.
        """
        scale = float(torch.linalg.vector_norm(block, dim=0).max())
        Q, R = torch.linalg.qr(self._project_out(block, local_first=True))
        deficient = R.diagonal().abs() <= 1e-4 * scale
        if bool(deficient.any()):
            block = block.clone()
            block[:, deficient] = self._random(int(deficient.sum()))
            Q, _ = torch.linalg.qr(self._project_out(block, local_first=False))
            Q, _ = torch.linalg.qr(self._project_out(Q, local_first=False))
        return Q


def _error_bounds(pairs: _RitzPairs, k: int) -> torch.Tensor:
    """Bound ``|sigma_i^2 - theta_i|`` for the top ``k`` Ritz values (float64, shape ``(k,)``).

    A Ritz value with residual ``rho`` lies within ``rho`` of an eigenvalue of ``W^T W``, and
    within ``rho^2 / gap`` when no other eigenvalue is closer than ``gap`` (Kato-Temple). The
    gap comes from the neighbouring Ritz values: the one above is a lower bound of its
    eigenvalue, and the one below is within its own residual. Like any bound computed from a
    Krylov space, it assumes that the start block is not orthogonal to a top singular vector,
    an event of negligible probability for a Gaussian block.
    """
    theta, rho = pairs.theta, pairs.residuals
    above = torch.cat([theta.new_tensor([math.inf]), theta[:-1] - theta[1:]])[:k]
    if len(theta) > k:
        below = theta[:k] - theta[1 : k + 1] - rho[1 : k + 1]
    else:  # the basis is the whole space: the last Ritz value has no neighbour below
        below = torch.cat([theta[:-1] - theta[1:] - rho[1:], theta.new_tensor([math.inf])])[:k]
    gap = torch.minimum(above, below)
    rho = rho[:k]
    return torch.where(gap > rho, rho * rho / gap.clamp_min(1e-300), rho)


def _bound_ratio(pairs: _RitzPairs, k: int, frobenius_sq: float, rtol: float) -> float:
    """Return the worst ratio of an error bound to its tolerance; 1 or less means converged.

    Ritz values never exceed their eigenvalues (``theta_i <= sigma_i^2``, Cauchy interlacing),
    so ``sigma_i - s_i = (sigma_i^2 - theta_i) / (sigma_i + s_i) <= error_i / (2 s_i)``, and the
    energy error is at most ``sum(error_i) / ||W||_F^2``.
    """
    errors = _error_bounds(pairs, k)
    theta = pairs.theta[:k].clamp_min(0.0)
    value_ratio = float((errors / (2 * rtol * theta).clamp_min(1e-300)).max())
    energy_ratio = float(errors.sum()) / frobenius_sq / ENERGY_ATOL
    return max(value_ratio, energy_ratio)


def _run_krylov(
    tall: torch.Tensor, k: int, *, seed: int, frobenius_sq: float, rtol: float, max_size: int
) -> tuple[_KrylovBasis, _RitzPairs] | None:
    """Grow a Krylov basis until the top ``k`` Ritz values meet the bounds; None past ``max_size``."""
    block = _block_size(k)
    basis = _KrylovBasis(tall, block, seed, capacity=max_size)
    history: list[tuple[int, float]] = []
    next_check = 2
    while basis.size < max_size:
        basis.extend()
        steps = basis.steps
        if steps < next_check and basis.size < max_size:
            continue
        pairs = basis.ritz_pairs(k + 1)
        ratio = _bound_ratio(pairs, k, frobenius_sq, rtol)
        logger.debug("Krylov step %d, basis %d: bound/tolerance %.3g", steps, basis.size, ratio)
        if ratio <= 1.0:
            return basis, pairs
        history.append((steps, ratio))
        skip = _steps_to_skip(history)
        if skip is None or basis.size + skip * block > 2 * max_size:
            logger.debug("Krylov bound stalls at %.3g; stopping at basis %d", ratio, basis.size)
            return None
        next_check = steps + skip
    return None


def _steps_to_skip(history: list[tuple[int, float]]) -> int | None:
    """Predict the steps before the next useful convergence check; None when the bound stalls.

    Each check costs an eigensolve of the projected matrix, so checks are spread out by
    extrapolating the log of the bound linearly. Convergence speeds up as the basis grows,
    so the 0.6 factor errs towards early checks.
    """
    if len(history) < 2:
        return 1
    (step_a, ratio_a), (step_b, ratio_b) = history[-2:]
    rate = (math.log(ratio_a) - math.log(ratio_b)) / (step_b - step_a)
    if rate <= 0.02:
        return None if len(history) >= 3 else 1
    return max(1, int(0.6 * math.log(ratio_b) / rate))


def _krylov_values(tall: torch.Tensor, k: int, *, seed: int, frobenius_sq: float, max_size: int) -> np.ndarray | None:
    """Return the top ``k`` singular values by block Krylov, or None when the bound is not met."""
    result = _run_krylov(tall, k, seed=seed, frobenius_sq=frobenius_sq, rtol=VALUE_RTOL, max_size=max_size)
    if result is None:
        return None
    _, values, _ = result[0].vectors(result[1], k)
    return np.sort(values.cpu().numpy())[::-1]


def _krylov_triplets(
    tall: torch.Tensor, r: int, *, seed: int, frobenius_sq: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Return the top ``r`` triplets ``(U (m, r), S (r,), V (n, r))`` in float64 by block Krylov, or None."""
    max_size = tall.shape[1] // 2
    result = _run_krylov(tall, r, seed=seed, frobenius_sq=frobenius_sq, rtol=VECTOR_RTOL, max_size=max_size)
    if result is None:
        return None
    image, values, right = result[0].vectors(result[1], r)
    order = torch.argsort(values, descending=True)
    values = values[order]
    return _left_vectors(image[:, order], values), values, right[:, order]


_METHODS: dict[str, Callable[..., np.ndarray | None]] = {
    "krylov": _krylov_values,
    "gram": _gram_values,
    "exact": _zero_values,
}
