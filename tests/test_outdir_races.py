"""No race loses data (issue 23, item 4): the final rename of an output re-checks it under a lock and
never replaces what appeared meanwhile. The window is made deterministic: in-process, the test writes
into the output while the ``with atomic_folder(...)`` body runs; across processes, the writers meet at
a barrier inside the body, so both reach the final step with the other one alive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tokengraft.outdir import FolderError, atomic_file, atomic_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def tokengraft_folder(path: Path, tag: str) -> Path:
    path.mkdir()
    (path / "tokengraft.json").write_text(json.dumps({"tag": tag}))
    return path


def test_a_folder_that_appears_during_the_save_is_never_touched(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FolderError, match="appeared or changed while this command worked"):
        with atomic_folder(out) as tmp:
            (tmp / "tokengraft.json").write_text("{}")
            out.mkdir()  # someone else's folder, created while the command works
            (out / "mine.txt").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == []


def test_overwrite_never_removes_a_foreign_folder_that_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FolderError, match="appeared"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "tokengraft.json").write_text("{}")
            out.mkdir()
            (out / "mine.txt").write_text("mine")
    assert (out / "mine.txt").read_text() == "mine"


def test_overwrite_refuses_a_tokengraft_folder_replaced_meanwhile(tmp_path):
    """--overwrite was checked against the folder at the start; another command's result that took
    its place meanwhile is a different folder and stays."""
    out = tokengraft_folder(tmp_path / "out", "old")
    with pytest.raises(FolderError, match="appeared or changed"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "tokengraft.json").write_text(json.dumps({"tag": "mine"}))
            os.rename(out, tmp_path / "gone")
            tokengraft_folder(out, "other writer")
    assert json.loads((out / "tokengraft.json").read_text()) == {"tag": "other writer"}
    assert leftovers(tmp_path, "out") == []


def test_overwrite_still_replaces_the_folder_it_checked(tmp_path):
    out = tokengraft_folder(tmp_path / "out", "old")
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "tokengraft.json").write_text(json.dumps({"tag": "new"}))
    assert json.loads((out / "tokengraft.json").read_text()) == {"tag": "new"}
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("what", ["file", "symlink", "filled folder"])
def test_a_path_that_appears_is_left_as_it_is(tmp_path, what):
    out, target = tmp_path / "out", tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(FolderError, match="appeared"):
        with atomic_folder(out) as tmp:
            (tmp / "tokengraft.json").write_text("{}")
            if what == "file":
                out.write_text("a file")
            elif what == "symlink":
                out.symlink_to(target)
            else:
                out.mkdir()
                (out / "x").write_text("x")
    if what == "file":
        assert out.read_text() == "a file"
    elif what == "symlink":
        assert out.is_symlink() and os.readlink(out) == str(target)
    else:
        assert [p.name for p in out.iterdir()] == ["x"]
    assert (target / "keep.txt").read_text() == "keep" and leftovers(tmp_path, "out") == []


def test_an_empty_folder_that_appears_counts_as_free(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "tokengraft.json").write_text("{}")
        out.mkdir()
    assert (out / "tokengraft.json").is_file()


def test_atomic_file_never_replaces_a_file_that_appeared(tmp_path):
    out = tmp_path / "iter_4.pth"
    with pytest.raises(FolderError, match="appeared"):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"mine")
            out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs" and leftovers(tmp_path, out.name) == []


def test_atomic_file_two_threads_one_wins(tmp_path):
    out, barrier, results = tmp_path / "f.bin", threading.Barrier(2), []

    def write(tag: bytes):
        try:
            with atomic_file(out) as tmp:
                tmp.write_bytes(tag * 1000)
                barrier.wait(timeout=30)  # both have written their temporary: now race the rename
            results.append(("ok", tag))
        except FolderError as e:
            results.append(("error", str(e)))

    threads = [threading.Thread(target=write, args=(t,)) for t in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = [tag for kind, tag in results if kind == "ok"]
    errors = [msg for kind, msg in results if kind == "error"]
    assert len(ok) == 1 and len(errors) == 1, results
    assert out.read_bytes() == ok[0] * 1000 and "appeared" in errors[0]
    assert leftovers(tmp_path, out.name) == []


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from tokengraft.outdir import FolderError, atomic_folder
    out, me, other, overwrite = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
    try:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            (tmp / "tokengraft.json").write_text(me.name)
            (tmp / "payload.bin").write_bytes(os.urandom(1 << 20))
            me.touch()
            t0 = time.time()
            while not other.exists():  # barrier: both writers are inside the body
                assert time.time() - t0 < 60, "the other writer never arrived"
                time.sleep(0.01)
    except FolderError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_writing_one_output_one_succeeds(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        tokengraft_folder(out, "earlier run")
    a, b = tmp_path / "writer-a", tmp_path / "writer-b"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(me), str(other), str(int(overwrite))],
                              stderr=subprocess.PIPE, text=True, env=ENV) for me, other in ((a, b), (b, a))]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and "appeared or changed" in err[0] and str(out) in err[0], err
    winner = next(name for (rc, _), name in zip(results, ("writer-a", "writer-b")) if rc == 0)
    assert (out / "tokengraft.json").read_text() == winner  # the winner's output, whole
    assert (out / "payload.bin").stat().st_size == 1 << 20
    assert leftovers(tmp_path, "out") == []


def test_two_add_commands_to_one_output(tmp_path, smollm2_dir):
    """Real CLI: two `tokengraft add` of one tiny model to the same -o, started together: exactly one
    writes the folder, the other exits 2 with one line (whichever reached the check last)."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tmp_path / "tiny"
    tiny_llama(tok, tied=True, hidden=32).save_pretrained(model)
    tok.save_pretrained(model)
    out = tmp_path / "out"
    cmds = [[sys.executable, "-m", "tokengraft", "add", str(model), "--tokens", t, "--init", "mean", "-o", str(out)]
            for t in ("<a1>", "<b1>")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for c in cmds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    lines = [x for x in err.splitlines() if x.startswith("tokengraft add:")]  # besides progress bars
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
    assert lines[0].startswith("tokengraft add: error: ") and str(out) in lines[0], lines
    won = "<a1>" if results[0][0] == 0 else "<b1>"
    added = [t["content"] for t in json.loads((out / "tokengraft.json").read_text())["tokens"]]
    assert added == [won]
    assert leftovers(tmp_path, "out") == []
