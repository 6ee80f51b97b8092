import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from checkpoints import matrix_with_singular_values

import lamda_spectra
from lamda_spectra.errors import PlanError, UsageError
from lamda_spectra.plan import PLAN_FORMAT, SCHEMA_VERSION, ModulePlan, Plan, load_plan, plan

FINGERPRINT = "0123456789abcdef" * 4
SOURCE = {"kind": "folder", "path": "/models/toy", "model_name": "toy"}


def spectra_row(module: str, d_out: int, d_in: int, values, *, layout: str = "linear", frobenius_sq=None) -> dict:
    """One spectra-table row for a weight with the given singular values (zeros fill the rest)."""
    values = np.asarray(values, dtype=np.float64)
    dim = min(d_out, d_in)
    full = np.concatenate([values, np.zeros(dim - len(values))])
    frobenius_sq = float(np.sum(full**2)) if frobenius_sq is None else frobenius_sq
    s1 = float(full[0])
    return {
        "module": module,
        "tensor": f"{module}.weight",
        "layout": layout,
        "d_out": d_out,
        "d_in": d_in,
        "dtype": "F32",
        "frobenius_norm": math.sqrt(frobenius_sq),
        "spectral_norm": s1,
        "stable_rank": frobenius_sq / s1**2 if s1 > 0 else math.nan,
        "effective_rank": math.nan,
        "n_values": dim,
        "full": True,
        "method": "exact",
        "singular_values": full,
        "fingerprint": FINGERPRINT,
    }


def spectra_table(rows: list[dict], **attrs) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    table.attrs.update(source=dict(SOURCE), fingerprint=FINGERPRINT, top_k=64, full_spectrum=False, computed=2, cached=0)
    table.attrs.update(attrs)
    return table


def two_modules() -> pd.DataFrame:
    """Module a: p = 0.64, 0.16, 0.16, 0.04. Module b (conv1d): p = 0.25 four times."""
    return spectra_table(
        [
            spectra_row("layers.0.a", 8, 16, [4.0, 2.0, 2.0, 1.0]),
            spectra_row("layers.0.b", 16, 4, [3.0, 3.0, 3.0, 3.0], layout="conv1d"),
        ]
    )


# ----------------------------------------------------------------------------------------------
# plan()


def test_energy_plan_modules():
    result = plan(two_modules(), budget="4", strategy="energy")

    a, b = result.modules["layers.0.a"], result.modules["layers.0.b"]
    # Energy scores at r0 = 2 are 0.8 and 0.5: shares 2.46 and 1.54 round to 2 and 2.
    assert result.ranks == {"layers.0.a": 2, "layers.0.b": 2}
    assert a.shape == (8, 16)
    assert b.shape == (16, 4)
    assert (a.layout, b.layout) == ("linear", "conv1d")
    assert a.energy_score == pytest.approx(0.8, abs=1e-12)
    assert b.energy_score == pytest.approx(0.5, abs=1e-12)
    assert a.captured_energy == pytest.approx(0.8, abs=1e-12)
    assert a.stable_rank == pytest.approx(25 / 16, abs=1e-12)
    assert b.stable_rank == pytest.approx(36 / 9, abs=1e-12)
    assert (a.frobenius_norm, a.spectral_norm) == (5.0, 4.0)
    assert a.singular_values == (4.0, 2.0)


def test_waterfill_plan_ranks_and_values():
    result = plan(two_modules(), budget="4", strategy="waterfill")

    # After one rank each (0.64 and 0.25), b's 0.25s beat a's 0.16s.
    assert result.ranks == {"layers.0.a": 1, "layers.0.b": 3}
    assert result.modules["layers.0.b"].captured_energy == pytest.approx(0.75, abs=1e-12)
    # max(rank, r0) values are kept: r0 = 2 for a, rank 3 for b.
    assert result.modules["layers.0.a"].singular_values == (4.0, 2.0)
    assert result.modules["layers.0.b"].singular_values == (3.0, 3.0, 3.0)


