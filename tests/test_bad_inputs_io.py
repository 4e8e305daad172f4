"""Bad inputs, faults and interruptions of the writing commands (add, convert, export), run as a
user would: a real subprocess, exit 2, ONE line on stderr naming the problem, no traceback, every
input unchanged (sha256 of each file before/after), nothing at the output and no temporaries.

Structure is carried by a tiny untied Llama with SmolLM2's real tokenizer; the interruption tests
convert the real SmolLM2 (large enough that the temporary folder exists for seconds)."""
from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tg(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def tree_hash(*paths) -> dict[str, str]:
    out = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def temporaries(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def refused(cmd: str, out: Path, inputs: list, *args, needle: str, out_before=None, loaded=False) -> str:
    """Run ``tokengraft CMD *args``; assert exit 2, one line naming ``needle``, inputs unchanged,
    the output as it was (absent, or ``out_before``), no temporaries. ``loaded``: the refusal comes
    after the model loaded (transformers' progress bar may precede it)."""
    before = tree_hash(*inputs)
    r = tg(cmd, *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not (loaded and ln.startswith("Loading weights"))]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"tokengraft {cmd}: error: ") and needle in lines[0], lines[0]
    assert tree_hash(*inputs) == before, "an input changed"
    if out_before is None:
        assert not os.path.lexists(out), f"{out} was written"
    else:
        assert tree_hash(out) == out_before, f"{out} changed"
    if out.parent.is_dir():
        assert not temporaries(out), temporaries(out)
    return lines[0]


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(smollm2_dir, tmp_path_factory):
    """tiny/: a plain HF folder (tiny untied Llama, SmolLM2's tokenizer); grafted/: tiny with <box>
    added by tokengraft (carries tokengraft.json). Read-only: tests copy what they put in place."""
    from transformers import AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.io import save_folder

    root = tmp_path_factory.mktemp("io")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(tok, hidden=16)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    man = graft(model, tok, [{"content": "<box>", "init": "subword"}], log=lambda *a: None)
    save_folder(root / "grafted", model, tok, man)
    return root


def _put(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> Path:
    p = folder / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return folder


# -- the output may not be, contain or sit inside an input ----------------------------------------

def test_add_output_is_a_parent_of_the_model(world, tmp_path):
    nest = _put(world / "grafted", tmp_path / "nest")  # a folder tokengraft wrote: only nesting stops it
    _put(world / "tiny", nest / "m")
    refused("add", nest, [nest], nest / "m", "--tokens", "<x>", "-o", nest, "--overwrite",
            needle="contains the MODEL_DIR", out_before=tree_hash(nest))


def test_convert_output_is_a_parent_of_the_checkpoint(world, tmp_path):
    nest = _put(world / "grafted", tmp_path / "nest2")
    _put(world / "tiny", nest / "m")
    refused("convert", nest, [nest, world / "grafted"], nest / "m", "--to", world / "grafted", "-o", nest,
            "--overwrite", needle="contains the CHECKPOINT", out_before=tree_hash(nest))


def test_convert_output_is_the_target(world, tmp_path):
    box = _put(world / "grafted", tmp_path / "smol-box")
    refused("convert", box, [world / "tiny", box], world / "tiny", "--to", box, "-o", box, "--overwrite",
            needle="is the TARGET", out_before=tree_hash(box))


def test_export_output_is_a_parent_of_the_run(world, tmp_path):
    enest = _put(world / "grafted", tmp_path / "enest")
    (enest / "run").mkdir()
    (enest / "run" / "run.json").write_text(json.dumps({"base_model": str(world / "tiny"), "mode": "rows",
                                                        "base_vocab_fingerprint": "x"}))
    refused("export", enest, [enest, world / "tiny"], enest / "run", "-o", enest, "--overwrite",
            needle="contains the SOURCE", out_before=tree_hash(enest))


def test_export_output_inside_the_runs_base_model(world, tmp_path):
    base = _put(world / "tiny", tmp_path / "base")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"base_model": str(base), "mode": "rows",
                                                           "base_vocab_fingerprint": "x"}))
    refused("export", base / "exp", [base, tmp_path / "run"], tmp_path / "run", "-o", base / "exp",
            needle="inside the base model (run.json)")


