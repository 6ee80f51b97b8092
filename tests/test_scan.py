import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from lamda_spectra.errors import LamdaError, LamdaWarning, SpectrumError
from lamda_spectra.scan import SPECTRA_COLUMNS, read_spectra_csv, scan, write_spectra_csv

from checkpoints import minilm_path, write_gpt2, write_known_spectra


def _exact_singular_values(weight: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(weight.to(torch.float64)).numpy()


def test_minilm_matches_exact_svd():
    table = scan(minilm_path(), top_k=32, use_cache=False)
    weights = load_file(str(minilm_path() / "model.safetensors"))

    assert len(table) == 36
    assert list(table.columns) == list(SPECTRA_COLUMNS)
    for row in table.itertuples():
        exact = _exact_singular_values(weights[row.tensor])
        np.testing.assert_allclose(row.singular_values, exact[: row.n_values], rtol=1e-3)
        assert row.n_values == 32
        assert row.frobenius_norm == pytest.approx(float(np.sqrt(np.sum(exact**2))), rel=1e-9)
        assert row.stable_rank == pytest.approx(float(np.sum(exact**2) / exact[0] ** 2), rel=1e-6)


def test_known_spectrum_values(tmp_path):
    values = [float(v) for v in range(100, 50, -1)]
    write_known_spectra(tmp_path, {"model.layers.0.mlp.up_proj": (96, 80, values)})

    table = scan(tmp_path, top_k=60, use_cache=False)

    expected = np.array(values + [0.0] * 10)
    np.testing.assert_allclose(table.loc[0, "singular_values"][:50], expected[:50], rtol=1e-5)
    assert table.loc[0, "spectral_norm"] == pytest.approx(100.0, rel=1e-6)
    assert table.loc[0, "frobenius_norm"] == pytest.approx(np.sqrt(np.sum(np.square(values))), rel=1e-6)


def test_gpt2_conv1d_transposed(tmp_path):
    write_gpt2(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))

    table = scan(tmp_path, top_k=8, use_cache=False)

    row = table.set_index("module").loc["transformer.h.0.attn.c_attn"]
    assert row.layout == "conv1d"
    assert (row.d_out, row.d_in) == (144, 48)
    exact = _exact_singular_values(weights["transformer.h.0.attn.c_attn.weight"])
    np.testing.assert_allclose(row.singular_values, exact[:8], rtol=1e-3)


def _write_single(folder: Path, weight: torch.Tensor, name: str = "model.layers.0.self_attn.q_proj") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.weight": weight}, str(folder / "model.safetensors"))
    return folder


def test_nonfinite_weight_rejected(tmp_path):
    weight = torch.randn(16, 16)
    weight[0, 0] = float("nan")
    weight[1, :3] = float("inf")
    _write_single(tmp_path, weight)

    with pytest.raises(SpectrumError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight .*1 NaN and 3 Inf"):
        scan(tmp_path, use_cache=False)


def test_nonfinite_weight_skipped(tmp_path):
    weight = torch.randn(16, 16)
    weight[2, 2] = float("nan")
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": weight,
            "model.layers.0.self_attn.k_proj.weight": torch.randn(16, 16),
        },
        str(folder / "model.safetensors"),
    )

    with pytest.warns(LamdaWarning, match="q_proj.weight .*1 NaN"):
        table = scan(folder, skip_nonfinite=True, use_cache=False)

    assert list(table["module"]) == ["model.layers.0.self_attn.k_proj"]


def test_all_zero_weight_warns(tmp_path):
    _write_single(tmp_path, torch.zeros(12, 20))

    with pytest.warns(LamdaWarning, match="all zeros"):
        table = scan(tmp_path, use_cache=False)

    assert table.loc[0, "frobenius_norm"] == 0.0
    assert table.loc[0, "spectral_norm"] == 0.0


def test_cache_skips_svd_on_rescan(tmp_path):
    cache = tmp_path / "cache"
    first = scan(minilm_path(), top_k=16, cache_dir=cache)
    second = scan(minilm_path(), top_k=8, cache_dir=cache)

    assert (first.attrs["computed"], first.attrs["cached"]) == (36, 0)
    assert (second.attrs["computed"], second.attrs["cached"]) == (0, 36)
    for a, b in zip(first["singular_values"], second["singular_values"]):
        np.testing.assert_array_equal(a[:8], b)


def test_cache_recomputes_for_more_values(tmp_path):
    cache = tmp_path / "cache"
    scan(minilm_path(), top_k=8, cache_dir=cache)

    larger = scan(minilm_path(), top_k=16, cache_dir=cache)

    assert larger.attrs["computed"] == 36


