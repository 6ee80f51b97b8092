"""The spectra report: file names, valid PNG/HTML/CSV content, bad inputs that leave the folder unchanged."""

from __future__ import annotations

import importlib
import math
import re
import time
import warnings
from dataclasses import replace

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from lamda_spectra.errors import LamdaWarning, ReportError
from lamda_spectra.plan import ModulePlan, Plan
from lamda_spectra.cli import report_main as main
from lamda_spectra.report import COMPARE_FILES, REPORT_FILES, compare, report
from lamda_spectra.scan import SPECTRA_COLUMNS, read_spectra_csv, write_spectra_csv

# The package attribute lamda_spectra.report is the report() function, so fetch the submodule.
report_package = importlib.import_module("lamda_spectra.report")

FINGERPRINT = "ab" * 32
OTHER_FINGERPRINT = "cd" * 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BERT_TYPES = {
    "attention.self.query": (48, 48),
    "attention.self.key": (48, 48),
    "attention.self.value": (48, 48),
    "attention.output.dense": (48, 48),
    "intermediate.dense": (96, 48),
    "output.dense": (48, 96),
}
LLAMA_TYPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (160, 64),
    "mlp.up_proj": (160, 64),
    "mlp.down_proj": (64, 160),
}


def decaying_values(n: int, layer: int, layers: int, type_index: int) -> np.ndarray:
    """Singular values ``10 * i^-a``, i = 1..n, decaying faster in deeper layers and later types."""
    decay = 0.3 + 1.2 * layer / max(layers - 1, 1) + 0.1 * type_index
    return 10.0 * np.arange(1, n + 1, dtype=np.float64) ** -decay


def synthetic_spectra(
    layers: int,
    types: dict[str, tuple[int, int]],
    *,
    stack: str = "model.layers",
    top_k: int | None = 24,
    others: dict[str, tuple[int, int]] | None = None,
    fingerprint: str = FINGERPRINT,
) -> pd.DataFrame:
    """A spectra table with the scan's columns for ``layers`` blocks of ``types`` modules.

    ``top_k=None`` keeps the full spectrum; otherwise the energy of the dropped tail still
    counts in the Frobenius norm, as in a real scan.
    """
    entries = [
        (f"{stack}.{layer}.{kind}", shape, layer, layers, index)
        for layer in range(layers)
        for index, (kind, shape) in enumerate(types.items())
    ]
    entries += [(name, shape, 0, 1, 0) for name, shape in (others or {}).items()]
    rows = []
    for name, (d_out, d_in), layer, depth, index in entries:
        values = decaying_values(min(d_out, d_in), layer, depth, index)
        kept = values if top_k is None else values[:top_k]
        p = values**2 / np.sum(values**2)
        rows.append(
            {
                "module": name,
                "tensor": f"{name}.weight",
                "layout": "linear",
                "d_out": d_out,
                "d_in": d_in,
                "dtype": "F32",
                "frobenius_norm": math.sqrt(np.sum(values**2)),
                "spectral_norm": values[0],
                "stable_rank": np.sum(values**2) / values[0] ** 2,
                "effective_rank": math.exp(-np.sum(p * np.log(p))) if top_k is None else math.nan,
                "n_values": len(kept),
                "full": len(kept) == len(values),
                "method": "exact",
                "singular_values": kept.copy(),
                "fingerprint": fingerprint,
            }
        )
    table = pd.DataFrame(rows, columns=list(SPECTRA_COLUMNS))
    table.attrs.update(
        source={"kind": "folder", "path": "/synthetic", "model_name": "synthetic"},
        fingerprint=fingerprint,
        top_k=int(table["n_values"].max()),
        full_spectrum=top_k is None,
    )
    return table


