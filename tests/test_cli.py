import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lamda_spectra.cli import build_plan_parser, plan_main

from checkpoints import minilm_path, write_hub_cache, write_known_spectra, write_llama


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run lamda-plan in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lamda_spectra.cli", *args], capture_output=True, text=True, env=full_env
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    import re

    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lamda-plan: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr


def test_minilm_plan_and_spectra(tmp_path, capsys):
    out = tmp_path / "out" / "plan.json"

    code = plan_main([str(minilm_path()), "-o", str(out), "--no-report", "--quiet"])

    assert code == 0
    plan = json.loads(out.read_text())
    assert len(plan["modules"]) == 36
    assert plan["totals"]["rank_sum"] == 36 * 16
    assert "encoder.layer.5.output.dense" in plan["modules"]
    assert (out.parent / "spectra.csv").exists()
    assert capsys.readouterr().out == ""


def test_json_summary(tmp_path, capsys):
    out = tmp_path / "plan.json"

    code = plan_main([str(minilm_path()), "-o", str(out), "--no-report", "--json", "--budget", "288"])

    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["modules"] == 36
    assert summary["rank_sum"] == 288
    ranks = json.loads(out.read_text())["modules"]
    assert summary["rank_max"] == max(module["rank"] for module in ranks.values())
    assert summary["core_params"] == sum(module["rank"] ** 2 for module in ranks.values())


def test_same_input_gives_identical_plan(tmp_path):
    first, second = tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json"

    assert plan_main([str(minilm_path()), "-o", str(first), "--no-report", "-q", "--strategy", "waterfill"]) == 0
    assert plan_main([str(minilm_path()), "-o", str(second), "--no-report", "-q", "--strategy", "waterfill"]) == 0

    assert first.read_bytes() == second.read_bytes()


def test_sharded_llama(tmp_path):
    write_llama(tmp_path / "llama")
    out = tmp_path / "plan.json"

    code = plan_main([str(tmp_path / "llama"), "-o", str(out), "--no-report", "-q", "--budget", "avg:4"])

    plan = json.loads(out.read_text())
    assert code == 0
    assert (tmp_path / "llama" / "model.safetensors.index.json").exists()
    assert len(plan["modules"]) == 14
    assert plan["modules"]["model.layers.1.mlp.down_proj"]["shape"] == [64, 160]


def test_hub_repo_id_offline(tmp_path):
    write_llama(tmp_path / "llama")
    cache = tmp_path / "hub"
    write_hub_cache(cache, "acme/tiny-llama", tmp_path / "llama")
    out = tmp_path / "plan.json"

    result = run_cli(
        "acme/tiny-llama", "-o", str(out), "--no-report", "-q", "--budget", "avg:4",
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )

    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["source"]["repo_id"] == "acme/tiny-llama"
    assert plan["source"]["revision"] == "a" * 40
    assert len(plan["modules"]) == 14


def test_hub_repo_missing_offline(tmp_path):
    result = run_cli(
        "acme/not-cached", "-o", str(tmp_path / "plan.json"),
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )

    assert_one_line_error(result, 1, "acme/not-cached")
    assert not (tmp_path / "plan.json").exists()


def _known(tmp_path: Path) -> Path:
    return write_known_spectra(
        tmp_path / "model",
        {f"model.layers.{i}.self_attn.q_proj": (32, 32, [float(v) for v in range(32, 0, -1)]) for i in range(4)},
    )


@pytest.mark.parametrize(
    ("args", "code", "pattern"),
    [
        (["--budget", "3"], 2, r"budget .*feasible .*4"),
        (["--budget", "avg:abc"], 2, r"avg:abc"),
        (["--min-rank", "8", "--max-rank", "4"], 2, r"max.rank .*4.*min.rank .*8|min.rank .*8.*max.rank .*4"),
        (["--target", "no_such_proj"], 1, r"no_such_proj.*model\.layers\.0\.self_attn\.q_proj"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], 2, r"device"),
    ],
)
def test_usage_errors(tmp_path, args, code, pattern):
    folder = _known(tmp_path)
    out = tmp_path / "out" / "plan.json"

    result = run_cli(str(folder), "-o", str(out), *args)

    assert_one_line_error(result, code, pattern)
    assert not out.parent.exists()


def test_missing_path(tmp_path):
    result = run_cli(str(tmp_path / "nowhere"), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, "nowhere")
    assert not (tmp_path / "plan.json").exists()


def test_lfs_pointer(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n"
    )

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, r"model\.safetensors.*LFS")


def test_truncated_file(tmp_path):
    folder = _known(tmp_path)
    path = folder / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, rf"model\.safetensors.*{size}.*{size - 100}")


def test_corrupt_header(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{ this is not json" + b" " * 30)

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, r"model\.safetensors.*header")


def test_missing_shards_listed(tmp_path):
    folder = write_llama(tmp_path / "llama", max_shard_size="30KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[0].unlink()
    shards[-1].unlink()

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, rf"{shards[0].name}.*{shards[-1].name}")


def test_index_names_absent_tensor(tmp_path):
    folder = write_llama(tmp_path / "llama")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.self_attn.extra_proj.weight"] = shard
    index_path.write_text(json.dumps(index))

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, rf"extra_proj\.weight.*{shard}")


def test_nan_weight(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    weight = torch.randn(8, 8)
    weight[3, 3] = float("nan")
    save_file({"model.layers.0.mlp.up_proj.weight": weight}, str(folder / "model.safetensors"))

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"), "--budget", "avg:2")

    assert_one_line_error(result, 1, r"up_proj\.weight.*1 NaN")
    assert not (tmp_path / "plan.json").exists()


def test_quantized_weight(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.randint(-8, 8, (8, 8), dtype=torch.int8)},
        str(folder / "model.safetensors"),
    )

    result = run_cli(str(folder), "-o", str(tmp_path / "plan.json"))

    assert_one_line_error(result, 1, r"model\.layers\.0\.mlp\.up_proj.*I8")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_nonroot(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)

    result = run_cli(str(_known(tmp_path)), "-o", str(locked / "plan.json"), "--no-report")

    assert_one_line_error(result, 1, r"locked")


def test_output_path_under_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")

    result = run_cli(str(_known(tmp_path)), "-o", str(blocker / "plan.json"), "--no-report")

    assert_one_line_error(result, 1, r"blocker")
    assert blocker.read_text() == "a file where a folder should be"


def test_help_documents_every_option():
    parser = build_plan_parser()
    text = parser.format_help()

    for action in parser._actions:
        assert action.help, f"option {action.option_strings or action.dest} has no help"
    for unit in ("sum of ranks", "average rank", "sum(r^2)", "singular values"):
        assert unit in text
