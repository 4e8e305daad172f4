"""The InternLM2 bridge: an InternLM2 folder (real SmolLM2 weights packed into InternLM2's layout, a
real sentencepiece tokenizer, planted remote code) read as Llama, tokenized as InternLM2 does, and
written back bit-exactly. The folder's Python files must never run (a marker file would appear)."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from internlm2_fixture import SPECIALS, build_internlm2, marker_path, reference_logits

from tokengraft import internlm2
from tokengraft.errors import TokengraftError

pytest.importorskip("sentencepiece")

ROPE = {"type": "linear", "factor": 2.0}  # exercised by the hand-written forward too


@pytest.fixture(scope="session")
def internlm2_dir(smollm2_dir, mistral_v1_dir, tmp_path_factory):
    """Read-only InternLM2 folder (4 real SmolLM2 layers, 32,006 rows, bf16). Never write into it."""
    return build_internlm2(smollm2_dir, mistral_v1_dir, tmp_path_factory.mktemp("il2") / "internlm2", layers=4,
                           rope_scaling=ROPE)


@pytest.fixture(scope="session")
def bridged(internlm2_dir):
    return internlm2.load_folder(internlm2_dir)


@pytest.fixture(autouse=True)
def no_remote_code(request):
    yield
    if "internlm2_dir" in request.fixturenames:
        d = request.getfixturevalue("internlm2_dir")
        assert not marker_path(d).exists(), f"a planted remote-code file ran: {marker_path(d).read_text()}"


def zen() -> str:
    import this

    return "".join(this.d.get(c, c) for c in this.s)


def prose() -> list[str]:
    from tokengraft.probe import heldout_text, real_text

    return [zen(), *real_text()[:3], *heldout_text()[:3],
            "def f(x):\n    if x:\n        return  x  # two spaces\n\treturn None\n",
            "<|im_start|>user\nWhat is in  the image?<|im_end|>\n<|im_start|>assistant\n",
            " leading space, trailing   ", "naïve café, 日本語, emoji 😀, math ∑∫"]


def sp_reference(sp_file, text: str, specials: dict[str, int]) -> list[int]:
    """InternLM2Tokenizer's algorithm from the sentencepiece library itself: bos, then the text cut at
    its special tokens (``specials``: content -> id), every other stretch ``SentencePieceProcessor.encode``d."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    ids = [sp.bos_id()]
    for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if chunk:
            ids += [specials[chunk]] if chunk in specials else sp.encode(chunk)
    return ids


# -- reading ----------------------------------------------------------------------------------------

def test_bridged_logits_equal_a_forward_from_the_packed_weights(internlm2_dir, bridged):
    model, tok, processor, manifest = bridged
    assert type(model).__name__ == "LlamaForCausalLM" and processor is None
    c = model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.tie_word_embeddings) == (3, 9, False)
    assert c.rope_parameters["rope_type"] == "linear" and c.rope_parameters["factor"] == 2.0
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    text = "<|im_start|>user\n" + zen()[:400] + "<|im_end|>\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 80 and SPECIALS and 32005 in ids[0].tolist()
    with torch.no_grad():
        got = model(ids).logits[0]
    ref = reference_logits(internlm2_dir, ids[0])
    assert ref.abs().max() > 1.0  # a real signal, not zeros
    assert (got - ref).abs().max().item() <= 1e-4
    assert manifest.history[-1]["op"] == "bridge" and manifest.history[-1]["source_arch"] == "internlm2"
    assert manifest.rows == 32006 and manifest.tied is False


