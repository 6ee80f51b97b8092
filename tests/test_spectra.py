"""Spectra: accuracy of every method against exact values and float64 SVDs, metrics and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lamda_spectra.errors import SpectrumError, UsageError
from lamda_spectra.spectra import (
    Spectrum,
    compute_spectrum,
    energy_score,
    spectrum_metrics,
    top_svd,
)
from checkpoints import matrix_with_singular_values, minilm_path

# The accuracy contract of compute_spectrum.
VALUE_RTOL = 1e-3
ENERGY_ATOL = 1e-4

SLOW_DECAY = [float(v) for v in range(100, 50, -1)]  # 100, 99, ..., 51, then zeros


def exact_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values from torch's float64 SVD, the independent reference."""
    return torch.linalg.svdvals(matrix.to(torch.float64)).numpy()


def energy_errors(spectrum: Spectrum, reference: np.ndarray, matrix: torch.Tensor, ranks) -> list[float]:
    """Absolute energy-score errors at each base rank, against the float64 reference."""
    total = float(torch.sum(matrix.to(torch.float64) ** 2))
    return [abs(energy_score(spectrum, r0) - float(np.sum(reference[:r0] ** 2)) / total) for r0 in ranks]


def assert_values_close(values: np.ndarray, reference: np.ndarray, *, zero_atol: float = 0.0) -> None:
    reference = reference[: len(values)]
    np.testing.assert_allclose(values, reference, rtol=VALUE_RTOL, atol=zero_atol)


@pytest.fixture(scope="module")
def slow_decay() -> tuple[torch.Tensor, np.ndarray]:
    matrix = matrix_with_singular_values(1500, 1200, SLOW_DECAY, seed=1).to(torch.float32)
    return matrix, exact_values(matrix)


@pytest.fixture(scope="module")
def gaussian() -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(2048, 1536, generator=generator)
    return matrix, exact_values(matrix)


