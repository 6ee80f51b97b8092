"""Spectra cache: round trip, reuse rules, corrupt entries and keys."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lamda_spectra import cache as cache_module
from lamda_spectra.cache import SpectraCache
from lamda_spectra.errors import LamdaWarning
from lamda_spectra.spectra import Spectrum

FINGERPRINT = "sha256:" + "ab" * 32
TENSOR = "model.layers.0.mlp.up_proj.weight"


def make_spectrum(n_values: int = 8, *, shape=(64, 32), full: bool = False) -> Spectrum:
    values = np.linspace(10.0, 1.0, n_values)
    return Spectrum(
        singular_values=values,
        frobenius_sq=float(np.sum(values**2)) + 3.0,
        shape=shape,
        method="krylov",
        full=full,
    )


def test_round_trip(tmp_path):
    cache = SpectraCache(tmp_path)
    spectrum = make_spectrum()
    path = cache.store(FINGERPRINT, TENSOR, spectrum)
    assert path is not None and path.is_file()
    assert path.parent.parent == tmp_path
    loaded = cache.load(FINGERPRINT, TENSOR, 8, False)
    np.testing.assert_array_equal(loaded.singular_values, spectrum.singular_values)
    assert loaded.frobenius_sq == spectrum.frobenius_sq
    assert loaded.shape == spectrum.shape
    assert loaded.method == spectrum.method
    assert loaded.full == spectrum.full
    assert loaded.singular_values.dtype == np.float64
    assert (cache.hits, cache.misses, cache.stores) == (1, 0, 1)


def test_reuse_for_smaller_k(tmp_path):
    cache = SpectraCache(tmp_path)
    cache.store(FINGERPRINT, TENSOR, make_spectrum(8))
    loaded = cache.load(FINGERPRINT, TENSOR, 3, False)
    np.testing.assert_array_equal(loaded.singular_values, make_spectrum(8).singular_values[:3])
    assert not loaded.full
    assert cache.hits == 1


def test_miss_for_larger_k_or_full(tmp_path):
    cache = SpectraCache(tmp_path)
    cache.store(FINGERPRINT, TENSOR, make_spectrum(8))
    assert cache.load(FINGERPRINT, TENSOR, 9, False) is None
    assert cache.load(FINGERPRINT, TENSOR, 4, True) is None
    assert (cache.hits, cache.misses) == (0, 2)


def test_full_entry_serves_any_request(tmp_path):
    cache = SpectraCache(tmp_path)
    cache.store(FINGERPRINT, TENSOR, make_spectrum(32, full=True))
    assert len(cache.load(FINGERPRINT, TENSOR, 64, False).singular_values) == 32
    assert cache.load(FINGERPRINT, TENSOR, 4, False).full is False
    assert cache.load(FINGERPRINT, TENSOR, 4, True).full is True
    assert cache.hits == 3


def test_missing_entry_is_a_miss(tmp_path):
    cache = SpectraCache(tmp_path)
    assert cache.load(FINGERPRINT, TENSOR, 1, False) is None
    assert cache.misses == 1


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_corrupt_entry_warns(tmp_path, content):
    cache = SpectraCache(tmp_path)
    path = cache.store(FINGERPRINT, TENSOR, make_spectrum())
    path.write_bytes(content)
    with pytest.warns(LamdaWarning, match=f"spectra cache entry {path} for tensor {TENSOR} is unreadable"):
        assert cache.load(FINGERPRINT, TENSOR, 4, False) is None
    assert cache.misses == 1
    # The caller recomputes and overwrites the entry.
    cache.store(FINGERPRINT, TENSOR, make_spectrum())
    assert cache.load(FINGERPRINT, TENSOR, 4, False) is not None


def test_entry_with_invalid_values_warns(tmp_path):
    cache = SpectraCache(tmp_path)
    bad = make_spectrum()
    bad = Spectrum(np.array([1.0, np.nan]), bad.frobenius_sq, bad.shape, bad.method, bad.full)
    cache.store(FINGERPRINT, TENSOR, bad)
    with pytest.warns(LamdaWarning, match="not a finite non-negative vector"):
        assert cache.load(FINGERPRINT, TENSOR, 1, False) is None


def test_key_changes_with_fingerprint_tensor_and_method(tmp_path, monkeypatch):
    cache = SpectraCache(tmp_path)
    path = cache.entry_path(FINGERPRINT, TENSOR)
    assert cache.entry_path("sha256:" + "cd" * 32, TENSOR) != path
    assert cache.entry_path(FINGERPRINT, "model.layers.1.mlp.up_proj.weight") != path
    cache.store(FINGERPRINT, TENSOR, make_spectrum())
    assert cache.load("sha256:" + "cd" * 32, TENSOR, 1, False) is None
    monkeypatch.setattr(cache_module, "METHOD_VERSION", "another-method")
    assert cache.entry_path(FINGERPRINT, TENSOR) != path
    assert cache.load(FINGERPRINT, TENSOR, 1, False) is None


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_SPECTRA_CACHE", str(tmp_path / "from-env"))
    assert SpectraCache().root == tmp_path / "from-env"
    monkeypatch.delenv("LAMDA_SPECTRA_CACHE")
    assert SpectraCache().root == cache_module.DEFAULT_CACHE_DIR.expanduser()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_cache_warns_once(tmp_path):
    root = tmp_path / "read-only"
    root.mkdir()
    root.chmod(0o500)
    cache = SpectraCache(root)
    with pytest.warns(LamdaWarning, match="cannot write the spectra cache"):
        assert cache.store(FINGERPRINT, TENSOR, make_spectrum()) is None
    assert cache.store(FINGERPRINT, "other.weight", make_spectrum()) is None
    assert cache.stores == 0


def test_unwritable_cache_path_warns(tmp_path):
    # A file where the cache folder should be: works the same for root and other users.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    cache = SpectraCache(blocker)
    with pytest.warns(LamdaWarning, match="cannot write the spectra cache under"):
        assert cache.store(FINGERPRINT, TENSOR, make_spectrum()) is None


def test_entry_of_other_tensor_warns(tmp_path):
    cache = SpectraCache(tmp_path)
    source = cache.store(FINGERPRINT, TENSOR, make_spectrum())
    other = cache.entry_path(FINGERPRINT, "model.layers.1.mlp.up_proj.weight")
    other.write_bytes(source.read_bytes())
    with pytest.warns(LamdaWarning, match=f"belongs to tensor {TENSOR}"):
        assert cache.load(FINGERPRINT, "model.layers.1.mlp.up_proj.weight", 1, False) is None


def test_one_file_per_tensor(tmp_path):
    cache = SpectraCache(tmp_path)
    first = cache.store(FINGERPRINT, TENSOR, make_spectrum())
    second = cache.store(FINGERPRINT, "model.layers.1.mlp.up_proj.weight", make_spectrum())
    assert first != second
    assert first.parent == second.parent
    assert sorted(path.name for path in first.parent.iterdir()) == sorted([first.name, second.name])