def synthetic_plan(spectra: pd.DataFrame, r0: int = 8, fingerprint: str = FINGERPRINT) -> Plan:
    """A plan whose ranks follow the energy score ``E`` (rank ``round(2 * r0 * E)``, at least 1)."""
    modules = {}
    for row in spectra.itertuples():
        values = row.singular_values
        shares = np.cumsum(values**2) / row.frobenius_norm**2
        energy = float(shares[r0 - 1])
        rank = int(min(max(1, round(2 * r0 * energy)), len(values)))
        modules[row.module] = ModulePlan(
            rank=rank,
            shape=(row.d_out, row.d_in),
            layout=row.layout,
            energy_score=energy,
            captured_energy=min(float(shares[rank - 1]), 1.0),
            stable_rank=row.stable_rank,
            frobenius_norm=row.frobenius_norm,
            spectral_norm=row.spectral_norm,
            singular_values=tuple(values[: max(rank, r0)]),
        )
    settings = {"strategy": "energy", "budget": f"avg:{r0}", "r0": r0, "min_rank": 1, "max_rank": 24, "multiple_of": 1}
    source = {"kind": "folder", "path": "/synthetic", "model_name": "synthetic"}
    return Plan(source=source, fingerprint=fingerprint, settings=settings, modules=modules)


@pytest.fixture(scope="module")
def bert_inputs():
    spectra = synthetic_spectra(2, BERT_TYPES, stack="encoder.layer", top_k=None, others={"pooler.dense": (48, 48)})
    return synthetic_plan(spectra), spectra


@pytest.fixture(scope="module")
def bert_report(bert_inputs, tmp_path_factory):
    """One report shared by the tests that only read it: drawing takes about a second per figure."""
    plan, spectra = bert_inputs
    folder = tmp_path_factory.mktemp("report") / "out"
    return report(plan, spectra, folder)


def folder_state(path):
    """Names, sizes and modification times of every file under ``path``."""
    return {
        item.relative_to(path): (item.stat().st_size, item.stat().st_mtime_ns)
        for item in sorted(path.rglob("*"))
        if item.is_file()
    }


def write_old_report(folder):
    """A report folder from an earlier run, plus a file of the user's."""
    folder.mkdir(parents=True)
    (folder / "rank_map.png").write_bytes(PNG_MAGIC + b"old")
    (folder / "notes.txt").write_text("mine")
    return folder


def test_report_writes_fixed_names(bert_report):
    folder = bert_report[0].parent
    assert [path.name for path in bert_report] == list(REPORT_FILES)
    assert sorted(path.name for path in folder.iterdir()) == sorted(REPORT_FILES)
    # No staging folder is left beside the report.
    assert [path.name for path in folder.parent.iterdir()] == ["out"]


def test_report_pngs_decode(bert_report):
    for path in bert_report:
        if path.suffix != ".png":
            continue
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.ndim == 3
        assert image.shape[0] > 200
        assert image.shape[1] > 200


def test_report_html_is_self_contained(bert_report):
    text = bert_report[REPORT_FILES.index("index.html")].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text
    assert "https://" not in text
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert len(sources) == 5
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert "<link" not in text
    assert "<script" not in text
    for expected in ("synthetic", FINGERPRINT, "avg:8", "LoRA", "encoder.layer.1.output.dense", "pooler.dense"):
        assert expected in text


def test_modules_csv_round_trip(bert_inputs, bert_report):
    plan, spectra = bert_inputs
    table = pd.read_csv(bert_report[REPORT_FILES.index("modules.csv")])
    assert list(table["module"]) == list(plan.modules)
    assert list(table["rank"]) == [module.rank for module in plan.modules.values()]
    np.testing.assert_allclose(
        table["energy_score"], [module.energy_score for module in plan.modules.values()], rtol=0, atol=1e-15
    )
    assert list(table["row"]) == ["0"] * 6 + ["1"] * 6 + ["other"]
    assert list(table["label"][:6]) == ["q", "k", "v", "attn.out", "ffn.in", "ffn.out"]
    assert table.loc[12, "label"] == "pooler.dense"
    assert table["layer"].isna().sum() == 1
    expected_lora = [m.rank * (m.shape[0] + m.shape[1]) for m in plan.modules.values()]
    assert list(table["lora_params"]) == expected_lora
    assert list(table["core_params"]) == [m.rank**2 for m in plan.modules.values()]
    first = np.array(table.loc[0, "singular_values"].split(), dtype=np.float64)
    np.testing.assert_array_equal(first, spectra.loc[0, "singular_values"])