@pytest.fixture(scope="module")
def minilm_weights() -> dict[str, torch.Tensor]:
    names = (
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    )
    with safe_open(str(minilm_path() / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in names}


# --- known singular values ---------------------------------------------------------------


def test_small_matrix_known_values():
    values = [10.0, 5.0, 2.0, 1.0, 0.5, 0.25]
    matrix = matrix_with_singular_values(300, 200, values, seed=0).to(torch.float32)
    spectrum = compute_spectrum(matrix, 6, device="cpu")
    assert spectrum.method == "gram"
    np.testing.assert_allclose(spectrum.singular_values, values, rtol=VALUE_RTOL)
    assert_values_close(spectrum.singular_values, exact_values(matrix))
    assert spectrum.frobenius_sq == pytest.approx(sum(v * v for v in values), rel=1e-6)
    assert spectrum.shape == (300, 200)
    assert not spectrum.full


def test_slow_decay_uses_krylov(slow_decay):
    matrix, reference = slow_decay
    spectrum = compute_spectrum(matrix, 50)
    assert spectrum.method == "krylov"
    np.testing.assert_allclose(spectrum.singular_values, SLOW_DECAY, rtol=VALUE_RTOL)
    assert_values_close(spectrum.singular_values, reference)
    assert max(energy_errors(spectrum, reference, matrix, range(51))) < ENERGY_ATOL


def test_slow_decay_zeros_fall_back(slow_decay):
    # Values 51-64 are zero. No residual bound can prove them relative to their size, so
    # the Krylov run gives way to the exact Gram eigensolve.
    matrix, reference = slow_decay
    spectrum = compute_spectrum(matrix, 64)
    assert spectrum.method == "gram"
    assert_values_close(spectrum.singular_values, reference, zero_atol=1e-5)
    assert max(energy_errors(spectrum, reference, matrix, range(65))) < ENERGY_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(slow_decay, dtype):
    stored = slow_decay[0].to(dtype)
    reference = exact_values(stored)
    spectrum = compute_spectrum(stored, 50)
    assert spectrum.method == "krylov"
    assert_values_close(spectrum.singular_values, reference)
    assert max(energy_errors(spectrum, reference, stored, range(51))) < ENERGY_ATOL


def test_wide_matches_tall(slow_decay):
    matrix, _ = slow_decay
    tall = compute_spectrum(matrix, 50)
    wide = compute_spectrum(matrix.T, 50)
    assert wide.shape == (1200, 1500)
    assert wide.method == tall.method
    np.testing.assert_allclose(wide.singular_values, tall.singular_values, rtol=1e-6)


def test_same_seed_same_values(slow_decay):
    matrix, _ = slow_decay
    first = compute_spectrum(matrix, 20, seed=7)
    again = compute_spectrum(matrix, 20, seed=7)
    other = compute_spectrum(matrix, 20, seed=8)
    np.testing.assert_array_equal(first.singular_values, again.singular_values)
    np.testing.assert_allclose(other.singular_values, first.singular_values, rtol=VALUE_RTOL)


def test_repeated_values_low_rank():
    # Forty equal values: the Krylov space is exhausted after one step.
    matrix = matrix_with_singular_values(1500, 1100, [5.0] * 40, seed=2).to(torch.float32)
    spectrum = compute_spectrum(matrix, 40)
    assert spectrum.method == "krylov"
    np.testing.assert_allclose(spectrum.singular_values, 5.0, rtol=VALUE_RTOL)
    assert energy_score(spectrum, 40) == pytest.approx(1.0, abs=ENERGY_ATOL)


def test_equal_values_wider_than_block():
    # Sixty equal top values exceed the block width (48 for k=64); the deficient products are
    # replaced by random columns, through which the Krylov space finds the rest of them.
    values = [10.0] * 60 + [3.0 * 0.7**i for i in range(200)]
    matrix = matrix_with_singular_values(1500, 1200, values, seed=3).to(torch.float32)
    spectrum = compute_spectrum(matrix, 64)
    assert spectrum.method == "krylov"
    assert_values_close(spectrum.singular_values, exact_values(matrix))


# --- flat spectra and real weights --------------------------------------------------------


def test_gaussian_auto_krylov(gaussian):
    matrix, reference = gaussian
    spectrum = compute_spectrum(matrix, 16)
    assert spectrum.method == "krylov"
    assert_values_close(spectrum.singular_values, reference)
    assert max(energy_errors(spectrum, reference, matrix, [1, 4, 16])) < ENERGY_ATOL


def test_gaussian_forced_krylov(gaussian):
    # At k=64 the automatic choice hands this flat spectrum to the Gram eigensolve. Forcing
    # the Krylov run checks its bound where convergence is slowest.
    matrix, reference = gaussian
    spectrum = compute_spectrum(matrix, 64, method="krylov")
    assert spectrum.method == "krylov"
    assert_values_close(spectrum.singular_values, reference)
    assert max(energy_errors(spectrum, reference, matrix, [1, 4, 16, 64])) < ENERGY_ATOL


@pytest.mark.parametrize("method", ["auto", "krylov"])
@pytest.mark.parametrize("k", [16, 64])
def test_minilm_weights(minilm_weights, method, k):
    for name, weight in minilm_weights.items():
        reference = exact_values(weight)
        spectrum = compute_spectrum(weight, k, method=method)
        assert spectrum.method == ("gram" if method == "auto" else "krylov"), name
        assert_values_close(spectrum.singular_values, reference)
        assert max(energy_errors(spectrum, reference, weight, range(k + 1))) < ENERGY_ATOL, name


def test_full_spectrum_effective_rank(minilm_weights):
    weight = minilm_weights["encoder.layer.3.intermediate.dense.weight"]
    reference = exact_values(weight)
    spectrum = compute_spectrum(weight, 8, full=True)
    assert spectrum.full
    assert spectrum.method == "gram"
    assert len(spectrum.singular_values) == 384
    assert_values_close(spectrum.singular_values, reference)
    p = reference**2 / np.sum(reference**2)
    expected = math.exp(-np.sum(p * np.log(p)))
    assert spectrum_metrics(spectrum)["effective_rank"] == pytest.approx(expected, rel=1e-9)


# --- edge cases ---------------------------------------------------------------------------


def test_k_above_min_dim_returns_all():
    matrix = matrix_with_singular_values(120, 80, [3.0, 2.0, 1.0], seed=4).to(torch.float32)
    spectrum = compute_spectrum(matrix, 500)
    assert spectrum.full
    assert len(spectrum.singular_values) == 80
    np.testing.assert_allclose(spectrum.singular_values[:3], [3.0, 2.0, 1.0], rtol=VALUE_RTOL)
    np.testing.assert_allclose(spectrum.singular_values[3:], 0.0, atol=1e-5)
    assert energy_score(spectrum, 1000) == pytest.approx(1.0, abs=1e-12)


def test_all_zero_weight():
    spectrum = compute_spectrum(torch.zeros(40, 30, dtype=torch.bfloat16), 8)
    assert spectrum.method == "exact"
    assert spectrum.frobenius_sq == 0.0
    np.testing.assert_array_equal(spectrum.singular_values, np.zeros(8))
    assert energy_score(spectrum, 8) == 0.0
    metrics = spectrum_metrics(spectrum)
    assert metrics["spectral_norm"] == 0.0
    assert metrics["frobenius_norm"] == 0.0
    assert math.isnan(metrics["stable_rank"])


def test_frobenius_in_float64():
    # Each square, 1 + 2^-11 + 2^-24, is exact in float64, but float32 rounds off the 2^-24.
    matrix = torch.full((64, 64), 1.0 + 2.0**-12, dtype=torch.float32)
    expected = 64 * 64 * (1.0 + 2.0**-12) ** 2
    assert compute_spectrum(matrix, 1).frobenius_sq == pytest.approx(expected, rel=1e-13, abs=0)
    assert float(torch.sum(matrix * matrix)) != pytest.approx(expected, rel=1e-13, abs=0)


def test_metrics_values():
    values = [4.0, 2.0, 1.0]
    matrix = matrix_with_singular_values(50, 40, values, seed=5)
    spectrum = compute_spectrum(matrix, 2)
    metrics = spectrum_metrics(spectrum)
    assert metrics["spectral_norm"] == pytest.approx(4.0, rel=1e-12)
    assert metrics["frobenius_norm"] == pytest.approx(math.sqrt(21.0), rel=1e-12)
    assert metrics["stable_rank"] == pytest.approx(21.0 / 16.0, rel=1e-12)
    assert math.isnan(metrics["effective_rank"])
    assert energy_score(spectrum, 2) == pytest.approx(20.0 / 21.0, rel=1e-12)


# --- errors -------------------------------------------------------------------------------


def test_energy_score_beyond_values():
    spectrum = compute_spectrum(matrix_with_singular_values(50, 40, [1.0], seed=0), 4)
    with pytest.raises(SpectrumError, match="contains 4 singular values, fewer than r0=5"):
        energy_score(spectrum, 5)
    with pytest.raises(SpectrumError, match="r0=-1 is invalid"):
        energy_score(spectrum, -1)


def test_rejects_quantized_and_vectors():
    with pytest.raises(SpectrumError, match="dtype torch.int8; quantized or packed"):
        compute_spectrum(torch.zeros(8, 8, dtype=torch.int8), 2)
    with pytest.raises(SpectrumError, match="got shape \\(8,\\)"):
        compute_spectrum(torch.zeros(8), 2)


def test_rejects_nonfinite_weight():
    matrix = torch.eye(8)
    matrix[2, 3] = float("nan")
    with pytest.raises(SpectrumError, match="contains NaN or Inf values"):
        compute_spectrum(matrix, 2)


def test_rejects_bad_arguments():
    matrix = torch.eye(8)
    with pytest.raises(UsageError, match="k=0 is invalid"):
        compute_spectrum(matrix, 0)
    with pytest.raises(UsageError, match="method 'svd' is unknown"):
        compute_spectrum(matrix, 2, method="svd")
    with pytest.raises(UsageError, match="rank r=9 is invalid for a \\(8, 8\\) weight"):
        top_svd(matrix, 9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_unavailable():
    with pytest.raises(UsageError, match="CUDA is not available; use 'cpu'"):
        compute_spectrum(torch.eye(8), 2, device="cuda")


# --- top_svd ------------------------------------------------------------------------------


def best_rank_r(matrix: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def assert_triplets(matrix: torch.Tensor, r: int, U, S, Vh, *, rtol: float) -> None:
    d_out, d_in = matrix.shape
    assert U.shape == (d_out, r)
    assert S.shape == (r,)
    assert Vh.shape == (r, d_in)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, atol=1e-5, rtol=0)
    expected = best_rank_r(matrix, r)
    approx = (U.double() * S.double()) @ Vh.double()
    assert float(torch.linalg.norm(approx - expected) / torch.linalg.norm(expected)) < rtol
    pivots = U.abs().argmax(dim=0)
    assert bool((U[pivots, torch.arange(r)] > 0).all())


@pytest.mark.parametrize("transpose", [False, True])
def test_top_svd_minilm(minilm_weights, transpose):
    weight = minilm_weights["encoder.layer.5.output.dense.weight"]
    weight = weight.T if transpose else weight
    U, S, Vh = top_svd(weight, 16)
    assert_triplets(weight, 16, U, S, Vh, rtol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_top_svd_krylov_path(transpose):
    values = torch.arange(1, 1201, dtype=torch.float64) ** -0.5
    matrix = matrix_with_singular_values(1500, 1200, values, seed=6).to(torch.float32)
    matrix = matrix.T if transpose else matrix
    U, S, Vh = top_svd(matrix, 16)
    assert_triplets(matrix, 16, U, S, Vh, rtol=1e-5)


def test_top_svd_deterministic_signs():
    matrix = matrix_with_singular_values(60, 40, [3.0, 2.0, 1.0], seed=7)
    first = top_svd(matrix, 3)
    flipped = top_svd(-matrix, 3)
    torch.testing.assert_close(first[1], flipped[1])
    # Negating W flips one factor of each pair, and the sign convention puts it on Vh.
    torch.testing.assert_close(first[0], flipped[0])
    torch.testing.assert_close(first[2], -flipped[2])


def test_top_svd_rank_deficient():
    # Values 4-8 are zero, so their left vectors are completed to an orthonormal set.
    matrix = matrix_with_singular_values(1500, 1200, [3.0, 2.0, 1.0], seed=8).to(torch.float32)
    U, S, Vh = top_svd(matrix, 8)
    torch.testing.assert_close(S[:3], torch.tensor([3.0, 2.0, 1.0]), rtol=1e-5, atol=0)
    assert float(S[3:].max()) < 1e-5
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, matrix, atol=1e-5, rtol=0)
