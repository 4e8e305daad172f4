"""Round trip on real SmolLM2-135M: graft A = <a>,<b>,<c>, train-like changes to those rows, then
carry A to B = <c>,<d>,<a> (another order): shared rows exact, base rows exact, <d> initialized,
<b> reported dropped. Through `tokengraft convert` (subprocess) and `load_checkpoint` (in memory)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tokengraft.checkpoint import load_checkpoint, read_state_dict

A, B = "<a>,<b>,<c>", "<c>,<d>,<a>"
BASE = 49152


@pytest.fixture(scope="module")
def grafted(smollm2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokengraft.graft import graft
    from tokengraft.io import save_folder

    d = tmp_path_factory.mktemp("smollm2-rt")
    # pad_to_multiple_of=1 + init=mean: no probe forward pass needed to build the fixtures (speed);
    # what is under test is the carrying of rows, not the graft's own initialization
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    man = graft(model, tok, A, init="mean", pad_to_multiple_of=1, log=lambda *a: None)
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as training would: the new rows move, a few base rows move a little
        for t in A.split(","):
            emb[tok.convert_tokens_to_ids(t)] += 0.05 * torch.randn(emb.shape[1], generator=g)
        emb[100:110] += 1e-3 * torch.randn(10, emb.shape[1], generator=g)
    save_folder(d / "A", model, tok, man)
    a_rows = emb.detach().clone()
    a_ids = {t: tok.convert_tokens_to_ids(t) for t in A.split(",")}
    del model

    # B: a fresh base with the tokens grafted in another order; the target needs only its
    # tokenizer, config and manifest
    model_b = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok_b = AutoTokenizer.from_pretrained(smollm2_dir)
    man_b = graft(model_b, tok_b, B, init="mean", pad_to_multiple_of=1, log=lambda *a: None)
    tok_b.save_pretrained(d / "B")
    model_b.config.save_pretrained(d / "B")
    man_b.save(d / "B")
    return d, a_rows, a_ids, model_b, tok_b


def _check(E, a_rows, a_ids, tok_b, report_new, report_dropped):
    assert E.shape == (BASE + 3, 576)
    assert torch.equal(E[:BASE], a_rows[:BASE])  # base rows exact (including the ones "training" moved)
    for t in ("<a>", "<c>"):
        assert torch.equal(E[tok_b.convert_tokens_to_ids(t)], a_rows[a_ids[t]])
    d = tok_b.convert_tokens_to_ids("<d>")
    # <d> is new: tied head, so the output-safe mean over trained base rows
    from tokengraft.init import mean_row, trained_mask

    mean = mean_row(a_rows, trained_mask(a_rows, BASE + 3))
    assert torch.allclose(E[d], mean, atol=1e-6) and E[d].norm() > 0
    assert list(report_new.values()) == ["<d>"]
    assert list(report_dropped.values()) == ["<b>"]


def test_convert_cli_round_trip(grafted, tmp_path):
    d, a_rows, a_ids, _, tok_b = grafted
    out = tmp_path / "A-on-B"
    r = subprocess.run([sys.executable, "-m", "tokengraft", "convert", str(d / "A"), "--to", str(d / "B"),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dropped: <b>" in r.stdout and "<d> (id" in r.stdout
    sd, _ = read_state_dict(out)
    man = json.loads((out / "tokengraft.json").read_text())
    step = man["history"][-1]
    assert step["op"] == "convert" and step["dropped"] == {str(a_ids["<b>"]): "<b>"}
    _check(sd["model.embed_tokens.weight"], a_rows, a_ids, tok_b,
           {int(k): v for k, v in step["new"].items()}, step["dropped"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE + 3
    assert (out / "tokenizer.json").read_bytes() == (d / "B" / "tokenizer.json").read_bytes()


def test_load_checkpoint_round_trip(grafted):
    d, a_rows, a_ids, model_b, tok_b = grafted
    report = load_checkpoint(model_b, d / "A", tok_b)
    assert report.assumed is None and "own tokenizer" in report.source_how
    _check(model_b.get_input_embeddings().weight.detach(), a_rows, a_ids, tok_b, report.new, report.dropped)
    assert model_b.lm_head.weight is model_b.get_input_embeddings().weight  # still tied
    # the model still speaks: greedy continuation of a real prompt is unchanged by the carry
    ids = tok_b("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model_b(ids).logits[0, -1].argmax()
    assert tok_b.decode(nxt).strip() == "Paris"


def test_light_tokenizer_agrees_with_transformers(grafted):
    """convert reads tokenizer.json with `tokenizers` alone (no transformers import); it must see
    exactly what AutoTokenizer sees."""
    from transformers import AutoTokenizer

    from tokengraft.checkpoint.sources import light_tokenizer
    from tokengraft.vocab import vocab_of

    d = grafted[0]
    for folder in (d / "A", d / "B"):
        light, full = light_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert light is not None and vocab_of(light) == vocab_of(full)
        for text in ("loc_17", "box", "The capital of France <a> is"):
            assert light(text)["input_ids"] == full(text, add_special_tokens=False)["input_ids"]
