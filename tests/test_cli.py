import errno
import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lamda_spectra import cli
from lamda_spectra.cli import STRATEGY_NAMES, build_plan_parser, count_noun, plan_main, report_main
from lamda_spectra.errors import LamdaError
from lamda_spectra.report import REPORT_FILES

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


# ----------------------------------------------------------------------------------------------
# Output paths, staged writes and interruptions (in-process: plan_main returns the exit code)


def files_under(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included, relative and sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def error_line(err: str, prog: str = "lamda-plan") -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture
def no_scan(monkeypatch):
    """Fail the test if the command reaches the scan."""
    scan_module = importlib.import_module("lamda_spectra.scan")

    def scan(*args, **kwargs):
        raise AssertionError("the scan ran although the command should have failed before it")

    monkeypatch.setattr(scan_module, "scan", scan)


def _blocked_outputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Output options that cannot be written, each with the message fragment it must produce."""
    (tmp_path / "existing").mkdir(parents=True)
    (tmp_path / "spectra-folder" / "spectra.csv").mkdir(parents=True)
    (tmp_path / "report-file").write_text("a file")
    (tmp_path / "html-folder" / "index.html").mkdir(parents=True)
    cases = [
        (
            ["-o", str(tmp_path / "existing")],
            f"output path {tmp_path / 'existing'} is a folder, but -o takes the plan file path; "
            f"pass for example -o {tmp_path / 'existing' / 'plan.json'}",
        ),
        (
            ["-o", str(tmp_path / "spectra-folder" / "plan.json"), "--no-report"],
            f"cannot write file {tmp_path / 'spectra-folder' / 'spectra.csv'}: a folder has that name",
        ),
        (
            ["-o", str(tmp_path / "out" / "plan.json"), "--report-dir", str(tmp_path / "report-file")],
            f"cannot write into folder {tmp_path / 'report-file'}: it is a file",
        ),
        (
            ["-o", str(tmp_path / "html-folder" / "plan.json")],
            f"cannot write file {tmp_path / 'html-folder' / 'index.html'}: a folder has that name",
        ),
        (
            ["-o", str(tmp_path / "out" / "spectra.csv"), "--no-report"],
            f"output path {tmp_path / 'out' / 'spectra.csv'} is where the spectra table goes",
        ),
        (
            ["-o", str(tmp_path / "out" / "index.html")],
            f"output path {tmp_path / 'out' / 'index.html'} is where the report writes its index.html",
        ),
    ]
    if Path("/proc/self").is_dir():
        cases.append((["-o", "/proc/lamda-test/plan.json"], "cannot create files in folder /proc ("))
    if Path("/sys/kernel").is_dir():
        cases.append((["-o", "/sys/plan.json", "--no-report"], "cannot create files in folder /sys ("))
    return cases


def test_bad_output_paths_fail_before_scan(tmp_path, capsys, no_scan):
    model = _known(tmp_path / "model")
    outputs = tmp_path / "outputs"
    cases = _blocked_outputs(outputs)
    before = files_under(outputs)

    for args, fragment in cases:
        code = plan_main([str(model), *args])

        line = error_line(capsys.readouterr().err)
        assert code == 1, line
        assert fragment in line
        assert files_under(outputs) == before, args


def test_spectra_write_failure_leaves_no_plan(tmp_path, capsys, monkeypatch):
    model = _known(tmp_path / "model")
    out = tmp_path / "out" / "plan.json"
    scan_module = importlib.import_module("lamda_spectra.scan")

    def fail(table, path):
        raise LamdaError(f"cannot write {path}: disk full")

    monkeypatch.setattr(scan_module, "write_spectra_csv", fail)

    code = plan_main([str(model), "-o", str(out), "--no-report", "--budget", "8"])

    assert code == 1
    assert "disk full" in error_line(capsys.readouterr().err)
    assert not out.parent.exists()


def test_disk_full_names_the_output(tmp_path, capsys, monkeypatch):
    model = _known(tmp_path / "model")
    out = tmp_path / "out" / "plan.json"
    scan_module = importlib.import_module("lamda_spectra.scan")

    def fail(table, path):
        Path(path).write_text("half a table")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(scan_module, "write_spectra_csv", fail)

    code = plan_main([str(model), "-o", str(out), "--no-report", "--budget", "8"])

    line = error_line(capsys.readouterr().err)
    assert code == 1
    assert f"cannot write the outputs beside {out}: No space left on device; nothing was written" in line
    assert not out.parent.exists()


def test_report_failure_keeps_old_outputs(tmp_path, capsys, monkeypatch):
    model = _known(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("old plan")
    report_module = importlib.import_module("lamda_spectra.report")

    def fail(plan, spectra, out_dir):
        (Path(out_dir) / "index.html").write_text("half a report")
        raise LamdaError("cannot draw the report")

    monkeypatch.setattr(report_module, "report", fail)

    code = plan_main([str(model), "-o", str(out / "plan.json"), "--budget", "8"])

    assert code == 1
    assert "cannot draw the report" in error_line(capsys.readouterr().err)
    assert files_under(out) == ["plan.json"]
    assert (out / "plan.json").read_text() == "old plan"


def test_report_disk_full_names_the_folder(tmp_path, capsys, monkeypatch):
    model = _known(tmp_path / "model")
    out = tmp_path / "out"
    assert plan_main([str(model), "-o", str(out / "plan.json"), "--budget", "8", "--no-report", "-q"]) == 0
    report_module = importlib.import_module("lamda_spectra.report")

    def fail(plan, spectra, out_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report_module, "report", fail)

    code = report_main([str(out / "plan.json"), "-o", str(tmp_path / "report")])

    line = error_line(capsys.readouterr().err, prog="lamda-report")
    assert code == 1
    assert f"cannot write the report into {tmp_path / 'report'}: No space left on device;" in line


def test_successful_run_leaves_no_temporary_files(tmp_path, capsys):
    model = _known(tmp_path / "model")
    out = tmp_path / "out"

    code = plan_main([str(model), "-o", str(out / "plan.json"), "--budget", "8", "-q"])

    assert code == 0
    assert files_under(out) == sorted(["plan.json", *REPORT_FILES])


@pytest.mark.parametrize(
    ("module", "function"), [("lamda_spectra.sources", "open_source"), ("lamda_spectra.scan", "scan")]
)
def test_ctrl_c_prints_one_line(tmp_path, capsys, monkeypatch, module, function):
    model = _known(tmp_path / "model")
    out = tmp_path / "out" / "plan.json"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, interrupt)

    code = plan_main([str(model), "-o", str(out)])

    assert code == 130
    assert capsys.readouterr().err == "lamda-plan: interrupted\n"
    assert not out.parent.exists()


def test_ctrl_c_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    model = _known(tmp_path / "model")
    out = tmp_path / "out"
    report_module = importlib.import_module("lamda_spectra.report")

    def interrupt(plan, spectra, out_dir):
        (Path(out_dir) / "spectra.png").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "report", interrupt)

    code = plan_main([str(model), "-o", str(out / "plan.json"), "--budget", "8"])

    assert code == 130
    assert capsys.readouterr().err == "lamda-plan: interrupted\n"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Warnings, usage errors and wording


def test_skip_unsupported_warns_once_per_module(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16) for i in range(2)}
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randint(-8, 8, (16, 16), dtype=torch.int8)
    save_file(tensors, str(folder / "model.safetensors"))
    out = tmp_path / "plan.json"

    code = plan_main([str(folder), "-o", str(out), "--no-report", "--skip-unsupported", "--budget", "4"])

    assert code == 0
    warning_lines = capsys.readouterr().err.splitlines()
    assert len(warning_lines) == 2, warning_lines
    for i, line in enumerate(warning_lines):
        assert line.startswith("lamda-plan: warning: ")
        assert f"module model.layers.{i}.mlp.up_proj has a quantized or packed weight" in line
        assert f"(model.layers.{i}.mlp.up_proj.weight has dtype I8)" in line


def test_skip_unsupported_warning_wording(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
        "model.layers.0.mlp.up_proj.weight": torch.randint(-8, 8, (16, 16), dtype=torch.int8),
    }
    save_file(tensors, str(folder / "model.safetensors"))

    plan_main([str(folder), "-o", str(tmp_path / "plan.json"), "--no-report", "--skip-unsupported", "--budget", "2"])

    assert capsys.readouterr().err == (
        "lamda-plan: warning: module model.layers.0.mlp.up_proj has a quantized or packed weight "
        "(model.layers.0.mlp.up_proj.weight has dtype I8); skipped\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "--bogus"], "unrecognized arguments: --bogus"),
        (["model", "--strategy", "best"], "argument --strategy: invalid choice: 'best'"),
        (["model", "--r0", "0"], "argument --r0: expected a positive integer, got 0"),
        ([], "the following arguments are required: MODEL"),
    ],
)
def test_plan_usage_error_is_one_line(argv, message, capsys):
    code = plan_main(argv)

    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert message in line
    assert line.endswith("; see lamda-plan --help")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give either PLAN or --compare PLAN_A PLAN_B"),
        (["plan.json", "--bogus"], "unrecognized arguments: --bogus"),
        (["--compare", "a.json", "b.json", "--spectra", "s.csv"], "--spectra applies to a single PLAN"),
    ],
)
def test_report_usage_error_is_one_line(argv, message, capsys):
    code = report_main(argv)

    line = error_line(capsys.readouterr().err, prog="lamda-report")
    assert code == 2
    assert message in line
    assert line.endswith("; see lamda-report --help")


@pytest.mark.parametrize(("main", "prog"), [(plan_main, "lamda-plan"), (report_main, "lamda-report")])
def test_help_and_version_return_zero(main, prog, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{prog} 0.1.0\n"

    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def test_parser_copies_match_sources():
    from lamda_spectra.allocation import STRATEGIES
    from lamda_spectra.scan import DEFAULT_TOP_K

    assert STRATEGY_NAMES == tuple(sorted(STRATEGIES))
    assert cli.DEFAULT_TOP_K == DEFAULT_TOP_K


def test_cli_module_imports_no_heavy_packages():
    # A stand-in package object, so that only cli.py's own imports count, not the package's __init__.
    script = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("lamda_spectra")
        package.__path__ = [{str(Path(cli.__file__).parent)!r}]
        package.__version__ = "0.1.0"
        sys.modules["lamda_spectra"] = package
        from lamda_spectra.cli import plan_main
        for argv in (["--help"], ["--version"], ["model", "--bogus"]):
            plan_main(argv)
        heavy = ("torch", "numpy", "pandas", "matplotlib", "safetensors", "lamda_spectra.scan", "lamda_spectra.plan")
        print("loaded:", [name for name in heavy if name in sys.modules], file=sys.stderr)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert result.stderr.splitlines()[-1] == "loaded: []", result.stderr


@pytest.mark.parametrize("main", ["plan_main", "report_main"])
def test_help_imports_no_heavy_packages(main):
    script = (
        f"import sys\nfrom lamda_spectra.cli import {main}\n{main}(['--help'])\n"
        "print(sorted({'torch', 'pandas', 'matplotlib'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert result.stdout.splitlines()[-1] == "[]"


def test_summary_uses_singular_for_one(tmp_path, capsys):
    folder = write_known_spectra(tmp_path / "model", {"model.layers.0.mlp.up_proj": (8, 8, [8.0, 4.0, 2.0, 1.0])})

    code = plan_main([str(folder), "-o", str(tmp_path / "plan.json"), "--no-report", "--budget", "2"])

    out = capsys.readouterr().out
    assert code == 0
    assert "(1 module, strategy energy, budget 2)" in out
    assert "(1 spectrum computed, 0 from cache)" in out


@pytest.mark.parametrize(
    ("count", "singular", "plural", "expected"),
    [(0, "module", None, "0 modules"), (1, "module", None, "1 module"), (2, "spectrum", "spectra", "2 spectra")],
)
def test_count_noun(count, singular, plural, expected):
    assert count_noun(count, singular, plural) == expected


# ----------------------------------------------------------------------------------------------
# Rank options that no module can use


def test_r0_above_every_module_rejected(tmp_path, capsys, no_scan):
    code = plan_main([str(_known(tmp_path)), "-o", str(tmp_path / "out" / "plan.json"), "--r0", "100000"])

    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert "r0 100000 is above min(d_out, d_in) of every module (largest: 32, module model.layers.0" in line
    assert line.endswith("choose r0 of at most 32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("budget", "fragment"),
    [
        ("3", "the smallest feasible budget is 4, because every module gets at least min_rank 1"),
        ("200", "the largest feasible budget is 128, because each module's rank is capped at min(d_out, d_in);"),
    ],
)
def test_infeasible_budget_names_binding_limit(tmp_path, capsys, no_scan, budget, fragment):
    code = plan_main([str(_known(tmp_path)), "-o", str(tmp_path / "out" / "plan.json"), "--budget", budget])

    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert fragment in line
    assert "max_rank" not in line
