"""k = 1,000 new tokens (issue 14, "thousands of tokens"): the smallest case of bench/many_tokens.py
as a test, on real SmolLM2-135M (tied head)."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from tokengraft import graft
from tokengraft.graft import KL_BUDGET
from tokengraft.probe import head_inputs, heldout_text, kl_of_rows

K = 1000
LOCS = [f"<loc_{i}>" for i in range(K)]


def test_thousand_tokens_on_smollm2(smollm2, caplog):
    model, tok = smollm2
    hidden = head_inputs(model, tok, heldout_text(), max_tokens=1024)  # before: base rows only
    base_head = model.lm_head.weight.detach().clone()
    # (wall time is measured by bench/many_tokens.py, not asserted here: CI machines are shared)
    with caplog.at_level(logging.WARNING, logger="tokengraft"):
        man = graft(model, tok, LOCS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # within budget: no warning

    ids = [t.id for t in man.tokens]
    assert ids == list(range(49152, 49152 + K))                       # in the user's order
    assert man.rows == 50176 and man.tied                              # padded to a multiple of 64
    assert [tok.convert_tokens_to_ids(t) for t in LOCS] == ids
    text = "box " + "".join(LOCS[::97]) + " and <loc_999>x<loc_0>"
    got = tok(text, add_special_tokens=False)["input_ids"]
    want = [tok.convert_tokens_to_ids(t) for t in LOCS[::97]] + [ids[999], ids[0]]
    assert [i for i in got if i >= 49152] == want
    assert tok.decode(got) == text

    assert torch.equal(model.lm_head.weight[:49152], base_head)        # base rows untouched
    # held-out text: the joint calibration bounds the TOTAL cost of all k rows (plus padding)
    per = kl_of_rows(hidden, model.lm_head.weight, range(49152, man.rows))
    mass = -torch.expm1(-per)
    assert float(per.mean()) <= KL_BUDGET * 3, float(per.mean())      # calibrated on other prose
    assert float(mass.max()) <= 1e-3
    # k mean rows (transformers' mean_resizing, roughly) would cost ~k x one mean row: far more
    mean_rows = model.model.embed_tokens.weight[:49152].mean(0).expand(K, -1)
    from tokengraft.init import kl_of_added

    lse = torch.logsumexp(hidden @ base_head.float().T, dim=1)
    assert float(kl_of_added(hidden, lse, mean_rows.detach()).mean()) > 10 * float(per.mean())


def test_rows_mode_trainable_is_k_times_hidden(smollm2):
    """rows mode trains deltas for the k new rows only: k*H tied, 2*k*H untied; never V*H."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokengraft.train.params import prepare

    model, tok = smollm2
    man = graft(model, tok, LOCS, init="mean")
    ids = [t.id for t in man.tokens]
    plan = prepare(model, "rows", ids, True)
    assert plan.trainable == K * 576

    cfg = LlamaConfig(vocab_size=50176, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    untied = LlamaForCausalLM(cfg)
    plan = prepare(untied, "rows", ids, False)
    assert plan.trainable == 2 * K * 16
    x = torch.tensor([[1, 2, ids[0], ids[-1]]])
    plan.model(input_ids=x, labels=x).loss.backward()
    grads = [p for p in plan.model.parameters() if p.grad is not None]
    assert sum(p.numel() for p in grads) == 2 * K * 16                 # gradients: O(k*H) too


@pytest.mark.parametrize("n", [10000])
def test_parse_and_add_ten_thousand_tokens_to_tokenizer(smollm2_dir, tmp_path, n):
    """--tokens-file with 10,000 entries: parsed and added to the tokenizer in seconds."""
    import json

    from transformers import AutoTokenizer

    from tokengraft.graft import add_tokens, parse_tokens

    f = tmp_path / "tokens.json"
    f.write_text(json.dumps([f"<code_{i}>" for i in range(n)]))
    t0 = time.perf_counter()
    specs = parse_tokens(tokens_file=str(f))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    add_tokens(tok, [s.content for s in specs], True)
    assert time.perf_counter() - t0 < 60  # one call: ~1 s unloaded
    assert tok.convert_tokens_to_ids("<code_9999>") == 49152 + n - 1


def test_from_data_ten_thousand_tokens_through_preflight(smollm2_dir):
    """--tokens from-data with 10,000 semantic-ID tokens in the data: collected and counted by the
    pre-flight in one scan per text (a scan per token per text took minutes at this size)."""
    from transformers import AutoTokenizer

    from tokengraft.train.preflight import preflight, tokens_from_data

    n = 10000
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": "item?"},
        {"from": "gpt", "value": " ".join(f"<a_{j}>" for j in range(5 * i, 5 * i + 5)) + " done"}]}
        for i in range(n // 5)]
    records[0]["conversations"][1]["value"] += " <a_0> again"  # counted twice
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    t0 = time.perf_counter()
    found = tokens_from_data(records, r"<a_\d+>")
    assert found == [f"<a_{i}>" for i in range(n)]                     # natural order, each once
    rep = preflight(records, tok, found, template="chatml", max_length=256)
    took = time.perf_counter() - t0
    assert took < 60, took                                           # ~5 s unloaded
    assert rep.token_counts["<a_0>"] == 2 and rep.token_counts["<a_9999>"] == 1
    assert sum(rep.token_counts.values()) == n + 1
    assert not rep.unknown_tags and not rep.problems
    line = [x for x in rep.format().splitlines() if "new-token frequency" in x][0]
    assert line.endswith(f"... ({n - 40} more)")                     # one readable line, not 10,000
