"""HF folders: sharded safetensors keep their sharding; untouched shards are hard links; .bin stays
.bin; config vocab sizes follow; transformers loads the result; the source is never modified."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from checkpoint_helpers import word_tokenizer, words

from tokengraft.checkpoint import read_state_dict
from tokengraft.checkpoint.convert import convert

SRC = words(94) + ["<a>", "<b>", "<c>"] + [None] * 3  # 97 tokens, 100 rows (3 padding rows)
TGT = words(94) + ["<c>", "<d>", "<a>"]


def tiny_llama(vocab_rows, tied=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("folders")
    model = tiny_llama(100)
    src = d / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    word_tokenizer([t for t in SRC if t]).save_pretrained(src)
    target = d / "target"
    word_tokenizer(TGT).save_pretrained(target)
    return d, src, target, model


def test_sharded_folder_keeps_layout_and_links_clean_shards(sharded, tmp_path):
    d, src, target, model = sharded
    before = digest(src)
    out = tmp_path / "out"
    report = convert(src, target, out, log=lambda *a: None)
    assert digest(src) == before  # the source is untouched
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 3 and sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    dirty = {idx["model.embed_tokens.weight"], idx["lm_head.weight"]}
    for s in shards:  # untouched shards are the same file (hard link), vocabulary shards are new files
        same = (out / s).stat().st_ino == (src / s).stat().st_ino
        assert same == (s not in dirty), s
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 100  # rows never shrink: the source had 100 rows (padded)
    assert json.loads((out / "tokengraft.json").read_text())["history"][-1]["op"] == "convert"
    assert set(report.dropped.values()) == {"<b>"} and set(report.new.values()) == {"<d>"}

    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(out)
    e_old, e_new = model.model.embed_tokens.weight, new.model.embed_tokens.weight
    h_old, h_new = model.lm_head.weight, new.lm_head.weight
    assert torch.equal(e_new[:94], e_old[:94]) and torch.equal(h_new[:94], h_old[:94])
    for tok in ("<a>", "<c>"):
        s, t = SRC.index(tok), TGT.index(tok)
        assert torch.equal(e_new[t], e_old[s]) and torch.equal(h_new[t], h_old[s])
    d_row = TGT.index("<d>")
    assert torch.allclose(h_new[d_row], h_old[:97].mean(0), atol=1e-6)  # output side: mean of trained rows
    assert torch.equal(e_new[97:], e_old[97:])  # padding rows stay where they were
    # the rest of the model is bit-identical
    sd_old, sd_new = model.state_dict(), new.state_dict()
    for k in sd_old:
        if "embed_tokens" not in k and "lm_head" not in k:
            assert torch.equal(sd_old[k], sd_new[k]), k


def test_bin_folder_stays_bin(sharded, tmp_path):
    _, _, target, model = sharded
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    model.config.save_pretrained(src)
    out = tmp_path / "out"
    convert(src, target, out, source_tokenizer=str(sharded[1]), log=lambda *a: None)
    assert (out / "pytorch_model.bin").is_file() and not (out / "model.safetensors").exists()
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert sd["lm_head.weight"].shape == (100, 32)
    assert torch.equal(sd["lm_head.weight"][TGT.index("<a>")], model.lm_head.weight[SRC.index("<a>")])


def test_bin_folder_as_safetensors_when_asked(sharded, tmp_path):
    _, _, target, model = sharded
    src = tmp_path / "bin"
    src.mkdir()
    sd = model.state_dict()
    half = len(sd) // 2
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for f, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, src / f)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    model.config.save_pretrained(src)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(src), "--to", str(target), "-o", str(out),
                        "--source-tokenizer", str(sharded[1]), "--safetensors"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    assert not list(out.glob("*.bin")) and (out / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    new = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(new.lm_head.weight[TGT.index("<a>")], model.lm_head.weight[SRC.index("<a>")])
    assert torch.equal(new.model.norm.weight, model.model.norm.weight)


def test_existing_output_needs_overwrite(sharded, tmp_path):
    _, src, target, _ = sharded
    out = tmp_path / "out"
    convert(src, target, out, log=lambda *a: None)  # an earlier conversion: tokengraft wrote it
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        convert(src, target, out, log=lambda *a: None)
    assert (out / "keep").read_text() == "x"
    convert(src, target, out, overwrite=True, log=lambda *a: None)
    assert not (out / "keep").exists() and (out / "config.json").exists()
    plain = tmp_path / "plain"  # a folder tokengraft did not write is never replaced
    plain.mkdir()
    (plain / "keep").write_text("x")
    with pytest.raises(ValueError, match="not written by tokengraft"):
        convert(src, target, plain, overwrite=True, log=lambda *a: None)
    assert (plain / "keep").read_text() == "x"


def test_read_state_dict_formats_agree(sharded, tmp_path):
    _, src, _, model = sharded
    from safetensors.torch import save_file

    ref = model.state_dict()
    torch.save(ref, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in ref.items() if k != "lm_head.weight"} | {"lm_head.weight": ref["lm_head.weight"].clone()},
              tmp_path / "w.safetensors")
    for p in (src, tmp_path / "w.pt", tmp_path / "w.safetensors"):
        sd, info = read_state_dict(p)
        assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref), p


def test_streamed_convert_equals_in_memory_remap(sharded, tmp_path, monkeypatch):
    """The disk-to-disk path (row chunks, pread runs) writes exactly what the in-memory remap
    computes; tiny chunks force many chunk boundaries and runs."""
    from transformers import AutoTokenizer

    from tokengraft.checkpoint import newrows as R
    from tokengraft.checkpoint import stream as S
    from tokengraft.checkpoint.remap import remap_state_dict

    _, src, target, _ = sharded
    monkeypatch.setattr(R, "CHUNK_ROWS", 7)
    monkeypatch.setattr(S, "CHUNK_ROWS", 7)
    monkeypatch.setattr(S, "OUT_CHUNK_BYTES", 3 * 32 * 4)  # 3 rows of 32 floats
    out = tmp_path / "out"
    convert(src, target, out, log=lambda *a: None)
    got, _ = read_state_dict(out)
    ref_in, _ = read_state_dict(src)
    ref, _ = remap_state_dict(ref_in, [t for t in SRC if t], TGT, target_rows=100,
                              tokenizer=AutoTokenizer.from_pretrained(target))
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_checkpoint_keys_match_in_memory_names():
    """load_checkpoint maps on-disk layouts (LLaVA classic, XTuner `llm.`) to a model's own names."""
    from tokengraft.checkpoint.load import match_keys

    disk = ["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.linear_1.weight"]
    mem = ["model.language_model.embed_tokens.weight", "lm_head.weight",
           "model.vision_tower.vision_model.post_layernorm.weight", "model.multi_modal_projector.linear_1.weight"]
    assert match_keys(disk, mem) == dict(zip(disk, mem))
    assert match_keys(["llm.output.weight"], ["output.weight"]) == {"llm.output.weight": "output.weight"}
    # ambiguous after stripping prefixes: left unmatched rather than guessed
    assert match_keys(["x.weight"], ["model.x.weight", "llm.x.weight"]) == {}


