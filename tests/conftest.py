import os

import pytest

# Tests never reach the network: the Hub code paths run against cache folders laid out in tmp_path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_spectra_cache(tmp_path_factory, monkeypatch):
    """Keep every test's spectra cache out of the user's home folder."""
    monkeypatch.setenv("LAMDA_SPECTRA_CACHE", str(tmp_path_factory.mktemp("spectra-cache")))