def test_plan_totals():
    result = plan(two_modules(), budget="4", strategy="energy")

    assert result.totals == {
        "modules": 2,
        "rank_sum": 4,
        "core_params": 2 * 2 + 2 * 2,
        "pmb_params": 2 * 8 + 2 * 16,
        "lora_params": 2 * (8 + 16) + 2 * (16 + 4),
    }


def test_plan_settings_record_everything():
    result = plan(two_modules(), budget="params:8", strategy="waterfill", min_rank=1, multiple_of=1)

    assert result.settings == {
        "strategy": "waterfill",
        "budget": "params:8",
        "budget_kind": "params",
        "budget_value": 8,
        "r0": 2,
        "min_rank": 1,
        "max_rank": 8,
        "multiple_of": 1,
        "top_k": 64,
        "full_spectrum": False,
    }


def test_plan_source_fingerprint_version():
    result = plan(two_modules(), budget="4")

    assert result.source == SOURCE
    assert result.fingerprint == FINGERPRINT
    assert result.tool_version == lamda_spectra.__version__


def test_plan_fingerprint_from_column():
    table = two_modules()
    del table.attrs["fingerprint"]

    assert plan(table, budget="4").fingerprint == FINGERPRINT


def test_plan_rejects_mixed_fingerprints():
    table = two_modules()
    del table.attrs["fingerprint"]
    table.loc[1, "fingerprint"] = "f" * 64

    with pytest.raises(PlanError, match="mixes 2 weights fingerprints"):
        plan(table, budget="4")


def test_plan_from_real_matrices():
    values = [10.0, 6.0, 3.0, 1.0]
    weight = matrix_with_singular_values(12, 20, values, seed=3)
    computed = torch.linalg.svdvals(weight).numpy()
    row = spectra_row("mlp.up", 12, 20, computed, frobenius_sq=float(torch.sum(weight**2)))

    result = plan(spectra_table([row]), budget="2", strategy="energy")

    module = result.modules["mlp.up"]
    assert module.rank == 2
    assert module.captured_energy == pytest.approx(136 / 146, abs=1e-12)
    assert module.stable_rank == pytest.approx(146 / 100, abs=1e-12)
    np.testing.assert_allclose(module.singular_values, values[:2], rtol=1e-12)


def test_plan_zero_weight_gets_min_rank():
    table = spectra_table([spectra_row("zero", 8, 8, [0.0]), spectra_row("live", 8, 8, [2.0, 1.0])])

    result = plan(table, budget="6", strategy="energy", min_rank=2)

    assert result.ranks == {"zero": 2, "live": 4}
    assert result.modules["zero"].stable_rank == 0.0
    assert result.modules["zero"].energy_score == 0.0


def test_plan_reads_csv_singular_values():
    table = two_modules()
    table["singular_values"] = [" ".join(repr(float(v)) for v in values) for values in table["singular_values"]]

    assert plan(table, budget="4").ranks == {"layers.0.a": 2, "layers.0.b": 2}


def test_plan_rejects_missing_columns():
    table = two_modules().drop(columns=["layout", "spectral_norm"])

    with pytest.raises(PlanError, match="missing columns layout, spectral_norm"):
        plan(table, budget="4")


def test_plan_lists_every_table_problem():
    rows = [
        spectra_row("a", 8, 8, [1.0, 2.0]),
        spectra_row("b", 8, 8, [2.0, 1.0]),
        spectra_row("b", 8, 8, [2.0, 1.0]),
    ]
    rows[1]["d_in"] = 0

    with pytest.raises(PlanError) as caught:
        plan(spectra_table(rows), budget="4")

    message = str(caught.value)
    assert "module names appear more than once: b" in message
    assert "module 'a': singular_values are not in descending order" in message
    assert "module 'b': d_in 0 is not a positive integer" in message


def test_plan_bad_budget_is_usage_error():
    with pytest.raises(UsageError, match="invalid budget 'lots'"):
        plan(two_modules(), budget="lots")


def test_plan_infeasible_budget_is_usage_error():
    with pytest.raises(UsageError, match="the largest feasible budget is 8, because .* capped at max_rank 4 "):
        plan(two_modules(), budget="9", max_rank=4)


