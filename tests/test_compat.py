"""Every folder tokengraft writes reads the same in transformers 4.48 (XTuner's pin), 5.20 (vLLM's
range) and the project's transformers 5 (issue 21).

The old versions run in cached venvs (tests/venvs.py), one subprocess per venv that reads every
folder (tests/compat_child.py); this process runs the same probe with its own transformers and
compares: tokenizer ids with and without the new tokens (each new token one id, the manifest's),
new special tokens registered as special, the same chat template and rendered chat, logits within
1e-4 (a LLaVA with a real picture's pixel_values, compared too). The folders are real: a
`tokengraft add` of SmolLM2 (tied, special and normal tokens), and the export of a real training
run on the SmolLM2 LLaVA. The fast tests below pin the rewrite itself (portable.py) and doctor.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import compat_child
from venvs import COMPAT, IndexUnreachable

TOKENS = [{"content": "<box>"}, {"content": "</box>", "stop": True}, {"content": "<think>"},
          {"content": "</think>"}, {"content": "grafted_word", "special": False}]
TEXTS = ["<box>12 34</box> then <think>why grafted_word?</think>", "Plain text, no new tokens: Paris."]
LOGIT_TOL = 1e-4


# -- the real folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def added(smollm2_dir, tmp_path_factory):
    """`tokengraft add` of real SmolLM2 (tied) with special tokens and one normal token."""
    from tokengraft.cli import main

    d = tmp_path_factory.mktemp("compat")
    (d / "tokens.json").write_text(json.dumps(TOKENS))
    assert main(["add", str(smollm2_dir), "--tokens-file", str(d / "tokens.json"), "-o", str(d / "added")]) == 0
    return d / "added"


@pytest.fixture(scope="module")
def llava_export(llava_dir, tmp_path_factory):
    """A real `rows` training run (2 steps) on the SmolLM2 LLaVA, exported; and one of its pictures."""
    from tokengraft.demo.data import make_grounding_dataset
    from tokengraft.export import export
    from tokengraft.train.loop import TrainConfig, train

    d = tmp_path_factory.mktemp("compat-run")
    data = make_grounding_dataset(d / "data", n_train=4, n_eval=1, bins=4, seed=0)
    train(TrainConfig(model=str(llava_dir), data=str(data["train"]), image_folder=str(data["image_folder"]),
                      tokens=data["tokens"], init="mean", template="chatml", output_dir=str(d / "run"), mode="rows",
                      batch_size=4, max_steps=2, lr=2e-2, logging_steps=1, save_steps=100, progress=False,
                      tensorboard=False, max_length=128))
    # verified where it will be used: the reload runs under transformers 4.48 (--verify-python)
    rep = export(d / "run", d / "export", verify_output=True, verify_python=_python("4.48"), log=lambda *a: None)
    assert rep.verify.ok and rep.verify.reloaded_by.startswith("transformers 4.48.0"), rep.verify.lines()
    image = sorted(p for p in Path(data["image_folder"]).iterdir() if p.suffix in (".png", ".jpg"))[0]
    return d / "export", data["tokens"], image


def _python(version: str):
    try:
        return COMPAT[version].ensure()
    except IndexUnreachable as e:
        pytest.skip(f"cannot build the transformers {version} venv: {e}")


def _spec(added, llava_export) -> dict:
    """Each folder with texts using its new tokens and not, and every token its manifest lists."""
    from tokengraft.manifest import Manifest

    out, tokens, image = llava_export
    every = {d: [t.content for t in Manifest.load(d).tokens] for d in (added, out)}
    return {"added": {"path": str(added), "texts": TEXTS, "tokens": every[added]},
            "llava": {"path": str(out), "llava": True, "image": str(image), "tokens": every[out],
                      "texts": ["<image>\nWhere is the red square? " + "".join(tokens[:6]) + "</box>", "Plain text."]}}


def _run_envs(spec: dict, tmp_path) -> dict:
    """One subprocess per old venv, all at once; {version: (report, out_dir)}."""
    pythons = {v: _python(v) for v in COMPAT}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    procs = {}
    for v, py in pythons.items():
        (tmp_path / v).mkdir()
        procs[v] = subprocess.Popen([str(py), compat_child.__file__, str(tmp_path / "spec.json"), str(tmp_path / v)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    results = {}
    for v, p in procs.items():
        log = p.communicate(timeout=900)[0]
        assert p.returncode == 0, f"transformers {v} could not read the folders:\n{log[-3000:]}"
        results[v] = (json.loads((tmp_path / v / "report.json").read_text()), tmp_path / v)
    return results


def _compare(name: str, mine: tuple, theirs: dict, out_dir, manifest_ids: dict, special: set) -> float:
    from safetensors.torch import load_file

    facts, tensors = mine
    got = theirs["folders"][name]
    v = theirs["transformers"]
    for key in ("ids", "keys", "input_keys", "token_ids", "special", "chat_template", "chat", "len", "rope_theta",
                "processor_chat_template"):
        assert got.get(key) == facts.get(key), f"{name}: transformers {v} reads another {key}"
    for t, i in manifest_ids.items():
        assert got["token_ids"][t] == [i], f"{name}: {t!r} is {got['token_ids'][t]} in {v}, manifest says {i}"
    assert special <= set(got["special"]), f"{name}: {special - set(got['special'])} not special in {v}"
    other = load_file(str(out_dir / f"{name}.safetensors"))
    assert torch.equal(other["input_ids"], tensors["input_ids"])
    if "pixel_values" in tensors:
        assert torch.allclose(other["pixel_values"], tensors["pixel_values"], atol=1e-6), f"{name}: pixels in {v}"
    return float((other["logits"] - tensors["logits"]).abs().max())


@pytest.mark.slow
def test_old_transformers_read_what_tokengraft_writes(added, llava_export, tmp_path, capsys):
    from tokengraft.manifest import Manifest

    spec = _spec(added, llava_export)
    results = _run_envs(spec, tmp_path)
    import transformers

    figures = {}
    for name, folder in spec.items():
        man = Manifest.load(folder["path"])
        ids = {t.content: t.id for t in man.tokens}
        special = {t.content for t in man.tokens if t.special}
        mine = compat_child.probe(folder)
        assert mine[0]["rope_theta"] == 100000.0 or mine[0]["rope_theta"] is None
        for v, (report, out_dir) in results.items():
            d = _compare(name, mine, report, out_dir, ids, special)
            figures[(name, report["transformers"])] = d
            assert d <= LOGIT_TOL, f"{name}: logits in transformers {report['transformers']} differ by {d:.3e}"
    with capsys.disabled():
        for (name, v), d in sorted(figures.items()):
            print(f"\ncompat {name}: transformers {v} vs {transformers.__version__}: max |logit diff| {d:.2e}")


# -- the rewrite itself (portable.py) and doctor -------------------------------------------------

@pytest.fixture(scope="module")
def raw_folder(smollm2_dir, tmp_path_factory):
    """A folder transformers 5 wrote itself (not tokengraft): a tiny Llama, bf16 on disk, SmolLM2's
    tokenizer with an extra special token."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    model = tiny_llama(tok, tied=True)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    out = tmp_path_factory.mktemp("raw") / "raw"
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_rewrite_keeps_what_transformers_5_reads(raw_folder, copy_dir):
    from transformers import AutoConfig, AutoTokenizer

    from tokengraft.portable import make_portable, misreadings

    before = misreadings(raw_folder)
    assert any("rope_theta 10000 (its default) instead of 50000.0" in m for m in before), before
    assert any("TokenizersBackend" in m for m in before) and any("bfloat16" in m for m in before)
    d = copy_dir(raw_folder)
    assert make_portable(d) == [] and misreadings(d) == []
    first = _digest(d)
    make_portable(d)
    assert _digest(d) == first  # idempotent
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0 and cfg["rope_parameters"]["rope_theta"] == 50000.0
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16" and cfg["rope_scaling"] is None
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tc
    assert tc["additional_special_tokens"] == ["<extra>"] and tc["model_input_names"] == ["input_ids", "attention_mask"]
    a, b = AutoConfig.from_pretrained(raw_folder), AutoConfig.from_pretrained(d)
    assert a.rope_parameters == b.rope_parameters and a.dtype == b.dtype
    ta, tb = AutoTokenizer.from_pretrained(raw_folder), AutoTokenizer.from_pretrained(d)
    assert type(ta) is type(tb) and ta.all_special_tokens == tb.all_special_tokens
    assert ta(TEXTS[0] + "<extra>")["input_ids"] == tb(TEXTS[0] + "<extra>")["input_ids"]