def test_output_through_a_symlink_to_the_input(world, tmp_path):
    model = _put(world / "grafted", tmp_path / "m")
    (tmp_path / "link").symlink_to(model)
    refused("add", tmp_path / "link", [model], model, "--tokens", "<x>", "-o", tmp_path / "link", "--overwrite",
            needle="is the MODEL_DIR", out_before=tree_hash(tmp_path / "link"))


# -- what --overwrite may replace -----------------------------------------------------------------

def test_overwrite_refuses_a_folder_tokengraft_did_not_write(world, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    line = refused("add", mine, [world / "tiny"], world / "tiny", "--tokens", "<x>", "-o", mine, "--overwrite",
                   needle="not written by tokengraft", out_before=tree_hash(mine))
    assert "--overwrite never replaces" in line


def test_existing_output_without_overwrite(world, tmp_path):
    out = _put(world / "grafted", tmp_path / "out")
    refused("add", out, [world / "tiny"], world / "tiny", "--tokens", "<x>", "-o", out,
            needle="already exists; pass --overwrite", out_before=tree_hash(out))


def test_output_is_a_file(world, tmp_path):
    f = tmp_path / "out"
    f.write_text("not a folder")
    refused("add", f, [world / "tiny"], world / "tiny", "--tokens", "<x>", "-o", f, "--overwrite",
            needle="exists and is a file; tokengraft never replaces a file", out_before=tree_hash(f))


def test_read_only_output_parent(world, tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits: /sys refuses new folders to everyone
        out = Path("/sys/tokengraft-test/out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    refused("add", out, [world / "tiny"], world / "tiny", "--tokens", "<x>", "-o", out, needle="cannot create")


# -- broken model folders -------------------------------------------------------------------------

def test_add_config_without_weights(world, tmp_path):
    m = _put(world / "tiny", tmp_path / "m")
    (m / "model.safetensors").unlink()
    refused("add", tmp_path / "o", [m], m, "--tokens", "<x>", "-o", tmp_path / "o", needle="no weights")


def test_export_config_without_weights(world, tmp_path):
    m = _put(world / "grafted", tmp_path / "m")
    (m / "model.safetensors").unlink()
    refused("export", tmp_path / "o", [m], m, "-o", tmp_path / "o", needle="neither a model folder")


def test_manifest_that_is_a_list(world, tmp_path):
    m = _put(world / "tiny", tmp_path / "m")
    (m / "tokengraft.json").write_text("[]")
    refused("add", tmp_path / "o", [m], m, "--tokens", "<x>", "-o", tmp_path / "o",
            needle="tokengraft.json: expected a JSON object")


@pytest.mark.parametrize("vocab", [1000, 60000])
def test_config_vocab_size_disagrees_with_weights(world, tmp_path, vocab):
    m = _edit_config(_put(world / "tiny", tmp_path / "m"), vocab_size=vocab)
    line = refused("add", tmp_path / "o", [m], m, "--tokens", "<x>", "-o", tmp_path / "o",
                   needle=f"vocab_size {vocab}")
    assert "49152 rows" in line


def test_malicious_bin_is_refused_unrun(world, tmp_path):
    import torch

    m = _put(world / "tiny", tmp_path / "m")
    (m / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Payload()}, m / "pytorch_model.bin")
    refused("add", tmp_path / "o", [m], m, "--tokens", "<x>", "-o", tmp_path / "o", needle="refused without running")
    assert not marker.exists()


# -- no remote code, even when a terminal answers "y" ---------------------------------------------

def _plant_remote_code(world, folder: Path, marker: Path, model_type="tokengraftevilnet") -> Path:
    m = _put(world / "grafted", folder)
    _edit_config(m, model_type=model_type, architectures=["EvilForCausalLM"],
                 auto_map={"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilForCausalLM"})
    (m / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'tokengraftevilnet'\n"
                                    "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return m


def _run_on_a_terminal_answering_yes(*args, timeout=300):
    """stdin/stdout on a pseudo-terminal that keeps answering "y"; stderr captured apart."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "tokengraft", *map(str, args)], stdin=slave, stdout=slave,
                         stderr=subprocess.PIPE, env=ENV, close_fds=True)
    os.close(slave)
    seen, end = b"", time.time() + timeout
    try:
        while p.poll() is None and time.time() < end:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
            os.write(master, b"y\n")
        p.wait(timeout=max(1, end - time.time()))
    finally:
        os.close(master)
    return p.returncode, p.stderr.read().decode(), seen.decode(errors="replace")


@pytest.mark.parametrize("cmd", ["add", "export"])
def test_remote_code_never_runs_on_a_terminal_answering_yes(world, tmp_path, cmd):
    marker = tmp_path / "RAN"
    m = _plant_remote_code(world, tmp_path / "m", marker)
    before = tree_hash(m)
    extra = ["--tokens", "<x>"] if cmd == "add" else []
    rc, err, terminal = _run_on_a_terminal_answering_yes(cmd, m, *extra, "-o", tmp_path / "o")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert not marker.exists(), "the folder's code ran"
    assert rc == 2 and len(lines) == 1 and "auto_map" in lines[0] and "Traceback" not in err, err
    assert "[y/N]" not in terminal and "custom code" not in terminal, terminal
    assert tree_hash(m) == before and not (tmp_path / "o").exists() and not temporaries(tmp_path / "o")


# -- interruptions --------------------------------------------------------------------------------

def _start_convert_and_wait_for_temp(smollm2_dir, target, out: Path):
    p = subprocess.Popen([sys.executable, "-m", "tokengraft", "convert", str(smollm2_dir), "--to", str(target),
                          "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    end = time.time() + 240
    while time.time() < end and p.poll() is None:
        tmp = [out.parent / n for n in temporaries(out) if ".tmp-" in n]
        if tmp and any(tmp[0].iterdir()):  # writing has begun
            return p, tmp[0]
        time.sleep(0.02)
    p.kill()
    pytest.fail(f"convert never showed a temporary folder (exit {p.poll()}): {p.stderr.read()[-2000:]!r}")


def test_sigterm_removes_the_temporary_folder(world, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    before = tree_hash(smollm2_dir)
    p, tmp = _start_convert_and_wait_for_temp(smollm2_dir, world / "grafted", out)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    err = p.stderr.read().decode()
    assert rc == 143 and "terminated" in err and "Traceback" not in err, (rc, err[-2000:])
    assert not tmp.exists() and not out.exists() and not temporaries(out)
    assert tree_hash(smollm2_dir) == before


def test_sigkill_leftover_is_swept_by_the_next_run(world, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    p, tmp = _start_convert_and_wait_for_temp(smollm2_dir, world / "grafted", out)
    p.kill()
    p.wait(timeout=60)
    assert tmp.exists(), "precondition: SIGKILL leaves the temporary folder"
    r = tg("convert", world / "tiny", "--to", world / "grafted", "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not tmp.exists() and not temporaries(out) and (out / "tokengraft.json").is_file()


def test_stale_temporary_of_a_live_process_is_kept(tmp_path):
    """Only temporaries whose process is gone are swept: a concurrent run keeps its folder."""
    from tokengraft.outdir import sweep_stale

    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    other = tmp_path / ".other.tmp-999999999-abc"
    live.mkdir()
    other.mkdir()
    assert sweep_stale(tmp_path / "out") == [] and live.exists() and other.exists()


def test_atomic_file_sweeps_a_killed_runs_temporary_and_follows_the_umask(tmp_path):
    """A single-file output (a converted iter_N.pth) gets the folder rule's guarantees: the
    temporary file a SIGKILLed run left is swept, a failure leaves nothing, modes follow the umask."""
    from tokengraft.outdir import atomic_file

    out = tmp_path / "iter_4.pth"
    dead = tmp_path / ".iter_4.pth.tmp-999999999-abc"
    dead.write_bytes(b"x" * 100)
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not dead.exists() and not out.exists() and not temporaries(out)
    old = os.umask(0o022)
    try:
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"whole")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"whole" and (out.stat().st_mode & 0o777) == 0o644 and not temporaries(out)


CHILD = """
import sys, types
import tokengraft.cli as cli
from transformers.dynamic_module_utils import resolve_trust_remote_code

def register(sub, name):
    return sub.add_parser(name)

def run(args):  # what a loader without trust_remote_code=False would do on a remote-code folder
    try:
        print("RESULT", resolve_trust_remote_code(None, sys.argv[1], False, True), file=sys.stderr)
    except ValueError:
        print("RESULT refused", file=sys.stderr)
    return 0

sys.modules["tokengraft.commands.askprompt"] = types.ModuleType("askprompt")
sys.modules["tokengraft.commands.askprompt"].__dict__.update(register=register, run=run)
cli.COMMANDS["askprompt"] = "askprompt"
sys.exit(cli.main(["askprompt"]))
"""


def test_no_command_can_be_prompted_into_running_a_folders_code(tmp_path):
    """cli.main gives commands no readable stdin: even transformers' own prompt, if some loader
    still reached it, cannot be answered yes on a terminal."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=slave, stdout=slave,
                         stderr=subprocess.PIPE, env=ENV, close_fds=True)
    os.close(slave)
    end = time.time() + 120
    while p.poll() is None and time.time() < end:
        if select.select([master], [], [], 0.2)[0]:
            try:
                os.read(master, 4096)
            except OSError:
                break
        os.write(master, b"y\n")
    p.wait(timeout=30)
    os.close(master)
    err = p.stderr.read().decode()
    assert "RESULT refused" in err and "RESULT True" not in err, err[-2000:]


def test_cli_restores_stdin_after_a_command():
    from tokengraft.cli import main

    before = sys.stdin
    assert main(["add", "/nonexistent-model", "--tokens", "<a>", "-o", "/nonexistent-out"]) == 2
    assert sys.stdin is before


# -- issue 23: schemas at the edge, one error boundary, add/export never silently wrong -----------
# Cases: tokens-file schema 11 (in-process on real files) + 2 through the CLI; manifest schema 5;
# index files 2; FIFO config 1; numeric flags 5; non-finite base rows 2; fp16 overflow 1; full disk 1;
# a base word in rows mode end to end 1.  = 31

TOKENS_SCHEMA = [
    ([{"content": "<x1>", "stop": "false"}], "field 'stop' must be true or false, got the string 'false'"),
    ([{"content": "<x1>", "special": 1}], "field 'special' must be true or false, got the number 1"),
    ([{"content": "<x1>", "special": None}], "field 'special' must be true or false, got null"),
    ([{"content": "<x1>", "init": 5}], "field 'init' must be a string, got the number 5"),
    ([{"content": "<x1>", "init": "bogus"}], "init 'bogus' is not one of"),
    ([{"content": "<x1>", "description": ["a"]}], "field 'description' must be a string"),
    ([{"content": "<x1>", "role": True}], "field 'role' must be a string, got true"),
    ([{"content": ""}], "empty or whitespace-only token"),
    ([{"content": 7}], "field 'content' must be a string, got the number 7"),
    ([{"content": "\ud800"}], "not valid Unicode text (a lone surrogate"),
    (["<a>", {"content": "<a>"}], "'<a>' is listed twice"),
]


@pytest.mark.parametrize("data,needle", TOKENS_SCHEMA, ids=[n[:28] for _, n in TOKENS_SCHEMA])
def test_tokens_file_schema(tmp_path, data, needle):
    from tokengraft.graft import GraftError, parse_tokens

    p = tmp_path / "tokens.json"
    p.write_text(json.dumps(data))  # json.dumps writes the lone surrogate as the escape \ud800
    with pytest.raises(GraftError) as e:
        parse_tokens(tokens_file=str(p))
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tokens_file_string_false_is_refused_by_add(world, tmp_path):
    (tmp_path / "t.yaml").write_text('- content: "<x1>"\n  stop: "false"\n')
    refused("add", tmp_path / "o", [world / "tiny"], world / "tiny", "--tokens-file", tmp_path / "t.yaml",
            "-o", tmp_path / "o", needle="token entry 0: field 'stop' must be true or false, got the string 'false'")


def test_tokens_file_that_is_a_fifo_or_not_utf8(world, tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    refused("add", tmp_path / "o", [world / "tiny"], world / "tiny", "--tokens-file", tmp_path / "fifo.json",
            "-o", tmp_path / "o", needle="not a regular file")
    (tmp_path / "latin1.json").write_bytes('[{"content": "<caf\xe9>"}]'.encode("latin-1"))
    refused("add", tmp_path / "o", [world / "tiny"], world / "tiny", "--tokens-file", tmp_path / "latin1.json",
            "-o", tmp_path / "o", needle="not UTF-8 text")


def _manifest(folder: Path, edit) -> Path:
    p = folder / "tokengraft.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))
    return folder


MANIFEST_CASES = [
    ("id 1e13", lambda d: d["tokens"][0].update(id=10**13), "tokens[0]: field 'id' must be an integer from 0 to"),
    ("stop string", lambda d: d["tokens"][0].update(stop="false"), "field 'stop' must be true or false"),
    ("rows float", lambda d: d.update(rows=1e13), "field 'rows' must be an integer from 1 to 16,777,216"),
    ("shared id", lambda d: d["tokens"].append({**d["tokens"][0], "content": "<other>"}), "two tokens share the id"),
    # no fingerprint, and a token the tokenizer does not have: checked against the tokenizer, never trusted
    ("foreign token", lambda d: (d.pop("vocab_fingerprint"), d["tokens"][0].update(content="<never-added>")),
     "records '<never-added>' at id"),
]


@pytest.mark.parametrize("name,edit,needle", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_schema_and_identity(world, tmp_path, name, edit, needle):
    m = _manifest(_put(world / "grafted", tmp_path / "m"), edit)
    refused("add", tmp_path / "o", [m], m, "--tokens", "<never-added>", "-o", tmp_path / "o", needle=needle,
            loaded=name == "foreign token")  # needs the tokenizer, which loads with the model


@pytest.mark.parametrize("weight_map,needle", [(["model.safetensors"], "field 'weight_map' must be an object"),
                                               ({"lm_head.weight": "../model.safetensors"}, "must be a shard file name")])
def test_index_weight_map_schema(world, tmp_path, weight_map, needle):
    m = _put(world / "tiny", tmp_path / "m")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused("add", tmp_path / "o", [m], m, "--tokens", "<x>", "-o", tmp_path / "o", needle=needle)


def test_fifo_as_config_json_is_refused_not_waited_on(world, tmp_path):
    m = _put(world / "tiny", tmp_path / "m")
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    t = time.time()
    refused("add", tmp_path / "o", [], m, "--tokens", "<x>", "-o", tmp_path / "o", needle="not a regular file")
    assert time.time() - t < 120


@pytest.mark.parametrize("cmd,args,needle", [
    ("add", ["M", "--tokens", "<x>", "-o", "O", "--pad-to-multiple-of", "99999999999999"],
     "--pad-to-multiple-of: expected an integer from 1 to 65,536, got '99999999999999'"),
    ("export", ["M", "-o", "O", "--max-shard-size", "lots"], "--max-shard-size: expected a size such as 5GB"),
    ("import-xtuner", ["M", "--llm", "M", "-o", "O", "--lora-alpha", "nan"], "--lora-alpha: expected a number > 0"),
    ("train", ["--model", "M", "--lr", "1e30"], "--lr: expected a number > 0 and <= 10"),
    ("train", ["--model", "M", "--batch-size", "1e3"], "--batch-size: expected an integer from 1 to"),
])
def test_numeric_flags_refused_at_parse_time(world, tmp_path, cmd, args, needle):
    """Before any model loads (M is a real model folder): argparse's one line, exit 2."""
    args = [str(world / "tiny") if a == "M" else str(tmp_path / "o") if a == "O" else a for a in args]
    refused(cmd, tmp_path / "o", [world / "tiny"], *args, needle=needle)


def test_one_inf_base_row_leaves_new_rows_finite(smollm2_dir):
    """Statistics over finite trained rows only; the base row is kept as it is, and reported."""
    import torch
    from transformers import AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.init import mean_row, trained_mask

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(tok, hidden=16)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[100, 3] = float("inf")
    finite = torch.ones(emb.shape[0], dtype=torch.bool)
    finite[100] = False
    expected = emb.detach()[finite & trained_mask(emb.detach(), emb.shape[0])].mean(dim=0)
    said = []
    man = graft(model, tok, [{"content": "<q1>", "init": "mean"}, {"content": "<q2>", "init": "mean"}],
                log=said.append)
    new = [t.id for t in man.tokens] + list(range(len(tok), man.rows))  # token rows and padding rows
    for w in (emb, model.get_output_embeddings().weight):
        assert torch.isfinite(w[new]).all()
    assert torch.allclose(emb[man.tokens[0].id], expected, atol=1e-6)
    assert torch.equal(mean_row(emb.detach(), trained_mask(emb.detach(), len(tok) - 2)), expected)
    assert emb[100, 3].item() == float("inf")  # the base row is the base's: left as it was
    assert any("row 100" in s and "model.embed_tokens.weight" in s for s in said), said


def test_copy_of_an_inf_row_is_an_error_naming_tensor_and_row(smollm2_dir):
    import torch
    from transformers import AutoTokenizer

    from tokengraft.graft import GraftError, graft

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(tok, hidden=16)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("hello")] = float("nan")
    with pytest.raises(GraftError, match=r"row \d+ of model.embed_tokens.weight would be non-finite"):
        graft(model, tok, [{"content": "<q1>", "init": "copy:hello"}], log=lambda *a: None)


def test_export_fp16_of_a_row_beyond_its_range(world, tmp_path):
    from safetensors.torch import load_file, save_file

    m = _put(world / "grafted", tmp_path / "m")
    sd = load_file(m / "model.safetensors")
    sd["model.embed_tokens.weight"][7] = 1e5  # finite in fp32, inf in fp16 (max 65504), fine in bf16
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    refused("export", tmp_path / "o", [m], m, "-o", tmp_path / "o", "--dtype", "fp16",
            needle="model.embed_tokens.weight: row 7 holds 100000, beyond float16's range", loaded=True)


def test_full_disk_is_one_line_and_leaves_nothing(world, tmp_path):
    """A file-size limit (what a full disk or quota does to a write): safetensors' 'File too large'."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "add", str(world / "tiny"), "--tokens", "<x>",
                        "-o", str(out)], capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=limit)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("rows ", "added ", "note"))]
    err = [ln for ln in lines if ln.startswith("tokengraft add: error: ")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(out) in err[0] and "file size limit" in err[0] and "needs about" in err[0], err[0]
    assert not out.exists() and not temporaries(out)


def test_a_base_word_is_never_trained_as_a_new_row(world, tmp_path):
    """`--tokens hello,<box>` in rows mode: hello is in the vocabulary, so its base row is exported
    bit-identical; only <box> trains (add -> train rows -> export)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"say hi {i}"},
                                                   {"from": "gpt", "value": f"hello <box>{i}"}]} for i in range(4)]))
    run, out = tmp_path / "run", tmp_path / "out"
    r = tg("train", "--model", world / "tiny", "--data", data, "--output-dir", run, "--tokens", "hello,<box>",
           "--template", "chatml", "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--lr", "0.05",
           "--no-progress", "--no-tensorboard", "--save-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not trained as new rows" in r.stdout + r.stderr
    assert json.loads((run / "run.json").read_text())["new_tokens"] == ["<box>"]
    assert tg("export", run, "-o", out).returncode == 0
    hello = AutoTokenizer.from_pretrained(world / "tiny").convert_tokens_to_ids("hello")
    base, got = load_file(world / "tiny" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[k][hello].equal(base[k][hello]), k
    box = json.loads((out / "tokengraft.json").read_text())["tokens"]
    assert [t["content"] for t in box] == ["<box>"]
