"""The `tokengraft` command as a user runs it: real subprocesses, real folders."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokengraft.cli import COMMANDS


def tg(*args, check=False):
    r = subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                       timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_every_command_has_help():
    r = tg("--help", check=True)
    built = [c for c in COMMANDS if c in r.stdout]
    assert "add" in built and "doctor" in built
    for c in built:
        h = tg(c, "--help", check=True)
        assert "usage: tokengraft " + c in h.stdout and len(h.stdout.splitlines()) > 8, c


def test_add_writes_complete_folder_and_refuses_to_clobber(smollm2_dir, tmp_path):
    out = tmp_path / "out"
    r = tg("add", smollm2_dir, "--tokens", "<box>,</box>", "-o", out, "--json", check=True)
    man = json.loads(r.stdout)
    assert [t["content"] for t in man["tokens"]] == ["<box>", "</box>"] and man["rows"] == 49216
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "tokengraft.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 49216
    before = sorted(p.name for p in out.iterdir())
    r = tg("add", smollm2_dir, "--tokens", "<x>", "-o", out)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before
    # again on the output: <box> is a no-op, <think> appends, history grows
    out2 = tmp_path / "out2"
    r = tg("add", out, "--tokens", "<box>,<think>", "-o", out2, "--json", check=True)
    man2 = json.loads(r.stdout)
    assert [t["content"] for t in man2["tokens"]] == ["<box>", "</box>", "<think>"]
    assert len(man2["history"]) == 2 and "already grafted" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--tokens", "<a>,,<b>"], "empty"),
    (["--tokens", "<a>,<a>"], "twice"),
    ([], "no tokens given"),
    (["--tokens-file", "/nonexistent/t.yaml"], "cannot read tokens file"),
])
def test_add_bad_input_is_one_line_and_writes_nothing(smollm2_dir, tmp_path, args, msg):
    r = tg("add", smollm2_dir, *args, "-o", tmp_path / "o")
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_add_on_a_folder_that_is_not_a_model(tmp_path):
    r = tg("add", tmp_path, "--tokens", "<a>", "-o", tmp_path / "o")
    assert r.returncode == 2 and "no config.json" in r.stderr