def test_plan_too_few_values_asks_rescan():
    rows = [spectra_row("a", 64, 64, np.linspace(8, 1, 64))]
    rows[0]["singular_values"] = rows[0]["singular_values"][:8]

    with pytest.raises(UsageError, match=r"module a has 8 singular values .* rescan with a larger top_k \(at least 32\)"):
        plan(spectra_table(rows), budget="avg:8", strategy="waterfill")


# ----------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(tmp_path):
    original = plan(two_modules(), budget="4", strategy="waterfill")

    path = original.save(tmp_path / "nested" / "plan.json")
    loaded = load_plan(path)

    assert loaded == original
    assert list(loaded.modules) == ["layers.0.a", "layers.0.b"]
    assert Plan.from_dict(original.to_dict()) == original


def test_saved_file_layout(tmp_path):
    path = plan(two_modules(), budget="4").save(tmp_path / "plan.json")

    document = json.loads(path.read_text())
    assert list(document) == [
        "format", "schema_version", "tool_version", "source", "fingerprint", "settings", "totals", "modules",
    ]
    assert document["format"] == PLAN_FORMAT
    assert document["schema_version"] == SCHEMA_VERSION
    assert document["modules"]["layers.0.b"]["shape"] == [16, 4]
    assert '"singular_values": [4.0, 2.0]' in path.read_text()


def test_same_input_byte_identical_file(tmp_path):
    first = plan(two_modules(), budget="avg:3", strategy="energy").save(tmp_path / "a" / "plan.json")
    second = plan(two_modules(), budget="avg:3", strategy="energy").save(tmp_path / "b" / "plan.json")

    assert first.read_bytes() == second.read_bytes()


def test_cache_counts_stay_out_of_plan(tmp_path):
    cold = plan(spectra_table(two_modules().to_dict("records"), computed=2, cached=0), budget="4")
    warm = plan(spectra_table(two_modules().to_dict("records"), computed=0, cached=2), budget="4")

    assert cold.to_json() == warm.to_json()


def write_document(tmp_path, document) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(PlanError, match=f"plan file {tmp_path / 'absent.json'} not found"):
        load_plan(tmp_path / "absent.json")


def test_load_folder_with_plan_inside(tmp_path):
    plan(two_modules(), budget="4").save(tmp_path / "run" / "plan.json")

    with pytest.raises(PlanError, match=f"plan file {tmp_path / 'run'} is a folder, not a file; pass {tmp_path / 'run' / 'plan.json'}$"):
        load_plan(tmp_path / "run")


