"""Output paths, for every command that writes one: checked before any work (exists, kind, writable, not an
input), written atomically, stale temporaries of dead processes removed (lbdl_cli/atomic.py)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from lbdl_cli.atomic import atomic_dir, atomic_file, check_out, remove_stale
from lbdl_cli.errors import OutputExistsError


@pytest.fixture(scope="module")
def writers(model_dir, tok_dir):
    """Each command that writes a directory, as a function of its --out."""
    text = ROOT / "data" / "tinyshakespeare-val.txt"
    return {
        "init": lambda out: ["init", "--preset", "nano", "--out", out],
        "convert": lambda out: ["convert", model_dir, "--out", out],
        "export": lambda out: ["export", model_dir, "--out", out],
        "import": lambda out: ["import", model_dir, "--out", out],
        "quantize": lambda out: ["quantize", model_dir, "--type", "q4_0", "--out", out],
        "quantize sweep": lambda out: ["quantize", "sweep", model_dir, "--eval", text, "--types", "q8_0", "--out", out],
        "data prepare": lambda out: ["data", "prepare", text, "--tokenizer", tok_dir, "--out", out],
        "tokenizer train": lambda out: ["tokenizer", "train", text, "--out", out],
    }


COMMANDS = ["init", "convert", "export", "import", "quantize", "quantize sweep", "data prepare", "tokenizer train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_impossible_out_fails_first_naming_the_users_path(cli, writers, tmp_path, command):
    (tmp_path / "file").write_text("a file")
    for out, says in [(tmp_path / "file" / "sub", "is a file, not a directory"),
                      ("/proc/lbdl-test/out", "nothing can be created in /proc"),
                      (tmp_path / "file", "is a file, not a directory")]:
        r = cli(*writers[command](out), "--force")
        assert r.code == 2, (command, out, r.err)
        assert says in r.err and str(out) in r.err and ".tmp-" not in r.err
        assert len(r.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", ["convert", "export", "quantize", "quantize sweep"])
def test_force_never_replaces_an_input(cli, writers, model_dir, command):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for out, says in [(model_dir, "is the input"), (model_dir / "sub", "is inside the input"),
                      (model_dir.parent, "contains the input")]:
        r = cli(*writers[command](out), "--force")
        assert r.code == 2 and says in r.err, (command, r.err)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_check_out_rules(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    check_out(tmp_path / "new" / "deeper", force=False, inputs=(tmp_path / "in",))  # parents made later
    with pytest.raises(OutputExistsError, match="already exists; choose another path or pass --force"):
        check_out(tmp_path / "in", force=False)
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_out(tmp_path, force=True, inputs=(tmp_path / "in" / "a.txt",))
    with pytest.raises(OutputExistsError, match="is a directory, not a file"):
        check_out(tmp_path / "in", force=True, kind="file")
    os.symlink(tmp_path / "in", tmp_path / "link")
    with pytest.raises(OutputExistsError, match="is the input"):  # through a symbolic link too
        check_out(tmp_path / "link", force=True, inputs=(tmp_path / "in",))
    assert not list(tmp_path.glob(".*probe*"))  # the writability probe leaves nothing behind


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "model"
    for name in (f".model.tmp-{dead}", f".model.tmp-{os.getppid()}", ".model.tmp-x", ".other.tmp-1"):
        (tmp_path / name).mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".model.tmp-x", f".model.tmp-{os.getppid()}", ".other.tmp-1", "model"])
    (tmp_path / f".model.old-{dead}").mkdir()  # a dead writer's old copy: removed only while model exists
    assert remove_stale(out) == [tmp_path / f".model.old-{dead}"]
    (tmp_path / f".plot.png.tmp-{dead}").write_text("half a png")
    with atomic_file(tmp_path / "plot.png") as tmp:
        tmp.write_text("png")
    assert (tmp_path / "plot.png").read_text() == "png" and not (tmp_path / f".plot.png.tmp-{dead}").exists()
