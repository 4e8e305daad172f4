"""graft on real models and real tokenizers: every invariant of DESIGN.md that graft owns."""
from __future__ import annotations

import json

import pytest
import torch

from tokengraft import Manifest, ManifestError, fingerprint, graft, vocab_of
from tokengraft.graft import GraftError, parse_tokens
from tokengraft.hf import is_tied
from tokengraft.probe import head_inputs, kl_of_rows, mass_of, real_text

BOX = "<box>,</box>,<ref>"
LOCS = [f"<loc_{i}>" for i in range(40)]


def check_invariants(model, tok, manifest):
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) <= rows == manifest.rows                           # 1. never short
    cfg = model.config
    for c in (cfg, cfg.get_text_config()):                              # 4. every vocab_size field
        if getattr(c, "vocab_size", None) is not None:
            assert c.vocab_size == rows
    assert is_tied(model) == manifest.tied                              # 3. tie flag true to reality
    assert cfg.get_text_config().tie_word_embeddings == manifest.tied
    for t in manifest.tokens:                                           # each token: one id, everywhere
        assert tok.convert_tokens_to_ids(t.content) == t.id < rows
        ids = tok(f"x{t.content}y {t.content}{t.content}", add_special_tokens=False)["input_ids"]
        assert ids.count(t.id) == 3
    pad = list(range(len(tok), rows))                                   # 2. padding rows never generated
    assert set(pad) <= set(model.generation_config.suppress_tokens or [])
    assert manifest.vocab_fingerprint == fingerprint(vocab_of(tok))


@pytest.fixture(scope="module")
def smol_hidden(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return head_inputs(m, tok, real_text()), m.lm_head.weight.detach().clone()


@pytest.mark.parametrize("tokens", [BOX, LOCS], ids=["3 tokens", "40 tokens"])
def test_smollm2_graft_invariants_and_invisibility(smollm2, smol_hidden, tokens):
    model, tok = smollm2
    hidden, base_head = smol_hidden
    man = graft(model, tok, tokens)
    n = 3 if tokens == BOX else 40
    assert [t.id for t in man.tokens] == list(range(49152, 49152 + n))
    assert man.rows == 49216 and man.tied and man.base_size == 49152
    check_invariants(model, tok, man)
    assert torch.equal(model.lm_head.weight[:49152], base_head)        # base rows untouched
    per_pos = kl_of_rows(hidden, model.lm_head.weight, range(49152, man.rows))  # new + padding rows
    kl, mass = float(per_pos.mean()), mass_of(per_pos)
    # tied `auto` spends at most its 5e-7 budget (measured on this same probe text), plus
    # float error; 40 mean rows alone cost ~7.6e-7 (1.9e-8 each), so the bound grows with n.
    assert kl <= max(5e-7, n * 2.2e-8) * 1.05, kl
    assert mass < 1e-3


def test_save_reload_plain_transformers_identical_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.io import save_folder

    model, tok = smollm2
    man = graft(model, tok, BOX)
    save_folder(tmp_path / "out", model, tok, man)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    t2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(t2) == len(tok) and is_tied(m2)
    ids = t2("Where is the <ref>cat? <box></box>", return_tensors="pt")["input_ids"]
    assert (ids >= 49152).sum() == 3
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    assert Manifest.load(tmp_path / "out").tokens[0].content == "<box>"


def test_idempotent_append_and_history(smollm2):
    model, tok = smollm2
    man = graft(model, tok, "<a1>,<a2>")
    emb = model.get_input_embeddings().weight.detach().clone()
    logs = []
    man = graft(model, tok, "<a1>,<a2>", manifest=man, log=logs.append)
    assert len(man.history) == 1 and "already grafted" in logs[0]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    man = graft(model, tok, "<a2>,<a3>", manifest=man, log=logs.append)
    assert man.contents == ["<a1>", "<a2>", "<a3>"] and len(man.history) == 2
    assert man.rows == 49216  # <a3> reused a free padding row: no resize
    assert "no resize" in logs[-1]
    check_invariants(model, tok, man)


def test_tokens_already_in_vocab_are_reported_not_added(smollm2):
    model, tok = smollm2
    logs = []
    man = graft(model, tok, "<|im_end|>,<new>", log=logs.append)
    assert man.contents == ["<new>"]
    assert any("<|im_end|>" in line and "not added" in line for line in logs)


@pytest.mark.parametrize("bad,msg", [("<a>,,<b>", "empty"), ("<a>, ,<b>", "empty"),
                                     ("<a>,<a>", "twice"), ([{"content": "<a>", "role": "x"}], "role"),
                                     ([{"content": "<a>", "init": "describe"}], "description"),
                                     ([{"content": "<a>", "init": "bogus"}], "init")])
def test_bad_token_requests_are_clear_errors(bad, msg):
    with pytest.raises(GraftError, match=msg):
        parse_tokens(bad)


def test_tokens_file_yaml_and_json(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("- <box>\n- content: <ref>\n  description: a referring expression\n  role: generate\n"
                 "- {content: '<image>', role: input, special: true}\n")
    specs = parse_tokens(tokens_file=str(y))
    assert [s.content for s in specs] == ["<box>", "<ref>", "<image>"]
    assert specs[1].description == "a referring expression" and specs[2].role == "input"
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"tokens": ["<x>", {"content": "<y>", "init": "copy:hello"}]}))
    assert [s.init for s in parse_tokens(tokens_file=str(j))] == ["auto", "copy:hello"]
    (tmp_path / "bad.yaml").write_text("- [unclosed\n")
    with pytest.raises(GraftError, match="not valid YAML"):
        parse_tokens(tokens_file=str(tmp_path / "bad.yaml"))


