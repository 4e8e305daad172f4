"""`--init distill`: input rows fitted so a new token acts like its description (real SmolLM2, tied)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

TOKENS = [{"content": "<think>", "description": "let me reason step by step"},
          {"content": "</tool>", "description": "end of the function call"}]


def test_graft_distill_changes_only_new_rows_keeps_budget_and_beats_the_start(smollm2):
    from tokengraft import distill
    from tokengraft.graft import KL_BUDGET, graft
    from tokengraft.probe import head_inputs, heldout_text, kl_of_rows

    model, tok = smollm2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_base = len(tok)
    man = graft(model, tok, TOKENS, init="distill", log=lambda *_: None)
    ids = [man.token(t["content"]).id for t in TOKENS]
    assert all(man.token(t["content"]).init.startswith("distill") for t in TOKENS)
    for n, p in model.named_parameters():
        if p.shape == before[n].shape:  # the embedding grew: compare its base rows below
            assert torch.equal(p, before[n]), f"{n} changed"
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[:n_base], before["model.embed_tokens.weight"][:n_base])
    # the invisibility budget holds on prose graft never saw (tied: the fitted row is the head row)
    hidden = head_inputs(model, tok, heldout_text(), max_tokens=512)
    kl = kl_of_rows(hidden, emb, range(n_base, emb.shape[0]))
    assert float(kl.mean()) <= 2 * KL_BUDGET
    # zero-shot, on held-out prose, before the tied blend: the fitted rows act more like the
    # descriptions than the sub-word mean they started from
    descs = [t["description"] for t in TOKENS]
    fitted = distill.fit_rows(model, tok, ids, descs, n_base=n_base)
    pieces = distill._description_pieces(tok, ids, descs, n_base)
    start = torch.stack([emb[p].detach().float().mean(0) for p in pieces])
    kl_start = distill.zero_shot_kl(model, tok, ids, descs, start, heldout_text())
    kl_fit = distill.zero_shot_kl(model, tok, ids, descs, fitted, heldout_text())
    # measured under load: 1.63 -> 1.31 nats (x0.80) with the default 12 steps
    assert float(kl_fit.mean()) < 0.9 * float(kl_start.mean()), (kl_fit, kl_start)


def test_fit_rows_is_deterministic_and_leaves_the_model_alone(smollm2):
    from tokengraft.distill import fit_rows

    model, tok = smollm2
    ids = tok.convert_tokens_to_ids(["hello"])
    w = model.get_input_embeddings().weight.detach().clone()
    a = fit_rows(model, tok, ids, ["a friendly greeting"], steps=3, seed=3)
    b = fit_rows(model, tok, ids, ["a friendly greeting"], steps=3, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(model.get_input_embeddings().weight, w)
    assert not any(p.requires_grad is False for p in model.parameters())  # restored as it was


def test_missing_description_is_one_line_error(smollm2, tmp_path):
    from tokengraft.distill import DistillError, fit_rows
    from tokengraft.graft import GraftError, parse_tokens

    model, tok = smollm2
    with pytest.raises(DistillError, match="has no description"):
        fit_rows(model, tok, [42], [""], steps=1)
    with pytest.raises(GraftError, match="init 'distill' needs a description"):
        parse_tokens([{"content": "<x>", "init": "distill"}])


def test_cli_distill_without_description_exits_2(smollm2_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokengraft", "add", str(smollm2_dir), "--tokens", "<x>",
                        "--init", "distill", "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "needs a description" in err[0], r.stderr
    assert not (tmp_path / "out").exists()
