import os
import stat
from pathlib import Path

import pytest

from lamda_spectra._io import StagedWrites, atomic_directory, atomic_write_bytes, check_writable_location
from lamda_spectra.errors import LamdaError


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included, relative and sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_check_new_nested_path_creates_nothing(tmp_path):
    check_writable_location(tmp_path / "a" / "b" / "plan.json")
    check_writable_location(tmp_path / "c" / "report", kind="folder")

    assert tree(tmp_path) == []


def test_check_rejects_folder_for_file(tmp_path):
    (tmp_path / "plan.json").mkdir()

    with pytest.raises(LamdaError, match=r"cannot write file .*plan\.json: a folder has that name"):
        check_writable_location(tmp_path / "plan.json")


def test_check_rejects_file_for_folder(tmp_path):
    (tmp_path / "report").write_text("x")

    with pytest.raises(LamdaError, match=r"cannot write into folder .*report: it is a file"):
        check_writable_location(tmp_path / "report", kind="folder")


def test_check_rejects_file_as_ancestor(tmp_path):
    (tmp_path / "blocker").write_text("x")

    with pytest.raises(LamdaError, match=r"blocker is a file, not a folder"):
        check_writable_location(tmp_path / "blocker" / "sub" / "plan.json")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_rejects_proc():
    # Root passes os.access on /proc, so only creating a file shows that /proc takes none.
    message = r"cannot write /proc/lamda-test/plan\.json: cannot create files in folder /proc"
    with pytest.raises(LamdaError, match=message):
        check_writable_location("/proc/lamda-test/plan.json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_check_rejects_read_only_folder_nonroot(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)

    with pytest.raises(LamdaError, match=r"cannot create files in folder .*locked"):
        check_writable_location(locked / "plan.json")


def test_atomic_write_rejects_folder(tmp_path):
    (tmp_path / "plan.json").mkdir()

    with pytest.raises(LamdaError, match=r"plan\.json: a folder has that name"):
        atomic_write_bytes(tmp_path / "plan.json", b"{}")

    assert tree(tmp_path) == ["plan.json"]


def test_staged_commit_moves_files(tmp_path):
    target = tmp_path / "out" / "run"
    (tmp_path / "keep").mkdir()

    with StagedWrites() as staged:
        first = staged.folder(target)
        (first / "plan.json").write_text("plan")
        assert staged.folder(target) == first
        (staged.folder(tmp_path / "keep") / "spectra.csv").write_text("csv")
        assert not (target / "plan.json").exists()

    assert tree(tmp_path) == ["keep", "keep/spectra.csv", "out", "out/run", "out/run/plan.json"]
    assert (target / "plan.json").read_text() == "plan"


def test_staged_commit_replaces_same_names_only(tmp_path):
    (tmp_path / "plan.json").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")

    with StagedWrites() as staged:
        (staged.folder(tmp_path) / "plan.json").write_text("new")

    assert (tmp_path / "plan.json").read_text() == "new"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert tree(tmp_path) == ["notes.txt", "plan.json"]


@pytest.mark.parametrize("error", [LamdaError("scan failed"), KeyboardInterrupt()])
def test_staged_failure_leaves_nothing(tmp_path, error):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "plan.json").write_text("old")

    with pytest.raises(type(error)):
        with StagedWrites() as staged:
            (staged.folder(tmp_path / "new" / "nested") / "plan.json").write_text("new")
            (staged.folder(tmp_path / "existing") / "plan.json").write_text("new")
            raise error

    assert tree(tmp_path) == ["existing", "existing/plan.json"]
    assert (tmp_path / "existing" / "plan.json").read_text() == "old"


def test_staged_commit_blocked_by_folder(tmp_path):
    (tmp_path / "index.html").mkdir()
    (tmp_path / "spectra.csv").mkdir()

    with pytest.raises(LamdaError, match=r"cannot write .*index\.html, .*spectra\.csv: a folder has that name"):
        with StagedWrites() as staged:
            folder = staged.folder(tmp_path)
            for name in ("index.html", "plan.json", "spectra.csv"):
                (folder / name).write_text(name)

    # The check runs before the first rename, so plan.json was not moved either.
    assert tree(tmp_path) == ["index.html", "spectra.csv"]


def test_staged_folder_rejects_file(tmp_path):
    (tmp_path / "report").write_text("x")

    with pytest.raises(LamdaError, match=r"cannot write into folder .*report: it is a file"):
        with StagedWrites() as staged:
            staged.folder(tmp_path / "report")

    assert tree(tmp_path) == ["report"]


def test_atomic_directory_rejects_file(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("precious")

    with pytest.raises(LamdaError, match=r"notes.txt: it is a file; move it"):
        with atomic_directory(existing) as staging:
            (staging / "a.json").write_text("{}")

    assert existing.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