def test_padded_vocabulary_reuses_free_rows(smollm2):
    """SmolLM2 padded to 49,216 rows (as Qwen2 pads 151,665 tokens to 151,936): no resize, no shrink."""
    model, tok = smollm2
    model.resize_token_embeddings(49216, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[49152:] = 0.0  # untrained padding rows, as shipped
    man = graft(model, tok, BOX)
    assert man.rows == 49216 and emb.shape[0] == 49216
    new = emb[49152:49155]
    assert (new.norm(dim=1) > 0.1 * emb[:49152].norm(dim=1).median()).all()  # initialized, not zero
    assert torch.all(emb[49155:] == 0)  # free padding rows nobody took are left as they were
    assert man.history[0]["reused_padding_rows"] == [49152, 49153, 49154]
    check_invariants(model, tok, man)


def test_untied_llama_with_real_mistral_tokenizer(mistral_v1_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(mistral_v1_dir)
    assert len(tok) == 32000
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         tie_word_embeddings=False))
    head0 = model.lm_head.weight.detach().clone()
    man = graft(model, tok, "<box>,</box>,<ref>,</ref>", pad_to_multiple_of=64)
    assert not man.tied and not is_tied(model) and man.rows == 32064
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    i = man.token("<ref>").id
    # input side semantic (subword "ref"), output side the mean of trained output rows
    pieces = tok("ref", add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[i], model.get_input_embeddings().weight[pieces].mean(0), atol=1e-6)
    assert torch.allclose(head[i], head0.mean(0), atol=1e-6)
    assert not torch.allclose(emb[i], head[i])
    check_invariants(model, tok, man)