def _config_only(tmp_path, rope: dict):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    return tmp_path


def test_scaled_rope_and_ropes_old_readers_lack(tmp_path):
    from tokengraft.portable import PortabilityWarning, make_portable, misreadings

    d = _config_only(tmp_path, {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    assert any("no rope scaling instead of 'llama3'" in m for m in misreadings(d))
    make_portable(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_theta"] == 5e5 and cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    # a rope type 4.48 lacks: written (4.48 then fails to load, not reads another rope) and warned
    _config_only(tmp_path, {"rope_type": "rope_of_tomorrow", "rope_theta": 1e4})
    with pytest.warns(PortabilityWarning, match="'rope_of_tomorrow' does not exist in transformers 4.48"):
        make_portable(d)
    _config_only(tmp_path, {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}})
    with pytest.warns(PortabilityWarning, match="per layer type"):
        make_portable(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tmp_path / "config.json").write_text("{not json")
        assert misreadings(tmp_path) == []  # doctor's other checks report a broken config


def test_doctor_warns_and_export_fixes_a_copy(raw_folder, tmp_path):
    from tokengraft.doctor import check_folder
    from tokengraft.export import export
    from tokengraft.portable import misreadings

    before = _digest(raw_folder)
    found = [f for f in check_folder(raw_folder) if f.code == "old-transformers-misreads"]
    assert found and all(f.severity == "warning" for f in found)
    msg = next(f.message for f in found if "rope_theta" in f.message)
    assert "transformers 4.48 reads rope_theta 10000" in msg and f"tokengraft export {raw_folder} -o" in msg
    export(raw_folder, tmp_path / "fixed", log=lambda *a: None)
    assert misreadings(tmp_path / "fixed") == []
    assert not [f for f in check_folder(tmp_path / "fixed") if f.code == "old-transformers-misreads"]
    assert _digest(raw_folder) == before  # the input is never touched


def _cli(*args):
    import os
    import sys

    return subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.slow
def test_export_verify_python_runs_the_reload_there(raw_folder, tmp_path):
    """The CLI: export a folder transformers 5 wrote, verified by transformers 4.48's own reload."""
    py = _python("4.48")
    r = _cli("export", raw_folder, "-o", tmp_path / "out", "--verify", "--verify-python", py)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("verify:"))
    assert "verify: OK" in line and "reloaded by transformers 4.48.0" in line and "tolerance 1e-04" in line, line


def test_verify_python_refused_in_one_line(raw_folder, tmp_path):
    r = _cli("export", raw_folder, "-o", tmp_path / "out", "--verify", "--verify-python", tmp_path / "nope")
    assert r.returncode == 2 and "--verify-python" in r.stderr and "not an executable file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("export", raw_folder, "-o", tmp_path / "out", "--verify-python", "/bin/sh")
    assert r.returncode == 2 and "needs --verify" in r.stderr
    assert not (tmp_path / "out").exists()


def test_bare_vision_tower_keys_renamed_in_the_header(tmp_path):
    """5.x saves a CLIP tower as vision_tower.embeddings.*; 4.x would find none of it. The rename
    touches only the header: every tensor reads back bit-identical under its wrapped name."""
    from safetensors.torch import load_file, save_file

    from tokengraft.portable import make_portable, misreadings

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"},
                                                      "vision_config": {"model_type": "clip_vision_model"}}))
    (tmp_path / "preprocessor_config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    sd = {"vision_tower.embeddings.patch_embedding.weight": torch.randn(4, 3, 2, 2, generator=g),
          "vision_tower.vision_model.post_layernorm.bias": torch.randn(5, generator=g),  # already wrapped
          "language_model.model.embed_tokens.weight": torch.randn(7, 3, generator=g).to(torch.bfloat16)}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert any("randomly initialized tower" in m for m in misreadings(tmp_path))
    make_portable(tmp_path)
    back = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(back) == sorted(["vision_tower.vision_model.embeddings.patch_embedding.weight",
                                   "vision_tower.vision_model.post_layernorm.bias",
                                   "language_model.model.embed_tokens.weight"])
    assert torch.equal(back["vision_tower.vision_model.embeddings.patch_embedding.weight"],
                       sd["vision_tower.embeddings.patch_embedding.weight"])
    assert torch.equal(back["language_model.model.embed_tokens.weight"], sd["language_model.model.embed_tokens.weight"])
    assert misreadings(tmp_path) == [] and not list(tmp_path.glob("*.portable"))