def test_bin_weights_are_read_without_torch_load(internlm2_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    d.mkdir()
    for f in internlm2_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(internlm2_dir / "model.safetensors"))
    torch.save(sd, d / "pytorch_model.bin")

    def refuse(*a, **k):
        raise AssertionError("torch.load must not read a model folder's pickle")

    monkeypatch.setattr(torch, "load", refuse)
    got = internlm2.read_weights(d)
    assert sorted(got) == sorted(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_maps_are_inverse_and_refuse_unknown_keys():
    cfg = {"model_type": "internlm2", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 1, "intermediate_size": 48, "vocab_size": 10}
    g = torch.Generator().manual_seed(0)
    sd = {"model.tok_embeddings.weight": torch.randn(10, 32, generator=g),
          "model.layers.0.attention.wqkv.weight": torch.randn(2 * (2 + 2) * 8, 32, generator=g),
          "model.layers.0.attention.wo.weight": torch.randn(32, 32, generator=g),
          "model.layers.0.feed_forward.w1.weight": torch.randn(48, 32, generator=g),
          "model.layers.0.feed_forward.w2.weight": torch.randn(32, 48, generator=g),
          "model.layers.0.feed_forward.w3.weight": torch.randn(48, 32, generator=g),
          "model.layers.0.attention_norm.weight": torch.randn(32, generator=g),
          "model.layers.0.ffn_norm.weight": torch.randn(32, generator=g),
          "model.norm.weight": torch.randn(32, generator=g), "output.weight": torch.randn(10, 32, generator=g)}
    llama = internlm2.to_llama(sd, cfg)
    w = sd["model.layers.0.attention.wqkv.weight"].view(2, 4, 8, 32)  # kv head 1: q heads 2, 3, then k, v
    assert torch.equal(llama["model.layers.0.self_attn.q_proj.weight"][24:32], w[1, 1])
    assert torch.equal(llama["model.layers.0.self_attn.k_proj.weight"][8:16], w[1, 2])
    assert torch.equal(llama["model.layers.0.self_attn.v_proj.weight"][0:8], w[0, 3])
    back = internlm2.from_llama(llama, cfg)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(TokengraftError, match="attention.wqkv.bias"):
        internlm2.to_llama({**sd, "model.layers.0.attention.wqkv.bias": torch.zeros(64)}, cfg)


@pytest.mark.parametrize("change, field", [
    ({"bias": True}, "'bias'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "'rope_scaling'"),
    ({"tie_word_embeddings": True}, "'tie_word_embeddings'"),
])
def test_what_llama_cannot_represent_is_refused_by_field(internlm2_dir, tmp_path, change, field):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((internlm2_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(TokengraftError) as e:
        internlm2.load_folder(d)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and str(d) in msg


def test_dynamic_rope_matches_internlm2s_dynamic_ntk_past_max_positions(internlm2_dir, tmp_path):
    """Real InternLM2-7B configs declare dynamic rope scaling: the bridge maps it to transformers'
    dynamic NTK rope; on a sequence 2.5x longer than max_position_embeddings the bridged logits equal
    the hand-written InternLM2 forward with its dynamic base (and differ from unscaled rope)."""
    d = tmp_path / "dyn"
    shutil.copytree(internlm2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    (d / "config.json").write_text(json.dumps(cfg))
    model, tok, _, _ = internlm2.load_folder(d)
    ids = tok(zen(), return_tensors="pt").input_ids[:, :40]
    assert ids.shape[1] == 40
    with torch.no_grad():
        got = model(ids).logits[0].float()
    want = reference_logits(d, ids[0])
    assert (got - want).abs().max().item() <= 1e-4
    plain = {**cfg, "rope_scaling": None}
    (d / "config.json").write_text(json.dumps(plain))
    assert (reference_logits(d, ids[0]) - want).abs().max().item() > 1e-2  # the scaling is really exercised


# -- the tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_encodes_as_sentencepiece_does(internlm2_dir, bridged, tmp_path):
    from transformers import AutoTokenizer

    tok = bridged[1]
    specials = {**{c: 32000 + off for c, off in SPECIALS.items()}, "<s>": 1, "</s>": 2, "<unk>": 0}
    sp_file = internlm2_dir / "tokenizer.model"
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in prose():
        want = sp_reference(sp_file, text, specials)
        assert tok(text)["input_ids"] == want, text[:60]
        assert reloaded(text)["input_ids"] == want, text[:60]
    # whitespace runs, digits, byte fallback and specials in every arrangement
    rng = random.Random(0)
    alphabet = list(" \n\t  abcXYZ.,:'-_0123456789éü日本😀") + list(SPECIALS) + ["   ", "\n\n", "the", "ing "]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tok(text)["input_ids"] == sp_reference(sp_file, text, specials), repr(text)


def test_tokenizer_keeps_internlm2_special_tokens_and_template(bridged):
    tok = bridged[1]
    assert len(tok) == 32006
    for content, off in SPECIALS.items():
        assert tok.convert_tokens_to_ids(content) == 32000 + off
        assert tok.added_tokens_decoder[32000 + off].special
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "user\nhi"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_added_tokens_appended_after_the_pieces(internlm2_dir, mistral_v1_dir, tmp_path):
    """A tokenizer.model without InternLM2's pieces: added_tokens_decoder entries follow it, at their ids."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((mistral_v1_dir / "tokenizer.model").read_bytes())
    tc = json.loads((internlm2_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = internlm2.load_tokenizer(d)
    assert [tok.convert_tokens_to_ids(c) for c in SPECIALS] == list(range(32000, 32006))
    text = "<|im_start|>user\n" + zen()[:200] + "<|im_end|>\n"
    assert tok(text)["input_ids"] == sp_reference(d / "tokenizer.model", text,
                                                  {c: 32000 + off for c, off in SPECIALS.items()})
    tc["added_tokens_decoder"]["32010"] = tc["added_tokens_decoder"].pop("32005")  # a gap
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(TokengraftError, match="32010"):
        internlm2.load_tokenizer(d)


# -- writing back -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact(internlm2_dir, tmp_path, dtype):
    from safetensors.torch import load_file

    model, tok, _, manifest = internlm2.load_folder(internlm2_dir, dtype)
    out = internlm2.save_folder(model, tok, tmp_path / "rt", internlm2_dir, manifest=manifest)
    a, b = load_file(str(internlm2_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in internlm2_dir.iterdir():  # config (auto_map), tokenizer files, remote code: all as they were
        if f.name != "model.safetensors":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    written = json.loads((out / "tokengraft.json").read_text())
    assert written["history"][-1]["layout"] == "internlm2"


def test_new_tokens_are_written_into_the_internlm2_layout(internlm2_dir, bridged, tmp_path):
    import copy

    from safetensors.torch import load_file

    from tokengraft.graft import graft

    model, tok, _, manifest = (copy.deepcopy(x) for x in bridged)
    manifest = graft(model, tok, ["<box>", "</box>", "<ref>"], manifest=manifest)
    out = internlm2.save_folder(model, tok, tmp_path / "g", internlm2_dir, manifest=manifest)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 32064 and cfg["auto_map"] and cfg["model_type"] == "internlm2"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert {tc["added_tokens_decoder"][str(i)]["content"] for i in (32006, 32007, 32008)} == {"<box>", "</box>", "<ref>"}
    assert "<box>" in tc["additional_special_tokens"]
    assert (out / "tokenizer.model").read_bytes() == (internlm2_dir / "tokenizer.model").read_bytes()
    # every tensor is the grafted model's, packed, in the original dtype
    want = {k: v.to(torch.bfloat16) for k, v in internlm2.from_llama(model.state_dict(), cfg).items()}
    got = load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    _, t2, _, man2 = internlm2.load_folder(out)
    text = "a <box>1 2</box> <ref>the cat</ref>"
    assert t2(text)["input_ids"] == tok(text)["input_ids"] and t2.convert_tokens_to_ids("<ref>") == 32008
    assert [h["op"] for h in man2.history][-3:] == ["add", "layout", "bridge"]
    assert [t.content for t in man2.tokens] == ["<box>", "</box>", "<ref>"]


def test_save_refuses_a_model_of_another_shape(internlm2_dir, smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(TokengraftError, match="num_hidden_layers 30 vs 4"):
        internlm2.save_folder(model, tok, tmp_path / "x", internlm2_dir)
    assert not (tmp_path / "x").exists()


# -- the commands -----------------------------------------------------------------------------------

def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "tokengraft", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


def test_cli_add_then_doctor(internlm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "added"
    r = _cli("add", internlm2_dir, "--tokens", "<box>,</box>,<ref>", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("doctor", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    man = json.loads((out / "tokengraft.json").read_text())
    assert [h["op"] for h in man["history"]] == ["bridge", "add"]
    assert man["history"][0]["source_arch"] == "internlm2"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    assert not list(out.glob("*.py"))
    # plain transformers reads the output; on text without the new tokens it computes what InternLM2 did
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(zen()[:300], return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(ids).logits[0, :, :32006]
    assert (got - reference_logits(internlm2_dir, ids[0])).abs().max().item() <= 1e-4
    assert tok.convert_tokens_to_ids("<ref>") == 32008


def test_doctor_reads_a_raw_internlm2_folder_through_the_bridge(internlm2_dir, tmp_path):
    """No remote-code error for InternLM2 (the bridge reads it; the planted .py files stay unimported),
    while the same auto_map on another model type is still reported."""
    r = _cli("doctor", internlm2_dir, "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    codes = {f["code"] for f in json.loads(r.stdout)["findings"]}
    assert "remote-code" not in codes and "tokenizer-unloadable" not in codes, codes
    other = tmp_path / "other"
    shutil.copytree(internlm2_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "internlm3"}))
    r = _cli("doctor", other, "--json")
    assert r.returncode == 1 and "remote-code" in {f["code"] for f in json.loads(r.stdout)["findings"]}


def test_export_uses_the_source_the_manifest_records(internlm2_dir, tmp_path):
    from safetensors.torch import load_file

    model, tok, _, manifest = internlm2.load_folder(internlm2_dir, torch.bfloat16)
    assert internlm2.bridge_source(manifest) == internlm2_dir.resolve()
    out = internlm2.export_internlm2(model, tok, tmp_path / "e", manifest)
    a, b = load_file(str(internlm2_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)
    manifest.history = [h for h in manifest.history if h["op"] != "bridge"]
    with pytest.raises(TokengraftError, match="records no InternLM2 source"):
        internlm2.export_internlm2(model, tok, tmp_path / "f", manifest)


def test_a_tokenizer_the_bridge_cannot_reproduce_is_refused(mistral_v1_dir, tmp_path, monkeypatch):
    """Sentencepiece options the bridge does not implement are refused by name; and the load-time check
    against the sentencepiece library catches a pipeline that encodes differently (here: sentencepiece's
    dummy prefix left out)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString((mistral_v1_dir / "tokenizer.model").read_bytes())
    m.normalizer_spec.remove_extra_whitespaces = True
    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(m.SerializeToString())
    with pytest.raises(TokengraftError, match="remove_extra_whitespaces"):
        internlm2.load_tokenizer(d)

    from tokenizers import normalizers

    from tokengraft.internlm2 import tokenizer as sp_tokenizer

    real = sp_tokenizer._sp_backend

    def no_dummy_prefix(proto):
        bpe, _, pre, dec = real(proto)
        return bpe, normalizers.Replace(" ", "\u2581"), pre, dec

    monkeypatch.setattr(sp_tokenizer, "_sp_backend", no_dummy_prefix)
    with pytest.raises(TokengraftError, match="does not tokenize this sentencepiece model exactly"):
        internlm2.load_tokenizer(mistral_v1_dir)


def test_cli_export_layout_internlm2_round_trips_and_llama_layout_keeps_tokenizer_model(internlm2_dir, smollm2_dir,
                                                                                       tmp_path):
    """add -> export --layout internlm2 --verify: every original tensor bit-exact (the grown rows keep
    the old rows), the new tokens in the original tokenizer files; the default llama layout carries
    tokenizer.model for llama.cpp's converter; a non-InternLM2 model is refused in one line."""
    from safetensors.torch import load_file

    added = tmp_path / "added"
    assert _cli("add", internlm2_dir, "--tokens", "<box>,</box>,<ref>", "-o", added).returncode == 0
    out = tmp_path / "back"
    r = _cli("export", added, "-o", out, "--layout", "internlm2", "--verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verify: OK" in r.stdout + r.stderr
    a, b = load_file(str(internlm2_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k].shape == b[k].shape:
            assert torch.equal(a[k], b[k]), k
        else:  # the vocabulary tensors: old rows unchanged, >= three new rows (graft pads the row count)
            assert b[k].shape[0] >= a[k].shape[0] + 3 and torch.equal(b[k][: a[k].shape[0]], a[k]), k
    rows = b["model.tok_embeddings.weight"].shape[0]
    cfg, orig = json.loads((out / "config.json").read_text()), json.loads((internlm2_dir / "config.json").read_text())
    assert cfg == {**orig, "vocab_size": rows}
    tc = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"] for v in tc.values()} >= {"<box>", "</box>", "<ref>"}
    man = json.loads((out / "tokengraft.json").read_text())
    assert man["history"][-1]["layout"] == "internlm2"

    llama = tmp_path / "llama"
    assert _cli("export", added, "-o", llama).returncode == 0
    assert (llama / "tokenizer.model").read_bytes() == (internlm2_dir / "tokenizer.model").read_bytes()
    r = _cli("export", smollm2_dir, "-o", tmp_path / "no", "--layout", "internlm2")
    assert r.returncode == 2 and "records no InternLM2 source" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("mode", ["rows", "lora"])
def test_cli_train_on_internlm2_then_export_verify(internlm2_dir, tmp_path, mode):
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Where is thing {i}?"},
                                              {"from": "gpt", "value": f"<ref>thing</ref><box>{i}</box>"}]}
            for i in range(8)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(recs))
    run = tmp_path / "run"
    r = _cli("train", "--model", internlm2_dir, "--data", data, "--output-dir", run, "--mode", mode,
             "--tokens", "<box>,</box>,<ref>,</ref>", "--template", "internlm2", "--batch-size", "2",
             "--max-length", "64", "--max-steps", "2", "--no-progress", "--no-tensorboard")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "export"
    r = _cli("export", run, "-o", out, "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "verify: OK" in r.stdout + r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] >= 32006 + 4


def test_convert_an_xtuner_internlm2_checkpoint_to_the_new_internlm2_folder(internlm2_dir, tmp_path):
    """The original user's path: tokens added (Llama layout), written back as InternLM2 for XTuner, and the
    old XTuner iter_N.pth (InternLM2 key names, 32,006 rows) converted to it: same format out, old rows
    by token identity, new rows initialized; the raw InternLM2 folder is the source tokenizer (read by
    the bridge, never its remote code)."""
    from safetensors.torch import load_file

    from tokengraft.checkpoint.safe_pickle import safe_load

    added = tmp_path / "added"
    assert _cli("add", internlm2_dir, "--tokens", "<box>,</box>,<ref>", "-o", added).returncode == 0
    new_llm = tmp_path / "new_llm"
    assert _cli("export", added, "-o", new_llm, "--layout", "internlm2").returncode == 0
    packed = load_file(str(internlm2_dir / "model.safetensors"))
    sd = {f"llm.{k}": v for k, v in packed.items()}
    sd["projector.model.0.weight"] = torch.randn(8, 4)
    torch.save({"meta": {"iter": 4}, "state_dict": sd, "message_hub": {}}, tmp_path / "iter_4.pth")
    r = _cli("convert", tmp_path / "iter_4.pth", "--to", new_llm, "-o", tmp_path / "iter_4_new.pth",
             "--source-tokenizer", internlm2_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    out = safe_load(tmp_path / "iter_4_new.pth")["state_dict"]
    rows = json.loads((new_llm / "config.json").read_text())["vocab_size"]
    for k in ("llm.model.tok_embeddings.weight", "llm.output.weight"):
        assert out[k].shape[0] == rows and torch.equal(out[k][:32006], packed[k[4:]]), k
        assert torch.isfinite(out[k][32006:32009]).all() and (out[k][32006:32009].norm(dim=1) > 0).all(), k
    assert torch.equal(out["llm.model.layers.0.attention.wqkv.weight"], packed["model.layers.0.attention.wqkv.weight"])