def test_interrupted_scan_resumes(tmp_path):
    cache = tmp_path / "cache"

    def stop_after_five(done, total, module):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(minilm_path(), top_k=8, cache_dir=cache, progress=stop_after_five)
    resumed = scan(minilm_path(), top_k=8, cache_dir=cache)

    assert (resumed.attrs["computed"], resumed.attrs["cached"]) == (31, 5)


def test_corrupt_cache_entry_recomputed(tmp_path):
    cache = tmp_path / "cache"
    reference = scan(minilm_path(), top_k=8, cache_dir=cache)
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert entries, "the scan wrote no cache entries"
    entries[0].write_bytes(b"not an array file")

    with pytest.warns(LamdaWarning):
        again = scan(minilm_path(), top_k=8, cache_dir=cache)

    assert again.attrs["computed"] == 1
    for a, b in zip(reference["singular_values"], again["singular_values"]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_spectra_csv_round_trip(tmp_path):
    table = scan(minilm_path(), top_k=8, use_cache=False)

    loaded = read_spectra_csv(write_spectra_csv(table, tmp_path / "spectra.csv"))

    assert list(loaded["module"]) == list(table["module"])
    for a, b in zip(table["singular_values"], loaded["singular_values"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded["frobenius_norm"], table["frobenius_norm"])
    assert loaded.attrs["fingerprint"] == table.attrs["fingerprint"]


def test_spectra_csv_missing_columns(tmp_path):
    path = tmp_path / "spectra.csv"
    path.write_text("module,tensor\nencoder.layer.0.attention.self.query,x\n")

    with pytest.raises(LamdaError, match=r"spectra\.csv lacks columns layout, d_out"):
        read_spectra_csv(path)



def _small_spectra_csv(tmp_path, n_rows=3):
    """Write a spectra.csv of ``n_rows`` modules with 4 singular values each and return its path and text."""
    rows = [
        {
            "module": f"encoder.layer.{index}.attention.self.query",
            "tensor": f"encoder.layer.{index}.attention.self.query.weight",
            "layout": "linear",
            "d_out": 8,
            "d_in": 8,
            "dtype": "F32",
            "frobenius_norm": 5.0,
            "spectral_norm": 4.0,
            "stable_rank": 1.5625,
            "effective_rank": float("nan"),
            "n_values": 4,
            "full": False,
            "method": "exact",
            "singular_values": np.array([4.0, 2.0, 1.0, 0.5]),
            "fingerprint": "ab" * 32,
        }
        for index in range(n_rows)
    ]
    path = write_spectra_csv(pd.DataFrame(rows, columns=list(SPECTRA_COLUMNS)), tmp_path / "spectra.csv")
    return path, path.read_text()


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda text: text[: text.rindex(",linear,") + 5], id="in-layout"),
        pytest.param(lambda text: text[: text.rindex(" 1.0 0.5,") + 4], id="in-singular-values"),
        pytest.param(lambda text: text[: text.rindex("abab") + 2], id="in-fingerprint"),
        pytest.param(lambda text: text[: text.rindex(",abab") + 1], id="before-fingerprint"),
    ],
)
def test_spectra_csv_truncated_last_row(tmp_path, cut):
    path, text = _small_spectra_csv(tmp_path)
    path.write_text(cut(text))

    with pytest.raises(LamdaError, match=r"spectra\.csv looks truncated: its last row \(line 4\) ") as raised:
        read_spectra_csv(path)

    assert str(path) in str(raised.value)
    assert str(raised.value).endswith("; rerun lamda-plan to regenerate it")


def test_spectra_csv_truncated_field_count(tmp_path):
    path, text = _small_spectra_csv(tmp_path)
    path.write_text(text[: text.rindex(",linear,") + 5])

    with pytest.raises(LamdaError, match=r"its last row \(line 4\) has 3 of 15 fields;"):
        read_spectra_csv(path)


def test_spectra_csv_short_middle_row(tmp_path):
    path, text = _small_spectra_csv(tmp_path)
    lines = text.splitlines(keepends=True)
    lines[2] = lines[2][: lines[2].index(",F32,")] + "\n"
    path.write_text("".join(lines))

    with pytest.raises(
        LamdaError,
        match=r"spectra\.csv is malformed: line 3 \(module encoder\.layer\.1\.attention\.self\.query\) has 5 of 15 fields",
    ):
        read_spectra_csv(path)