def test_spectra_csv_round_trip(bert_inputs, bert_report):
    _, spectra = bert_inputs
    table = read_spectra_csv(bert_report[REPORT_FILES.index("spectra.csv")])
    assert list(table.columns) == list(SPECTRA_COLUMNS)
    assert list(table["module"]) == list(spectra["module"])
    for read, original in zip(table["singular_values"], spectra["singular_values"]):
        np.testing.assert_array_equal(read, original)
    np.testing.assert_allclose(table["frobenius_norm"], spectra["frobenius_norm"], rtol=1e-15)


def test_report_top_values_only(tmp_path):
    spectra = synthetic_spectra(3, LLAMA_TYPES, top_k=12)
    written = report(synthetic_plan(spectra), spectra, tmp_path)
    assert all(path.is_file() for path in written)
    assert not pd.read_csv(tmp_path / "modules.csv")["full"].any()


def test_report_single_layer(tmp_path):
    spectra = synthetic_spectra(1, {"mlp.fc1": (32, 16)}, stack="blocks")
    written = report(synthetic_plan(spectra), spectra, tmp_path)
    assert matplotlib.image.imread(written[REPORT_FILES.index("rank_map.png")]).shape[0] > 100


def test_report_64_layers(tmp_path):
    spectra = synthetic_spectra(64, LLAMA_TYPES, top_k=32)
    plan = synthetic_plan(spectra)
    started = time.perf_counter()
    written = report(plan, spectra, tmp_path)
    print(f"64-layer report ({len(plan.modules)} modules): {time.perf_counter() - started:.1f} s")
    assert len(pd.read_csv(written[REPORT_FILES.index("modules.csv")])) == 64 * 7
    assert all(path.stat().st_size > 0 for path in written)


def test_fingerprint_mismatch_keeps_folder(tmp_path, bert_inputs):
    plan, _ = bert_inputs
    other = synthetic_spectra(2, BERT_TYPES, stack="encoder.layer", fingerprint=OTHER_FINGERPRINT)
    out = write_old_report(tmp_path / "out")
    before = folder_state(tmp_path)
    with pytest.raises(ReportError, match=r"other weights than the plan \(fingerprint cdcdcdcdcdcd against abababababab\)"):
        report(plan, other, out)
    assert folder_state(tmp_path) == before