def test_package_exposes_functions():
    import tokengraft
    from tokengraft import checkpoint

    assert callable(checkpoint.convert) and callable(checkpoint.read_state_dict) and callable(checkpoint.safe_load)
    assert tokengraft.load_checkpoint is checkpoint.load_checkpoint
    assert tokengraft.remap_state_dict is checkpoint.remap_state_dict


def test_target_given_as_a_manifest(tmp_path):
    """TARGET may be a tokengraft.json alone: the target tokenizer is the checkpoint's base plus the
    manifest's tokens at their ids, and the rows are the manifest's."""
    from transformers import AutoTokenizer

    from tokengraft.manifest import AddedToken, Manifest
    from tokengraft.vocab import fingerprint

    base = words(96)
    model = tiny_llama(96)
    src = tmp_path / "src"
    model.save_pretrained(src)
    word_tokenizer(base).save_pretrained(src)
    m = Manifest(base_fingerprint=fingerprint(base), base_size=96, rows=128, tied=False,
                 tokens=[AddedToken("<x>", 96), AddedToken("<y>", 97, role="input")])
    m.save(tmp_path)
    out = tmp_path / "out"
    convert(src, tmp_path / "tokengraft.json", out, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 98 and tok.convert_tokens_to_ids("<x>") == 96 and tok.convert_tokens_to_ids("<y>") == 97
    sd, _ = read_state_dict(out)
    assert sd["lm_head.weight"].shape == (128, 32)
    assert torch.equal(sd["lm_head.weight"][:96], model.lm_head.weight[:96])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    assert [t["content"] for t in json.loads((out / "tokengraft.json").read_text())["tokens"]] == ["<x>", "<y>"]
    # without a tokenizer for the checkpoint, the manifest alone cannot name the rows
    (tmp_path / "bare").mkdir()
    for f in src.iterdir():
        if f.name.startswith(("model", "config")):
            (tmp_path / "bare" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="--source-tokenizer"):
        convert(tmp_path / "bare", tmp_path / "tokengraft.json", tmp_path / "out2", log=lambda *a: None)
    assert not (tmp_path / "out2").exists()


def test_trainer_checkpoint_folder_resumes_with_remapped_moments(sharded, tmp_path):
    """A transformers Trainer checkpoint-N folder: optimizer.pt is remapped with the weights, the
    other resume files travel unchanged."""
    _, src_tok, target, _ = sharded
    model = tiny_llama(100, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[94, 95, 96, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ck = tmp_path / "checkpoint-10"
    model.save_pretrained(ck)
    word_tokenizer([t for t in SRC if t]).save_pretrained(ck)
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    (ck / "trainer_state.json").write_text('{"global_step": 10}')
    torch.save({"last_epoch": 10}, ck / "scheduler.pt")
    out = tmp_path / "out"
    convert(ck, target, out, log=lambda *a: None)
    assert (out / "trainer_state.json").read_text() == '{"global_step": 10}'
    assert (out / "scheduler.pt").read_bytes() == (ck / "scheduler.pt").read_bytes()
    from transformers import AutoModelForCausalLM

    new_model = AutoModelForCausalLM.from_pretrained(out)
    opt2 = torch.optim.AdamW(new_model.parameters(), lr=1e-2)
    opt2.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    names = [n for n, _ in model.named_parameters()]
    i = names.index("lm_head.weight")
    old_m, new_m = opt.state_dict()["state"][i]["exp_avg"], opt2.state_dict()["state"][i]["exp_avg"]
    for tok in ("<a>", "<c>", "w5"):
        assert torch.equal(new_m[TGT.index(tok)], old_m[SRC.index(tok)])
    assert torch.count_nonzero(new_m[TGT.index("<d>")]) == 0
    new_model(input_ids=ids, labels=ids).loss.backward()
    opt2.step()  # resumes
