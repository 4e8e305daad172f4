"""doctor's bad-input battery (issue 9): each damaged folder goes through a real subprocess
(`python -m tokengraft doctor ...`); each must exit 1 (a check failed) or 2 (unreadable input) with
one line naming the problem, never a traceback, never run the folder's code, and leave the input
byte-identical.

The folders are a tiny random Llama with SmolLM2's real tokenizer (the cases are structural: sizes,
names, values), grafted by tokengraft so a manifest is there, and a tiny LLaVA built on it."""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama

TOKENS = [{"content": "<box>"}, {"content": "</box>"}, {"content": "<ref>"}, {"content": "</ref>"}]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- folders ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory):
    """A tied 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer, saved by transformers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    tiny_llama(tok, tied=True).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def grafted_dir(tiny_dir, tmp_path_factory):
    """tiny_dir + <box>, </box>, <ref>, </ref> grafted by tokengraft (49156 tokens, 49216 rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.io import save_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    manifest = graft(model, tok, TOKENS, log=lambda *a: None)
    return save_folder(tmp_path_factory.mktemp("grafted") / "grafted", model, tok, manifest)


@pytest.fixture(scope="module")
def llava_tiny(grafted_dir, tmp_path_factory):
    """A tiny LLaVA (CLIP tower of 1 layer) on the grafted text model: its tokenizer has <box>."""
    from tokengraft.demo.llava import build_llava

    return build_llava(grafted_dir, tmp_path_factory.mktemp("llava") / "llava", image_size=64, patch_size=32,
                       vision_hidden=32, vision_layers=1)


def damaged(src: Path, tmp_path: Path, name: str = "m") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def doctor(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokengraft", "doctor", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=ENV, cwd=cwd)


def check_fails(folder: Path, code: str, *words: str, args=(), rc: int = 1) -> str:
    """Run doctor on ``folder``: exit ``rc``, an error line with ``code`` and ``words``, no traceback,
    the folder unchanged. Returns that line."""
    before = digest(folder)
    r = doctor(folder, *args)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out[-3000:]
    assert r.returncode == rc, out[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("error") and f" {code} " in ln]
    assert len(lines) == 1, (code, r.stdout[-3000:])
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert digest(folder) == before
    return lines[0]


# -- the baseline: the undamaged folders pass -------------------------------------------------

def test_clean_tiny_folders_pass(grafted_dir, llava_tiny):
    for folder in (grafted_dir, llava_tiny):
        r = doctor(folder)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1].startswith("OK: 0 error(s)")
    r = doctor(grafted_dir, "--kl")  # the model is built (safetensors, no remote code) and measured
    assert r.returncode == 0 and " kl-invisibility " in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


# -- weights ----------------------------------------------------------------------------------

def _edit_weights(folder: Path, fn) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_nan_in_a_vocabulary_row(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    _edit_weights(d, lambda sd: sd["model.embed_tokens.weight"][49152].fill_(float("nan")))
    check_fails(d, "nonfinite-rows", "1 vocabulary row(s)", "49152 '<box>'", "NaN")


def test_inf_in_a_layer_makes_every_probability_nan(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    _edit_weights(d, lambda sd: sd["model.norm.weight"].__setitem__(3, float("inf")))
    # the claim behind the error: this model's probabilities are all NaN
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        p = model(input_ids=torch.tensor([[1, 2, 3]])).logits.softmax(-1)
    assert torch.isnan(p).all()
    check_fails(d, "nonfinite-weights", "model.norm.weight (1)")


def test_no_weights_at_all(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    (d / "model.safetensors").unlink()
    check_fails(d, "weights-missing", "no weights", "save_pretrained")


def test_malicious_bin_with_kl_is_never_run(tiny_dir, tmp_path):
    d = damaged(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    line = check_fails(d, "weights-unreadable", "pytorch_model.bin", "system", "never runs", args=["--kl"])
    assert "kl-" not in line and not marker.exists()


# -- config -----------------------------------------------------------------------------------

def test_vocab_size_missing(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    edit_json(d / "config.json", lambda c: c.pop("vocab_size"))
    check_fails(d, "vocab-size-missing", "no vocab_size", "set vocab_size to 49216")


def test_vocab_size_string_is_a_bad_value_not_a_tokenizer_problem(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    edit_json(d / "config.json", lambda c: c.update(vocab_size="49216"))
    check_fails(d, "config-bad-value", "vocab_size is '49216'", "not a positive integer")
    assert "tokenizer-unloadable" not in doctor(d).stdout


# -- manifest vs tokenizer, both directions ---------------------------------------------------

def test_token_removed_from_the_manifest(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    edit_json(d / "tokengraft.json", lambda m: m.update(tokens=m["tokens"][:-1]))
    check_fails(d, "manifest-token-unrecorded", "49155 '</ref>'", "does not record")


def test_manifest_token_missing_from_the_tokenizer(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)

    def drop(t, key):  # the last grafted token, removed by hand from the tokenizer files
        if key == "added_tokens":
            t[key] = [a for a in t[key] if a["content"] != "</ref>"]
        else:
            t[key] = {k: v for k, v in t.get(key, {}).items() if v["content"] != "</ref>"}
    edit_json(d / "tokenizer.json", lambda t: drop(t, "added_tokens"))
    edit_json(d / "tokenizer_config.json", lambda t: drop(t, "added_tokens_decoder"))

    def unregister(t):  # transformers re-adds registered special tokens on load: drop it there too
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(t.get(key), list):
                t[key] = [a for a in t[key] if (a.get("content") if isinstance(a, dict) else a) != "</ref>"]
    edit_json(d / "tokenizer_config.json", unregister)
    check_fails(d, "manifest-token-mismatch", "'</ref>' is recorded at id 49155", "not in the tokenizer")


# -- LLaVA ------------------------------------------------------------------------------------

def _box_id(folder: Path) -> int:
    return next(a["id"] for a in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
                if a["content"] == "<box>")


def test_llava_image_token_on_box(llava_tiny, tmp_path):
    d = damaged(llava_tiny, tmp_path)
    box = _box_id(d)
    edit_json(d / "config.json", lambda c: c.update(image_token_index=box))
    check_fails(d, "image-token-mismatch", f"is {box} ('<box>')", "'<image>'")


def test_llava_without_processor_and_image_token_on_box(llava_tiny, tmp_path):
    d = damaged(llava_tiny, tmp_path)
    box = _box_id(d)
    edit_json(d / "config.json", lambda c: c.update(image_token_index=box))
    for f in ("processor_config.json", "preprocessor_config.json"):
        (d / f).unlink(missing_ok=True)
    check_fails(d, "processor-missing", "no processor files")
    check_fails(d, "image-token-mismatch", f"is {box}, which is '<box>'")


# -- remote code ------------------------------------------------------------------------------

def _in_pty(args, timeout: float = 600) -> tuple[int, str]:
    """Run ``args`` on a pseudo-terminal that answers "y" to anything it is asked."""
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    os.write(master, b"y\n" * 8)  # typed ahead: any prompt reads a "y"
    out, end = b"", time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
            if b"[y/N]" in data:
                os.write(master, b"y\n")
        elif p.poll() is not None:
            break
    p.wait(timeout=60)
    os.close(master)
    return p.returncode, out.decode(errors="replace")


def test_remote_code_is_reported_and_never_run(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n" \
           f"class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
    (d / "configuration_evil.py").write_text(code)
    (d / "modeling_evil.py").write_text(code.replace("EvilConfig(LlamaConfig)", "EvilModel"))
    edit_json(d / "config.json", lambda c: c.update(
        model_type="evil_llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}))
    before = digest(d)
    rc, out = _in_pty([sys.executable, "-m", "tokengraft", "doctor", str(d)])
    assert not marker.exists(), out[-3000:]
    assert rc == 1 and "Traceback" not in out and "[y/N]" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("error") and " remote-code " in ln]
    assert len(lines) == 1 and "ships remote code" in lines[0] and "never runs it" in lines[0], out[-3000:]
    assert digest(d) == before


# -- unreadable input: exit 2 -----------------------------------------------------------------

def test_not_a_folder_is_one_line_exit_2(tmp_path):
    r = doctor(tmp_path / "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a folder" in r.stderr


# -- --checkpoint -----------------------------------------------------------------------------

def _mmengine_checkpoint(path: Path, rows: int, hidden: int = 64) -> Path:
    """An mmengine/XTuner-shaped iter_N.pth: meta, state_dict (llm.* keys), optimizer."""
    g = torch.Generator().manual_seed(0)
    sd = {"llm.model.embed_tokens.weight": torch.randn(rows, hidden, generator=g),
          "llm.lm_head.weight": torch.randn(rows, hidden, generator=g),
          "llm.model.norm.weight": torch.ones(hidden)}
    torch.save({"meta": {"iter": 4}, "state_dict": sd}, path)
    return path


def test_checkpoint_of_the_old_vocabulary(grafted_dir, tmp_path):
    ck = _mmengine_checkpoint(tmp_path / "iter_4.pth", 49152)
    before = digest(tmp_path)
    r = doctor("--checkpoint", ck, "--model", grafted_dir)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if " checkpoint-rows-mismatch " in ln)
    assert line.startswith("error") and "have 49152 rows" in line and "49216" in line and "load_from" in line
    assert f"tokengraft convert {ck} --to {grafted_dir} -o {tmp_path / 'iter_4-converted.pth'}" in line
    assert digest(tmp_path) == before


def test_checkpoint_that_fits(grafted_dir, tmp_path):
    ck = _mmengine_checkpoint(tmp_path / "iter_8.pth", 49216)
    r = doctor("--checkpoint", ck, "--model", grafted_dir, "--json")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    f = json.loads(r.stdout)["findings"]
    assert [x["code"] for x in f] == ["checkpoint-fits"] and f[0]["data"]["checkpoint_rows"] == 49216


def test_checkpoint_without_model_is_exit_2(tmp_path):
    ck = _mmengine_checkpoint(tmp_path / "iter_4.pth", 8, hidden=4)
    r = doctor("--checkpoint", ck)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--model" in r.stderr
    assert r.stderr.strip().count("\n") == 0


# -- issue 23: every JSON file doctor reads goes through the one reader and its schemas -----------

def test_a_fifo_as_config_json_is_reported_not_waited_on(grafted_dir, tmp_path):
    d = damaged(grafted_dir, tmp_path)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    t = time.time()
    check_fails(d, "config-invalid", "config.json: is not a regular file")
    assert time.time() - t < 300


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["tokens"][0].update(stop="false"), ("tokens[0]: field 'stop' must be true or false",
                                                      "got the string 'false'")),
    (lambda m: m["tokens"][0].update(id=10**13), ("tokens[0]: field 'id' must be an integer from 0 to",)),
    (lambda m: m.update(tied="yes"), ("field 'tied' must be true or false",)),
], ids=["stop string", "id 1e13", "tied string"])
def test_manifest_of_the_wrong_types(grafted_dir, tmp_path, edit, words):
    d = damaged(grafted_dir, tmp_path)
    edit_json(d / "tokengraft.json", edit)
    check_fails(d, "manifest-invalid", *words)