def test_spectra_csv_value_count_mismatch(tmp_path):
    path, text = _small_spectra_csv(tmp_path)
    path.write_text(text.replace("4.0 2.0 1.0 0.5", "4.0 2.0 1.0", 1))

    with pytest.raises(
        LamdaError,
        match=r"line 2 \(module encoder\.layer\.0\.attention\.self\.query\) has 3 singular values but n_values is 4",
    ):
        read_spectra_csv(path)


def test_spectra_csv_malformed_value_names_module(tmp_path):
    path, text = _small_spectra_csv(tmp_path)
    lines = text.splitlines(keepends=True)
    lines[2] = lines[2].replace("4.0 2.0 1.0 0.5", "4.0 abc 1.0 0.5")
    path.write_text("".join(lines))

    with pytest.raises(
        LamdaError,
        match=r"has a malformed singular_values cell on line 3 \(module encoder\.layer\.1\.attention\.self\.query\): "
        r"could not convert string to float: 'abc'",
    ):
        read_spectra_csv(path)


def test_spectra_csv_small_table_reads(tmp_path):
    path, _ = _small_spectra_csv(tmp_path)

    table = read_spectra_csv(path)

    assert len(table) == 3
    np.testing.assert_array_equal(table["singular_values"].iloc[2], [4.0, 2.0, 1.0, 0.5])
    assert table.attrs["fingerprint"] == "ab" * 32


PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from lamda_spectra.scan import scan
    table = scan(sys.argv[1], top_k=16, use_cache=False)
    # VmHWM is this process image's peak RSS; getrusage's ru_maxrss would also count the
    # parent's RSS at fork time.
    status = open("/proc/self/status").read()
    peak_mb = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
    print(json.dumps({"modules": len(table), "peak_mb": peak_mb}))
    """
)


@pytest.mark.slow
def test_peak_memory_bounded_by_largest_tensor(tmp_path):
    """Scanning must stream: peak RSS stays below 4 x largest target in float32 + 600 MB."""
    folder = tmp_path / "model"
    folder.mkdir()
    hidden = 2048
    generator = torch.Generator().manual_seed(0)
    tensors = {
        # A large non-target tensor makes loading the whole checkpoint exceed the bound.
        "model.embed_tokens.weight": torch.ones(64000, 4096, dtype=torch.bfloat16),
    }
    for layer in range(4):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{layer}.self_attn.{name}.weight"] = torch.randn(
                hidden, hidden, generator=generator, dtype=torch.bfloat16
            )
    save_file(tensors, str(folder / "model.safetensors"))
    largest_target_mb = hidden * hidden * 4 / 2**20
    total_mb = (folder / "model.safetensors").stat().st_size / 2**20
    del tensors
    assert total_mb >= 10 * largest_target_mb

    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(folder)], capture_output=True, text=True, check=True
    )

    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["modules"] == 16
    assert measured["peak_mb"] < 4 * largest_target_mb + 600


def test_source_path_relative_below_working_dir(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "weights"
    write_known_spectra(folder, {"model.layers.0.mlp.up_proj": (8, 6, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])})

    monkeypatch.chdir(tmp_path / "project")
    inside = scan(folder, top_k=2, use_cache=False).attrs["source"]["path"]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    outside = scan(folder, top_k=2, use_cache=False).attrs["source"]["path"]

    assert inside == "weights"
    assert outside == str(folder.resolve())


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        (",5.0,", ",16.6645.60,", "has frobenius_norm '16.6645.60', not a finite non-negative number"),
        (",linear,8,", ",linear,8x,", "has d_out '8x', not a finite non-negative whole number"),
        (",False,", ",maybe,", "has full 'maybe', not True or False"),
        ("4.0 2.0 1.0 0.5", "4.0 nan 1.0 0.5", "has singular values that are not finite, non-negative and descending"),
        ("4.0 2.0 1.0 0.5", "4.0 2.0 2.5 0.5", "has singular values that are not finite, non-negative and descending"),
    ],
)
def test_spectra_csv_bad_cell_names_row(tmp_path, old, new, fragment):
    path, text = _small_spectra_csv(tmp_path)
    lines = text.splitlines(keepends=True)
    assert old in lines[2]
    lines[2] = lines[2].replace(old, new, 1)
    path.write_text("".join(lines))

    with pytest.raises(LamdaError) as raised:
        read_spectra_csv(path)

    message = str(raised.value)
    assert f"spectra table {path} is malformed: line 3 (module encoder.layer.1.attention.self.query) {fragment}" in message
    assert message.endswith("; rerun lamda-plan to regenerate it")