def test_missing_columns_named(tmp_path, bert_inputs):
    plan, spectra = bert_inputs
    path = tmp_path / "spectra.csv"
    spectra.drop(columns=["full", "singular_values"]).to_csv(path, index=False)
    with pytest.raises(ReportError, match=rf"{re.escape(str(path))} .*full, singular_values"):
        report(plan, path, tmp_path / "out")
    with pytest.raises(ReportError, match=r"the spectra table is missing columns n_values"):
        report(plan, spectra.drop(columns=["n_values"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ['{"hello": "world"}', "not json at all", "[1, 2]", ""])
def test_not_a_plan(tmp_path, bert_inputs, text):
    _, spectra = bert_inputs
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ReportError, match=rf"plan file {re.escape(str(path))}"):
        report(path, spectra, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_plan_file(tmp_path, bert_inputs):
    _, spectra = bert_inputs
    with pytest.raises(ReportError, match=r"missing.json not found"):
        report(tmp_path / "missing.json", spectra, tmp_path / "out")


def test_plan_folder_names_plan_inside(tmp_path, bert_inputs, capsys):
    plan, _ = bert_inputs
    plan.save(tmp_path / "run" / "plan.json")

    assert main([str(tmp_path / "run")]) == 1

    error = capsys.readouterr().err
    assert error == f"lamda-report: error: plan file {tmp_path / 'run'} is a folder, not a file; pass {tmp_path / 'run' / 'plan.json'}\n"


def test_truncated_spectra_csv_named(tmp_path, bert_inputs):
    plan, spectra = bert_inputs
    path = write_spectra_csv(spectra, tmp_path / "spectra.csv")
    text = path.read_text()
    path.write_text(text[: len(text) - 200])

    with pytest.raises(ReportError, match=rf"spectra table {re.escape(str(path))} looks truncated: its last row \(line \d+\) "):
        report(plan, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_module_spectra(tmp_path, bert_inputs):
    plan, spectra = bert_inputs
    with pytest.raises(ReportError, match=r"has no spectrum for 1 planned module \(for example pooler.dense\); pass the spectra.csv"):
        report(plan, spectra.iloc[:-1], tmp_path / "out")


def test_unwritable_output_folder(tmp_path, bert_inputs):
    plan, spectra = bert_inputs
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    before = folder_state(tmp_path)
    with pytest.raises(ReportError, match=r"cannot write the report into .*file.txt/report"):
        report(plan, spectra, blocker / "report")
    with pytest.raises(ReportError, match=r"file.txt exists and is not a folder"):
        report(plan, spectra, blocker)
    assert folder_state(tmp_path) == before


def test_failed_drawing_keeps_folder(tmp_path, bert_inputs, monkeypatch):
    plan, spectra = bert_inputs
    out = write_old_report(tmp_path / "out")
    before = folder_state(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("drawing failed")

    # The page is drawn last, so every figure is already staged when it fails.
    monkeypatch.setattr(report_package, "index_html", fail)
    with pytest.raises(RuntimeError, match="drawing failed"):
        report(plan, spectra, out)
    assert folder_state(tmp_path) == before


def test_compare_rank_maps(tmp_path):
    spectra = synthetic_spectra(4, LLAMA_TYPES)
    plan_a = synthetic_plan(spectra, r0=4)
    plan_b = synthetic_plan(spectra, r0=8)
    written = compare(plan_a, plan_b, tmp_path)
    assert [path.name for path in written] == list(COMPARE_FILES)
    assert matplotlib.image.imread(written[0]).ndim == 3
    table = pd.read_csv(written[1])
    expected = [plan_b.modules[name].rank - plan_a.modules[name].rank for name in table["module"]]
    assert list(table["difference"]) == expected
    assert list(table["rank_a"]) == [plan_a.modules[name].rank for name in table["module"]]


def test_compare_partial_overlap(tmp_path):
    plan_a = synthetic_plan(synthetic_spectra(3, LLAMA_TYPES))
    plan_b = synthetic_plan(synthetic_spectra(2, LLAMA_TYPES))
    table = pd.read_csv(compare(plan_a, plan_b, tmp_path)[1])
    assert len(table) == 21
    assert table["rank_b"].isna().sum() == 7
    assert table["difference"].isna().sum() == 7


def test_compare_disjoint_plans(tmp_path):
    plan_a = synthetic_plan(synthetic_spectra(1, LLAMA_TYPES))
    plan_b = synthetic_plan(synthetic_spectra(1, BERT_TYPES, stack="encoder.layer"))
    with pytest.raises(ReportError, match="the two plans share no module"):
        compare(plan_a, plan_b, tmp_path / "out")


def hub_plan(spectra: pd.DataFrame, fingerprint: str = OTHER_FINGERPRINT) -> Plan:
    """A plan of ``spectra`` whose source is the Hub repo org/model at revision main."""
    source = {"kind": "hub", "repo_id": "org/model", "revision": "main", "model_name": "model"}
    return replace(synthetic_plan(spectra, fingerprint=fingerprint), source=source)


def test_compare_other_weights_warns(tmp_path):
    plan_a = synthetic_plan(synthetic_spectra(2, LLAMA_TYPES))
    plan_b = hub_plan(synthetic_spectra(2, LLAMA_TYPES, fingerprint=OTHER_FINGERPRINT))
    expected = (
        r"plan A comes from /synthetic \(fingerprint abababababab\) and plan B from org/model@main "
        r"\(fingerprint cdcdcdcdcdcd\), so this comparison is across different weights"
    )
    with pytest.warns(LamdaWarning, match=expected):
        written = compare(plan_a, plan_b, tmp_path)
    assert [path.name for path in written] == list(COMPARE_FILES)


def test_compare_same_weights_silent(tmp_path):
    spectra = synthetic_spectra(2, LLAMA_TYPES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LamdaWarning)
        compare(synthetic_plan(spectra, r0=4), hub_plan(spectra, fingerprint=FINGERPRINT), tmp_path)


def test_compare_unknown_fingerprint_logged(tmp_path, caplog):
    spectra = synthetic_spectra(2, LLAMA_TYPES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LamdaWarning)
        compare(synthetic_plan(spectra), synthetic_plan(spectra, fingerprint=""), tmp_path)
    assert "cannot check that plan A and plan B come from the same weights: no fingerprint" in caplog.text


def test_command_redraws_report_beside_plan(tmp_path, bert_inputs, capsys):
    plan, spectra = bert_inputs
    plan_path = plan.save(tmp_path / "plan.json")
    write_spectra_csv(spectra, tmp_path / "spectra.csv")
    assert main([str(plan_path)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted({*REPORT_FILES, "plan.json"})
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / name}" for name in REPORT_FILES]


def test_command_compare(tmp_path):
    spectra = synthetic_spectra(2, LLAMA_TYPES)
    path_a = synthetic_plan(spectra, r0=4).save(tmp_path / "a" / "plan.json")
    path_b = synthetic_plan(spectra, r0=8).save(tmp_path / "b" / "plan.json")
    assert main(["--compare", str(path_a), str(path_b), "-o", str(tmp_path / "cmp"), "-q"]) == 0
    assert sorted(path.name for path in (tmp_path / "cmp").iterdir()) == sorted(COMPARE_FILES)


def test_command_compare_other_weights_warns(tmp_path, capsys):
    path_a = synthetic_plan(synthetic_spectra(2, LLAMA_TYPES)).save(tmp_path / "a" / "plan.json")
    plan_b = hub_plan(synthetic_spectra(2, LLAMA_TYPES, fingerprint=OTHER_FINGERPRINT))
    path_b = plan_b.save(tmp_path / "b" / "plan.json")
    assert main(["--compare", str(path_a), str(path_b), "-o", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "lamda-report: warning: plan A (a/plan.json) comes from /synthetic (fingerprint abababababab) and "
        "plan B (b/plan.json) from org/model@main (fingerprint cdcdcdcdcdcd), so this comparison is across "
        "different weights"
    ]


def test_command_errors_are_one_line(tmp_path, bert_inputs, capsys):
    plan, _ = bert_inputs
    plan_path = plan.save(tmp_path / "plan.json")
    write_spectra_csv(synthetic_spectra(1, LLAMA_TYPES, fingerprint=OTHER_FINGERPRINT), tmp_path / "spectra.csv")
    assert main([str(plan_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("lamda-report: error: ")
    assert "fingerprint" in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give either PLAN or --compare PLAN_A PLAN_B"),
        (["a.json", "--compare", "a.json", "b.json"], "give either PLAN or --compare PLAN_A PLAN_B"),
        (["--compare", "a.json", "b.json", "--spectra", "s.csv"], "--spectra applies to a single PLAN, not to --compare"),
    ],
    ids=["nothing", "both", "spectra-with-compare"],
)
def test_command_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"lamda-report: error: {message}; see lamda-report --help\n"