def test_load_folder_without_plan(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(PlanError, match=f"plan file {tmp_path / 'empty'} is a folder, not a file; pass the plan.json that lamda-plan wrote$"):
        load_plan(tmp_path / "empty")


def test_load_not_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": ')

    with pytest.raises(PlanError, match=rf"plan file {path} is not valid JSON \(line 1, column 12: Expecting value\); regenerate it with lamda-plan"):
        load_plan(path)


def test_load_wrong_format_and_version(tmp_path):
    document = plan(two_modules(), budget="4").to_dict()
    document["format"] = "peft-config"
    document["schema_version"] = 2

    with pytest.raises(PlanError) as caught:
        load_plan(write_document(tmp_path, document))

    message = str(caught.value)
    assert message.startswith(f"invalid plan file {tmp_path / 'plan.json'}: ")
    assert "format is 'peft-config', expected 'lamda-spectra-plan'" in message
    assert "schema_version 2 is not supported" in message


def test_load_lists_every_problem(tmp_path):
    document = plan(two_modules(), budget="4").to_dict()
    del document["settings"]
    document["extra"] = 1
    document["fingerprint"] = "not-a-hash"
    document["modules"]["layers.0.a"]["rank"] = 0
    document["modules"]["layers.0.a"]["energy_score"] = 1.5
    del document["modules"]["layers.0.b"]["singular_values"]
    document["modules"]["layers.0.b"]["layout"] = "conv2d"

    with pytest.raises(PlanError) as caught:
        load_plan(write_document(tmp_path, document))

    problems = str(caught.value).split(": ", 1)[1].split("; ")
    assert "missing key 'settings'" in problems
    assert "unknown key 'extra'" in problems
    assert "fingerprint 'not-a-hash' is not 64 lowercase hex digits (or empty when unknown)" in problems
    assert "module 'layers.0.a': rank 0 is not a positive integer" in problems
    assert "module 'layers.0.a': energy_score 1.5 is not a number in [0, 1]" in problems
    assert "module 'layers.0.b': missing key 'singular_values'" in problems
    assert "module 'layers.0.b': layout 'conv2d' is not one of linear, conv1d" in problems


def test_load_totals_inconsistent(tmp_path):
    document = plan(two_modules(), budget="4").to_dict()
    document["totals"]["rank_sum"] = 5
    del document["totals"]["lora_params"]

    with pytest.raises(PlanError) as caught:
        load_plan(write_document(tmp_path, document))

    message = str(caught.value)
    assert "totals.rank_sum is 5 but the modules give 4" in message
    assert "totals is missing 'lora_params'" in message


def test_load_rank_above_shape(tmp_path):
    document = plan(two_modules(), budget="4").to_dict()
    document["modules"]["layers.0.b"]["rank"] = 5
    document["totals"]["rank_sum"] = 7

    with pytest.raises(PlanError, match="module 'layers.0.b': rank 5 exceeds min\\(d_out, d_in\\) = 4"):
        load_plan(write_document(tmp_path, document))


def test_load_not_an_object(tmp_path):
    with pytest.raises(PlanError, match="the document is a JSON list, not an object"):
        load_plan(write_document(tmp_path, [1, 2]))


# ----------------------------------------------------------------------------------------------
# Validation when built


def module_fields(**changes) -> dict:
    fields = dict(
        rank=2,
        shape=(8, 16),
        layout="linear",
        energy_score=0.8,
        captured_energy=0.8,
        stable_rank=1.5,
        frobenius_norm=5.0,
        spectral_norm=4.0,
        singular_values=(4.0, 2.0),
    )
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 9}, "rank 9 exceeds min"),
        ({"rank": True}, "rank True is not a positive integer"),
        ({"shape": (8, 0)}, "shape \\(8, 0\\) is not two positive integers"),
        ({"layout": "embedding"}, "layout 'embedding' is not one of linear, conv1d"),
        ({"captured_energy": math.nan}, "captured_energy nan is not a number in \\[0, 1\\]"),
        ({"stable_rank": -1.0}, "stable_rank -1.0 is not a finite non-negative number"),
        ({"singular_values": (4.0,)}, "singular_values holds 1 values, fewer than rank 2"),
        ({"singular_values": (2.0, 4.0)}, "singular_values are not in descending order"),
    ],
)
def test_module_plan_validates(changes, message):
    with pytest.raises(PlanError, match=f"invalid module plan: .*{message}"):
        ModulePlan(**module_fields(**changes))


def test_module_plan_normalizes_types():
    module = ModulePlan(**module_fields(shape=[np.int64(8), 16], singular_values=[np.float32(4.0), 2]))

    assert module.shape == (8, 16)
    assert module.singular_values == (4.0, 2.0)
    assert type(module.singular_values[1]) is float


def test_module_plan_clips_rounding_error():
    module = ModulePlan(**module_fields(captured_energy=1.0 + 1e-12, energy_score=-1e-15))

    assert module.captured_energy == 1.0
    assert module.energy_score == 0.0


def test_plan_validates_when_built():
    with pytest.raises(PlanError, match="invalid plan: fingerprint 'abc' is not 64 lowercase hex digits.*modules must be"):
        Plan(source={}, fingerprint="abc", settings={}, modules={})


def test_plan_copies_caller_dicts():
    settings = {"strategy": "energy"}
    modules = {"a": ModulePlan(**module_fields())}

    result = Plan(source={}, fingerprint="", settings=settings, modules=modules)
    settings["strategy"] = "uniform"
    modules.clear()

    assert result.settings == {"strategy": "energy"}
    assert list(result.modules) == ["a"]


def test_plan_rejects_a_path(tmp_path):
    with pytest.raises(PlanError, match=r"not a PosixPath; call plan\(scan\('.*'\), \.\.\.\)"):
        plan(tmp_path, budget="avg:4")