def test_init_strategies_on_untied(mistral_v1_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(mistral_v1_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        model.get_input_embeddings().weight[100:200] = 0  # untrained rows must not drag the mean
    emb0 = model.get_input_embeddings().weight.detach().clone()
    src = tok.convert_ids_to_tokens(500)
    specs = [{"content": "<m>", "init": "mean"}, {"content": "<h>", "init": "hewitt"},
             {"content": "<d>", "init": "describe", "description": "bounding box"},
             {"content": "<c>", "init": f"copy:{src}"},
             {"content": "<box>", "init": "subword", "description": "bounding box"}]
    man = graft(model, tok, specs)
    emb = model.get_input_embeddings().weight
    trained = emb0.norm(dim=1) > 0
    mean = emb0[trained].mean(0)
    assert torch.allclose(emb[man.token("<m>").id], mean, atol=1e-6)
    h = emb[man.token("<h>").id]
    assert 0 < (h - mean).norm() < 0.05 * mean.norm() + 0.05
    desc = tok("bounding box", add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[man.token("<d>").id], emb0[desc].mean(0), atol=1e-6)
    assert torch.equal(emb[man.token("<c>").id], emb0[500])
    # subword reads the token's own name ("box"), not its description (that is `describe`)
    name = tok("box", add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[man.token("<box>").id], emb0[name].mean(0), atol=1e-6)
    assert [t.init for t in man.tokens] == ["mean", "hewitt", "describe", f"copy:{src}", "subword"]


def test_llava_image_token_and_processor_roundtrip(llava_dir, tmp_path):
    from PIL import Image

    from tokengraft.io import load_folder, save_folder

    model, tok, proc, man = load_folder(llava_dir)
    img_id = model.config.image_token_id
    assert tok.convert_ids_to_tokens(img_id) == "<image>" and man.token("<image>").role == "input"
    man = graft(model, tok, BOX, manifest=man, processor=proc)
    assert model.config.image_token_id == img_id and man.contents == ["<image>", "<box>", "</box>", "<ref>"]
    check_invariants(model, tok, man)
    save_folder(tmp_path / "llava2", model, tok, man, processor=proc)
    m2, t2, p2, man2 = load_folder(tmp_path / "llava2")
    assert p2.tokenizer.convert_tokens_to_ids("<box>") == man.token("<box>").id
    inputs = p2(images=Image.new("RGB", (64, 48), (200, 30, 30)), text="<image>\nWhere? <box>", return_tensors="pt")
    assert int((inputs["input_ids"] == img_id).sum()) == 49
    with torch.no_grad():
        a, b = model.eval()(**inputs).logits, m2.eval()(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert man2.rows == model.get_input_embeddings().weight.shape[0]


def test_tokenizer_with_image_tokens_mistral_v3(mistral_v3_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(mistral_v3_dir)
    assert len(tok) == 32768 and "[IMG]" in tok.get_vocab()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32768, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    logs = []
    man = graft(model, tok, "[IMG],<box>", log=logs.append)
    assert man.contents == ["<box>"] and any("[IMG]" in line for line in logs)
    assert man.token("<box>").id == 32768 and man.rows == 32832
    check_invariants(model, tok, man)


def test_qwen2_padded_vocab_from_llama_cpp(llama_cpp_vocab_dir):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(llama_cpp_vocab_dir, gguf_file="ggml-vocab-qwen2.gguf")
    n = len(tok)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    man = graft(model, tok, "<box>,</box>")
    assert man.rows >= 151936 and model.get_input_embeddings().weight.shape[0] == man.rows
    assert man.token("<box>").id == n
    check_invariants(model, tok, man)


def test_skip_special_tokens_behaviour(smollm2):
    """Documented in docs/add.md: special tokens vanish under skip_special_tokens=True."""
    model, tok = smollm2
    graft(model, tok, [{"content": "<box>"}, {"content": "<plain>", "special": False}],
          init="mean", pad_to_multiple_of=1)  # no probe pass needed: nothing here is about init
    ids = tok("a <box> b <plain> c", add_special_tokens=False)["input_ids"]
    assert "<box>" not in tok.decode(ids, skip_special_tokens=True)
    assert "<plain>" in tok.decode(ids, skip_special_tokens=True)
    assert "<box>" in tok.decode(ids, skip_special_tokens=False)


def test_manifest_schema_versions(tmp_path):
    m = Manifest(base_fingerprint="sha256:x", base_size=10, rows=64, tied=True)
    m.save(tmp_path)
    assert Manifest.load(tmp_path).rows == 64
    d = json.loads((tmp_path / "tokengraft.json").read_text())
    d["schema_version"] = 99
    (tmp_path / "tokengraft.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="newer than this tokengraft"):
        Manifest.load(tmp_path)
    (tmp_path / "tokengraft.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_kl_of_rows_is_the_direct_kl():
    """kl_of_rows (the closed form) equals KL computed from both softmaxes, bias included."""
    from tokengraft.probe import kl_of_rows, mass_of

    g = torch.Generator().manual_seed(0)
    w, b, h = torch.randn(50, 8, generator=g), torch.randn(50, generator=g), torch.randn(30, 8, generator=g) * 2
    new = [3, 17, 49]
    keep = [i for i in range(50) if i not in new]
    lp = torch.log_softmax(h @ w[keep].T + b[keep], -1)
    lq = torch.log_softmax(h @ w.T + b, -1)
    direct = (lp.exp() * (lp - lq[:, keep])).sum(-1)
    got = kl_of_rows(h, w, new, b, chunk=7)  # chunk boundaries inside the positions
    assert torch.allclose(got, direct, atol=1e-5, rtol=1e-4)
    assert abs(mass_of(got) - float(lq[:, new].exp().sum(-1).max())) < 1e-5
    assert float(kl_of_rows(h, w, []).abs().max()) == 0.0


# -- special tokens, as transformers registers them (issue 13) --------------------------------------

def _special_view(tok, contents):
    ids = tok.convert_tokens_to_ids(contents)
    return [(c in tok.all_special_tokens, i in tok.all_special_ids) for c, i in zip(contents, ids)]


def test_special_tokens_registered_like_transformers(smollm2_dir, tmp_path):
    """New special tokens join all_special_tokens/ids and are saved the way transformers' own
    add_special_tokens saves them; --not-special ones do not; a reload from disk keeps both."""
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    from tokengraft.io import save_folder

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    before = list(tok.all_special_tokens)
    model = tiny_llama(tok)
    man = graft(model, tok, [{"content": "<box>"}, {"content": "<plain>", "special": False}, {"content": "</box>"}],
                init="mean", log=lambda *a: None)
    assert _special_view(tok, ["<box>", "<plain>", "</box>"]) == [(True, True), (False, False), (True, True)]
    assert set(before) <= set(tok.all_special_tokens)  # the base's own special tokens stay
    ids = tok("a <box> b <plain> c </box>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).split() == ["a", "b", "<plain>", "c"]

    out = save_folder(tmp_path / "out", model, tok, man)
    ours = json.loads((out / "tokenizer_config.json").read_text())
    ref = AutoTokenizer.from_pretrained(smollm2_dir)
    ref.add_special_tokens({"extra_special_tokens": ["<box>", "</box>"]}, replace_extra_special_tokens=False)
    ref.save_pretrained(tmp_path / "ref")
    theirs = json.loads((tmp_path / "ref" / "tokenizer_config.json").read_text())
    # written under 4.x's key (portable.py: 4.48 cannot read 5.x's list), which 5.x reads as the same list
    assert ours.get("additional_special_tokens") == theirs.get("extra_special_tokens") == ["<box>", "</box>"]
    assert "extra_special_tokens" not in ours
    back = AutoTokenizer.from_pretrained(out)
    assert _special_view(back, ["<box>", "<plain>", "</box>"]) == [(True, True), (False, False), (True, True)]


def test_special_tokens_registered_on_llava(llava_dir, tmp_path):
    from transformers import AutoProcessor

    from tokengraft.io import load_folder, save_folder

    model, tok, proc, man = load_folder(llava_dir)
    man = graft(model, tok, "<box>,</box>", manifest=man, processor=proc, init="mean", log=lambda *a: None)
    assert _special_view(tok, ["<box>", "</box>"]) == [(True, True), (True, True)]
    assert "<image>" in tok.get_vocab()
    out = save_folder(tmp_path / "out", model, tok, man, processor=proc)
    back = AutoProcessor.from_pretrained(out).tokenizer
    assert _special_view(back, ["<box>", "</box>"]) == [(True, True), (True, True)]
    assert back.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")


def test_tied_auto_over_budget_warns(smollm2, caplog):
    """When even mean rows exceed the KL budget (thousands of tokens on a tied head; here a budget
    of 1e-15 stands in for them), graft says so instead of staying silent."""
    import logging

    model, tok = smollm2
    with caplog.at_level(logging.WARNING, logger="tokengraft"):
        graft(model, tok, "<box>,</box>", kl_budget=1e-15)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("x the budget" in m and "new tied rows" in m for m in msgs), msgs
