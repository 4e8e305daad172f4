"""The `tokengraft` command as a user runs it: real subprocesses, real folders."""
from __future__ import annotations

import json
import os
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
    for c in COMMANDS:  # every registered command, not only those the top-level help happens to list
        assert c in r.stdout, c
        h = tg(c, "--help", check=True)
        assert h.stdout.startswith("usage: tokengraft " + c) and len(h.stdout.splitlines()) > 8, c
        assert "exit status" in h.stdout.lower() or c == "demo", c


WRITERS = ("add", "convert", "export", "import-xtuner", "demo")


def _options(parser, cmd):
    sub = next(a for a in parser._actions if a.dest == "command").choices[cmd]
    return {s: a for a in sub._actions for s in a.option_strings}


def test_shared_flags_one_spelling_and_one_help():
    from tokengraft.cli import build_parser
    from tokengraft.commands._common import HELP

    parser = build_parser()
    seen = {}
    for cmd in WRITERS:
        opts = _options(parser, cmd)
        out = opts["-o"]  # -o, --output and the old --out are one option everywhere
        assert opts["--output"] is out and opts["--out"] is out and out.dest == "output", cmd
        assert out.help.startswith(HELP["output"]) or cmd == "demo", cmd
        for flag in ("--overwrite", "--tokens", "--tokens-file", "--dtype", "--max-shard-size"):
            if flag in opts:
                seen.setdefault(flag, set()).add(opts[flag].help)
    assert {f for f in seen} >= {"--overwrite", "--tokens", "--tokens-file", "--dtype", "--max-shard-size"}
    assert all(len(h) == 1 for h in seen.values()), seen
    args = parser.parse_args(["add", "M", "--tokens", "<a>", "--out", "O"])
    assert args.output == "O"


def _modes(folder):
    dirs = {oct(os.stat(folder).st_mode & 0o777)}
    files = set()
    for p in folder.rglob("*"):
        (dirs if p.is_dir() else files).add(oct(p.stat().st_mode & 0o777))
    return dirs, files


def test_outputs_follow_the_umask(smollm2_dir, tmp_path):
    """Folders and files written by add / convert / export are 0755 / 0644 under umask 022, as
    save_pretrained's would be (the temporary folder's 0700 does not survive the rename)."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny = tmp_path / "tiny"
    tiny_llama(tok, hidden=16).save_pretrained(tiny)
    tok.save_pretrained(tiny)

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                           timeout=600, umask=0o022)
        assert r.returncode == 0, r.stderr[-2000:]

    run("add", tiny, "--tokens", "<box>", "-o", tmp_path / "added")
    run("convert", tiny, "--to", tmp_path / "added", "-o", tmp_path / "converted")
    run("export", tmp_path / "added", "-o", tmp_path / "exported")
    for name in ("added", "converted", "exported"):
        assert _modes(tmp_path / name) == ({"0o755"}, {"0o644"}), name


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
    (tmp_path / "notes").mkdir()  # the output beside it: an output inside MODEL_DIR is refused first
    r = tg("add", tmp_path / "notes", "--tokens", "<a>", "-o", tmp_path / "o")
    assert r.returncode == 2 and "no config.json" in r.stderr


# -- the one error boundary (issue 23) ------------------------------------------------------------
PLANT = """
import sys
from tokengraft import cli, errors
import tokengraft.commands.doctor as d

class Measured(errors.TokengraftError):
    exit_code = 1
    details = ("verify: max |logit diff| 3.1e-2",)

def boom(args):
    if sys.argv[1] == "bug":
        {}["missing key"]
    raise Measured("verification failed, nothing written: logits differ")

d.run = boom
sys.exit(cli.main(sys.argv[2:]))
"""


def _planted(kind, *argv, env=None):
    return subprocess.run([sys.executable, "-c", PLANT, kind, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(tmp_path):
    r = _planted("bug", "doctor", str(tmp_path))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == ("tokengraft doctor: error: KeyError: 'missing key' (run with --debug for the traceback)")
    for argv, env in ((["--debug", "doctor", str(tmp_path)], None), (["doctor", str(tmp_path), "--debug"], None),
                      (["doctor", str(tmp_path)], {"TOKENGRAFT_DEBUG": "1"})):
        r = _planted("bug", *argv, env=env)
        assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr, (argv, r.stderr)
        assert 'in boom' in r.stderr and r.stderr.rstrip().endswith("(run with --debug for the traceback)")


def test_exit_code_and_details_come_from_the_error_class(tmp_path):
    r = _planted("check", "doctor", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["tokengraft doctor: verify: max |logit diff| 3.1e-2",
                                     "tokengraft doctor: error: verification failed, nothing written: logits differ"]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--steps", "5"], "tokengraft train: error: unrecognized arguments: --steps"),
    (["add", "m", "--tokens", "<a>", "-o", "o", "--pad-to-multiple-of", "0"],
     "tokengraft add: error: argument --pad-to-multiple-of: expected an integer from 1 to 65,536, got '0'"),
    (["demo", "--seed", "-1"], "tokengraft demo: error: argument --seed: expected an integer from 0 to"),
])
def test_argparse_errors_are_one_line(argv, needle):
    r = tg(*argv)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(needle), r.stderr


@pytest.mark.parametrize("extra,needle", [
    ('tokens: [{content: "<a>", stop: "false"}]', "token entry 0: field 'stop' must be true or false"),
    ('tokens: "<a>"\nlora_targets: [1]', "lora_targets [1]: expected a list of module names"),
    ('tokens: "<a>"\nlr: 1e30', "lr 1e+30: expected a number > 0 and <= 10"),
    ('tokens: "<a>"\nsteps: 5', "unknown key(s) steps"),
])
def test_train_yaml_values_are_checked_before_any_model_loads(tmp_path, extra, needle):
    (tmp_path / "d.json").write_text("[]")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tmp_path}\ndata: {tmp_path / 'd.json'}\noutput_dir: {tmp_path / 'run'}\n{extra}\n")
    r = tg("train", cfg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert r.stderr.startswith("tokengraft train: error: ") and not (tmp_path / "run").exists()
